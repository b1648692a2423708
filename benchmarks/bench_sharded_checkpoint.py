"""Checkpoint time and rank 0's peak memory during a save: the ZeRO-1 optimizer state gathered on rank 0 vs written
shard-wise by each rank (``[checkpoint] sharded``), and the peer as its users tune it: PyTorch's
``torch.distributed.checkpoint.async_save`` of an FSDP2 (``fully_shard``) model and its sharded Adam state, same
model, same ranks, alternating in one run.

    python benchmarks/bench_sharded_checkpoint.py [--ranks 2] [--repeats 3] [--width 4096] [--dir DIR] [--smoke]

An MLP (2048 -> width -> width -> width -> 2048; 50 M parameters at width 4096) with Adam under ``allreduce`` with
``shard_optimizer = true`` on N ranks (1 thread each). Each repeat takes one training step, then one checkpoint
gathered and, after another step, one sharded (the order alternates between repeats). Per checkpoint it reports
the training thread's stall (capture, plus the in-memory snapshot of an asynchronous write: what training waits
for), the whole save until committed (written and fsynced), the bytes rank 0 wrote, and rank 0's peak resident
memory during the save above what it held before it (the kernel's high-water mark, reset before each save through
``/proc/self/clear_refs``). The peer's stall is the time ``get_state_dict`` plus ``async_save`` hold the training
thread (staging to CPU memory included), its save the time until the returned future completes. Prints medians; the
worker halves run inside the ranks (``--worker`` / ``--worker-dcp``).
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


def _start_peak() -> tuple[int, bool]:
    """This process's resident KiB now, and whether its high-water mark (VmHWM) was reset to it (Linux only)."""
    before = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the present RSS
        return before, True
    except OSError:
        return before, False


def worker(width: int, repeats: int, directory: str, phase: int = 0) -> None:
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
    for repeat in range(phase, phase + repeats):
        for sharded in (True, False) if repeat % 2 else (False, True):
            strategy.backward(nn.functional.mse_loss(model(x), y))
            strategy.step()
            step += 1
            checkpointer.sharded = sharded
            world.barrier()
            before, hwm = _start_peak()
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


def worker_dcp(width: int, repeats: int, directory: str) -> None:
    """The peer: gloo process group, each Linear and the whole model ``fully_shard``-ed (FSDP2's per-block
    wrapping), Adam, and one ``dcp.async_save`` per repeat of the sharded model and optimizer state dicts."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=size)
    model = nn.Sequential(nn.Linear(2048, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2048))  # fmt: skip
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(8, 2048), torch.randn(8, 2048)
    rows = []
    for step in range(1, repeats + 1):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        before, hwm = _start_peak()
        where = Path(directory) / f"dcp-{step:09d}"
        t0 = time.perf_counter()
        model_state, optim_state = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": model_state, "optim": optim_state}, checkpoint_id=str(where))
        stall = time.perf_counter() - t0
        future.result()
        total = time.perf_counter() - t0
        dist.barrier()
        totals = [None] * size
        dist.all_gather_object(totals, total)
        if rank == 0:
            written = sum(f.stat().st_size for f in where.iterdir())
            own = sum(f.stat().st_size for f in where.glob("__0_*"))
            peak = (_rss_kib("VmHWM") - before) / 1024 if hwm else float("nan")
            rows.append({"sharded": "dcp", "stall_s": stall, "save_s": max(totals), "peak_mib": peak,
                         "rank0_mb": own / 1e6, "all_mb": written / 1e6})  # fmt: skip
    if rank == 0:
        print("RESULT " + json.dumps({"params": sum(p.numel() for p in model.parameters()), "rows": rows}),
              flush=True)  # fmt: skip
    dist.barrier()
    # No gloo teardown at interpreter exit: with FSDP's hooks alive it sometimes ends in std::terminate (exit -6).
    sys.stdout.flush()
    os._exit(0)


def _launch(args: argparse.Namespace, role: str, tmp: str, phase: int) -> dict:
    from caldera.launch import build_command

    # mpiexec even inside a Slurm allocation: the peer's ranks read Open MPI's OMPI_COMM_WORLD_* variables.
    cmd = build_command(args.ranks, [sys.executable, str(HERE), role, "--width", str(args.width), "--repeats", "1",
                                     "--dir", tmp, "--phase", str(phase)], prefer="mpiexec")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"the ranks failed ({role}):\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


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
    parser.add_argument("--worker-dcp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.worker or args.worker_dcp:
        if args.worker_dcp:
            worker_dcp(args.width, args.repeats, args.dir)
        else:
            worker(args.width, args.repeats, args.dir, args.phase)
        return
    rows, params = [], 0
    # One launch per repeat and side (Caldera's launch saves gathered and sharded, in alternating order), the
    # order of the sides alternating too, so a slower phase of a shared machine lands on both.
    for repeat in range(args.repeats):
        for role in ("--worker", "--worker-dcp")[:: 1 if repeat % 2 == 0 else -1]:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                result = _launch(args, role, tmp, repeat)
            rows += result["rows"]
            params = result["params"] if role == "--worker" else params
    print(f"MLP of {params / 1e6:.1f} M parameters, Adam, {args.ranks} ranks, medians of {args.repeats}; Caldera: "
          "allreduce + shard_optimizer; peer: FSDP2 fully_shard + DCP async_save")  # fmt: skip
    print(
        f"{'checkpoint':<22} {'stall s':>8} {'save s':>8} {'rank-0 peak MiB':>16} {'rank-0 MB':>10} {'all MB':>8}"
    )
    med = {}
    for kind, label in ((False, "Caldera gathered"), (True, "Caldera sharded"), ("dcp", "DCP async_save")):
        mine = [r for r in rows if r["sharded"] == kind]
        med[kind] = {k: statistics.median(r[k] for r in mine) for k in ("stall_s", "save_s", "peak_mib", "rank0_mb",
                                                                       "all_mb")}  # fmt: skip
        m = med[kind]
        print(f"{label:<22} {m['stall_s']:>8.3f} {m['save_s']:>8.3f} {m['peak_mib']:>16.1f} {m['rank0_mb']:>10.1f} "
              f"{m['all_mb']:>8.1f}")  # fmt: skip
    ours, peer = med[True], med["dcp"]
    print(f"Caldera sharded vs DCP async_save: stall {peer['stall_s'] / max(ours['stall_s'], 1e-9):.2f}x shorter, "
          f"save {peer['save_s'] / max(ours['save_s'], 1e-9):.2f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
