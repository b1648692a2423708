"""caldera tune at allocation scale on real ranks: a pruned search stopped mid-way (SIGTERM -> exit 85) and resumed
to exactly its number of trials; 2-rank data-parallel trials on 4 ranks with a two-objective Pareto front."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from caldera.checkpoint import REQUEUE_EXIT_CODE
from caldera.cli import main
from tests.conftest import ROOT, mpiexec, run_ranks
from tests.test_launch import env

# Digits, a narrow CNN, two epochs per trial; ASHA prunes at the first epoch whatever is not in the better half.
SEARCH = ["-m", "caldera.cli", "tune", "examples/digits_tune.toml", "--set", "optim.epochs=2",
          "--set", "model.args.channels=4", "--set", "tune.space={optim.lr: {low: 0.0003, high: 0.03, log: true}}",
          "--set", "tune.pruner=asha", "--set", "tune.pruner_args={min_resource: 1, reduction_factor: 2}",
          "--trials", "8"]  # fmt: skip


def table(run_dir):
    with open(run_dir / "tune" / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.mpi
def test_a_pruned_search_stopped_mid_way_resumes_to_the_same_study(tmp_path, capsys):
    mpiexec()  # skips when there is no MPI
    cmd = [*SEARCH, "--set", f"run.dir={tmp_path}"]
    # caldera launch passes SIGTERM on as SIGUSR1, as Slurm's --signal does: each rank stops its trial.
    proc = subprocess.Popen([sys.executable, "-m", "caldera.cli", "launch", "-n", "2", "--", sys.executable, *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())  # fmt: skip
    try:
        deadline, record = time.monotonic() + 120, tmp_path / "tune" / "trials.csv"
        # Both ranks have told a trial: the search is under way and every rank's stop handler is in place (a rank
        # still importing torch would die of the signal, as any Python process does).
        while not (record.exists() and {"0", "1"} <= {r["rank"] for r in table(tmp_path)}):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "study.journal" in err and "exit code 85" in err
    stopped = table(tmp_path)
    counted = [r for r in stopped if r["state"] != "retried"]
    assert 2 <= len(counted) < 8, stopped  # stopped in the middle
    # Without --resume the study is not overwritten; with it, the search finishes the same study (a time limit
    # already spent stops it again before any trial starts).
    assert main(cmd[2:]) == 2 and "continue it with `caldera tune --resume`" in capsys.readouterr().err
    assert main([*cmd[2:], "--resume", "--time-limit", "0"]) == REQUEUE_EXIT_CODE
    assert "stopped (time limit on rank 0)" in capsys.readouterr().err and table(tmp_path) == stopped
    done = run_ranks(2, [*cmd, "--resume"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = table(tmp_path)
    counted = [r for r in final if r["state"] != "retried"]
    assert len(counted) == 8 and {r["state"] for r in counted} <= {"complete", "pruned"}, final
    assert any(r["state"] == "pruned" for r in counted) and {r["rank"] for r in counted} == {"0", "1"}
    for r in stopped:  # what was told before the stop is kept as it was
        if r["state"] in ("complete", "pruned"):
            assert next(f for f in final if f["trial"] == r["trial"]) == r
    for r in (r for r in final if r["state"] == "retried"):  # a trial cut short ran again with its parameters
        assert any(f["optim.lr"] == r["optim.lr"] and f["state"] != "retried" for f in final), final
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert best["trials"] == 8 and best["pruned"] == sum(r["state"] == "pruned" for r in counted)
    assert done.stdout.count("best of 8 trials (0 failed") == 1


@pytest.mark.mpi
def test_two_rank_trials_on_four_ranks_train_data_parallel_for_a_pareto_front(tmp_path):
    # Phantom images (each trial's group writes its own stack, its statistics reduced over its two ranks only),
    # a U-Net whose width is searched: val_loss against the parameter count.
    small = ["--set", "data.args={n: 16, size: 16, patch: [16, 16], patch_stride: [16, 16], dose_range: [2, 100]}",
             "--set", "data.batch_size=4", "--set", "data.num_workers=0", "--set", "optim.epochs=1",
             "--set", "optim.warmup_steps=0", "--set", "parallel.strategy=allreduce", "--set", "data.val_fraction=0.25",
             "--set", "tune.ranks_per_trial=2", "--set", "tune.metric=[val_loss, params]",
             "--set", "tune.direction=[minimize, minimize]", "--set", "tune.sampler=grid",
             "--set", "tune.space={model.args.channels: [2, 8]}"]  # fmt: skip
    cmd = [
        "-m",
        "caldera.cli",
        "tune",
        "examples/imaging_denoise.toml",
        "--set",
        f"run.dir={tmp_path}",
        *small,
    ]
    proc = run_ranks(4, cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table(tmp_path)
    assert [r["state"] for r in rows] == ["complete"] * 2
    assert {r["rank"] for r in rows} == {"0", "2"}  # one trial per group; each group's rank 0 tells the study
    for r in rows:  # each trial trained on its two ranks, on its own stack
        trial = tmp_path / "trials" / f"trial-000{r['trial']}"
        assert "2 rank(s), global batch 4 = 2 x 2" in (trial / "trial.log").read_text()
        assert (trial / "phantoms.h5").stat().st_size > 0
    size = {r["model.args.channels"]: float(r["params"]) for r in rows}
    assert size["2"] < size["8"]
    front = json.loads((tmp_path / "tune" / "best.json").read_text())["pareto"]
    scores = {int(r["trial"]): (float(r["val_loss"]), float(r["params"])) for r in rows}
    beaten = {
        t
        for t, (a, b) in scores.items()
        for c, d in scores.values()
        if c <= a and d <= b and (c, d) != (a, b)
    }
    assert sorted(e["trial"] for e in front) == sorted(
        set(scores) - beaten
    )  # exactly the trials nothing beats
    assert (tmp_path / "tune" / "pareto.png").stat().st_size > 0
    assert proc.stdout.count("Pareto front of 2 trials") == 1
