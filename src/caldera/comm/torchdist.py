"""The torch.distributed communicator: Caldera's ranks over a process group instead of MPI (torchrun's ranks).

One process group carries everything: gloo moves CPU tensors and pickled Python objects; when the job computes on
GPUs the group is ``"cpu:gloo,cuda:nccl"``, so CUDA tensors go through NCCL and metrics kept on the CPU still
have a way. ``init_group`` builds it from torchrun's environment (``env://``); ``group_from`` builds it over any
other communicator (rank 0 opens the rendezvous store on a free port and announces it), which is how
``caldera.init_process_group`` gives plain PyTorch scripts under mpiexec their process group.

What MPI offers and this does not: ``Abort`` ends only this process (``os._exit``); under torchrun the agent then
stops the job's other processes on this node (other nodes' processes stop when their next collective fails or
the hang watchdog ends them). ``split`` is offered on the group of all ranks only (torch.distributed makes every
rank of the job take part in creating each group). Tags of point-to-point messages are honoured by gloo; NCCL
matches messages in order instead.
"""

from __future__ import annotations

import atexit
import functools
import operator
import os
import socket
import sys
import threading
from datetime import timedelta
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from caldera.comm.base import Communicator, check_op


def _single(new: str, old: str):
    """Newer torch names the single-tensor collectives *_single and deprecates the old names (same operation);
    looked up at the call, since a torch built without distributed support has neither."""
    return getattr(dist, new, None) or getattr(dist, old)


