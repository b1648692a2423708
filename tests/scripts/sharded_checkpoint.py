"""Train a small model whose ZeRO-1 optimizer state is checkpointed shard-wise, from scratch or from a checkpoint.

Usage: mpiexec -n N python sharded_checkpoint.py OUT CKPT_DIR RESUME_FROM SHARD RANKS [...]
Each 5-tuple is one run, one after the other, on the first RANKS of the N ranks (the others wait: one launch can
resume a checkpoint on 3 ranks and another on 2): it trains 3 epochs (12 steps, a checkpoint every 3 steps into
CKPT_DIR, written in the background), from RESUME_FROM ("-": from scratch), with the optimizer state sharded over
the ranks when SHARD is 1, and its rank 0 writes the final weights to OUT. ``fit`` is imported by
tests/test_sharded_checkpoint.py for its one-process runs.
"""

import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.checkpoint import Checkpointer
from caldera.comm.mpi import MPIComm
from caldera.models import MLP
from caldera.world import World


def fit(world, ckpt, resume, shard):
    """Train on ``world``; return the final weights as one vector and the trainer."""
    g = torch.Generator().manual_seed(7)
    data = TensorDataset(torch.randn(96, 20, generator=g), torch.randint(0, 5, (96,), generator=g))
    torch.manual_seed(0)
    model = MLP([20, 33, 17, 5])  # odd sizes: the ranks' ranges cut through parameters
    *body, head = list(model.parameters())
    # Two groups with their own rates and decay, and a schedule: the reassembled state must follow both.
    opt = torch.optim.AdamW([{"params": body, "weight_decay": 0.1}, {"params": [head], "lr": 3e-3}], lr=1e-2,
                            weight_decay=0.0)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    strategy = "allreduce" if world.size > 1 else "single"
    options = {"grad_clip": 1.0, **({"shard_optimizer": shard} if strategy == "allreduce" else {})}
    trainer = caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=3, batch_size=24, world=world,
                              strategy=strategy, strategy_options=options, scheduler=sched, progress=False, seed=3,
                              checkpointer=Checkpointer(ckpt, world, every=3, keep=10), resume=resume)  # fmt: skip
    trainer.fit(data)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer


if __name__ == "__main__":
    world = caldera.init()
    torch.set_num_threads(1)
    args = sys.argv[1:]
    for out, ckpt, resume, shard, ranks in zip(*(args[i::5] for i in range(5))):
        w = world
        if int(ranks) < world.size:
            from mpi4py import MPI  # here, not above: importing it starts MPI, and the tests import fit alone

            inside = world.rank < int(ranks)
            sub = world.comm.comm.Split(0 if inside else MPI.UNDEFINED, world.rank)
            if not inside:
                continue
            w = World(rank=sub.Get_rank(), size=sub.Get_size(), local_rank=sub.Get_rank(), local_size=sub.Get_size(),
                      comm=MPIComm(sub), launcher="mpi")  # fmt: skip
        weights, _ = fit(w, ckpt, False if resume == "-" else resume, shard == "1")
        if w.rank == 0:
            torch.save(weights, out)
