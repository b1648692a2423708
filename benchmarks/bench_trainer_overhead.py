"""Trainer overhead vs. a hand-written PyTorch loop on the same model, data, batches and optimizer.

    python benchmarks/bench_trainer_overhead.py [--repeats 5] [--epochs 2]

Both loops run the same number of steps on the same in-memory data; runs alternate so machine noise hits both.
Prints the median time of each and the ratio (target: Trainer <= 1.03 x the hand loop).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import caldera
from caldera.models import UNetSmall
from caldera.sims.heat import dataset

# --smoke: two steps per loop, once.
SMOKE = {"repeats": 1, "epochs": 1, "samples": 64}


def hand_loop(model, data, epochs, batch, seed):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    x, y = data.tensors
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in range(len(x) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def trainer_loop(model, data, epochs, batch, seed):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = caldera.Trainer(model, opt, nn.MSELoss(), max_epochs=epochs, batch_size=batch, seed=seed,
                              drop_last=True, progress=True, plot=False)  # fmt: skip
    trainer.fit(data)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    caldera.init()
    data = dataset(args.samples, 32, 20, seed=0)
    times: dict[str, list[float]] = {"hand": [], "trainer": []}
    for _ in range(args.repeats):
        for name, fn in (("hand", hand_loop), ("trainer", trainer_loop)):
            torch.manual_seed(0)
            model = UNetSmall(2, 1, 16)
            t0 = time.perf_counter()
            fn(model, data, args.epochs, args.batch, 0)
            times[name].append(time.perf_counter() - t0)
    hand, trainer = statistics.median(times["hand"]), statistics.median(times["trainer"])
    steps = args.epochs * (args.samples // args.batch)
    print(
        f"UNetSmall, {steps} steps of batch {args.batch}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    print(f"hand-written loop  {hand:.3f} s (median)")
    print(f"caldera.Trainer    {trainer:.3f} s (median)")
    print(
        f"ratio Trainer / hand = {trainer / hand:.3f}  (overhead {100 * (trainer / hand - 1):+.1f} %, target <= +3 %)"
    )


if __name__ == "__main__":
    main()
