"""Synchronous data parallel on real MPI ranks: equal to one process, identical on every rank, never hangs."""

import json
import sys
import time

import pytest
import torch

from caldera.cli import main
from tests.conftest import run_ranks

pytestmark = pytest.mark.mpi


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize(
    ("ranks", "model", "bucket_mb", "overlap", "reducer", "clip", "accumulate"),
    [(2, "mlp", 0.002, "1", "shm", 0.05, 1), (3, "mlp", 0.002, "1", "mpi", 0.05, 1), (2, "cnn", 25, "1", "mpi", 0, 2),
     (3, "cnn", 0.01, "0", "shm", 0, 1), (3, "mlp", 0.01, "1", "shm", 0, 3), (2, "gated", 0.002, "1", "shm", 0, 1),
     (2, "potential", 0.002, "1", "shm", 0, 1)],
)  # fmt: skip
def test_ranks_match_single_process_with_the_global_batch(ranks, model, bucket_mb, overlap, reducer, clip,
                                                          accumulate):  # fmt: skip
    # 100 samples, global batch 24: the last batch (4 samples) is split unevenly across 3 ranks.
    # A small gradient-norm clip (0.05) is active on every step, so clipping must see the reduced gradient.
    # accumulate > 1: each rank's share runs in micro-batches (the last one: 2 samples in 3 pieces), and only
    # the last micro-batch of a step communicates. "gated": a layer with gradients on every other step only, so a
    # rank's slot must not keep the last step's gradient for it. "potential": an interatomic potential trained on its
    # forces (-dE/dx from autograd in forward): every step is a double backward through the reduction hooks.
    args = [model, "100", "24", "3", str(bucket_mb), overlap, reducer, str(clip or ""), str(accumulate)]
    proc = run_ranks(ranks, ["tests/scripts/dp_equivalence.py", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["size"] == ranks and out["shm"] == (reducer == "shm")
    assert "component query failed" not in proc.stderr  # pip Open MPI's UCX complaint is kept quiet
    assert out["max_diff"] < 1e-5, out
    assert out["spread"] == 0.0, out  # every rank holds bit-identical weights
    assert out["val_loss"] == pytest.approx(out["ref_val_loss"], abs=1e-5)
    if overlap == "1":  # one reduction per bucket per optimizer step, however many micro-batches
        assert out["reductions"] == out["steps"] * out["n_buckets"], out
    assert proc.stdout.count("epoch 3 ") == 2  # only rank 0 prints (its DP run and its reference run)


@pytest.mark.parametrize("reducer", ["shm", "mpi"])
def test_linear_weight_gradients_are_fused_into_aligned_buckets(reducer):
    # Both reducers: every gradient view on a cache line; with fused_linear_grads each linear layer's backward adds
    # its weight gradient into the bucket with one addmm_ (micro-batches under no_sync included); the weights after
    # three steps equal those of PyTorch's own accumulation.
    proc = run_ranks(2, ["tests/scripts/dp_fused_linear.py", reducer])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["aligned"], out
    assert out["fused_calls"] == out["expected_calls"] and out["plain_calls"] == 0, out
    assert out["max_diff"] < 1e-6 and out["spread"] == 0.0, out


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failing_rank_stops_every_rank_promptly(mode):
    start = time.monotonic()
    proc = run_ranks(3, ["tests/scripts/failing_rank.py", mode], timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 45, f"took {elapsed:.0f} s to stop"
    text = proc.stdout + proc.stderr
    if mode == "raise":
        assert "caldera: rank 2/3 failed: RuntimeError: sabotaged input on purpose" in text
    else:
        assert "rank 2" in text and "signal 9" in text


def test_cli_runs_the_main_job_on_two_ranks_and_ends_where_one_process_does(tmp_path):
    small = ["--set", "data.args.n_samples=96", "--set", "data.args.grid=16", "--set", "optim.epochs=2", "--set",
             "train.plot=false"]  # fmt: skip
    proc = run_ranks(2, ["-m", "caldera.cli", "train", "examples/heat_surrogate.toml", "--set",
                         f"run.dir={tmp_path / 'two'}", "--set", "parallel.strategy=allreduce", *small],
                     timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s), global batch 32 = 2 x 16" in proc.stdout
    assert proc.stdout.count("epoch 2 ") == 1
    # The same global batch on one process: all-reduced gradients are the same mean, so the same training run.
    one_dir = tmp_path / "one"
    assert main(["train", "examples/heat_surrogate.toml", "--set", f"run.dir={one_dir}", *small]) == 0
    rows = {n: [json.loads(r) for r in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}  # fmt: skip
    assert len(rows["two"]) == 2
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    one, two = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:  # ~1e-8 apart measured: only the order of the float additions differs
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_launch_wraps_mpiexec(tmp_path):
    script = tmp_path / "who.py"
    script.write_text("import caldera\nw = caldera.init()\nprint(f'rank {w.rank} of {w.size}')\n")
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "caldera.cli", "launch", "-n", "3", "--", sys.executable,
                           str(script)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 3", "rank 1 of 3", "rank 2 of 3"]  # fmt: skip


def test_launch_reports_a_failed_job(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("import caldera\nw = caldera.init()\nif w.rank == 1:\n    raise ValueError('bad input')\n"
                      "w.barrier()\n")  # fmt: skip
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "caldera.cli", "launch", "-n", "2", "--", sys.executable,
                           str(script)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "rank 1/2 failed: ValueError: bad input" in proc.stderr
    assert "caldera launch: the job failed" in proc.stderr


@pytest.mark.mpi
def test_batchnorm_statistics_are_averaged_over_the_ranks():
    proc = run_ranks(2, ["tests/scripts/dp_batchnorm.py"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for row in rows:
        assert row["own_spread"] > 1e-3  # each rank's statistics came from its own shard
        assert row["error"] < 1e-6  # and now every rank holds their mean


@pytest.mark.mpi
@pytest.mark.parametrize("ranks,reducer", [(3, "auto"), (2, "mpi")])
def test_a_sharded_optimizer_trains_like_one_process_and_its_checkpoints_resume_anywhere(
    tmp_path, ranks, reducer
):
    # AdamW with two groups, a schedule and clipping; the ranks' ranges cut through parameters.
    proc = run_ranks(ranks, ["tests/scripts/zero_equivalence.py", str(tmp_path), reducer])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["size"] == ranks
    assert out["vs_unsharded"] == 0.0 and out["spread"] == 0.0  # the very numbers of the unsharded optimizer
    assert out["vs_reference"] < 1e-5  # and one process with the whole batch
    # 1/N of the state per rank (plus the step counters).
    assert out["state_bytes"] < out["unsharded_state_bytes"] / ranks + 100
    assert out["resumed_vs_whole"] == 0.0  # stopped after 2 epochs, resumed on the same ranks: bit-exact
    assert out["one_process_resume_vs_whole"] < 1e-5  # the whole state was saved: one process resumes it
    # fp16-mixed: the loss scaler decides on the reduced gradients, so the ranks skip the same steps (5 of 8 here).
    sharded_scaler, plain_scaler = out["fp16_scalers"]
    assert sharded_scaler == plain_scaler and 0 < sharded_scaler["skipped"] < 8
    assert out["fp16_vs_unsharded"] == 0.0


@pytest.mark.mpi
# 3 ranks: uneven ranges and reduce-scatter counts (2 ranks split evenly, the easier case; the suite's time is spent
# once, on the harder one).
@pytest.mark.parametrize("ranks", [3])
def test_sharded_gradients_train_like_zero1_and_one_process_and_keep_one_nth(tmp_path, ranks):
    # ZeRO-2: tiny buckets reduce-scattered over ranges that cut through them; clipping on most steps.
    proc = run_ranks(ranks, ["tests/scripts/zero2_equivalence.py", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["size"] == ranks
    assert out["vs_zero1"] < 1e-6 and out["spread"] == 0.0  # ZeRO-1's numbers, the same on every rank
    assert out["vs_reference"] < 1e-5  # and one process with the whole batch (global-norm clipping included)
    # Between steps no whole gradient is held, only this rank's range of the sums (ZeRO-1 keeps all of them).
    assert out["zero2"]["whole_grads_after_step"] == 0 and out["zero1"]["whole_grads_after_step"] > 0
    assert out["zero2"]["grad_numbers_kept"] <= -(-out["zero1"]["grad_numbers_kept"] // ranks)
    assert out["resumed_vs_whole"] == 0.0  # sharded checkpoint, resumed on the same ranks: bit-exact
    assert out["one_process_resume_vs_whole"] < 1e-5  # and by one process without sharding


def test_a_sharded_optimizer_refuses_what_it_cannot_shard():
    from caldera.config import ConfigError, load_config
    from caldera.parallel.zero import ShardedOptimizer

    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="LBFGS is not known to update each number on its own"):
        ShardedOptimizer(torch.optim.LBFGS([p]), [(p, 0)], 0, 2)
    base = {"model": {"name": "mlp"}, "data": {"source": "digits"}}
    with pytest.raises(
        ConfigError, match="shard_optimizer' = True: not an option of strategy 'local-sgd' .*'allreduce'"
    ):
        load_config({**base, "parallel": {"strategy": "local-sgd", "shard_optimizer": True}})
    with pytest.raises(ConfigError, match="shard_optimizer does not combine with .*'bf16-true'"):
        load_config({**base, "parallel": {"strategy": "allreduce", "shard_optimizer": True},
                     "precision": {"mode": "bf16-true"}})  # fmt: skip
    zero2 = {"strategy": "allreduce", "shard_gradients": True}
    with pytest.raises(
        ConfigError, match="shard_gradients = true shards the optimizer too.*shard_optimizer = true"
    ):
        load_config({**base, "parallel": zero2})
    zero2["shard_optimizer"] = True
    with pytest.raises(ConfigError, match="shard_gradients = true reduce-scatters through MPI.*not 'shm'"):
        load_config({**base, "parallel": {**zero2, "reducer": "shm"}})
    with pytest.raises(ConfigError, match="shard_gradients = true does not combine with 16-bit grad_comm"):
        load_config({**base, "parallel": {**zero2, "grad_comm": "bf16"}})
    with pytest.raises(ConfigError, match="shard_gradients = true does not combine with .*'fp16-mixed'"):
        load_config({**base, "parallel": zero2, "precision": {"mode": "fp16-mixed"}})
    assert load_config({**base, "parallel": zero2}).parallel.options["shard_gradients"] is True
    from caldera.parallel.allreduce import AllReduce

    with pytest.raises(
        ValueError, match="shard_gradients needs shard_optimizer = true and grad_comm = 'fp32'"
    ):
        AllReduce(shard_gradients=True)  # the Python API refuses it too
