"""Run on 3 ranks: allreduce with parameters, gradients and optimizer state sharded (ZeRO-3), from a run file, must
train like one process (clipping and micro-batches included) on 3 ranks and on 2, hold only its ranges of the
parameters between steps, write checkpoints and final weights shard-wise and resume on another number of ranks
(3 -> 2, 3 -> 1 plain, 1 plain -> 3 sharded); `predict --tp 2` on 2 ranks reads each rank's slices from the shard
files of a 2-rank and of a 3-rank run and equals one process's predict, which joins them.

Usage: mpiexec -n 3 python zero3_equivalence.py RUN_DIR
Prints one JSON line on rank 0.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import caldera
from caldera.comm.local import LocalComm
from caldera.config import load_config
from caldera.errors import ConfigError
from caldera.parallel.tensor import read_sharded_weights
from caldera.parallel_infer import load_shard
from caldera.predict import load_run_config, predict
from caldera.train.callbacks import Callback
from caldera.train.run import train
from caldera.world import World

root = Path(sys.argv[1])
world = caldera.init()
torch.set_num_threads(1)
ZERO3 = {"strategy": "allreduce", "shard_optimizer": True, "shard_gradients": True, "shard_params": True}


def config(name, epochs, parallel):
    return load_config({
        "run": {"dir": str(root / name), "seed": 5},
        "model": {"name": "transformer", "args": {"in_features": 8, "out_features": 10, "dim": 20, "heads": 4,
                                                  "layers": 3, "max_tokens": 8}},
        "data": {"source": "tiny_tokens:data", "args": {"train": 96, "val": 20}, "batch_size": 24},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "epochs": epochs, "grad_clip": 0.3},
        "train": {"loss": "cross_entropy", "metrics": ["accuracy"], "progress": False, "plot": False,
                  "accumulate": 2},
        "checkpoint": {"every": 4, "keep": 5, "async_write": False},
        "parallel": parallel,
    })  # fmt: skip


class Held(Callback):
    """After each step: the parameter numbers this rank holds (gathered units) and whole .grad tensors."""

    def on_fit_start(self, trainer):
        self.held, self.grads = 0, 0

    def on_step_end(self, trainer):
        z = trainer.strategy.zero3
        self.held = max(
            self.held, sum(u.full.untyped_storage().nbytes() // 4 for u in z.units) + z.local.numel()
        )
        self.grads = max(self.grads, sum(p.grad is not None for p in trainer.model.parameters()))


def weights(run):
    """The final weights, in the model's order: model.pt, or joined from the shard files."""
    plain, shards = root / run / "model.pt", root / run / "model-shards"
    state = torch.load(plain, weights_only=True) if plain.is_file() else read_sharded_weights(shards)
    return torch.cat([state[k].flatten() for k in sorted(state)])


def sub(n):
    """The first n ranks as a world of their own (None on the others)."""
    comm = world.comm.split(0 if world.rank < n else 1, world.rank)
    return World(rank=comm.rank, size=comm.size, comm=comm, launcher="mpi") if world.rank < n else None


out = {}
held = Held()
train(config("z3", 2, ZERO3), world=world, callbacks=[held])
w2 = sub(2)
# 3 -> 2: the first epoch's checkpoint of the 3-rank run, resumed on 2 ranks (copied: a run directory is one run's)
ckpts = sorted((root / "z3" / "checkpoints").glob("step-*"))
alone = World(comm=LocalComm())
if world.rank == 0:
    for name in ("r32", "r31"):
        shutil.copytree(root / "z3", root / name)
        for later in sorted((root / name / "checkpoints").glob("step-*"))[1:]:
            shutil.rmtree(later)
        shutil.rmtree(root / name / "model-shards")
world.barrier()
if w2 is not None:
    train(config("r32", 2, ZERO3), world=w2, resume=True)
    train(config("z2", 2, ZERO3), world=w2)
    held_tp = {}
    for run in ("z2", "z3"):  # shards written by 2 ranks and by 3, each rank reading its tp = 2 slices
        predict(root / run, out=root / f"{run}-tp2.npy", tp=2, world=w2, progress=False, trust_code=True)
        shard, _, strategy = load_shard(root / run, load_run_config(root / run, trust_code=True), w2.comm)
        held_tp[run] = sum(p.numel() for p in shard.parameters())
        strategy.close()
if world.rank == 0:
    train(config("one", 2, {"strategy": "allreduce"}), world=alone)
    train(config("r31", 2, {"strategy": "allreduce"}), world=alone, resume=True)
    for run in ("z2", "z3"):  # one process: the whole model, joined from the shard files
        predict(root / run, out=root / f"{run}-one.npy", world=alone, progress=False, trust_code=True)
    shutil.copytree(root / "one", root / "r13")
    for later in sorted((root / "r13" / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)
    (root / "r13" / "model.pt").unlink()
world.barrier()
train(config("r13", 2, ZERO3), world=world, resume=True)
if world.rank == 0:
    one = weights("one")
    # A rank file missing: one line naming it, for every reader.
    shutil.copytree(root / "z2", root / "broken")
    (root / "broken" / "model-shards" / "zero3-00001.pt").unlink()
    try:
        predict(root / "broken", world=alone, progress=False, trust_code=True)
        broken = "read"
    except ConfigError as exc:
        broken = str(exc)
    tp_vs_one = max(float(np.abs(np.load(root / f"{r}-tp2.npy") - np.load(root / f"{r}-one.npy")).max())
                    for r in ("z2", "z3"))  # fmt: skip
    manifest = json.loads((ckpts[0] / "manifest.json").read_text())
    print(json.dumps({
        "size": world.size,
        "z3_vs_one": (weights("z3") - one).abs().max().item(),
        "z2_vs_one": (weights("z2") - one).abs().max().item(),
        "tp_vs_one": tp_vs_one,
        "rows": len(np.load(root / "z3-one.npy")),
        "held_tp": held_tp,
        "shard_files": sorted(p.name for p in (root / "z3" / "model-shards").iterdir()),
        "model_pt": (root / "z3" / "model.pt").exists(),
        "broken": broken,
        "r32_vs_one": (weights("r32") - one).abs().max().item(),
        "r31_vs_one": (weights("r31") - one).abs().max().item(),
        "r13_vs_one": (weights("r13") - one).abs().max().item(),
        "params": one.numel(),
        "held": held.held,
        "whole_grads": held.grads,
        "kind": manifest.get("sharded", {}).get("kind"),
    }), flush=True)  # fmt: skip
