"""ZeRO-3 (``[parallel] shard_params``): parameters, gradients and optimizer state sharded over real MPI ranks,
from run files: equal to one process on 3 ranks and on 2 (and, resumed, 3 -> 2), resumed across rank counts and
strategies, final weights written shard-wise and predicted from with ``--tp 2``, and a model whose training state
exceeds one process's memory limit trains on 3 ranks while one process fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from caldera.config import ConfigError, load_config
from tests.conftest import ROOT, run_ranks


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.mpi
def test_zero3_equals_one_process_and_resumes_across_rank_counts(tmp_path):
    proc = run_ranks(3, ["tests/scripts/zero3_equivalence.py", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    # 3 ranks (SGD with momentum, weight decay, global-norm clipping, 2 micro-batches a step) equal one process.
    assert out["z3_vs_one"] < 1e-5 and out["z2_vs_one"] < 1e-5  # and 2 ranks, from the start
    # Resumed from the 3-rank run's sharded checkpoint on 2 ranks and on one plain process, and from a plain
    # process's checkpoint on 3 sharded ranks: the unbroken run's weights.
    assert out["r32_vs_one"] < 1e-5 and out["r31_vs_one"] < 1e-5 and out["r13_vs_one"] < 1e-5
    assert out["kind"] == "zero-3"  # the manifest records parameter shards
    # The final weights: each rank's range, no gather and no model.pt (nobody reads a stale whole file).
    ranks = [f"zero3-0000{r}.pt" for r in range(3)]
    assert out["shard_files"] == ["layout.json", "shared.pt", *ranks]
    assert out["model_pt"] is False
    # predict --tp 2 from the 2-rank and the 3-rank shards (each rank reads its slices, holding less than the
    # whole model) equals one process's predict over the joined weights.
    assert out["rows"] == 20 and out["tp_vs_one"] < 1e-5, out
    assert all(0 < held < out["params"] for held in out["held_tp"].values()), out
    # A rank file missing: one line naming it.
    broken = out["broken"]
    assert (
        "zero3-00001.pt: missing; the ZeRO-3 weights need every rank's file" in broken and "\n" not in broken
    )
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


@pytest.mark.mpi
def test_a_model_larger_than_one_process_memory_limit_trains_sharded_on_3_ranks(tmp_path):
    # Each process may map 400 MiB beyond what it uses after starting; the model's weights, gradients and Adam
    # state take 385 MiB of it (one process also needs activations and its threads: it fails, as checked). Large blocks are returned to the system when freed (glibc would otherwise keep them in
    # its heap, where the limit still counts them).
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    script = "tests/scripts/zero3_rlimit.py"
    one = subprocess.run([sys.executable, script, str(tmp_path), "400", "plain"], capture_output=True, text=True,
                         timeout=240, cwd=ROOT, env={**os.environ, **env})  # fmt: skip
    alone = last_json(one.stdout)
    assert alone["outcome"].startswith("failed") and "can't allocate memory" in alone["outcome"], (
        alone
    )  # it bites
    proc = run_ranks(3, [script, str(tmp_path), "400", "sharded"], timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["outcome"] == "trained" and out["params"] * 16 > 0.95 * 400 * 2**20, out
