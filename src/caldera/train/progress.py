"""Progress bars: one rich bar on rank 0 (training steps, predicted samples, tuning trials); nothing elsewhere."""

from __future__ import annotations

from typing import IO, Any


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
        columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn(f"{k} {{task.fields[{k}]}}") for k in self.fields if f"[{k}]" not in label]
        columns.append(TimeRemainingColumn() if clock == "remaining" else TimeElapsedColumn())
        # Bound now: a caller may redirect sys.stdout while the bar refreshes (tune's trials).
        if file is not None:
            console = Console(file=file)
        self.progress = Progress(*columns, console=console, transient=transient)
        self.task: Any = None

    def __enter__(self) -> Bar:
        return self.start()

    def start(self) -> Bar:
        """Start showing the bar (a context manager does it, too)."""
        self.progress.start()
        return self

    def update(self, advance: float = 0, completed: float | None = None, total: float | None = None,
               begin: float = 0, **fields: Any) -> None:  # fmt: skip
        """Move the bar by ``advance`` (or to ``completed``) and set the shown ``fields``; the first call creates
        the task with ``total`` steps, ``begin`` of them done (a resumed run)."""
        if self.task is None:
            self.task = self.progress.add_task("", total=total, completed=begin, **{**self.fields, **fields})
        self.progress.update(self.task, advance=advance, completed=completed, **fields)

    def close(self) -> None:
        """Stop showing the bar."""
        self.progress.stop()


def progress_bar(show: bool, label: str, fields: dict[str, Any] | None = None, console: Any = None,
                 transient: bool = False, clock: str = "remaining", file: IO[str] | None = None,
                 terminal_only: bool = False) -> NullBar:  # fmt: skip
    """A ``Bar`` when ``show`` (pass ``world.is_main and <progress asked for>``), else a ``NullBar``.

    ``terminal_only``: also a NullBar when stdout is no terminal (no escape codes in a batch job's log)."""
    if not show:
        return NullBar()
    if terminal_only:
        from rich.console import Console

        if not Console().is_terminal:
            return NullBar()
    return Bar(label, fields, console, transient, clock, file)
