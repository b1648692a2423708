"""Checkpoint/restart: kill -9 and resume gives the same weights bit for bit; corrupt checkpoints are skipped;
SIGTERM checkpoints and exits for a requeue; `caldera launch --max-restarts` finishes a job that lost a rank."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

import caldera
from caldera.checkpoint import REQUEUE_EXIT_CODE, Checkpointer, parse_duration, parse_interval, verify
from tests.conftest import ROOT, run_ranks

SCRIPT = "tests/scripts/ckpt_train.py"


def run_local(*args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def run(ranks, *args):
    return run_local(*args) if ranks == 1 else run_ranks(ranks, [SCRIPT, *map(str, args)])


def weights(run_dir):
    return torch.load(run_dir / "model.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The unbroken run's directory for a rank count, trained once per module (checkpoint frequency does not
    change the weights, so every test of that rank count compares against the same run)."""
    done = {}

    def get(ranks):
        if ranks not in done:
            done[ranks] = tmp_path_factory.mktemp(f"ref{ranks}")
            assert run(ranks, done[ranks], "--every", "1000").returncode == 0
        return done[ranks]

    return get


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("ranks", "kill_at"), [(1, 17), pytest.param(2, 23, marks=pytest.mark.mpi)])
def test_kill9_then_resume_gives_identical_weights(tmp_path, reference, ranks, kill_at):
    ref, broken = reference(ranks), tmp_path / "broken"
    died = run(ranks, broken, "--kill-at", kill_at)
    assert died.returncode != 0
    survivors = Checkpointer(broken / "checkpoints", caldera.init()).list()
    assert survivors, "no checkpoint survived the kill"
    assert all(int(p.name.split("-")[1]) <= kill_at for p in survivors)
    resumed = run(ranks, broken, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert_same(weights(ref), weights(broken))
    rows = [json.loads(x) for x in (broken / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    assert run_local(tmp_path, "--epochs", "1", "--sync").returncode == 0
    ckpt = Checkpointer(tmp_path / "checkpoints", caldera.init(), keep=2)
    older, newest = ckpt.list()[-2:]
    data = bytearray((newest / "shared.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "shared.pt").write_bytes(bytes(data))
    assert "checksum" in verify(newest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.latest() == older
    assert any("unusable" in str(w.message) and newest.name in str(w.message) for w in caught)
    # A checkpoint whose manifest never got written (killed mid-commit) is not even a candidate.
    (older / "manifest.json").unlink()
    assert "manifest.json missing" in verify(older)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.mpi)])
def test_sigterm_checkpoints_and_exits_with_the_requeue_code(tmp_path, reference, ranks):
    proc = run(ranks, tmp_path, "--term-at", 9, "--every", "1000")
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stdout + proc.stderr[-2000:]
    assert "PREEMPTED at step 9" in proc.stdout and "SIGTERM" in proc.stdout
    ckpt = Checkpointer(tmp_path / "checkpoints", caldera.init())
    assert ckpt.latest().name == "step-000000009"
    assert run(ranks, tmp_path, "--resume", "--every", "1000").returncode == 0
    assert_same(weights(reference(ranks)), weights(tmp_path))


@pytest.mark.mpi
def test_launch_max_restarts_finishes_a_job_that_lost_a_rank(tmp_path, reference):
    ref = reference(2)
    job = tmp_path / "job"
    proc = subprocess.run([sys.executable, "-m", "caldera.cli", "launch", "-n", "2", "--max-restarts", "1", "--",
                           sys.executable, SCRIPT, str(job), "--kill-at", "20"], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "restart 1 of 1" in proc.stderr and "resumed from" in proc.stdout
    assert_same(weights(ref), weights(job))


def test_cli_resume_and_time_limit(tmp_path, capsys):
    from caldera.cli import main

    run_dir = tmp_path / "heat"
    # In this process: the command's code path without an interpreter start per call.
    base = ["train", "examples/heat_surrogate.toml", "--set", f"run.dir={run_dir}", "--set", "data.args.n_samples=128",
            "--set", "optim.epochs=2", "--set", "checkpoint.every=2", "--set", "train.plot=false"]  # fmt: skip
    assert main([*base, "--time-limit", "0"]) == REQUEUE_EXIT_CODE
    err = capsys.readouterr().err
    assert "time limit" in err and "step-000000001" in err
    assert main([*base, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "global step 1" in out
    shared = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "shared.pt", weights_only=False)
    assert set(shared["model"]) == set(torch.load(run_dir / "model.pt"))  # plain torch reads the weights


def test_intervals_parse():
    assert parse_interval(500) == (500, None) and parse_interval("90s") == (None, 90)
    assert parse_interval("10m") == (None, 600) and parse_interval(None) == (None, None)
    assert parse_duration("01:59:00") == 7140 and parse_duration("1-00:00:10") == 86410
    assert parse_duration("2h") == 7200
    with pytest.raises(ValueError, match="'90s'"):
        parse_interval("soon")


def test_resuming_a_finished_run_trains_nothing_more(tmp_path):
    assert run_local(tmp_path, "--sync").returncode == 0
    before = weights(tmp_path)
    again = run_local(tmp_path, "--resume", "--sync")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "epoch 4, step 0" in again.stdout
    assert_same(before, weights(tmp_path))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
