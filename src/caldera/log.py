"""Library messages through ``logging``, rank-aware: rank 0 tells, every rank warns.

Caldera's modules log to ``caldera.<module>`` loggers. On a job of many ranks, an informational message that every
rank would give alike (a checkpoint set aside, data being generated) is shown by rank 0 only; warnings and errors
are shown by every rank, prefixed with the rank that gives them. A program that configures ``logging`` itself
(a handler on the root or the ``caldera`` logger) gets the records instead, with ``record.rank`` set; otherwise
Caldera adds its own handler, as Lightning does, so that a plain script still sees the messages.
``CALDERA_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) sets how much is shown (default INFO).
"""

from __future__ import annotations

import logging
import os
import sys

from caldera.errors import ConfigError

ROOT = "caldera"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Rank variables launchers set in every process (Open MPI, MPICH/Hydra, PMIx, Slurm, torchrun): before
# ``caldera.init()`` runs, they say which rank this process is without any collective call.
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS", "WORLD_SIZE")

_rank: tuple[int, int] | None = None  # (rank, size) once init() knows them


def get_logger(name: str) -> logging.Logger:
    """The logger of a Caldera module, e.g. ``get_logger(__name__)``, with the rank filter."""
    logger = logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
    # On the logger itself, not a handler: a record passes the filters of the logger it is made on only, and
    # the program's own handlers (root's) must see record.rank and no rank-1 chatter too.
    if not any(isinstance(f, RankFilter) for f in logger.filters):
        logger.addFilter(RankFilter())
    return logger


def set_rank(rank: int | None, size: int = 1) -> None:
    """Tell the filter this process's rank (``caldera.init()`` calls it; None: back to the launcher's variables)."""
    global _rank
    _rank = None if rank is None else (rank, size)


def rank_and_size() -> tuple[int, int]:
    """This process's (rank, size): from ``init()`` once it ran, else from the launcher's variables."""
    if _rank is not None:
        return _rank
    return launcher_value(_RANK_VARS, 0), launcher_value(_SIZE_VARS, 1)


def launcher_value(names: tuple[str, ...], default: int) -> int:
    """The first of the environment variables ``names`` that a launcher set to a number, else ``default``."""
    for var in names:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return default


class RankFilter(logging.Filter):
    """Set ``record.rank``; keep records below WARNING on rank 0 only (every rank would say the same)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank, size = rank_and_size()
        record.rank = rank
        return rank == 0 or record.levelno >= logging.WARNING


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (pytest's capture, a redirected stream), not the one at import."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores that
        pass


class _Formatter(logging.Formatter):
    """``caldera: message`` on rank 0 or alone, ``caldera[rank 1/4]: message`` elsewhere."""

    def format(self, record: logging.LogRecord) -> str:
        rank, size = rank_and_size()
        where = f"[rank {rank}/{size}]" if size > 1 and rank != 0 else ""
        return f"caldera{where}: {super().format(record)}"


def level_from_env() -> int:
    """``CALDERA_LOG_LEVEL`` as a logging level (INFO when unset); a wrong value is one line naming the choices."""
    raw = os.environ.get("CALDERA_LOG_LEVEL", "").strip().upper()
    if not raw:
        return logging.INFO
    if raw not in LEVELS:
        raise ConfigError(f"CALDERA_LOG_LEVEL={raw!r} is not a level; use one of {', '.join(LEVELS)}")
    return getattr(logging, raw)


def setup() -> None:
    """Give the ``caldera`` logger the rank filter and, unless the program configured logging, a stderr handler
    printing ``caldera: message`` (``caldera[rank 1/4]: message`` on other ranks). Idempotent."""
    logger = get_logger(ROOT)
    if logging.getLogger().hasHandlers() or any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.propagate = False  # the program had no handlers; ours is the one that shows the message
    try:
        logger.setLevel(level_from_env())
    except ConfigError as exc:  # at import: say it once and keep the default rather than fail every import
        sys.stderr.write(f"caldera: {exc}; using INFO\n")
        logger.setLevel(logging.INFO)
