"""What the multi-rank benchmarks share: their command line, the timed loop inside the ranks, and a measured run.

A benchmark is one file with two halves: the driver (``main``) starts each row's ranks through
``caldera.launch.build_command`` and reads what they print; the worker half (``--worker ...``) runs inside the ranks
and prints ``samples/s=`` (``report_rate``) and whatever else its driver reads. The benchmarks import this file from
beside them (a script's folder is first on ``sys.path``, for the driver and its workers alike).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable


def bench_parser(doc: str | None, worker_fields: tuple[str, ...], **defaults: int) -> argparse.ArgumentParser:
    """The options every multi-rank benchmark has: ``--ranks --repeats --steps``, the hidden ``--worker``, ``--smoke``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=defaults.pop("ranks", 2))
    p.add_argument("--repeats", type=int, default=defaults.pop("repeats", 3))
    p.add_argument("--steps", type=int, default=defaults.pop("steps", 10))
    for name, value in defaults.items():  # the benchmark's own sizes (--dim, --layers, --batch, ...)
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    p.add_argument("--worker", nargs=len(worker_fields), metavar=worker_fields, help=argparse.SUPPRESS)
    p.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    return p


def parse(p: argparse.ArgumentParser, smoke: dict, worker: Callable[..., None]) -> argparse.Namespace | None:
    """The driver's options (``smoke`` applied under ``--smoke``), or None after running ``worker(MODE, *sizes)`` in a rank."""
    args = p.parse_args()
    if args.smoke:
        vars(args).update(smoke)
    if args.worker:
        mode, *sizes = args.worker
        worker(mode, *map(int, sizes))
        return None
    return args


def report_rate(
    one_step: Callable[[], None], samples_per_step: int, steps: int, rank: int, warmup: int = 3
) -> None:
    """Run ``warmup`` untimed then ``steps`` timed steps; rank 0 prints the rate in the form ``measured_run`` reads."""
    for _ in range(warmup):
        one_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if rank == 0:
        print(f"samples/s={samples_per_step * steps / (time.perf_counter() - t0):.1f}", flush=True)


def free_port() -> int:
    """A port nothing listens on now: a fixed one can still be held by the last run's gloo store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured_run(cmd: list[str], timeout: float = 300) -> tuple[float, str]:
    """Run one measured row (1 thread per rank, a fresh ``MASTER_PORT``): its samples/s and everything it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        # gloo's teardown (destroy_process_group) has hung after a complete, timed run: keep the measurement.
        printed = (exc.stdout or b"").decode()
        done = re.search(r"samples/s=([\d.]+)", printed)
        if done:
            print(
                f"  (warning: {' '.join(cmd[-4:])} hung after measuring; killed after {timeout:.0f} s)",
                flush=True,
            )
            return float(done.group(1)), printed
        raise RuntimeError(f"{' '.join(cmd)} hung for {timeout:.0f} s:\n{exc.stdout}\n{exc.stderr}") from None
    rate = re.search(r"samples/s=([\d.]+)", out.stdout)
    if out.returncode != 0 or not rate:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    return float(rate.group(1)), out.stdout
