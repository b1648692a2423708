"""Checkpoint time and rank 0's peak memory during a save: the ZeRO-1 optimizer state gathered on rank 0 vs written
shard-wise by each rank (``[checkpoint] sharded``), same model, same ranks, alternating in one run.

    python benchmarks/bench_sharded_checkpoint.py [--ranks 2] [--repeats 3] [--width 4096] [--dir DIR] [--smoke]

An MLP (2048 -> width -> width -> width -> 2048; 50 M parameters at width 4096) with Adam under ``allreduce`` with
``shard_optimizer = true`` on N ranks (1 thread each). Each repeat takes one training step, then one checkpoint
gathered and, after another step, one sharded (the order alternates between repeats). Per checkpoint it reports
the training thread's stall (capture, plus the in-memory snapshot of an asynchronous write: what training waits
for), the whole save until committed (written and fsynced), the bytes rank 0 wrote, and rank 0's peak resident
memory during the save above what it held before it (the kernel's high-water mark, reset before each save through
``/proc/self/clear_refs``). Prints medians; the worker half runs inside the ranks (``--worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SMOKE = {"repeats": 1, "width": 256}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(width: int, repeats: int, directory: str) -> None:
    import torch
    from torch import nn

    import caldera
    from caldera.checkpoint import Checkpointer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    world = caldera.init()
    model = nn.Sequential(nn.Linear(2048, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2048))  # fmt: skip
    checkpointer = Checkpointer(directory, world, keep=1)
    trainer = caldera.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-4), nn.MSELoss(), world=world,
                              strategy="allreduce", strategy_options={"shard_optimizer": True}, progress=False,
                              checkpointer=checkpointer)  # fmt: skip
    strategy = trainer.strategy
    strategy.setup(trainer.model, trainer.optimizer, world)
    checkpointer.begin(resume=False)
    x, y = torch.randn(8, 2048), torch.randn(8, 2048)
    rows, step = [], 0
    for repeat in range(repeats):
        for sharded in (True, False) if repeat % 2 else (False, True):
            strategy.backward(nn.functional.mse_loss(model(x), y))
            strategy.step()
            step += 1
            checkpointer.sharded = sharded
            world.barrier()
            before = _rss_kib("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the present RSS
                hwm = True
            except OSError:
                hwm = False
            t0 = time.perf_counter()
            trainer.global_step = step
            checkpointer.save(step, *trainer._capture())  # asynchronous: the training thread snapshots
            stall = time.perf_counter() - t0
            checkpointer.wait()
            total = time.perf_counter() - t0
            world.barrier()
            total = max(world.comm.allgather(total))
            if world.rank == 0:
                where = checkpointer.dir / f"step-{step:09d}"
                written = sum(f.stat().st_size for f in where.glob("*.pt"))
                own = (where / "shared.pt").stat().st_size + (where / "rank-00000.pt").stat().st_size
                peak = (_rss_kib("VmHWM") - before) / 1024 if hwm else float("nan")
                rows.append({"sharded": sharded, "stall_s": stall, "save_s": total, "peak_mib": peak,
                             "rank0_mb": own / 1e6, "all_mb": written / 1e6})  # fmt: skip
    strategy.close()
    if world.rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print("RESULT " + json.dumps({"params": n, "rows": rows}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096, help="hidden width (4096: 50 M parameters)")
    parser.add_argument(
        "--dir", default=None, help="where to write the checkpoints (default: a temporary one)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: a tiny model, one repeat (the tests run it)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.worker:
        worker(args.width, args.repeats, args.dir)
        return
    mpiexec = Path(sys.executable).parent / "mpiexec"
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "--allow-run-as-root", "--oversubscribe", "-n",
               str(args.ranks), sys.executable, str(HERE), "--worker", "--width", str(args.width), "--repeats",
               str(args.repeats), "--dir", tmp]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"the ranks failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"MLP of {result['params'] / 1e6:.1f} M parameters, Adam, allreduce + shard_optimizer on {args.ranks} "
          f"ranks, medians of {args.repeats}:")  # fmt: skip
    print(
        f"{'checkpoint':<10} {'stall s':>8} {'save s':>8} {'rank-0 peak MiB':>16} {'rank-0 MB':>10} {'all MB':>8}"
    )
    for sharded in (False, True):
        rows = [r for r in result["rows"] if r["sharded"] == sharded]
        med = {k: statistics.median(r[k] for r in rows) for k in ("stall_s", "save_s", "peak_mib", "rank0_mb",
                                                                     "all_mb")}  # fmt: skip
        print(f"{'sharded' if sharded else 'gathered':<10} {med['stall_s']:>8.3f} {med['save_s']:>8.3f} "
              f"{med['peak_mib']:>16.1f} {med['rank0_mb']:>10.1f} {med['all_mb']:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