def backend_for(device: torch.device) -> str:
    """The process group's backends for a job computing on ``device``: gloo alone on CPUs, NCCL beside it on GPUs."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def _torch_op(op: str):
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
            "prod": dist.ReduceOp.PRODUCT}[check_op(op)]  # fmt: skip


def _combine(op: str):
    """The Python-side reduction of two objects (numbers or NumPy arrays) for ``allreduce``."""
    if op == "sum":
        return operator.add
    if op == "prod":
        return operator.mul
    pick = np.maximum if op == "max" else np.minimum
    builtin = max if op == "max" else min
    return lambda a, b: (
        pick(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else builtin(a, b)
    )


class WorkHandle:
    """A pending torch.distributed operation; ``after`` runs once it has completed (a copy back, say)."""

    def __init__(self, work: Any, cuda: bool, after: Any = None) -> None:
        self._work, self._after = work, after
        # On a GPU, wait() only orders the current CUDA stream after the operation: the host never blocks, so
        # callers may queue several steps at once instead of polling (see comm/lowp.py).
        self.stream_ordered = cuda

    def wait(self) -> None:
        """Block (CPU) or order the current stream (GPU) until the operation completes."""
        self._work.wait()
        self._finish()

    def test(self) -> bool:
        """Return True if the operation completed."""
        done = bool(self._work.is_completed())
        if done:
            self._work.wait()  # collects the result (and any error) of the finished operation
            self._finish()
        return done

    def _finish(self) -> None:
        if self._after is not None:
            after, self._after = self._after, None
            after()


class TorchDistComm:
    """A communicator over a torch.distributed process group (the default group of all ranks unless given)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._world = group is None

    # -- tensor (buffer) collectives -------------------------------------------------------------------------
    def Allreduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``tensor`` over all ranks, in place (bf16 on the CPU is summed in fp32, as over MPI)."""
        self.Iallreduce(tensor, op).wait()

    def Iallreduce(self, tensor: torch.Tensor, op: str = "sum") -> WorkHandle:
        """Start an in-place all-reduce; read ``tensor`` only after ``wait()``."""
        if tensor.dtype == torch.bfloat16 and not tensor.is_cuda:
            wide = tensor.float()  # the same sums as MPIComm's (which has no bf16 type and widens)
            work = dist.all_reduce(wide, op=_torch_op(op), group=self.group, async_op=True)
            return WorkHandle(work, False, lambda: tensor.copy_(wide))
        work = dist.all_reduce(tensor, op=_torch_op(op), group=self.group, async_op=True)
        return WorkHandle(work, tensor.is_cuda)

    def Bcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        """Overwrite ``tensor`` on every rank with root's values."""
        dist.broadcast(tensor, group=self.group, group_src=root)

    def Send(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> None:
        """Send ``tensor`` to rank ``dest`` (blocking)."""
        dist.send(tensor.contiguous(), group=self.group, group_dst=dest, tag=tag)

    def Isend(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> WorkHandle:
        """Start sending ``tensor`` (contiguous) to ``dest``; do not change it before ``wait()``."""
        work = dist.isend(tensor, group=self.group, group_dst=dest, tag=tag)
        return WorkHandle(work, tensor.is_cuda)

    def Irecv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> WorkHandle:
        """Start receiving into ``tensor`` from ``source``; read it only after ``wait()``."""
        work = dist.irecv(tensor, group=self.group, group_src=source, tag=tag)
        return WorkHandle(work, tensor.is_cuda)

    def Recv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> None:
        """Receive into ``tensor`` from rank ``source`` (blocking)."""
        dist.recv(tensor, group=self.group, group_src=source, tag=tag)

    def Allgather(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Gather equal-sized ``send`` from every rank into ``recv`` in rank order."""
        self.Iallgather(send, recv).wait()

    def Iallgather(self, send: torch.Tensor, recv: torch.Tensor) -> WorkHandle:
        """Start gathering equal-sized ``send`` from every rank into ``recv``; read it after ``wait()``."""
        out = recv.view(-1)
        work = _single("all_gather_single", "all_gather_into_tensor")(
            out, send.reshape(-1), group=self.group, async_op=True
        )
        return WorkHandle(work, send.is_cuda)

    def Ialltoall(self, send: torch.Tensor, recv: torch.Tensor) -> WorkHandle:
        """Start sending block k of ``send`` to rank k; block k of ``recv`` comes from rank k (equal blocks)."""
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        return WorkHandle(work, send.is_cuda)

    def Reduce_scatter(self, send: torch.Tensor, recv: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``send`` and leave this rank's block of it in ``recv``."""
        _single("reduce_scatter_single", "reduce_scatter_tensor")(
            recv.view(-1), send.reshape(-1), op=_torch_op(op), group=self.group
        )

    def Barrier(self) -> None:
        """Wait until every rank has arrived."""
        dist.barrier(group=self.group)

    # -- object collectives (pickled by torch.distributed; for small metadata) -------------------------------
    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Return root's Python object on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=root)
        return box[0]

    def allgather(self, obj: Any) -> list[Any]:
        """Return every rank's object, in rank order."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def allreduce(self, obj: Any, op: str = "sum") -> Any:
        """Reduce a Python number or NumPy array over all ranks (gathered, then combined in rank order)."""
        return functools.reduce(_combine(check_op(op)), self.allgather(obj))

    def split(self, color: int, key: int = 0) -> Communicator:
        """Split into sub-communicators by ``color`` (ordered by ``key``); offered on the group of all ranks only."""
        if not self._world:
            raise NotImplementedError(
                "splitting a split communicator is not offered over torch.distributed (every rank of the job must "
                "create each group); start the ranks with `caldera launch -n N` or mpiexec to use MPI instead"
            )
        colors = self.allgather((color, key, self.rank))
        mine = None
        # Every rank creates every group, in the same order: torch.distributed numbers groups by creation.
        for c in sorted({c for c, _, _ in colors}):
            ranks = [r for _, r in sorted((k, r) for cc, k, r in colors if cc == c)]  # by key, then rank
            group = dist.new_group(ranks=ranks, sort_ranks=False)
            if c == color:
                mine = group
        return TorchDistComm(mine)

    def Free(self) -> None:
        """Release a communicator made by ``split``."""
        if not self._world:
            dist.destroy_process_group(self.group)

    def Abort(self, code: int = 1) -> None:
        """End this process at once with ``code``; torchrun's agent then stops the job's other processes."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def init_group(device: torch.device, timeout: float | None = None) -> None:
    """Create the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), init_method="env://", **_timeout(timeout))
        _joined_group()


def group_from(comm: Communicator, device: torch.device, local_rank: int, local_size: int,
               timeout: float | None = None) -> None:  # fmt: skip
    """Create torch.distributed's default process group over the ranks of ``comm`` (collective; idempotent).

    Rank 0 opens the rendezvous store on a port the OS picks (no race for it) and announces its host name and
    port through ``comm``: nobody configures MASTER_ADDR or MASTER_PORT (a MASTER_ADDR already set names the host
    to announce, for hosts whose name resolves to the wrong network). RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT are then set as torchrun would set them.
    """
    if dist.is_initialized():
        return
    store = None
    if comm.rank == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        store = dist.TCPStore(host, 0, comm.size, is_master=True, wait_for_workers=False, **_timeout(timeout))
        where = (host, store.port)
    else:
        where = None
    host, port = comm.bcast(where)
    if store is None:
        store = dist.TCPStore(host, port, comm.size, is_master=False, **_timeout(timeout))
    os.environ.update(RANK=str(comm.rank), WORLD_SIZE=str(comm.size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_size), MASTER_ADDR=host, MASTER_PORT=str(port))  # fmt: skip
    dist.init_process_group(backend_for(device), store=store, rank=comm.rank, world_size=comm.size,
                            **_timeout(timeout))  # fmt: skip
    _joined_group()


# Whether this process made a process group: exit_process then skips the interpreter's teardown.
_joined = False


def _joined_group() -> None:
    global _joined
    _joined = True
    atexit.register(_destroy)


def _destroy() -> None:
    """Tear the default group down before the interpreter does. Local for gloo, no collective; registered after
    mpi4py's MPI_Finalize, so it runs before it."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``. After a process group was made: the exit handlers run (files closed, the
    group destroyed, MPI finalized), then the process ends without the interpreter's teardown.

    Why: gloo's threads can still hold tensors then, and freeing one in a dying interpreter aborts the process
    ("terminate called without an active exception", exit -6) after all its work is done: about one torchrun
    job in twenty on a loaded machine, even with the group destroyed first (pytorch/pytorch#179291)."""
    if not _joined:
        sys.exit(code)
    # As the interpreter would, the other non-daemon threads (a file writer) finish first.
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _timeout(seconds: float | None) -> dict[str, timedelta]:
    return {} if seconds is None else {"timeout": timedelta(seconds=seconds)}
