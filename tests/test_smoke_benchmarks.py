"""Every benchmark runs in its smoke mode (``--smoke``: tiny sizes, one repeat), so no refactor leaves one broken.

A new ``benchmarks/bench_*.py`` is picked up by the glob and fails here until it has a ``--smoke`` flag."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

# scaling_model.py is no bench_*: it fits and predicts offline from its stored measurements, and smokes the same way.
BENCHMARKS = sorted([*(p.name for p in (ROOT / "benchmarks").glob("bench_*.py")), "scaling_model.py"])
MULTI_RANK = {
    "bench_async.py",
    "bench_cluster.py",
    "bench_data_parallel.py",
    "bench_fsdp.py",
    "bench_pipeline.py",
    "bench_sharded_checkpoint.py",
    "bench_tensor.py",
    "bench_tensor_serve.py",
    "bench_tune.py",
    "bench_zero_memory.py",
}  # they start mpiexec themselves
# Run by tests/test_smoke_benchmarks_more.py instead: pytest-xdist hands each test file to one worker
# (`--dist loadfile`), and all smoke runs in one file made the longest file of the suite (about 4 minutes).
IN_SECOND_FILE = {
    "bench_async.py", "bench_checkpoint.py", "bench_compile.py", "bench_inference.py", "bench_pipeline.py",
    "bench_tensor.py", "scaling_model.py",
}  # fmt: skip


def params(names: list[str]) -> list:
    """The benchmarks as test parameters, the multi-rank ones marked ``mpi``."""
    return [pytest.param(n, marks=[pytest.mark.mpi] if n in MULTI_RANK else []) for n in names]


@pytest.mark.parametrize("name", params([n for n in BENCHMARKS if n not in IN_SECOND_FILE]))
def test_benchmark_runs_in_smoke_mode(name, tmp_path):
    run_smoke(name, tmp_path)


def run_smoke(name: str, tmp_path) -> None:
    """Run ``benchmarks/<name> --smoke`` from a scratch directory and check it measured and left docs/ alone."""
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg"}
    # From a scratch directory: whatever a benchmark writes beside it lands there, not in the checkout.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--smoke"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "hung" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert any(c.isdigit() for c in proc.stdout), proc.stdout  # it printed its measurements
    # A smoke run never overwrites the figures the docs show.
    touched = [p for p in (ROOT / "docs").rglob("*") if p.is_file() and p.stat().st_mtime >= started]
    assert not touched, f"{name} --smoke wrote into docs/: {touched}"
