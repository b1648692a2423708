"""Communicators: how ranks exchange tensors. ``LocalComm`` for one process, ``MPIComm`` over mpi4py."""

from caldera.comm.base import Communicator as Communicator
from caldera.comm.base import Handle as Handle
from caldera.comm.local import LocalComm as LocalComm

__all__ = ["Communicator", "Handle", "LocalComm"]
