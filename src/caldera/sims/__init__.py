"""Built-in simulations that make data for examples and tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from caldera.comm.base import Communicator
from caldera.comm.local import LocalComm


def write_once(
    file: Path,
    write: Callable[[], object],
    what: str,
    error: type[Exception] | None = None,
    comm: Communicator | None = None,
) -> None:
    """Rank 0 of ``comm`` (default: this process alone) runs ``write()`` when ``file`` is missing while the other
    ranks wait; a failure is raised on every rank (as ``error``, default DataError), so that no rank waits forever
    for a file that will not come."""
    from caldera.data.formats import DataError

    comm = comm or LocalComm()
    problem = None
    if comm.rank == 0 and not file.exists():
        try:
            write()
        except (OSError, ValueError) as exc:
            problem = f"cannot write {what} {file}: {exc}"
    problem = comm.bcast(problem)  # also the wait: the others open the file only once rank 0 has written it
    if problem:
        raise (error or DataError)(problem)
