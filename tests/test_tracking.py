"""[log]: per-step scalars in steps.jsonl, TensorBoard and MLflow from a real 2-rank run resumed once, one run id."""

import importlib.util
import json
import sys

import pytest

from caldera.cli import main
from tests.conftest import run_ranks

# 64 training samples in global batches of 16: 4 steps an epoch.
BASE = ["train", "examples/heat_surrogate.toml", "--set", "data.args.n_samples=80", "--set", "data.args.grid=16",
        "--set", "data.args.steps=10", "--set", "data.batch_size=16", "--set", "data.val_fraction=0.2",
        "--set", "model.args.channels=4", "--set", "optim.warmup_steps=4", "--set", "parallel.strategy=allreduce",
        "--set", "train.plot=false", "--set", "train.progress=false", "--set", "log.every_steps=1"]  # fmt: skip
# W&B is in the tracking extra, not the test one (its wheel is large and starts a service): checked when installed.
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


@pytest.mark.mpi
def test_two_ranks_resumed_log_one_run_with_per_step_curves(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The same run in this process, logged every 2nd step: allreduce on 2 ranks takes the same steps as one process.
    ref = tmp_path / "one"
    backends = "[wandb]" if HAS_WANDB else "[]"
    alone = ["--set", f"run.dir={ref}", "--set", "optim.epochs=1", "--set", f"log.backends={backends}"]
    assert main([*BASE, *alone, "--set", "log.every_steps=2"]) == 0
    one = {r["step"]: r for r in rows(ref)}
    assert sorted(one) == [2, 4]

    run_dir = tmp_path / "two"
    args = [
        "-m",
        "caldera.cli",
        *BASE,
        "--set",
        f"run.dir={run_dir}",
        "--set",
        "log.backends=[tensorboard, mlflow]",
    ]
    first = run_ranks(2, [*args, "--set", "optim.epochs=1"])
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((run_dir / "tracking.json").read_text())
    second = run_ranks(2, [*args, "--set", "optim.epochs=2", "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "global step 4" in second.stdout
    kept = json.loads((run_dir / "tracking.json").read_text())
    assert kept["mlflow"] == state["mlflow"] and kept["tensorboard"] == state["tensorboard"]

    # steps.jsonl: every step once, over both legs; the first epoch's numbers as one process's (loss, lr, norm).
    two = rows(run_dir)
    assert [r["step"] for r in two] == list(range(1, 9))
    for r in (two[1], two[3]):
        ref_row = one[r["step"]]
        assert r["epoch"] == ref_row["epoch"] == 1 and r["train/lr"] == pytest.approx(ref_row["train/lr"])
        assert r["train/loss"] == pytest.approx(ref_row["train/loss"], rel=1e-4)
        assert r["train/grad_norm"] == pytest.approx(ref_row["train/grad_norm"], rel=1e-3)
    for r in two:
        assert r["train/samples_per_s"] > 0 and 0 <= r["train/data_wait"] < 1 and r["train/grad_norm"] > 0
        assert 0 < r["system/rss_gb"] <= r["system/peak_rss_gb"] and r["system/host_mem_used_gb"] > 0
    # The per-step losses of an epoch (equal batches) average to the epoch's train_loss.
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for epoch, logged in enumerate(epochs, start=1):
        mean = sum(r["train/loss"] for r in two if r["epoch"] == epoch) / 4
        assert mean == pytest.approx(logged["train_loss"], rel=1e-6)

    # MLflow: one run in the file store, the recorded one, its loss history covering both legs once.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [state["mlflow"]["run_id"]]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["optim.lr"] == "0.002"
    history = client.get_metric_history(state["mlflow"]["run_id"], "train/loss")
    assert [m.step for m in history] == [r["step"] for r in two]
    assert [m.value for m in history] == pytest.approx([r["train/loss"] for r in two])
    assert [m.step for m in client.get_metric_history(state["mlflow"]["run_id"], "epoch/val_loss")] == [4, 8]

    # TensorBoard: the same per-step scalars, in one event file per leg (rank 1 wrote none).
    assert len(list((run_dir / "tensorboard").iterdir())) == 2
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/data_wait", "train/grad_norm",
            "system/rss_gb", "epoch/train_loss"} <= set(events.Tags()["scalars"])  # fmt: skip
    curve = events.Scalars("train/loss")
    assert [e.step for e in curve] == [r["step"] for r in two]
    assert [e.value for e in curve] == pytest.approx(
        [r["train/loss"] for r in two], rel=1e-6
    )  # float32 there

    if HAS_WANDB:  # offline: the run's files under <run dir>/wandb, named by the id tracking.json keeps
        run_id = json.loads((ref / "tracking.json").read_text())["wandb"]["id"]
        (found,) = (ref / "wandb").glob(f"offline-run-*-{run_id}")
        assert (found / f"run-{run_id}.wandb").stat().st_size > 0


def test_a_missing_backend_package_or_a_wrong_log_key_is_one_line(tmp_path, monkeypatch, capsys):
    base = [*BASE, "--set", f"run.dir={tmp_path}", "--set", "optim.epochs=1"]
    assert main([*base, "--set", "log.every_step=5"]) == 2
    assert "unknown key 'log.every_step'. Did you mean 'every_steps'?" in capsys.readouterr().err
    assert main([*base, "--set", "log.backends=[tensorbord]"]) == 2
    assert "'log.backends.0' = 'tensorbord'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what Python does for a package that cannot be imported
    assert main([*base, "--set", "log.backends=[mlflow]"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "mlflow needs the mlflow package; pip install 'caldera[tracking]'" in err
    )
    assert not (tmp_path / "steps.jsonl").exists()
