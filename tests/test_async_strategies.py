"""Asynchronous strategies with real processes and ranks: async-shared (worker processes on shared weights),
async-ps (parameter servers over MPI), local-sgd (periodic model averaging)."""

import json
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
import caldera.parallel.async_shared  # noqa: F401  (importing a strategy module registers its name)
import caldera.parallel.local_sgd  # noqa: F401
import caldera.parallel.param_server  # noqa: F401
from caldera.data.sampler import ShardedBatches
from caldera.models import SmallCNN
from caldera.parallel import available_strategies, make_strategy
from caldera.parallel._async import WorkItems
from caldera.parallel.param_server import shard_bounds, shard_plan
from tests.conftest import ROOT, run_ranks


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


# -- in-process: the pieces ----------------------------------------------------------------------------------------
def test_the_three_names_are_registered():
    assert {"async-shared", "async-ps", "local-sgd"} <= set(available_strategies())


@pytest.mark.parametrize("servers", [1, 2, 3, 7])
def test_shards_cover_every_parameter_exactly_once(servers):
    params = list(SmallCNN(channels=16).parameters())
    covered = [torch.zeros(p.numel(), dtype=torch.int64) for p in params]
    for pieces in shard_plan(params, servers):
        for i, lo, hi in pieces:
            covered[i][lo:hi] += 1
    assert all(bool((c == 1).all()) for c in covered)
    sizes = [b - a for a, b in shard_bounds(sum(p.numel() for p in params), servers)]
    assert max(sizes) - min(sizes) <= 1  # balanced to one element


def test_work_items_are_the_data_parallel_slices_of_each_global_batch():
    # The inputs are the sample indices, so each item's batch says which samples it took.
    data = TensorDataset(torch.arange(103).float(), torch.zeros(103, dtype=torch.long))
    items = WorkItems(data, global_batch=24, workers=3, epochs=2, seed=5)
    assert items.total == 2 * items.steps_per_epoch * 3
    for n in range(items.total):
        epoch, step, part = items.locate(n)
        x, _, n_local, n_global = items.batch(n)
        sharded = ShardedBatches(data, 24, rank=part, size=3, seed=5)
        sharded.set_epoch(epoch)
        idx, expected_global = sharded.plan()[step]
        assert x.long().tolist() == idx.tolist() and (n_local, n_global) == (len(idx), expected_global)


def test_local_sgd_on_one_rank_is_plain_training():
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    weights = []
    for name in ("single", "local-sgd"):
        caldera.init(seed=0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=2, batch_size=16, strategy=name,
                        strategy_options={"sync_every": 3} if name == "local-sgd" else {},
                        progress=False).fit(data)  # fmt: skip
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_mistakes_are_refused_with_the_fix():
    world = caldera.init()
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for name in ("async-shared", "async-ps"):
        with pytest.raises(
            RuntimeError, match="strategy.fit"
        ):  # driven as a plain strategy: refused, no hang
            make_strategy(name).setup(model, opt, world)
    trainer = caldera.Trainer(model, opt, nn.MSELoss(), strategy="async-ps", progress=False)
    with pytest.raises(ValueError, match="mpiexec"):
        trainer.fit(TensorDataset(torch.randn(8, 2), torch.randn(8, 2)))
    scheduled = caldera.Trainer(model, opt, nn.MSELoss(), strategy="async-shared", progress=False,
                                scheduler=torch.optim.lr_scheduler.StepLR(opt, 5))  # fmt: skip
    with pytest.raises(ValueError, match="LambdaLR.*StepLR keeps its own step count"):
        scheduled.fit(TensorDataset(torch.randn(8, 2), torch.randn(8, 2)))
    with pytest.raises(ValueError, match="'none'"):
        make_strategy("async-shared", lock="global")
    with pytest.raises(ValueError, match="pipeline"):
        make_strategy("async-ps", max_staleness=0, pipeline=True)
    with pytest.raises(ValueError, match="sync_every"):
        make_strategy("local-sgd", sync_every=0)


