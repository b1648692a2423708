"""Hang detection: a job whose ranks stop making progress ends with a report instead of idling to its wall time.

Silent hangs are what users of distributed training complain about most: one rank blocks on a read from a dead
filesystem or in a deadlock of its own, the others wait for it in a collective, and the allocation burns until
the scheduler kills it with no word of where. Here the training loop marks its progress (phase and step); a
thread on every rank sends that mark to rank 0 every few seconds over a communicator of its own. When no rank
has moved for ``timeout`` seconds, rank 0 prints where every rank is and names the ranks the others wait for,
every rank prints its Python stack, and the job ends (exit code 124, so ``caldera launch --max-restarts``
relaunches it from the last checkpoint). Plain PyTorch loops use it too: ``with caldera.Watchdog(timeout="5m")``
and ``mark(phase, step)`` in the loop.

A rank stuck in native code that holds Python's lock cannot run its thread: rank 0 names it as not answering and
``faulthandler`` (a C-level timer that needs no lock) prints its stack. Should rank 0 itself be stuck that way,
every other rank ends the job on its own a little later. Without a thread-safe MPI (``MPI_THREAD_MULTIPLE``),
or in one process, or under torchrun (no MPI: the ranks talk through torch.distributed), each rank watches only
itself: a stuck rank ends the job with its own report, and the ranks waiting for it end theirs.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import socket
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np

from caldera.durations import parse_duration
from caldera.world import World, init

# In the order a step passes through them: at equal steps, a rank in an earlier phase is behind one in a later.
PHASES = (
    "starting",
    "simulation",  # online training: between rounds, the simulation computes on this rank
    "loading a batch",
    "training step",
    "end-of-epoch reduction",
    "validation",
    "callbacks",
    "checkpoint",
    "finishing",
)
_PHASE = {name: i for i, name in enumerate(PHASES)}
HANG_EXIT_CODE = 124  # what timeout(1) returns: "it ran out of time"
DEFAULT_TIMEOUT = 1800.0  # seconds without progress on every rank before a multi-rank job is ended
_STATUS, _COMMAND = 7301, 7302  # message tags on the watchdog's own communicator
_ADVICE = (
    "If this was a slow phase rather than a hang, raise hang_timeout ([run] hang_timeout in a run file, "
    "hang_timeout= in Python; 0 turns the watchdog off)."
)
_COMMS: dict[int, Any] = {}  # one duplicated communicator per world communicator, reused by later fits


def hang_timeout_for(world: World, hang_timeout: float | None) -> float:
    """``hang_timeout`` in seconds; None means the default: on several ranks only (alone, nobody waits); 0 off."""
    if hang_timeout is None:
        return DEFAULT_TIMEOUT if world.size > 1 else 0.0
    return float(hang_timeout)


class Watchdog:
    """End the job with a report naming the stuck ranks when none has progressed for ``timeout`` seconds.

    Around a plain loop (a DDP script, say)::

        with caldera.Watchdog(timeout="5m") as dog:  # every rank, after caldera.init_process_group()
            for step, batch in enumerate(loader):
                dog.mark("training step", step)
                ...
    """

    def __init__(self, world: World | None = None, timeout: float | str = DEFAULT_TIMEOUT,
                 beat: float | None = None) -> None:  # fmt: skip
        world = world if world is not None else init()
        timeout = parse_duration(timeout) or 0.0
        if timeout <= 0:
            raise ValueError(
                f"hang timeout must be > 0 seconds (got {timeout}); use 0 in the config to turn it off"
            )
        self.world, self.timeout = world, float(timeout)
        # The beat bounds how late a hang is noticed; a fifth of the timeout keeps that under 20 % of it.
        self.beat = beat if beat is not None else min(max(self.timeout / 5, 0.2), 30.0)
        self._mark = (0, 0, 0, time.monotonic())  # epoch, step, phase index, when
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._comm: Any = None
        self._hosts: list[str] | None = None  # every rank's hostname (rank 0 names the node of a silent rank)

    def mark(self, phase: str, step: int, epoch: int = -1) -> None:
        """Record that this rank reached ``phase`` (one of ``PHASES``) of ``step`` now (cheap: call it as often
        as you like); ``epoch`` -1 means the loop has no epochs."""
        self._mark = (epoch, step, _PHASE[phase], time.monotonic())

    def start(self) -> Watchdog:
        """Start watching (collective on several ranks: every rank must call it)."""
        mpi = getattr(self.world.comm, "comm", None)  # the mpi4py communicator behind MPIComm
        if mpi is not None and self.world.size > 1:
            from mpi4py import MPI

            if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
                key = id(mpi)
                if key not in _COMMS:
                    _COMMS[key] = mpi.Dup()  # its own tags and matching: never mixes with training's messages
                self._comm = _COMMS[key]
                self._hosts = self._comm.allgather(socket.gethostname())
        self.mark("starting", 0)
        self._thread = threading.Thread(target=self._run, name="caldera-watchdog", daemon=True)
        self._thread.start()
        # Before mpi4py finalizes MPI at exit (atexit runs last-registered first): the thread calls MPI.
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop watching (not collective)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            _cancel_faulthandler()
            atexit.unregister(self.stop)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._comm is None:
                self._watch_self()
            elif self.world.rank == 0:
                self._watch_all()
            else:
                self._report()
        except Exception as exc:  # a broken watchdog must never take a healthy job down
            sys.stderr.write(f"caldera: rank {self.world.rank}: the hang watchdog stopped: {exc!r}\n")

    def _age(self) -> float:
        return time.monotonic() - self._mark[3]

    def _status(self) -> np.ndarray:
        epoch, step, phase, _ = self._mark
        return np.array([epoch, step, phase, self._age()], dtype=np.float64)

    def _watch_self(self) -> None:
        while not self._stop.wait(self.beat):
            _arm_faulthandler(self.timeout)
            if self._age() > self.timeout:
                row = self._status()
                self._end(f"rank {self.world.rank} has made no progress for {row[3]:.0f} s ({_where(row)})")

    def _report(self) -> None:
        """A rank other than 0: send this rank's mark every beat; print the stack when rank 0 asks."""
        comm, rank = self._comm, self.world.rank
        out, send = np.zeros(4), None
        order = np.zeros(1)
        ask = comm.Irecv(order, source=0, tag=_COMMAND)
        # Rank 0 ends the job within ~timeout + 2 beats of the last progress; later, it must be stuck itself.
        backstop = 2 * self.timeout + 4 * self.beat + 10
        while not self._stop.wait(self.beat):
            _arm_faulthandler(self.timeout)
            if ask.Test():
                print_stack(f"rank {rank}")
                ask = comm.Irecv(order, source=0, tag=_COMMAND)
            if send is None or send.Test():
                out[:] = self._status()
                send = comm.Isend(out, dest=0, tag=_STATUS)
            if self._age() > backstop:
                row = self._status()
                self._end(f"rank {rank} has made no progress for {row[3]:.0f} s ({_where(row)}) and rank 0 "
                          "did not end the job (it may be stuck itself)")  # fmt: skip
        ask.Cancel()
        ask.Wait()
        if send is not None:
            send.Wait()  # 32 bytes: sent eagerly, so this does not wait for rank 0

    def _watch_all(self) -> None:
        """Rank 0: collect every rank's mark; when none has moved for the timeout, report and end the job."""
        comm, size = self._comm, self.world.size
        table = np.zeros((size, 4))  # epoch, step, phase, age when reported
        inbox = np.zeros((size, 4))
        heard = np.full(size, time.monotonic())  # when each rank's last mark arrived
        asks = [comm.Irecv(inbox[r], source=r, tag=_STATUS) for r in range(1, size)]
        while not self._stop.wait(self.beat):
            _arm_faulthandler(self.timeout)
            for i in _completed(asks):
                r = i + 1
                table[r], heard[r] = inbox[r], time.monotonic()
                asks[i] = comm.Irecv(inbox[r], source=r, tag=_STATUS)
            now = time.monotonic()
            table[0] = self._status()
            ages = table[:, 3] + (now - heard)
            ages[0] = table[0, 3]
            if ages.min() > self.timeout:
                self._hung(table, ages, now - heard)
        for a in asks:
            a.Cancel()
            a.Wait()

    def _hung(self, table: np.ndarray, ages: np.ndarray, silence: np.ndarray) -> None:
        silent = [r for r in range(1, len(table)) if silence[r] > self.timeout]
        lines = [
            f"caldera: no rank has made progress for {ages.min():.0f} s (hang_timeout = {self.timeout:g} s). "
            "Where each rank is:",
            *_table_lines(table, ages, silence, silent),
            _verdict(table, silent, self._hosts),
            f"Each rank's Python stack follows; then the job ends (exit code 124). {_ADVICE}",
        ]
        sys.stderr.write("\n" + "\n".join(lines) + "\n")
        sys.stderr.flush()
        order = np.ones(1)
        sent = [
            self._comm.Isend(order, dest=r, tag=_COMMAND) for r in range(1, len(table)) if r not in silent
        ]
        print_stack("rank 0")
        time.sleep(min(max(2 * self.beat, 1.0), 5.0))  # let the other ranks' stacks reach the launcher
        del sent
        self.world.comm.Abort(HANG_EXIT_CODE)

    def _end(self, message: str) -> None:
        sys.stderr.write(f"\ncaldera: {message}. Its Python stack follows; then the job ends (exit code 124). "
                         f"{_ADVICE}\n")  # fmt: skip
        print_stack(f"rank {self.world.rank}")
        self.world.comm.Abort(HANG_EXIT_CODE)


