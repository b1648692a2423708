"""The size-1 communicator: one process, no MPI needed, same interface as the MPI one."""

from __future__ import annotations

import os
from typing import Any

import torch

from caldera.comm.base import Communicator, check_op


class DoneHandle:
    """A handle for work that finished when it was started."""

    stream_ordered = False

    def wait(self) -> None:
        """Return at once: nothing is pending."""

    def test(self) -> bool:
        """Return True: nothing is pending."""
        return True


class LocalComm:
    """A communicator of one rank; every collective is the identity."""

    rank = 0
    size = 1

    def Allreduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Leave ``tensor`` unchanged (a reduction over one rank)."""
        check_op(op)

    def Iallreduce(self, tensor: torch.Tensor, op: str = "sum") -> DoneHandle:
        """Return a completed handle."""
        check_op(op)
        return DoneHandle()

    def Bcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        """Leave ``tensor`` unchanged."""

    def Send(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> None:
        """There is no other rank to send to."""
        raise RuntimeError(f"Send to rank {dest}: this communicator has one rank")

    def Isend(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> DoneHandle:
        """There is no other rank to send to."""
        raise RuntimeError(f"Isend to rank {dest}: this communicator has one rank")

    def Irecv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> DoneHandle:
        """There is no other rank to receive from."""
        raise RuntimeError(f"Irecv from rank {source}: this communicator has one rank")

    def Recv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> None:
        """There is no other rank to receive from."""
        raise RuntimeError(f"Recv from rank {source}: this communicator has one rank")

    def Allgather(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Copy ``send`` into ``recv``."""
        recv.view(-1).copy_(send.reshape(-1))

    def Iallgather(self, send: torch.Tensor, recv: torch.Tensor) -> DoneHandle:
        """Copy ``send`` into ``recv``; return a completed handle."""
        self.Allgather(send, recv)
        return DoneHandle()

    def Ialltoall(self, send: torch.Tensor, recv: torch.Tensor) -> DoneHandle:
        """Copy ``send`` into ``recv``; return a completed handle."""
        recv.view(-1).copy_(send.reshape(-1))
        return DoneHandle()

    def Reduce_scatter(self, send: torch.Tensor, recv: torch.Tensor, op: str = "sum") -> None:
        """Copy ``send`` into ``recv``."""
        check_op(op)
        recv.view(-1).copy_(send.reshape(-1))

    def Barrier(self) -> None:
        """Return at once."""

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Return ``obj``."""
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        """Return ``[obj]``."""
        return [obj]

    def allreduce(self, obj: Any, op: str = "sum") -> Any:
        """Return ``obj``."""
        check_op(op)
        return obj

    def split(self, color: int, key: int = 0) -> Communicator:
        """Return a new size-1 communicator."""
        return LocalComm()

    def Free(self) -> None:
        """Nothing to release."""

    def Abort(self, code: int = 1) -> None:
        """Exit the process at once with ``code``."""
        os._exit(code)
