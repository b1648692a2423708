"""One RunDir, one evaluation routine, one progress bar: what train writes reads back through the same names."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

from caldera.comm import LocalComm
from caldera.config import Config, load_config
from caldera.errors import ConfigError
from caldera.train.evaluate import Scores
from caldera.train.metrics import METRICS
from caldera.train.progress import Bar, NullBar, progress_bar
from caldera.train.run import load_run_model, load_runs, train
from caldera.train.rundir import RunDir

RUN_FILE = """
[run]
dir = "{dir}"
[model]
name = "mlp"
args = {{sizes = [64, 16, 10]}}
[data]
source = "digits"
batch_size = 128
val_fraction = 0.2
[optim]
epochs = 2
lr = 0.01
[train]
loss = "cross_entropy"
metrics = ["accuracy"]
progress = false
plot = false
"""


def test_a_trained_run_reads_back_through_rundir_and_scores_and_bars_are_shared(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(RUN_FILE.format(dir=tmp_path / "run"))
    cfg = load_config(config)
    history = train(cfg, config)
    files = RunDir(cfg.run_dir)
    names = {p.name for p in files.path.iterdir()}
    assert {"config.toml", "config.resolved.json", "model.pt", "summary.json", "run.json", "metrics.jsonl",
            "metrics.csv", "checkpoints"} <= names, names  # fmt: skip
    # Every write went through a temporary name and a rename: none is left behind.
    assert not list(files.path.rglob("*.tmp"))
    # The formats the CLI, predict and serve read: unchanged bytes.
    assert (files.path / "config.toml").read_bytes() == config.read_bytes()
    assert files.config_resolved.read_text() == json.dumps(cfg.model_dump(), indent=2)
    assert files.metrics(history).rows == [json.loads(line) for line in (files.path / "metrics.jsonl").open()]
    assert json.loads(files.summary.read_text())["final"] == history[-1]
    assert json.loads(files.identity.read_text())["start_step"] == 0
    assert files.missing() == []

    # The model comes back through the trust check and a tensors-only load, with the trained weights.
    model = load_run_model(files, Config.model_validate(files.read_config()))
    saved = torch.load(files.weights, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # Scores: sums weighted by samples give the mean over all samples, however the batches are cut.
    x, y = torch.randn(10, 64), torch.randint(0, 10, (10,))
    with torch.no_grad():
        out = model(x)
    scores = Scores(torch.nn.functional.cross_entropy, {"accuracy": METRICS["accuracy"]})
    scores.add(out[:3], y[:3], 3)
    scores.add(out[3:], y[3:], 7)
    got = scores.reduce(LocalComm(), "val_")
    assert abs(got["val_loss"] - torch.nn.functional.cross_entropy(out, y).item()) < 1e-6
    assert got["val_accuracy"] == (out.argmax(1) == y).float().mean().item()
    counted = Scores(None)  # predictions without targets: samples counted, nothing scored
    counted.add(out, y, 10)
    assert counted.reduce(LocalComm()) == {}

    # Progress: off ranks and quiet runs get a bar that does nothing; rank 0's shows label, count and fields.
    assert type(progress_bar(False, "trials")) is NullBar
    sink = io.StringIO()
    with progress_bar(True, "trials", {"best": "-"}, file=sink, clock="elapsed") as bar:
        assert isinstance(bar, Bar)
        bar.update(advance=2, total=3, best="0.5")
        bar.update(advance=1, best="0.25")
    text = sink.getvalue()
    assert "trials" in text and "3/3" in text and "best 0.25" in text, text
    # Runs scored side by side (seeds): loaded alike, refused with one line when their data differ or are missing.
    other = tmp_path / "other"
    shutil.copytree(files.path, other)
    resolved = json.loads((other / "config.resolved.json").read_text())
    resolved["data"]["batch_size"] = 64
    (other / "config.resolved.json").write_text(json.dumps(resolved))
    models, cfgs = load_runs([files.path, other], lambda c: c.data.source)
    assert len(models) == 2 and cfgs[1].data.batch_size == 64
    assert all(torch.equal(v, saved[k]) for k, v in models[1].state_dict().items())
    with pytest.raises(ConfigError, match="other: 64 differ from .*run's 128; compare runs that differ only"):
        load_runs([files.path, other], lambda c: c.data.batch_size)
    with pytest.raises(ConfigError, match="missing config.resolved.json, model.pt: give finished run"):
        load_runs([files.path, tmp_path / "nowhere"], lambda c: c.data.source)
