"""A transformer whose parameters and Adam state exceed one process's memory limit trains under ZeRO-3.

Usage: [mpiexec -n N] python zero3_rlimit.py RUN_DIR BUDGET_MIB {sharded,plain}
Each process limits its data segment (``RLIMIT_DATA``: heap and private mappings) to what it uses after starting
(torch, MPI, the data) plus BUDGET_MIB, then trains from a run file: ``sharded`` with shard_params, ``plain`` with
the whole model in the process. Prints one JSON line on rank 0: the model's size and this rank's peak memory.
"""

import json
import math
import resource
import sys
from pathlib import Path

import torch

import caldera
from caldera.config import load_config
from caldera.train.run import build_data, train

run_dir, budget, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
world = caldera.init()
torch.set_num_threads(1)
parallel = {"strategy": "allreduce"}
if mode == "sharded":
    parallel |= {"shard_optimizer": True, "shard_gradients": True, "shard_params": True, "bucket_mb": 4}
cfg = load_config({
    "run": {"dir": str(run_dir / mode), "seed": 1},
    # 25 M parameters: 100 MiB, and 400 MiB with their gradients and Adam's two moments; one token a sample keeps
    # the arithmetic small (each 8x8 input is one token of 64 numbers).
    "model": {"name": "transformer", "args": {"in_features": 64, "out_features": 10, "dim": 512, "heads": 4,
                                              "layers": 8, "max_tokens": 1}},
    "data": {"source": "tiny_tokens:data", "args": {"train": 6, "val": 3}, "batch_size": 3},
    "optim": {"name": "adam", "lr": 1e-4, "epochs": 1},
    "train": {"loss": "cross_entropy", "progress": False, "plot": False},
    "checkpoint": {"async_write": False},
    "parallel": parallel,
})  # fmt: skip
build_data(cfg)  # (the data source's imports happen before the limit: what every run needs anyway)


def vm(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


base = vm("VmData")
resource.setrlimit(resource.RLIMIT_DATA, (base + budget * 2**20, resource.getrlimit(resource.RLIMIT_DATA)[1]))
params = 0  # the trained model's, counted from its weights' layout (written shard-wise: no rank gathers them)
try:
    train(cfg, world=world)
    outcome = "trained"
except (MemoryError, RuntimeError) as exc:  # torch's allocator: "DefaultCPUAllocator: can't allocate memory"
    if world.size > 1:
        raise  # (caldera stops every rank: the others would wait in a collective for this one)
    outcome = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
growth = world.comm.allgather((vm("VmData") - base) / 2**20)  # what the run kept mapped
peak = world.comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
if world.rank == 0:
    if outcome == "trained":
        layout = json.loads((run_dir / mode / "model-shards" / "layout.json").read_text())
        params = sum(math.prod(p["shape"]) for p in layout["params"])
    print(json.dumps({"outcome": outcome, "ranks": world.size, "params": params, "base_mib": base / 2**20,
                      "limit_mib": budget, "data_growth_mib": growth, "peak_rss_mib": [p / 2**20 for p in peak]}), flush=True)  # fmt: skip
