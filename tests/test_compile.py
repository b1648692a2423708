"""[train] compile = true: torch.compile of the module the strategy runs forward on, against the eager run.

Inductor may reorder float operations (fused kernels sum in another order), so compiled weights equal eager ones to
rounding, not bit for bit: after 2 epochs of SGD (56 steps) on the digits MLP the differences measured are ~1e-7;
the tolerance (rtol 1e-5, atol 1e-6) leaves room for that and still fails on any real difference (a skipped step,
a lost gradient, a wrong average moves weights by ~1e-3). Each process compiles once: the tiny MLP takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caldera.config import ConfigError, load_config
from caldera.train.run import train
from caldera.train.trainer import Trainer
from tests.conftest import run_ranks

RUN = {
    "model": {"name": "mlp", "args": {"sizes": [64, 32, 10]}},
    "data": {"source": "digits", "batch_size": 64, "val_fraction": 0.0, "drop_last": True},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 2},
    "train": {"loss": "cross_entropy", "progress": False, "plot": False},
    "run": {"seed": 3},
}


def _cfg(run_dir: Path, strategy: str = "single", epochs: int = 2, compile: bool = False):
    return load_config({**RUN, "run": {**RUN["run"], "dir": str(run_dir)},
                        "optim": {**RUN["optim"], "epochs": epochs},
                        "train": {**RUN["train"], "compile": compile},
                        "parallel": {"strategy": strategy}})  # fmt: skip


def _toml(cfg_dir: Path, run_dir: Path) -> Path:
    path = cfg_dir / "compiled_allreduce.toml"
    path.write_text(f"""
[run]
dir = "{run_dir}"
seed = 3
[model]
name = "mlp"
args = {{sizes = [64, 32, 10]}}
[data]
source = "digits"
batch_size = 64
val_fraction = 0.0
drop_last = true
[optim]
name = "sgd"
lr = 0.05
momentum = 0.9
epochs = 2
[train]
loss = "cross_entropy"
progress = false
plot = false
compile = true
[parallel]
strategy = "allreduce"
""")
    return path


@pytest.fixture(scope="module")
def eager(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The eager single-process run's final weights (2 epochs)."""
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    train(_cfg(run_dir))
    return torch.load(run_dir / "model.pt", weights_only=True)


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)  # the same plain keys, in order: no "_orig_mod." prefix
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_compiled_run_equals_eager_and_resumes(tmp_path, eager, capsys):
    """Compiled: one epoch, a checkpoint, a resumed second epoch -> the eager run's weights; files keep plain keys."""
    run_dir = tmp_path / "run"
    train(_cfg(run_dir, epochs=1, compile=True))
    log = capsys.readouterr().out
    assert "compiling the model (torch.compile, mode default) took" in log
    shared = torch.load(sorted((run_dir / "checkpoints").glob("*/shared.pt"))[-1], weights_only=True)
    assert list(shared["model"]) == list(eager)
    train(_cfg(run_dir, epochs=2, compile=True), resume=True)
    assert "resumed from" in capsys.readouterr().out
    _assert_close(torch.load(run_dir / "model.pt", weights_only=True), eager)


@pytest.mark.mpi
def test_compiled_allreduce_two_ranks_equals_eager(tmp_path, eager):
    """2 ranks, allreduce, compiled (gradient hooks and buckets on the compiled module's parameters) -> the eager
    single-process run with the same global batch."""
    run_dir = tmp_path / "run"
    proc = run_ranks(2, ["-m", "caldera.cli", "train", str(_toml(tmp_path, run_dir))], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiling the model") == 1, proc.stdout  # rank 0 logs it
    _assert_close(torch.load(run_dir / "model.pt", weights_only=True), eager)


def test_compile_refusals_are_one_line(tmp_path):
    """Strategies that do not run the trainer's compiled module are refused in one line, by the run file and by
    the Trainer; a mode torch.compile does not have is named."""
    with pytest.raises(ConfigError) as exc:
        _cfg(tmp_path, strategy="pipeline", compile=True)
    assert "[train] compile: strategy 'pipeline'" in str(exc.value) and "\n" not in str(exc.value)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError) as exc:
        Trainer(model, opt, torch.nn.functional.mse_loss, strategy="async-shared", compile=True)
    assert "does not pickle" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        Trainer(model, opt, torch.nn.functional.mse_loss, compile="fastest")
