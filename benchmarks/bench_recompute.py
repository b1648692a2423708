"""Activation checkpointing: memory kept for backward and step time, with and without, same model, same run.

    python benchmarks/bench_recompute.py [--batch 32] [--grid 64] [--repeats 5]

UNetSmall (channels 16) on (batch, 2, grid, grid) fields, 1 thread. "plain" is the unmodified PyTorch model (the
peer); "recomputed" is the same model after ``caldera.train.recompute.checkpoint_activations``. Memory is what
autograd keeps for backward during one forward pass (saved-tensor hooks); time is forward + backward, median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from caldera.models import UNetSmall
from caldera.train.recompute import checkpoint_activations, saved_activation_bytes

# --smoke: a small batch of small fields, once.
SMOKE = {"batch": 2, "grid": 16, "repeats": 1}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 2, args.grid, args.grid)
    plain, recomputed = UNetSmall(), UNetSmall()
    recomputed.load_state_dict(plain.state_dict())
    checkpoint_activations(recomputed)
    kept = {name: saved_activation_bytes(m, x) for name, m in (("plain", plain), ("recomputed", recomputed))}
    times: dict[str, list[float]] = {"plain": [], "recomputed": []}
    for _ in range(args.repeats):  # alternating, so machine noise hits both alike
        for name, m in (("plain", plain), ("recomputed", recomputed)):
            t0 = time.perf_counter()
            m(x).square().mean().backward()
            times[name].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"UNetSmall, batch {args.batch} of {args.grid}x{args.grid}, 1 thread, {args.repeats} repeats (medians)"
    )
    for name in ("plain", "recomputed"):
        print(
            f"  {name:10s} kept for backward {kept[name] / 2**20:7.1f} MiB   forward+backward {t[name]:.3f} s"
        )
    print(
        f"  ratio      memory x{kept['recomputed'] / kept['plain']:.2f}   time x{t['recomputed'] / t['plain']:.2f}"
    )


if __name__ == "__main__":
    main()
