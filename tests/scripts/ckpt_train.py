"""Train a small dropout MLP with checkpoints; optionally die (SIGKILL) or be told to stop (SIGTERM) at a step.

Usage: [mpiexec -n N] python ckpt_train.py RUN_DIR --every 3 [--kill-at K] [--term-at K] [--resume]
The run's final weights land in RUN_DIR/model.pt. Killing happens only on the first launch (CALDERA_RESTART
unset or 0), so `caldera launch --max-restarts` can finish the job.
"""

import argparse
import os
import signal

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.checkpoint import Checkpointer, Preempted

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--every", default="3")
p.add_argument("--kill-at", type=int, default=-1)
p.add_argument("--term-at", type=int, default=-1)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--resume", action="store_true")
p.add_argument("--sync", action="store_true")
args = p.parse_args()

world = caldera.init(seed=11)
g = torch.Generator().manual_seed(5)
data = TensorDataset(torch.randn(200, 20, generator=g), torch.randint(0, 5, (200,), generator=g))
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 5))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
first_launch = os.environ.get("CALDERA_RESTART", "0") == "0"


class Saboteur(caldera.Callback):
    def on_step_end(self, trainer):
        last = world.rank == world.size - 1
        if trainer.global_step == args.kill_at and last and first_launch:
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.global_step == args.term_at and last and first_launch:
            os.kill(os.getpid(), signal.SIGTERM)


every = int(args.every) if args.every.isdigit() else args.every
ckpt = Checkpointer(
    os.path.join(args.run_dir, "checkpoints"), world, every=every, keep=2, async_write=not args.sync
)
trainer = caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=args.epochs, batch_size=16, run_dir=args.run_dir,
                          strategy="allreduce" if world.size > 1 else "single", scheduler=sched, seed=3,
                          callbacks=[Saboteur()], checkpointer=ckpt, progress=False, plot=False,
                          resume=args.resume or os.environ.get("CALDERA_RESUME") == "1")  # fmt: skip
try:
    trainer.fit(data, data)
except Preempted as stop:
    if world.is_main:
        print(f"PREEMPTED at step {trainer.global_step}: {stop}", flush=True)
    raise
if world.is_main:
    print(f"DONE steps={trainer.global_step}", flush=True)
