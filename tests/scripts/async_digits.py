"""Train the digits CNN with an asynchronous strategy; print one JSON line per run (main rank).

Usage: python async_digits.py STRATEGY OPTIONS_JSON [OPTIONS_JSON ...] [--slow WORKER SECONDS]
async-shared runs alone (it starts its own workers); async-ps and local-sgd run under mpiexec. ``--slow W S``
makes worker W (a rank under MPI, a worker index under async-shared) sleep S seconds per step: a straggler.
The JSON holds the final validation accuracy, the strategy's stats and, for async-ps, every server's records.
"""

import json
import os
import sys
import time

import torch
from torch import nn

import caldera
import caldera.parallel.async_shared  # noqa: F401  (importing a strategy module registers its name)
import caldera.parallel.local_sgd  # noqa: F401
import caldera.parallel.param_server  # noqa: F401
from caldera.data import digits, split_dataset
from caldera.models import SmallCNN
from caldera.parallel import make_strategy
from caldera.train.metrics import accuracy


class SlowLoss(nn.Module):
    """Cross-entropy that sleeps on one worker: a straggler (a module, so worker processes can unpickle it)."""

    def __init__(self, worker: int, seconds: float) -> None:
        super().__init__()
        self.worker, self.seconds = worker, seconds

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        me = os.environ.get("CALDERA_WORKER_INDEX", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
        if int(me) == self.worker:
            time.sleep(self.seconds)
        return nn.functional.cross_entropy(out, target)


class Decay:
    """Learning-rate factor from 1 down to 0.1 over ``total`` updates, so the last epochs settle instead of
    oscillating by a percent of accuracy (a class, so async-shared's worker processes can unpickle it)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, step: int) -> float:
        return max(0.1, 1.0 - 0.9 * step / self.total)


def run(name: str, options: dict, slow: tuple[int, float]) -> None:
    world = caldera.init(seed=0)
    torch.set_num_threads(1)
    train, val = split_dataset(digits(), 0.2, seed=0)
    model = SmallCNN(channels=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    strategy = make_strategy(name, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Decay(15 * 45))
    trainer = caldera.Trainer(model, optimizer, SlowLoss(*slow), metrics={"accuracy": accuracy}, max_epochs=15,
                              batch_size=32, strategy=strategy, progress=False, world=world,
                              scheduler=scheduler)  # fmt: skip
    history = trainer.fit(train, val)  # async-shared / async-ps take the loop over through strategy.fit
    out = {"history": [h.get("val_accuracy") for h in history], "stats": getattr(strategy, "stats", {})}
    if name == "local-sgd":
        out["val_accuracy"] = history[-1]["val_accuracy"]  # the trainer averaged the ranks before validating
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        everyone = torch.stack(world.comm.allgather(flat))
        out.update(spread=(everyone - everyone[0]).abs().max().item(), steps=strategy.steps,
                   averages=strategy.averages)  # fmt: skip
    else:
        out["val_accuracy"] = history[-1]["val_accuracy"]
    if name == "async-ps":
        records = world.comm.allgather(
            (strategy.applied_log, strategy.reply_log) if strategy.is_server else None
        )
        out["servers"] = [{"applied": r[0], "replies": r[1]} for r in records if r is not None]
        out["numels"] = [p.numel() for p in model.parameters()]
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        everyone = torch.stack(world.comm.allgather(flat))
        out["spread"] = (everyone - everyone[0]).abs().max().item()
    if world.is_main:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    slow = (-1, 0.0)
    if "--slow" in args:
        i = args.index("--slow")
        slow = (int(args[i + 1]), float(args[i + 2]))
        args = args[:i] + args[i + 3 :]
    for options in args[1:]:
        run(args[0], json.loads(options), slow)
