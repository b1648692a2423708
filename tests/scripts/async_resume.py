"""Stop an asynchronous run with SIGTERM, resume it, and compare with an unbroken run (main rank prints JSON).

Usage: python async_resume.py STRATEGY OPTIONS_JSON RUN_DIR [PRECISION]
async-shared runs alone; async-ps under mpiexec. Three runs in one job: unbroken (with checkpoints every 7
updates), stopped by SIGTERM to the main process at a worker's 30th item (a checkpoint, then Preempted on
every rank), resumed to the end.
"""

import json
import os
import signal
import sys

import torch
from torch import nn

import caldera
import caldera.parallel.async_shared  # noqa: F401  (importing a strategy module registers its name)
import caldera.parallel.param_server  # noqa: F401
from caldera.checkpoint import Checkpointer, Preempted
from caldera.data import digits, split_dataset
from caldera.train.metrics import accuracy


class StopAt(nn.Module):
    """Cross-entropy that sends SIGTERM to the main process (rank 0) at this worker's ``at``-th item: a
    preemption in the middle of the run, wherever the timing of the machine puts the items."""

    def __init__(self, at: int = 0) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            os.kill(int(os.environ["MAIN_PID"]), signal.SIGTERM)
        return nn.functional.cross_entropy(out, target)


def run(name: str, options: dict, run_dir: str, world, **ckpt) -> tuple[caldera.Trainer, object]:
    caldera.init(seed=0)
    torch.set_num_threads(1)
    train, val = split_dataset(digits(), 0.2, seed=0)
    # BatchNorm: the workers' running statistics must survive the checkpoint too.
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    resume, precision = ckpt.pop("resume", False), sys.argv[4] if len(sys.argv) > 4 else "fp32"
    trainer = caldera.Trainer(model, optimizer, StopAt(ckpt.pop('stop_at', 0)), metrics={"accuracy": accuracy},
                              max_epochs=4, batch_size=64, strategy=name, strategy_options=options,
                              progress=False, world=world, run_dir=run_dir, plot=False, resume=resume, precision=precision,
                              checkpointer=Checkpointer(f"{run_dir}/checkpoints", world, **ckpt))  # fmt: skip
    outcome = None
    try:
        trainer.fit(train, val)
    except Preempted as stop:
        outcome = stop
    return trainer, outcome


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [t.detach().flatten() for t in list(model.parameters()) + list(model.buffers())]
    ).double()


def main() -> None:
    name, options, root = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    world = caldera.init()
    os.environ["MAIN_PID"] = str(world.comm.bcast(os.getpid(), root=0))
    whole, _ = run(name, options, f"{root}/whole", world, every=7)
    stopped, preempted = run(name, options, f"{root}/broken", world, stop_at=30)
    resumed, again = run(name, options, f"{root}/broken", world, resume=True)
    if world.is_main:
        print(json.dumps({
            "preempted": preempted is not None and preempted.code == 85,
            "stopped_at": str(preempted.path) if preempted else None, "again": again is not None,
            "diff": (flat(whole.model) - flat(resumed.model)).abs().max().item(),
            "whole_history": whole.history, "resumed_history": resumed.history,
            "whole_stats": whole.strategy.stats, "resumed_stats": resumed.strategy.stats,
        }, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
