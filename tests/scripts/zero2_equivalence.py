"""Run on N ranks: allreduce with gradients and optimizer state sharded (ZeRO-2) must train like ZeRO-1 and like
one process (clipping and micro-batches included), keep only 1/N of the gradients between steps, and checkpoint/resume shard-wise.

Usage: mpiexec -n N python zero2_equivalence.py RUN_DIR
Prints one JSON line on rank 0.
"""

import json
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.checkpoint import Checkpointer
from caldera.comm.local import LocalComm
from caldera.models import MLP
from caldera.train.callbacks import Callback
from caldera.world import World

run_dir = sys.argv[1]
world = caldera.init()
torch.set_num_threads(1)
g = torch.Generator().manual_seed(7)
data = TensorDataset(torch.randn(96, 20, generator=g), torch.randint(0, 5, (96,), generator=g))


class GradsKept(Callback):
    """After each step (allreduce only): whole .grad tensors still held, and gradient numbers this rank keeps."""

    def on_fit_start(self, trainer):
        self.whole, self.kept = 0, 0

    def on_step_end(self, trainer):
        s = trainer.strategy
        shard = getattr(s, "_grad_shard", None)  # ZeRO-2's range of the summed gradients
        kept = sum(b.flat.numel() for b in s.buckets) + (shard.numel() if shard is not None else 0)
        self.whole = max(self.whole, sum(p.grad is not None for p in trainer.model.parameters()))
        self.kept = max(self.kept, kept)


def fit(w, strategy, grads, epochs, ckpt=None, resume=False):
    torch.manual_seed(0)
    model = MLP([20, 33, 17, 5])  # odd sizes: the ranks' ranges cut through parameters and buckets
    *body, head = list(model.parameters())
    opt = torch.optim.AdamW([{"params": body, "weight_decay": 0.1}, {"params": [head], "lr": 3e-3}], lr=1e-2,
                            weight_decay=0.0)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    checkpointer = Checkpointer(ckpt, w, keep=3, async_write=False) if ckpt else None
    # Two micro-batches per step: the first only accumulates (no_sync) into the buckets ZeRO-2 allocates on demand.
    options = {"grad_clip": 0.5}  # small enough that most steps are clipped: the global norm must be right
    if strategy == "allreduce":  # tiny buckets: several per rank range, some split between two ranks
        options |= {"shard_optimizer": True, "shard_gradients": grads, "bucket_mb": 0.002}
    trainer = caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=epochs, batch_size=24, world=w,
                              strategy=strategy, strategy_options=options, scheduler=sched, progress=False, seed=3,
                              checkpointer=checkpointer, resume=resume, accumulate=2,
                              callbacks=[kept := GradsKept()] if strategy == "allreduce" else [])  # fmt: skip
    trainer.fit(data)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    if strategy != "allreduce":
        return weights, {}
    return weights, {"whole_grads_after_step": kept.whole, "grad_numbers_kept": kept.kept}


zero2, info2 = fit(world, "allreduce", True, 3)
zero1, info1 = fit(world, "allreduce", False, 3)
everyone = torch.stack(world.comm.allgather(zero2))
fit(world, "allreduce", True, 2, ckpt=f"{run_dir}/ckpt")  # stopped after 2 epochs, resumed for the third
resumed, _ = fit(world, "allreduce", True, 3, ckpt=f"{run_dir}/ckpt", resume=True)
if world.rank == 0:
    alone = World(comm=LocalComm())
    reference, _ = fit(alone, "single", False, 3)
    one, _ = fit(alone, "single", False, 3, ckpt=f"{run_dir}/ckpt", resume=f"{run_dir}/ckpt/step-000000008")
    print(json.dumps({
        "size": world.size,
        "vs_reference": (zero2 - reference).abs().max().item(),
        "vs_zero1": (zero2 - zero1).abs().max().item(),
        "spread": (everyone - everyone[0]).abs().max().item(),
        "resumed_vs_whole": (resumed - zero2).abs().max().item(),
        "one_process_resume_vs_whole": (one - zero2).abs().max().item(),
        "zero2": info2,
        "zero1": info1,
        "params": zero2.numel(),
    }), flush=True)  # fmt: skip
