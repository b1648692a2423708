"""Progress output in batch logs: plain periodic lines, no terminal control sequences; the bar on a terminal."""

from __future__ import annotations

import io

import pytest

from caldera.train.progress import Bar, Lines, plain_output, progress_bar
from tests.conftest import run_ranks


def test_plain_lines_come_once_per_interval_and_at_the_end(monkeypatch):
    t = [100.0]
    out: list[str] = []
    lines = Lines(
        "epoch {task.fields[epoch]}", {"epoch": "-", "loss": "-"}, out.append, interval=30, now=lambda: t[0]
    )
    for step in range(1, 101):  # 100 steps, 1 s each
        t[0] += 1
        lines.update(1, None, 100, 0, {"epoch": f"{(step - 1) // 50 + 1}/2", "loss": f"{1 / step:.3g}"})
    lines.close()
    lines.close()  # a second close repeats nothing
    # The first update (step 1) starts the clock at t=101; lines at 131, 161, 191 s, then the final state.
    assert out == [
        "epoch 1/2  31/100  loss 0.0323  elapsed 0:00:30  remaining 0:01:06",
        "epoch 2/2  61/100  loss 0.0164  elapsed 0:01:00  remaining 0:00:38",
        "epoch 2/2  91/100  loss 0.011  elapsed 0:01:30  remaining 0:00:08",
        "epoch 2/2  100/100  loss 0.01  elapsed 0:01:39  remaining 0:00:00",
    ]
    # NO_COLOR (or TERM=dumb) makes even a terminal plain: a Bar writes lines, not rich redraws.
    monkeypatch.setenv("NO_COLOR", "1")
    assert plain_output()
    buf = io.StringIO()
    with Bar("trials", {"best": "-"}, file=buf, clock="elapsed") as bar:
        bar.update(advance=1, total=3, best="0.5")
    assert (
        buf.getvalue().startswith("trials  1/3  best 0.5  elapsed 0:00:00") and "\x1b" not in buf.getvalue()
    )
    assert type(progress_bar(True, "predicting", terminal_only=True)).__name__ == "NullBar"


@pytest.mark.mpi
def test_a_two_rank_job_under_mpiexec_writes_a_small_log_without_control_sequences(tmp_path):
    # Open MPI hands each rank's stdout a pseudo-terminal although the job's output here is a pipe: rich saw a
    # terminal and redrew the bar (128 KB and ~7 600 escape sequences for the main job on 2 ranks).
    proc = run_ranks(2, ["-m", "caldera.cli", "train", "examples/heat_surrogate.toml",
                         "--set", "optim.epochs=2", "--set", "data.args.n_samples=300", "--set", "data.args.grid=16",
                         "--set", "parallel.strategy=allreduce", "--set", f"run.dir={tmp_path / 'run'}"],
                     env={"TERM": "xterm-256color", "CALDERA_PROGRESS_INTERVAL": "0.2"})  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "\x1b" not in log and "\r" not in log
    assert len(log.encode()) < 4096, log
    epochs = [line for line in log.splitlines() if line.startswith("epoch ") and "train_loss" in line]
    assert [line.split()[1] for line in epochs] == ["1", "2"], log
    assert "val_rel_l2" in epochs[-1]
    # The bar's own plain lines: at least the final one, with the whole count.
    assert any(line.startswith("epoch 2/2  16/16  loss ") for line in log.splitlines()), log
    assert (tmp_path / "run" / "metrics.jsonl").exists()
