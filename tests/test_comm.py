"""Communicators: the MPI one on real ranks, the local one in-process, same interface."""

import os
import re
import subprocess
import sys

import pytest
import torch

from caldera.comm import Communicator, LocalComm
from tests.conftest import ROOT, run_ranks


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_collectives_on_real_ranks(ranks):
    proc = run_ranks(ranks, ["tests/scripts/comm_ops.py"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("OK")) == [
        f"OK {r}" for r in range(ranks)
    ]


@pytest.mark.mpi
def test_torch_distributed_collectives_under_torchrun():
    """The same calls over torch.distributed (gloo), on 3 processes that torchrun from the torch wheel starts."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    proc = subprocess.run([*torchrun, "tests/scripts/comm_ops.py"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # torchrun passes the processes' output through one pipe, and lines of different ranks can run together.
    assert sorted(re.findall(r"OK (\d+)", proc.stdout)) == ["0", "1", "2"], proc.stdout


def test_local_comm_is_the_identity_with_the_same_interface():
    comm = LocalComm()
    assert isinstance(comm, Communicator)
    t = torch.arange(4.0)
    comm.Allreduce(t)
    comm.Iallreduce(t).wait()
    comm.Bcast(t)
    assert torch.equal(t, torch.arange(4.0))
    recv = torch.empty(4)
    comm.Allgather(t, recv)
    assert torch.equal(recv, t)
    comm.Iallgather(t.bfloat16(), half := torch.empty(4, dtype=torch.bfloat16)).wait()
    assert torch.equal(half, t.bfloat16())
    assert comm.Ialltoall(t, recv).test() and torch.equal(recv, t)
    comm.split(0).Free()
    assert comm.allgather(5) == [5] and comm.bcast("x") == "x" and comm.allreduce(3) == 3
    assert comm.split(0).size == 1
    with pytest.raises(ValueError, match="unknown reduction op 'mean'"):
        comm.Allreduce(t, op="mean")


def test_declaring_cuda_aware_mpi_over_a_library_without_cuda_support_is_refused():
    # In a subprocess: initialising MPI inside the pytest process would leak into later forking tests.
    code = (
        "from mpi4py import MPI\n"
        "from caldera.comm.mpi import cuda_aware_mpi, mpi_reports_cuda\n"
        "import os\n"
        "print('reports', mpi_reports_cuda())\n"
        "os.environ.pop('CALDERA_CUDA_AWARE_MPI')\n"
        "print('undeclared', cuda_aware_mpi())\n"  # detected: pip's Open MPI has no CUDA support -> NCCL
        "os.environ['CALDERA_CUDA_AWARE_MPI'] = '1'\n"
        "cuda_aware_mpi()\n"
    )
    env = {**os.environ, "CALDERA_CUDA_AWARE_MPI": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "reports False" in proc.stdout  # pip's Open MPI answers MPIX_Query_cuda_support = 0
    assert "undeclared False" in proc.stdout
    assert proc.returncode != 0
    assert "reports no CUDA support" in proc.stderr and "Unset CALDERA_CUDA_AWARE_MPI" in proc.stderr
