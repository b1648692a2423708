"""Peak memory per rank: data parallel with everything replicated, ZeRO-1 (``shard_optimizer``) and ZeRO-2
(``shard_optimizer`` + ``shard_gradients``), same model, same batch, each run in fresh ranks.

    python benchmarks/bench_zero_memory.py [--ranks 2] [--repeats 2] [--width 4096] [--io 2048] [--steps 5]
                                           [--modes replicated zero-1 zero-2] [--smoke]

An MLP (io -> width -> width -> io -> io; 21 M parameters at width 2560, io 2048) with Adam under ``allreduce``
(reducer ``mpi``, default buckets) on N ranks of 1 thread, a global batch of 64. Per rank it reports the peak
resident memory of the whole process (``getrusage`` ``ru_maxrss``: the kernel's high-water mark) and that peak above
the resident memory once the model was built (what training added: gradients, buckets, optimizer state, gather
buffers), the largest over the ranks, and samples/s. The modes alternate between repeats; medians are printed.
The worker half runs inside the ranks (``--worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODES = {"replicated": {}, "zero-1": {"shard_optimizer": True},
         "zero-2": {"shard_optimizer": True, "shard_gradients": True}}  # fmt: skip
SMOKE = {"repeats": 1, "width": 64, "io": 32, "steps": 2, "modes": ["zero-2"]}  # one launch: seconds


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, width: int, io: int, steps: int) -> None:
    import torch
    from torch import nn

    import caldera

    torch.set_num_threads(1)
    torch.manual_seed(0)
    world = caldera.init()
    model = nn.Sequential(nn.Linear(io, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, io), nn.ReLU(), nn.Linear(io, io))  # fmt: skip
    built = _rss_mib()
    options = {"reducer": "mpi", **MODES[mode]}
    trainer = caldera.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-4), nn.MSELoss(), world=world,
                              strategy="allreduce", strategy_options=options, progress=False)  # fmt: skip
    strategy = trainer.strategy
    strategy.setup(trainer.model, trainer.optimizer, world)
    batch = 64 // world.size
    x, y = torch.randn(batch, io), torch.randn(batch, io)
    world.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        strategy.backward(nn.functional.mse_loss(model(x), y))
        strategy.step()
    world.barrier()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rows = world.comm.allgather({"peak_mib": peak, "added_mib": peak - built})
    strategy.close()
    if world.rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(
            "RESULT " + json.dumps({"params": n, "ranks": rows, "samples_s": steps * 64 / seconds}),
            flush=True,
        )


def run(mode: str, args: argparse.Namespace) -> dict:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "--allow-run-as-root", "--oversubscribe", "-n",
           str(args.ranks), sys.executable, str(HERE), "--worker", mode, "--width", str(args.width), "--io", str(args.io), "--steps",
           str(args.steps)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=1800)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"the ranks failed ({mode}):\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--width", type=int, default=2560, help="hidden width (2560: 21 M parameters)")
    parser.add_argument("--io", type=int, default=2048, help="input and output width")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: a tiny model, one repeat (the tests run it)"
    )
    parser.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.worker:
        worker(args.worker, args.width, args.io, args.steps)
        return
    results: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes[:: 1 if repeat % 2 == 0 else -1]:
            results[mode].append(run(mode, args))
    params = results[args.modes[0]][0]["params"]
    print(f"MLP of {params / 1e6:.1f} M parameters, Adam, allreduce (mpi) on {args.ranks} ranks x 1 thread, "
          f"medians of {args.repeats}; memory: the largest rank")  # fmt: skip
    print(f"{'mode':<11} {'peak RSS MiB':>13} {'added by training MiB':>22} {'samples/s':>10}")
    for mode, runs in results.items():
        peak = statistics.median(max(r["peak_mib"] for r in run["ranks"]) for run in runs)
        added = statistics.median(max(r["added_mib"] for r in run["ranks"]) for run in runs)
        speed = statistics.median(run["samples_s"] for run in runs)
        print(f"{mode:<11} {peak:>13.1f} {added:>22.1f} {speed:>10.1f}")


if __name__ == "__main__":
    main()
