"""Benchmark caldera.linalg.solve (float32 LU + fp64 refinement) against fp64 numpy/scipy solves.

Usage: python benchmarks/bench_linalg.py [--sizes 2000 4096 8000] [--repeats 3]
       python benchmarks/bench_linalg.py --device cuda [--sizes 4096 16384]   # torch tensors on a GPU

Prints, per size, the median wall time of each solver, the speedup of caldera over numpy and scipy, the
normwise backward errors and whether caldera's backward error is within 10x of the fp64 solvers'. With
``--device cuda`` the peer is ``torch.linalg.solve`` in fp64 on the same GPU, and caldera factors in float32 there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy
import scipy.linalg

from caldera.linalg import backward_error, solve

# --smoke: one small system, once; without --device also the torch table on the CPU (the GPU table's code).
SMOKE = {"sizes": [64], "repeats": 1}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _race(solvers: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median time and last output of each solver, after one warm-up each, repeats interleaved."""
    for fn in solvers.values():  # warm-up: thread pools, page faults, lazy imports, GPU kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in solvers}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):  # round-robin so slow drifts in machine load hit all solvers alike
        for name, fn in solvers.items():
            elapsed, outputs[name] = _timed(fn)
            times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def bench_size(n: int, repeats: int, seed: int) -> dict[str, Any]:
    """Time the three solvers on one random well-conditioned n x n system, interleaving the repeats."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    b = rng.standard_normal(n)
    solvers: dict[str, Callable[[], Any]] = {
        "numpy": lambda: np.linalg.solve(A, b),
        "scipy": lambda: scipy.linalg.solve(A, b),
        "caldera": lambda: solve(A, b, factor_dtype=np.float32),
    }
    med, outputs = _race(solvers, repeats)
    result = outputs["caldera"]
    errors = {
        "numpy": backward_error(A, outputs["numpy"], b),
        "scipy": backward_error(A, outputs["scipy"], b),
        "caldera": result.backward_error,
    }
    return {
        "n": n,
        "time": med,
        "be": errors,
        "iters": result.iterations,
        "method": result.method + (" (fell back)" if result.fell_back else ""),
        "within10": errors["caldera"] <= 10 * min(errors["numpy"], errors["scipy"]),
    }


def bench_size_torch(n: int, repeats: int, seed: int, device: str) -> dict[str, Any]:
    """Time torch.linalg.solve (fp64) against caldera's float32 LU + fp64 refinement on ``device``."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    A = torch.randn(n, n, dtype=torch.float64, device=device, generator=g)
    b = torch.randn(n, dtype=torch.float64, device=device, generator=g)

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            out = fn()
            if A.is_cuda:
                torch.cuda.synchronize()
            return out

        return run

    solvers = {
        "torch": synced(lambda: torch.linalg.solve(A, b)),
        "caldera": synced(lambda: solve(A, b, factor_dtype=torch.float32)),
    }
    med, outputs = _race(solvers, repeats)
    result = outputs["caldera"]
    be = {"torch": backward_error(A, outputs["torch"], b), "caldera": result.backward_error}
    return {"n": n, "time": med, "be": be, "iters": result.iterations, "method": result.method}


def main_torch(args: argparse.Namespace) -> None:
    """The GPU (or torch CPU) table: caldera against torch.linalg.solve in fp64 on the same device."""
    import torch

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "torch CPU"
    print(
        f"# {time.strftime('%Y-%m-%d')}  {name}, torch {torch.__version__}, median of {args.repeats} repeats, 1 RHS"
    )
    print(
        f"{'n':>6} {'torch fp64 s':>12} {'caldera s':>9} {'x torch':>8} {'BE torch':>9} {'BE caldera':>10} {'iters':>5}"
    )
    for n in args.sizes:
        row = bench_size_torch(n, args.repeats, args.seed, args.device)
        t, be = row["time"], row["be"]
        print(
            f"{n:>6} {t['torch']:>12.4f} {t['caldera']:>9.4f} {t['torch'] / t['caldera']:>7.2f}x "
            f"{be['torch']:>9.1e} {be['caldera']:>10.1e} {row['iters']:>5}  {row['method']}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one table row per size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default=None, help="cuda (or cpu): torch tensors on it, torch.linalg as the peer"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.device:
        main_torch(args)
        return

    print(f"# {time.strftime('%Y-%m-%d')}  {_cpu_name()}, {os.cpu_count()} cores")
    print(
        f"# numpy {np.__version__}, scipy {scipy.__version__}, OPENBLAS_CORETYPE="
        f"{os.environ.get('OPENBLAS_CORETYPE', '<unset>')}, median of {args.repeats} repeats, 1 RHS"
    )
    header = (
        f"{'n':>6} {'numpy s':>8} {'scipy s':>8} {'caldera s':>9} {'x numpy':>8} {'x scipy':>8} "
        f"{'BE numpy':>9} {'BE scipy':>9} {'BE caldera':>10} {'iters':>5} {'<=10x':>5}  method"
    )
    print(header)
    for n in args.sizes:
        row = bench_size(n, args.repeats, args.seed)
        t, be = row["time"], row["be"]
        print(
            f"{n:>6} {t['numpy']:>8.3f} {t['scipy']:>8.3f} {t['caldera']:>9.3f} "
            f"{t['numpy'] / t['caldera']:>7.2f}x {t['scipy'] / t['caldera']:>7.2f}x "
            f"{be['numpy']:>9.1e} {be['scipy']:>9.1e} {be['caldera']:>10.1e} {row['iters']:>5} "
            f"{'yes' if row['within10'] else 'NO':>5}  {row['method']}",
            flush=True,
        )
    if args.smoke:
        main_torch(argparse.Namespace(**{**vars(args), "device": "cpu"}))


if __name__ == "__main__":
    main()
