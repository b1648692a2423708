"""[train] compile: samples/s of eager and compiled training, same model, same data, same run file, through ``train``.

    python benchmarks/bench_compile.py [--model unet|mlp] [--epochs 4] [--repeats 2] [--threads 1]

unet: the heat surrogate (``unet_small``, channels 16) on ``--samples`` 32x32 heat fields, batch 32, Adam. mlp: the
digits MLP [64, 256, 256, 10], batch 64, SGD. Each repeat trains the eager run, then the compiled one (alternating, so
machine noise hits both alike); steady samples/s is the median over the epochs after the first, which holds the
compile: "first epoch" is repeat 1's (a cold compile unless Inductor's on-disk cache has this graph); later repeats
in the same process reuse the compiled code. One process, ``--threads`` threads, CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import caldera.world
from caldera.config import load_config
from caldera.train.run import train

# --smoke: the digits MLP (the quickest compile), two epochs, once.
SMOKE = {"model": "mlp", "epochs": 2, "repeats": 1}


def run_file(args: argparse.Namespace, run_dir: Path, compile: bool) -> dict:
    """The run file of one measured run."""
    common = {"run": {"dir": str(run_dir), "seed": 0}, "optim": {"epochs": args.epochs},
              "train": {"progress": False, "plot": False, "compile": compile}}  # fmt: skip
    if args.model == "mlp":
        return {**common, "model": {"name": "mlp", "args": {"sizes": [64, 256, 256, 10]}},
                "data": {"source": "digits", "batch_size": 64, "val_fraction": 0.0, "drop_last": True},
                "optim": {**common["optim"], "name": "sgd", "lr": 0.05, "momentum": 0.9},
                "train": {**common["train"], "loss": "cross_entropy"}}  # fmt: skip
    return {**common, "model": {"name": "unet_small", "args": {"channels": args.channels}},
            "data": {"source": "heat", "args": {"n_samples": args.samples, "grid": args.grid, "steps": 10},
                     "batch_size": 32, "val_fraction": 0.0, "drop_last": True},
            "optim": {**common["optim"], "name": "adam", "lr": 1e-3}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("unet", "mlp"), default="unet")
    parser.add_argument("--samples", type=int, default=1024, help="heat fields (unet)")
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    torch.set_num_threads(args.threads)
    steady: dict[str, list[float]] = {"eager": [], "compiled": []}
    first: dict[str, list[float]] = {"eager": [], "compiled": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in ("eager", "compiled"):
                caldera.world.reset()
                run_dir = Path(tmp) / f"{name}-{r}"
                history = train(load_config(run_file(args, run_dir, name == "compiled")))
                rates = [_samples(args) / h["time_s"] for h in history[1:]]
                steady[name] += rates
                first[name].append(history[0]["time_s"])
    what = "digits MLP [64, 256, 256, 10]" if args.model == "mlp" else (
        f"heat U-Net (channels {args.channels}) on {args.grid}x{args.grid}"
    )  # fmt: skip
    print(
        f"{what}, {args.epochs} epochs x {args.repeats} repeats, {args.threads} thread(s), torch {torch.__version__}"
    )
    for name in ("eager", "compiled"):
        print(f"  {name:9s} steady {statistics.median(steady[name]):9.1f} samples/s   "
              f"first epoch {first[name][0]:6.2f} s (repeat 1; later repeats reuse the compiled code: "
              f"{statistics.median(first[name][1:] or first[name]):.2f} s)")  # fmt: skip
    ratio = statistics.median(steady["compiled"]) / statistics.median(steady["eager"])
    print(f"  compiled / eager: x{ratio:.2f} samples/s after the first epoch")


def _samples(args: argparse.Namespace) -> int:
    """Training samples per epoch (whole batches: drop_last)."""
    n, batch = (1797, 64) if args.model == "mlp" else (args.samples, 32)
    return n // batch * batch


if __name__ == "__main__":
    main()
