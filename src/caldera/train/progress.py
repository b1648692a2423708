"""Progress bars: one rich bar on rank 0 (training steps, predicted samples, tuning trials); nothing elsewhere.

On a terminal the bar redraws in place. In a batch log (output not a terminal, ``NO_COLOR`` set or ``TERM=dumb``)
it prints a plain line every ``CALDERA_PROGRESS_INTERVAL`` seconds (default 30) and a last one at the end, with
no terminal control sequence: a day-long job's output file holds a few lines per hour instead of every redraw.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import IO, Any

from caldera.errors import ConfigError

DEFAULT_INTERVAL = 30.0  # seconds between plain progress lines in a batch log


def plain_output() -> bool:
    """True where progress and log lines must be plain text: not a terminal, ``NO_COLOR`` or ``TERM=dumb``.

    Both stdout and stderr must be terminals: Open MPI gives each rank's stdout a pseudo-terminal even when
    mpiexec's own output is a pipe or a file, while stderr stays a pipe there and tells the truth."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM", "").lower() == "dumb":
        return True
    return not all(_isatty(f) for f in (sys.stdout, sys.stderr))


def _isatty(f: Any) -> bool:
    try:
        return bool(f is not None and f.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def make_console(**kwargs: Any) -> Any:
    """A rich Console for log lines that writes no escape code where ``plain_output()`` holds."""
    from rich.console import Console

    if plain_output():
        # force_terminal=False overrides Open MPI's pseudo-terminal (rich 15 then writes no escape code; its bar
        # would show only once, at the end); no colour system keeps styles plain should a rich version differ.
        kwargs.update(force_terminal=False, no_color=True, color_system=None, legacy_windows=False)
    return Console(**kwargs)


def progress_interval() -> float:
    """Seconds between plain progress lines: ``CALDERA_PROGRESS_INTERVAL``, else 30."""
    raw = os.environ.get("CALDERA_PROGRESS_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(
            f"CALDERA_PROGRESS_INTERVAL={raw!r} is not a number of seconds >= 0; set it to e.g. 30"
        )
    return seconds


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Lines:
    """The plain form of a bar: ``label  done/total  name value ...  elapsed h:mm:ss  remaining h:mm:ss`` once
    per ``interval`` seconds of updates, and a last line at ``close`` (``now`` is the clock, for tests)."""

    def __init__(self, label: str, fields: dict[str, Any], write: Callable[[str], None],
                 interval: float | None = None, now: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.label, self.values, self.write, self.now = label, dict(fields), write, now
        # Fields the label shows itself ("epoch {task.fields[epoch]}") get no column of their own.
        self.columns = [k for k in fields if f"[{k}]" not in label]
        self.interval = progress_interval() if interval is None else interval
        self.done: float = 0
        self.total: float | None = None
        self.begin: float = 0
        self.started: float | None = None
        self.last: float | None = None  # when the last line was printed
        self.printed: str | None = None

    def update(self, advance: float, completed: float | None, total: float | None, begin: float,
               fields: dict[str, Any]) -> None:  # fmt: skip
        """Record the new state; print a line when ``interval`` has passed since the last one."""
        t = self.now()
        if self.started is None:
            self.started, self.last, self.begin, self.done = t, t, begin, begin
        if total is not None:
            self.total = total
        self.done = completed if completed is not None else self.done + advance
        self.values.update(fields)
        if t - (self.last or t) >= self.interval:
            self._emit(t)

    def close(self) -> None:
        """Print the final state (unless that very line was the last printed); nothing if never updated."""
        if self.started is not None:
            line = self.line(self.now())
            if line != self.printed:
                self.write(line)
                self.printed = line

    def line(self, t: float) -> str:
        """The progress line at time ``t``."""
        from rich.text import Text

        label = Text.from_markup(self.label.format(task=SimpleNamespace(fields=self.values))).plain
        count = f"{self.done:g}/{self.total:g}" if self.total is not None else f"{self.done:g}"
        parts = [label, count, *(f"{k} {self.values[k]}" for k in self.columns)]
        elapsed = t - (self.started if self.started is not None else t)
        parts.append(f"elapsed {_clock(elapsed)}")
        rate = (self.done - self.begin) / elapsed if elapsed > 0 else 0
        if self.total is not None and rate > 0:
            parts.append(f"remaining {_clock(max(self.total - self.done, 0) / rate)}")
        return "  ".join(parts)

    def _emit(self, t: float) -> None:
        line = self.line(t)
        self.write(line)
        self.printed, self.last = line, t


class NullBar:
    """What ranks other than 0 (or runs with progress off) get: every call does nothing."""

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> NullBar:
        """Start showing the bar."""
        return self

    def update(self, advance: float = 0, completed: float | None = None, total: float | None = None,
               begin: float = 0, **fields: Any) -> None:  # fmt: skip
        """Move the bar by ``advance`` (or to ``completed``) and set the shown ``fields``; the first call creates
        the task with ``total`` steps, ``begin`` of them done (a resumed run)."""

    def close(self) -> None:
        """Stop showing the bar."""


class Bar(NullBar):
    """``label``, the bar, done/total, one ``name value`` column per field not named in the label, and a clock."""

    def __init__(self, label: str, fields: dict[str, Any] | None = None, console: Any = None,
                 transient: bool = False, clock: str = "remaining", file: IO[str] | None = None) -> None:  # fmt: skip
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # Field values start as "-" until the first update gives them (the loss before the first step).
        self.fields = dict(fields or {})
        self.task: Any = None
        self.lines: Lines | None = None
        if plain_output():  # a batch log: periodic plain lines, no redraws
            if file is not None:
                out = file
                self.lines = Lines(label, self.fields, lambda line: print(line, file=out, flush=True))
            elif console is not None:
                # Through the console the log lines share; markup/highlight off: the line is plain text.
                self.lines = Lines(
                    label, self.fields, lambda line: console.print(line, markup=False, highlight=False)
                )
            else:
                self.lines = Lines(label, self.fields, lambda line: print(line, flush=True))
            return
        columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn(f"{k} {{task.fields[{k}]}}") for k in self.fields if f"[{k}]" not in label]
        columns.append(TimeRemainingColumn() if clock == "remaining" else TimeElapsedColumn())
        # Bound now: a caller may redirect sys.stdout while the bar refreshes (tune's trials).
        if file is not None:
            console = Console(file=file)
        self.progress = Progress(*columns, console=console, transient=transient)

    def __enter__(self) -> Bar:
        return self.start()

    def start(self) -> Bar:
        """Start showing the bar (a context manager does it, too)."""
        if self.lines is None:
            self.progress.start()
        return self

    def update(self, advance: float = 0, completed: float | None = None, total: float | None = None,
               begin: float = 0, **fields: Any) -> None:  # fmt: skip
        """Move the bar by ``advance`` (or to ``completed``) and set the shown ``fields``; the first call creates
        the task with ``total`` steps, ``begin`` of them done (a resumed run)."""
        if self.lines is not None:
            self.lines.update(advance, completed, total, begin, fields)
            return
        if self.task is None:
            self.task = self.progress.add_task("", total=total, completed=begin, **{**self.fields, **fields})
        self.progress.update(self.task, advance=advance, completed=completed, **fields)

    def close(self) -> None:
        """Stop showing the bar (plain lines: print the last one)."""
        if self.lines is not None:
            self.lines.close()
        else:
            self.progress.stop()


def progress_bar(show: bool, label: str, fields: dict[str, Any] | None = None, console: Any = None,
                 transient: bool = False, clock: str = "remaining", file: IO[str] | None = None,
                 terminal_only: bool = False) -> NullBar:  # fmt: skip
    """A ``Bar`` when ``show`` (pass ``world.is_main and <progress asked for>``), else a ``NullBar``.

    ``terminal_only``: also a NullBar where ``plain_output()`` holds (a batch log gets no lines from it)."""
    if not show:
        return NullBar()
    if terminal_only and plain_output():
        return NullBar()
    return Bar(label, fields, console, transient, clock, file)
