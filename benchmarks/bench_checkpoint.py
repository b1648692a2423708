"""Checkpoint cost: training-step slowdown with asynchronous checkpoints, and write bandwidth vs. a file copy.

    python benchmarks/bench_checkpoint.py [--seconds 20] [--every 5s] [--mb 100] [--policy-interval 5]

1. Trains the 6.3 M-parameter MLP with Adam (a ~75 MB checkpoint) for --seconds without checkpoints and again
   checkpointing every --every; prints the step-time slowdown, the training-thread stall per checkpoint, and that
   cost extrapolated to one checkpoint per minute (target <= 5 %).
   Then the default policy (``every = "auto"``: the first epoch end at least 10 minutes after the last
   checkpoint) with its interval shortened to --policy-interval seconds and one-second epochs; its slowdown scaled
   to the real 600 s interval is the default's cost.
2. Writes a --mb state dict with ``Checkpointer.save(block=True)`` (serialise, sha256, fsync, manifest, rename)
   and copies a file of the same bytes with shutil + fsync; prints both bandwidths and the ratio (target >= 70 %).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import caldera
from caldera.checkpoint import AUTO_INTERVAL, Checkpointer, parse_interval

# --smoke: about a second of training per variant, a 2 MB bandwidth test, once.
SMOKE = {"seconds": 1.2, "every": "0.2s", "mb": 2, "repeats": 1, "policy_interval": 0.2}


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )


def train_for(seconds: float, ckpt: Checkpointer | None, epoch_steps: int = 50) -> tuple[float, int]:
    """Return (mean step time, steps) of training for ``seconds`` (an epoch ends every ``epoch_steps``)."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(128, 1024), torch.randint(0, 10, (128,))
    loss_fn = nn.CrossEntropyLoss()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        steps += 1
        if ckpt is not None:
            capture = lambda: ({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}, {})  # noqa: E731
            ckpt.at_step_boundary(steps, capture)
            if steps % epoch_steps == 0:
                ckpt.at_epoch_end(steps, capture)
    if ckpt is not None:
        ckpt.wait()
    return (time.perf_counter() - t0) / steps, steps


def bandwidth(mb: int, tmp: Path, world, repeats: int = 5) -> tuple[float, float]:
    """Return median (checkpoint MB/s, plain copy MB/s) for ``mb`` megabytes of tensors, alternating.

    Alternating repeats matter on a VM: the first write into fresh page-cache memory is several times slower
    than later ones, and a single measurement would charge that to whichever writer went first."""
    state = {f"w{i}": torch.randn(mb * 2**20 // 4 // 10) for i in range(10)}
    ckpt = Checkpointer(tmp / "bw", world, keep=1)
    ckpt_rates, copy_rates = [], []
    for step in range(1, repeats + 2):  # the first round warms the page cache and is not counted
        t0 = time.perf_counter()
        path = ckpt.save(step, {"model": state, "epoch": 0}, {}, block=True)
        t_ckpt = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in path.iterdir())
        src = path / "shared.pt"
        t0 = time.perf_counter()
        shutil.copyfile(src, tmp / f"copy-{step}.bin")
        with open(tmp / f"copy-{step}.bin", "rb+") as f:
            os.fsync(f.fileno())
        t_copy = time.perf_counter() - t0
        (tmp / f"copy-{step}.bin").unlink()
        if step > 1:
            ckpt_rates.append(nbytes / 1e6 / t_ckpt)
            copy_rates.append(src.stat().st_size / 1e6 / t_copy)
    return statistics.median(ckpt_rates), statistics.median(copy_rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--every", default="5s")
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policy-interval", type=float, default=5.0,
                        help="the default policy's 600 s shortened to this, to measure it in seconds")  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    world = caldera.init()
    with tempfile.TemporaryDirectory(dir=".") as d:
        tmp = Path(d)
        base, _ = train_for(args.seconds, None)
        ckpt = Checkpointer(tmp / "run", world, every=args.every, keep=2)
        with_ckpt, steps = train_for(args.seconds, ckpt)
        n_ckpt = len(ckpt.save_seconds)
        stall = statistics.median(ckpt.save_seconds) if ckpt.save_seconds else 0.0
        slowdown = with_ckpt / base - 1
        interval = parse_interval(args.every)[1] or float("nan")
        per_minute = slowdown * interval / 60
        print(f"step time: {base * 1e3:.1f} ms without, {with_ckpt * 1e3:.1f} ms with a checkpoint every "
              f"{args.every} ({n_ckpt} checkpoints in {steps} steps): slowdown {100 * slowdown:+.1f} %")  # fmt: skip
        print(f"training-thread stall per checkpoint (snapshot to memory): {stall * 1e3:.0f} ms")
        print(f"extrapolated to one checkpoint per minute: {100 * per_minute:+.2f} %  (target <= 5 %)")
        policy = Checkpointer(tmp / "auto", world, every="auto", keep=2, auto_interval=args.policy_interval)
        epoch = max(1, round(1.0 / base))  # one-second epochs: several per policy interval
        with_policy, _ = train_for(args.seconds, policy, epoch_steps=epoch)
        scaled = (with_policy / base - 1) * args.policy_interval / AUTO_INTERVAL
        print(f"default policy (epoch ends >= {args.policy_interval:g} s apart, {len(policy.save_seconds)} "
              f"checkpoints): slowdown {100 * (with_policy / base - 1):+.1f} %; at its real {AUTO_INTERVAL:.0f} s: "
              f"{100 * scaled:+.3f} %")  # fmt: skip
        ck, cp = bandwidth(args.mb, tmp, world, args.repeats)
        print(f"write bandwidth, {args.mb} MB: checkpoint {ck:.0f} MB/s, plain copy + fsync {cp:.0f} MB/s, "
              f"ratio {ck / cp:.2f} (target >= 0.70)")  # fmt: skip


if __name__ == "__main__":
    main()