def print_stack(who: str) -> None:
    """Print every thread's Python stack but the watchdog's to stderr, headed by ``who``."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- {who}, thread {names.get(ident, ident)!r} (most recent call last):\n{stack}")
    sys.stderr.write("\n".join(parts) + "\n")
    sys.stderr.flush()


def _completed(requests: list[Any]) -> list[int]:
    if not requests:
        return []
    from mpi4py import MPI

    done = MPI.Request.Testsome(requests)
    return list(done or [])


def _where(row: np.ndarray) -> str:
    epoch = f"epoch {int(row[0]) + 1}, " if row[0] >= 0 else ""  # -1: a loop without epochs (online training)
    return f"{epoch}step {int(row[1])}, {PHASES[int(row[2])]}"


def _table_lines(table: np.ndarray, ages: np.ndarray, silence: np.ndarray, silent: list[int]) -> list[str]:
    groups: dict[tuple, list[int]] = {}
    for r, row in enumerate(table):
        groups.setdefault((int(row[0]), int(row[1]), int(row[2]), r in silent), []).append(r)
    lines = []
    for (epoch, step, phase, quiet), ranks in sorted(groups.items()):
        label = ("rank " if len(ranks) == 1 else "ranks ") + _ranges(ranks)
        where = _where(np.array([epoch, step, phase, 0]))
        oldest = max(ages[r] for r in ranks)
        note = f" (silent for {max(silence[r] for r in ranks):.0f} s: where it was then)" if quiet else ""
        lines.append(f"  {label:<16} {where}; last progress {oldest:.0f} s ago{note}")
    return lines


def _verdict(table: np.ndarray, silent: list[int], hosts: list[str] | None = None) -> str:
    """Which ranks the others wait for: the silent ones, else the ones furthest behind."""
    if silent:
        who = _ranges(silent)
        # Silent ranks on other nodes than rank 0's may simply be unreachable: name those nodes.
        away = sorted({hosts[r] for r in silent} - {hosts[0]}) if hosts else []
        link = f", or a lost network link to node(s) {', '.join(away)}" if away else ""
        return (f"The others wait for rank(s) {who}: their watchdog threads stopped answering (native code "
                f"holding Python's lock, a suspended or swapped-out process{link}); faulthandler prints their "
                "stacks.")  # fmt: skip
    keys = [(int(r[1]), int(r[2])) for r in table]  # step, then phase (epochs advance with the step)
    if len(set(keys)) == 1:
        return (f"Every rank is at the same place ({_where(table[0])}): a collective inside it did not complete "
                "on all ranks (ranks calling different collectives, a lost network link?); see the stacks.")  # fmt: skip
    behind = [r for r, k in enumerate(keys) if k == min(keys)]
    return f"The others wait for rank(s) {_ranges(behind)} ({_where(table[behind[0]])}); see their stacks."


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def _arm_faulthandler(timeout: float) -> None:
    # Re-armed every beat, so it fires only when this thread cannot run (Python's lock held by stuck native code).
    with contextlib.suppress(
        ValueError, AttributeError, OSError, RuntimeError
    ):  # no usable stderr (embedded)
        faulthandler.dump_traceback_later(timeout, repeat=False, file=sys.__stderr__, exit=False)


def _cancel_faulthandler() -> None:
    faulthandler.cancel_dump_traceback_later()