class FailingLoss(nn.Module):
    """Cross-entropy that raises in async-shared's worker 1 (module level: worker processes import it)."""

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import os

        if os.environ.get("CALDERA_WORKER_INDEX") == "1":
            raise RuntimeError("sabotaged on purpose")
        return nn.functional.cross_entropy(out, target)


class NaNLoss(nn.Module):
    """Cross-entropy that turns NaN on a worker's 5th item (module level: worker processes import it)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.cross_entropy(out, target)
        return loss * float("nan") if self.calls == 5 else loss


# -- real processes and ranks --------------------------------------------------------------------------------------
def test_a_nan_loss_in_an_async_worker_stops_the_run_naming_the_item(capfd):
    caldera.init(seed=0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), NaNLoss(), max_epochs=20,
                              batch_size=16, strategy="async-shared", strategy_options={"workers": 1},
                              progress=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="async-shared worker 0 died"):
        trainer.fit(TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,))))
    assert "loss is nan in work item 4 (epoch 1, step 4, slice 0) on worker 0" in capfd.readouterr().err
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # the NaN never reached the weights


def test_a_failing_async_shared_worker_stops_the_run_with_its_name():
    caldera.init(seed=0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), FailingLoss(), max_epochs=50,
                              batch_size=16, strategy="async-shared", progress=False)  # fmt: skip
    data = TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,)))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="async-shared worker 1 died with exit code 1"):
        trainer.fit(data)
    assert time.monotonic() - start < 30


def test_async_shared_trains_digits_lock_free_and_with_tensor_locks():
    import os
    import subprocess

    cmd = [sys.executable, "tests/scripts/async_digits.py", "async-shared", '{"workers": 2, "lock": "none"}',
           '{"workers": 2, "lock": "tensor"}']  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["stats"]["lock"] for r in runs] == ["none", "tensor"]
    for run in runs:
        stats = run["stats"]
        assert run["val_accuracy"] >= 0.95, run["history"]
        assert stats["updates"] == 15 * 45 * 2 == sum(stats["updates_per_worker"])
        assert min(stats["updates_per_worker"]) > 0.3 * stats["updates"]  # both workers really trained
        # Staleness was measured for every update: the workers did overlap, and nobody waited for anybody.
        assert sum(stats["staleness_histogram"].values()) == stats["updates"]
        assert stats["staleness_mean"] > 0 and stats["staleness_max"] >= 1
    assert "staleness mean" in proc.stdout


@pytest.mark.mpi
def test_local_sgd_trains_digits_on_two_ranks():
    proc = run_ranks(
        2, ["tests/scripts/async_digits.py", "local-sgd", '{"sync_every": 4, "sync_warmup_steps": 10}']
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["val_accuracy"] >= 0.95, out["history"]
    assert out["spread"] == 0.0  # after synchronize() every rank holds the same model
    steps = 15 * 45
    scheduled = 10 + (steps - 10) // 4  # the warm-up steps, then every 4th step
    # The trainer also averages before each epoch's validation, unless that step just averaged.
    epoch_ends = sum(1 for e in range(1, 16) if (45 * e - 10) % 4 != 0)
    assert out["steps"] == steps and out["averages"] == scheduled + epoch_ends


@pytest.mark.mpi
def test_async_ps_trains_digits_and_never_exceeds_its_staleness_bound():
    # 2 servers + 2 workers, max_staleness = 1; worker rank 3 is slower, so the bound has work to do.
    proc = run_ranks(4, ["tests/scripts/async_digits.py", "async-ps", '{"servers": 2, "max_staleness": 1}',
                         "--slow", "3", "0.002"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    stats, k, workers = out["stats"], 1, 2
    assert out["val_accuracy"] >= 0.95, out["history"]
    assert out["spread"] == 0.0  # every rank ends with the final model
    # The shards cover every parameter exactly once.
    total = sum(out["numels"])
    covered = torch.zeros(total, dtype=torch.int64)
    for start, stop in stats["shards"]:
        covered[start:stop] += 1
    assert bool((covered == 1).all()) and len(stats["shards"]) == 2
    assert len(out["servers"]) == 2
    for server in out["servers"]:
        # Every push was applied exactly once, in clock order per worker ...
        for w in range(workers):
            clocks = [c for worker, c, *_ in server["applied"] if worker == w]
            assert clocks == list(range(1, len(clocks) + 1))
        assert len(server["applied"]) == stats["updates"] == 15 * 45 * 2
        # ... no reply ever let a worker run more than k clocks ahead of the slowest live one ...
        assert max(clock - slowest for _, clock, slowest in server["replies"]) <= k
        # ... so at most (W-1)(2k+1) other updates landed between a worker's read and its write.
        assert max(v_apply - v_read for _, _, v_read, v_apply, _ in server["applied"]) <= (workers - 1) * (
            2 * k + 1
        )
    assert stats["delayed_replies"] > 0  # the bound did hold the fast worker back


@pytest.mark.mpi
def test_async_ps_with_max_staleness_0_and_local_sgd_every_step_are_synchronous_sgd():
    proc = run_ranks(3, ["tests/scripts/async_equivalence.py"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["ps_diff"] < 1e-5, out  # momentum and weight decay included: the server steps once per round
    assert out["ps_scheduled_diff"] < 1e-5 < out["schedule_matters"], out  # each global batch's own rate
    assert out["ps_micro_diff"] < 1e-5, out  # work items in micro-batches (accumulate = 2)
    assert out["ps_staleness_max"] == 0 and out["ps_updates"] == 3 * 5 * 2
    assert out["local_sgd_diff"] < 1e-5 and out["local_sgd_spread"] == 0.0, out
    assert out["bn_spread"] == 0.0 and out["bn_moved"] > 0.01  # the workers' statistics reached every rank


@pytest.mark.mpi
def test_a_silent_worker_does_not_stall_the_others(tmp_path):
    # max_staleness = 0: without dead-worker detection rank 1 would wait for rank 2 forever.
    proc = run_ranks(3, ["tests/scripts/async_ps_dead.py", "1.0", "0.3", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker rank 2 silent for more than 0.3 s" in proc.stderr
    out = last_json(proc.stdout)
    stats = out["stats"]
    [(rank, declared)] = stats["dead"]
    assert rank == 2 and stats["refused"] == 1  # its late push was refused; then it said "done"
    assert stats["finished"] == [1, 1]  # it came back, so both workers end cleanly
    last_of_rank2 = max(t for w, *_, t in out["applied"] if w == 1)
    assert declared - last_of_rank2 < 0.3 + 0.1  # declared dead promptly ...
    during = [t for w, *_, t in out["applied"] if w == 0 and declared < t < declared + 0.5]
    assert len(during) > 20  # ... and rank 1 kept training while rank 2 was silent
    assert (tmp_path / "run" / "model.pt").exists()


@pytest.mark.mpi
def test_a_worker_that_never_returns_ends_the_job_after_the_outputs(tmp_path):
    start = time.monotonic()
    proc = run_ranks(3, ["tests/scripts/async_ps_dead.py", "60", "0.3", str(tmp_path / "run")], timeout=90)
    assert proc.returncode != 0 and time.monotonic() - start < 45
    assert "worker rank(s) [2] went silent and never came back" in proc.stderr
    for name in ("model.pt", "metrics.jsonl", "strategy.json"):
        assert (tmp_path / "run" / name).exists()


# -- checkpoints: a consistent cut, SIGTERM -> checkpoint + exit 85, resume ---------------------------------------
def check_resumed(out: dict, exact: bool) -> None:
    """The stopped-and-resumed run went through a real preemption and ended like the unbroken one."""
    assert out["preempted"] and not out["again"], out
    step = int(out["stopped_at"].rsplit("-", 1)[1])
    assert 0 < step < out["whole_stats"]["updates"], out["stopped_at"]  # stopped in the middle of the run
    assert out["resumed_stats"]["resumed_from"] == step  # ... and the resumed run started there
    assert out["resumed_stats"]["updates"] == out["whole_stats"]["updates"]
    assert len(out["resumed_history"]) == len(out["whole_history"])  # the records before the stop survived
    if exact:  # one worker, or max_staleness = 0: deterministic, so the resume must be bit-exact
        assert out["diff"] == 0.0, out["diff"]
        assert out["resumed_history"][-1]["val_loss"] == out["whole_history"][-1]["val_loss"]
    assert out["resumed_history"][-1]["val_accuracy"] >= 0.9, out["resumed_history"]  # and it did learn


def test_async_shared_sigterm_checkpoints_and_resumes_bit_exactly(tmp_path):
    import os
    import subprocess

    # fp16-mixed: the workers unscale their own gradients, and each one's loss scale is saved and restored.
    cmd = [sys.executable, "tests/scripts/async_resume.py", "async-shared", '{"workers": 1}', str(tmp_path),
           "fp16-mixed"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_resumed(last_json(proc.stdout), exact=True)
    assert len(list((tmp_path / "whole" / "checkpoints").iterdir())) == 3  # every 7 updates, keep 3


@pytest.mark.mpi
def test_async_ps_checkpoints_at_a_cut_and_resumes_bit_exactly_when_synchronous(tmp_path):
    # Two servers (each saves its own shard's momentum), max_staleness = 0: deterministic, hence bit-exact;
    # fp16-mixed: the workers' loss scales travel in their own checkpoint files.
    proc = run_ranks(4, ["tests/scripts/async_resume.py", "async-ps", '{"servers": 2, "max_staleness": 0}',
                         str(tmp_path), "fp16-mixed"], timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_resumed(last_json(proc.stdout), exact=True)


@pytest.mark.mpi
def test_async_ps_checkpoints_with_held_replies_and_a_pipeline(tmp_path):
    # max_staleness = 1 holds fast workers back: the cut must still complete (parked workers release them).
    proc = run_ranks(3, ["tests/scripts/async_resume.py", "async-ps", '{"max_staleness": 1, "pipeline": true}',
                         str(tmp_path), "bf16-mixed"], timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_resumed(last_json(proc.stdout), exact=False)


def test_cli_async_shared_time_limit_then_resume(tmp_path, capsys):
    import subprocess

    from caldera.checkpoint import REQUEUE_EXIT_CODE
    from caldera.cli import main

    run_dir = tmp_path / "digits"
    train = ["train", "examples/digits_async.toml", "--set", f"run.dir={run_dir}", "--set", "optim.epochs=1",
             "--set", "train.plot=false"]  # fmt: skip
    base = [sys.executable, "-m", "caldera.cli", *train]
    # The example: async-shared with 2 workers, warm-up + cosine applied per item in the worker processes.
    stop = subprocess.run([*base, "--time-limit", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert stop.returncode == REQUEUE_EXIT_CODE, stop.stderr[-3000:]
    assert "time limit" in stop.stderr and "checkpoint" in stop.stderr
    # Refused before any worker starts: checked in this process. The run file differs from the checkpoint's; forced,
    # the strategy still cannot resume with other workers.
    assert main([*train, "--resume", "--set", "parallel.workers=3"]) == 2
    assert "parallel.workers (2 -> 3)" in capsys.readouterr().err
    assert main([*train, "--resume", "--force", "--set", "parallel.workers=3"]) == 2
    assert "resume with [parallel] workers = 2" in capsys.readouterr().err
    done = subprocess.run([*base, "--resume"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and (run_dir / "model.pt").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
