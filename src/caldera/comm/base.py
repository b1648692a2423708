"""The communicator protocol: what every strategy may ask of the other ranks.

Names follow mpi4py's convention of naming by cost: capitalised calls (``Allreduce``, ``Bcast``) move torch
tensor buffers in place and never pickle; lowercase calls (``bcast``, ``allgather``, ``allreduce``) move small
Python objects such as metrics or metadata. Every call is collective unless it says otherwise: all ranks of the
communicator must make it, in the same order.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol, runtime_checkable

import torch

OPS = ("sum", "max", "min", "prod")


@runtime_checkable
class Handle(Protocol):
    """A pending non-blocking operation."""

    # True where wait() only orders the device stream after the operation (NCCL): the host never blocks there, so
    # a caller waits at once instead of polling. Every handle class says which it is.
    stream_ordered: bool

    def wait(self) -> None:
        """Block until the operation has completed and its buffer may be read."""
        ...

    def test(self) -> bool:
        """Return True if the operation has completed, without blocking."""
        ...


@runtime_checkable
class Communicator(Protocol):
    """A group of ranks that exchange torch tensors (buffers) and small Python objects."""

    rank: int
    size: int

    def Allreduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``tensor`` over all ranks, in place."""
        ...

    def Iallreduce(self, tensor: torch.Tensor, op: str = "sum") -> Handle:
        """Start an in-place all-reduce of ``tensor``; the result is valid after ``wait()``."""
        ...

    def Bcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        """Overwrite ``tensor`` on every rank with root's values."""
        ...

    def Send(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> None:
        """Send ``tensor`` to rank ``dest`` (blocking; point to point: pipeline stages)."""
        ...

    def Isend(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> Handle:
        """Start sending ``tensor`` to ``dest``; leave it unchanged until ``wait()``."""
        ...

    def Irecv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> Handle:
        """Start receiving into ``tensor`` from ``source``; read it after ``wait()``."""
        ...

    def Recv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> None:
        """Receive into ``tensor`` (its shape and dtype must match what was sent) from rank ``source``."""
        ...

    def Allgather(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Gather equal-sized ``send`` from every rank into ``recv`` (size * send.numel(), rank order)."""
        ...

    def Iallgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        """Start gathering ``send`` from every rank into ``recv`` (rank order); valid after ``wait()``."""
        ...

    def Ialltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        """Start sending block k of ``send`` to rank k, receiving block k of ``recv`` from rank k (equal blocks);
        any dtype (the bits are moved, never combined)."""
        ...

    def Reduce_scatter(self, send: torch.Tensor, recv: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``send`` (size * recv.numel()) and leave this rank's block in ``recv``."""
        ...

    def Barrier(self) -> None:
        """Wait until every rank has arrived."""
        ...

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Return root's Python object on every rank."""
        ...

    def allgather(self, obj: Any) -> list[Any]:
        """Return the list of every rank's Python object, in rank order."""
        ...

    def allreduce(self, obj: Any, op: str = "sum") -> Any:
        """Reduce a Python number (or NumPy array) over all ranks."""
        ...

    def split(self, color: int, key: int = 0) -> Communicator:
        """Split into sub-communicators of the ranks sharing ``color``, ordered by ``key``."""
        ...

    def Free(self) -> None:
        """Release a communicator made by ``split`` (collective over its ranks)."""
        ...

    def Abort(self, code: int = 1) -> None:
        """Terminate every rank of the job (not collective: any rank may call it)."""
        ...


def wait_yielding(handle: Handle, spins: int = 64, longest_s: float = 2e-4) -> None:
    """Wait for ``handle`` without holding the core: poll ``test()``, yielding between polls, then sleeping.

    A blocking MPI wait spins at 100 % while the peer rank still computes; on shared cores (more ranks than cores,
    data workers, a neighbour job) that spin takes time from the very rank it waits for. The first ``spins``
    polls only yield (a message about to land costs no sleep); after that, sleeps double from 10 us up to
    ``longest_s``, which bounds the latency added to a late message (0.2 ms against steps of milliseconds). A
    stream-ordered handle (NCCL) is waited on directly: its ``wait()`` never blocks the host."""
    if handle.stream_ordered:
        handle.wait()
        return
    for _ in range(spins):
        if handle.test():
            return
        os.sched_yield()
    pause = 1e-5
    while not handle.test():
        time.sleep(pause)
        pause = min(2 * pause, longest_s)


def check_op(op: str) -> str:
    """Validate a reduction name and return it."""
    if op not in OPS:
        raise ValueError(f"unknown reduction op {op!r}; use one of {', '.join(OPS)}")
    return op


def shared_gpus(placements: list[tuple[str, str]]) -> dict[tuple[str, str], list[int]]:
    """Given each rank's (host, device), return the GPUs that more than one rank uses, with those ranks."""
    users: dict[tuple[str, str], list[int]] = {}
    for rank, (host, device) in enumerate(placements):
        if device.startswith("cuda"):
            users.setdefault((host, device), []).append(rank)
    return {gpu: ranks for gpu, ranks in users.items() if len(ranks) > 1}
