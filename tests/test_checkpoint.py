"""Checkpoint/restart: kill -9 and resume gives the same weights bit for bit, having trained only the steps after
the checkpoint; corrupt, unloadable or hostile (pickle) checkpoints are skipped for the previous good one; SIGTERM
checkpoints and exits for a requeue; `caldera launch --max-restarts` finishes a job that lost a rank; a fresh run
sets another run's checkpoints aside; a resume under a changed config is one line (exit 2) unless --force."""

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import caldera
from caldera.checkpoint import (
    REQUEUE_EXIT_CODE,
    Checkpointer,
    parse_duration,
    parse_interval,
    rng_state,
    verify,
)
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


def assert_ran_from(run_dir, step):
    """The process that finished the run started at checkpoint ``step`` and trained only the steps after it (a
    resume that restored nothing would retrain from step 0 and, being deterministic, still match the weights)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["start_step"], summary["steps_run"]) == (step, summary["steps"] - step), summary


# Two ranks only: the single-process resume is test_sigterm_checkpoints_and_exits_with_the_requeue_code[1], and a kill
# -9 while rank 0 writes is what the atomic commit must survive whatever the rank count.
@pytest.mark.mpi
@pytest.mark.parametrize(("ranks", "kill_at"), [(2, 23)])
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
    assert_ran_from(broken, int(survivors[-1].name.split("-")[1]))
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
    assert_ran_from(tmp_path, 9)


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
    assert json.loads((job / "summary.json").read_text())["start_step"] > 0  # the relaunch continued


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
    shared = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "shared.pt", weights_only=True)
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
    assert_ran_from(tmp_path, 39)


class Payload:
    """A pickle that runs a command when unpickled without weights_only (what a hostile checkpoint would hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_the_newest_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    assert run_local(tmp_path, "--epochs", "1", "--sync").returncode == 0
    before = weights(tmp_path)
    older, newest = Checkpointer(tmp_path / "checkpoints", caldera.init()).list()[-2:]
    marker = tmp_path / "PWNED"
    shared = torch.load(newest / "shared.pt", weights_only=True)
    torch.save({**shared, "extra": Payload(marker)}, newest / "shared.pt")
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["shared.pt"]["bytes"] = (
        (newest / "shared.pt").stat().st_size
    )  # sizes agree: it verifies
    (newest / "manifest.json").write_text(json.dumps(manifest))
    assert verify(newest) is None
    torch.load(
        newest / "shared.pt", weights_only=False
    )  # the payload is live: unpickling it runs the command
    assert marker.exists()
    marker.unlink()
    resumed = run_local(tmp_path, "--resume", "--epochs", "1", "--sync")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not marker.exists()
    assert f"resumed from {older}" in resumed.stdout
    assert newest.name in resumed.stderr and "refused unloaded" in resumed.stderr
    assert_same(before, weights(tmp_path))
    assert_ran_from(tmp_path, int(older.name.split("-")[1]))


def same_state(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b


def test_byte_flip_sweep_each_flip_loads_equal_or_falls_back(tmp_path):
    """Flip single bytes of a small shared.pt: every flip either verifies and loads the very same state, or makes
    the checkpoint unusable (a warning) and the load falls back to the previous one; never an exception."""
    world = caldera.init(seed=0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = Checkpointer(tmp_path, world, keep=5)
    for step in (1, 2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        shared = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": 0,
            "history": [{"l": 0.5}],
        }
        ckpt.save(step, shared, {"rng": rng_state(), "partial": (0.0, 0)}, block=True)
    older, newest = ckpt.list()
    file = newest / "shared.pt"
    original = file.read_bytes()
    reference = torch.load(file, weights_only=True)
    # A seeded sample (the whole file, 2 717 bytes, takes ~12 s and passed): both ends of the archive, where the
    # zip headers are, plus random bytes in between.
    offsets = sorted({*range(60), *range(len(original) - 400, len(original)),
                      *random.Random(17).sample(range(len(original)), 150)})  # fmt: skip
    outcomes = {"equal": 0, "fell back": 0}
    for i in offsets:
        flipped = bytearray(original)
        flipped[i] ^= 0xFF
        file.write_bytes(bytes(flipped))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shared, _, where = ckpt.load()
        if where == newest:
            assert same_state(reference, shared), f"byte {i}: loaded a different state"
            outcomes["equal"] += 1
        else:
            assert where == older and any(newest.name in str(w.message) for w in caught), i
            outcomes["fell back"] += 1
    assert outcomes["equal"] > 0 and outcomes["fell back"] > 100, outcomes


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys, warnings
    from pathlib import Path
    import torch, caldera
    from caldera.checkpoint import Checkpointer, verify
    d = Path(sys.argv[1])
    ckpt = Checkpointer(d, caldera.init(), keep=5)
    ckpt.save(1, {"model": {"w": torch.zeros(10)}}, {}, block=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    big = {"model": {"w": torch.randn(500_000)}}  # 2 MB: cannot be written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt.save(2, big, {}, block=True)
    print("WARNED", any("not written" in str(w.message) for w in caught))
    print("LEFT", sorted(p.name for p in d.iterdir()))
    (d / ".step-000000003.tmp").mkdir()  # and one a killed writer left behind
    (d / ".step-000000003.tmp" / "shared.pt.partial").write_bytes(b"x" * 100_000)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    path = ckpt.save(4, big, {}, block=True)
    print("SAVED", path.name, verify(path), sorted(p.name for p in d.iterdir()))
""")


def test_a_failed_write_leaves_nothing_behind_and_the_next_checkpoint_succeeds(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNED True" in proc.stdout
    assert "LEFT ['step-000000001']" in proc.stdout  # no .step-000000002.tmp
    assert "SAVED step-000000004 None ['step-000000001', 'step-000000004']" in proc.stdout


def test_auto_policy_checkpoints_at_epoch_ends_at_most_every_interval(tmp_path):
    from caldera.config import load_config
    from caldera.train.run import build_checkpointer

    cfg = load_config({"model": {"name": "mlp"}, "data": {"source": "heat"}})
    assert cfg.checkpoint.every == "auto" and build_checkpointer(cfg, caldera.init()).epoch_seconds == 600
    off = build_checkpointer(
        load_config({**cfg.model_dump(), "checkpoint": {"every": "end"}}), caldera.init()
    )
    assert (off.epoch_seconds, off.every_steps, off.every_seconds) == (None, None, None)

    def fit(directory, interval):
        world = caldera.init(seed=0)
        model = torch.nn.Linear(4, 1)
        ckpt = Checkpointer(
            directory, world, every="auto", keep=10, auto_interval=interval, async_write=False
        )
        data = (torch.randn(40, 4), torch.randn(40, 1))  # 4 steps per epoch
        caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss,
                        max_epochs=3, batch_size=10, checkpointer=ckpt, progress=False, world=world).fit(data)  # fmt: skip
        return [p.name for p in ckpt.list()]

    # Every epoch end once the interval has passed (0 s: every one), and the end of the run; never mid-epoch.
    assert fit(tmp_path / "a", 0.0) == ["step-000000004", "step-000000008", "step-000000012"]
    assert fit(tmp_path / "b", 3600.0) == ["step-000000012"]  # epochs shorter than the interval: at the end


def test_fresh_run_sets_an_older_run_aside_and_resume_refuses_a_changed_config(tmp_path, capsys, caplog):
    from caldera.cli import main

    run_dir = tmp_path / "heat"
    base = ["train", "examples/heat_surrogate.toml", "--set", f"run.dir={run_dir}", "--set", "data.args.n_samples=80",
            "--set", "data.args.grid=16", "--set", "data.args.steps=5", "--set", "model.args.channels=4",
            "--set", "data.batch_size=16", "--set", "optim.epochs=1", "--set", "train.plot=false",
            "--set", "train.progress=false", "--set", "optim.warmup_steps=0"]  # fmt: skip
    ckpts = run_dir / "checkpoints"
    # An older run with more epochs, checkpointing every step: its step numbers are higher than the next run's.
    assert main([*base, "--set", "optim.epochs=3", "--set", "checkpoint.every=1"]) == 0
    old = {p.name for p in ckpts.glob("step-*")}
    old_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    capsys.readouterr()
    assert main(base) == 0  # a fresh run in the same directory
    # A library message, through logging: Caldera's stderr handler, or pytest's when it holds the root logger.
    out = capsys.readouterr().err + caplog.text
    aside = ckpts / f"previous-{old_id}"
    assert f"moved to {aside}" in out and {p.name for p in aside.iterdir()} == old  # nothing deleted
    mine = [p.name for p in ckpts.glob("step-*")]
    assert mine == ["step-000000005"]  # the new run's checkpoint survived retention
    new_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert (
        new_id != old_id and json.loads((ckpts / mine[0] / "manifest.json").read_text())["run_id"] == new_id
    )
    fresh = weights(run_dir)
    assert main([*base, "--resume"]) == 0  # the requeue: adopts this run, not the older one
    assert f"resumed from {ckpts / mine[0]}" in capsys.readouterr().out
    assert_same(fresh, weights(run_dir))
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == new_id
    # A changed model: one line naming the key and the fix, exit 2, nothing lost.
    assert main([*base, "--resume", "--set", "model.args.channels=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.args.channels (4 -> 8)" in err and "--resume --force" in err
    # Forced, the weights do not fit: still one line, naming a parameter.
    assert main([*base, "--resume", "--force", "--set", "model.args.channels=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit this model: parameter" in err and "shape" in err
    assert_same(fresh, weights(run_dir))
    # More epochs may change without --force: training continues from the checkpoint.
    assert main([*base, "--resume", "--set", "optim.epochs=2"]) == 0
    assert_ran_from(run_dir, 5)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 10
    # The cosine decay is laid over the new length: the extra epoch learns (with the saved run's length it would
    # run at a decayed-to-zero rate and leave the weights as they were).
    extended = weights(run_dir)
    assert any(not torch.equal(extended[k], fresh[k]) for k in fresh)
    shutil.rmtree(run_dir)


def test_a_set_aside_cut_short_by_a_crash_is_finished_into_the_same_folder(tmp_path):
    world = caldera.init(seed=0)
    old = Checkpointer(tmp_path, world, keep=5)
    old.begin(resume=False)
    for step in (1, 2):
        old.save(step, {"model": {"w": torch.full((2,), float(step))}}, {}, block=True)
    first, second = old.list()
    # A fresh run was killed after moving the first checkpoint aside.
    aside = tmp_path / f"previous-{old.run_id}"
    aside.mkdir()
    os.replace(first, aside / first.name)
    Checkpointer(tmp_path, world, keep=5).begin(resume=False)
    assert sorted(p.name for p in aside.iterdir()) == [first.name, second.name]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("previous-")] == [aside.name]
    # Set aside again with the same names present: never overwritten, the next free folder.
    (tmp_path / second.name).mkdir()
    (tmp_path / second.name / "manifest.json").write_text(json.dumps({"run_id": old.run_id}))
    Checkpointer(tmp_path, world, keep=5).begin(resume=False)
    assert (tmp_path / f"previous-{old.run_id}-1" / second.name / "manifest.json").exists()
    assert sorted(p.name for p in aside.iterdir()) == [first.name, second.name]
