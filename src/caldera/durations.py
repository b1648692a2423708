"""Intervals and wall times as run files write them: steps (500), '90s', '45m', '2h', Slurm's 'D-HH:MM:SS'.

Here, below config and checkpoint, so that a run file's durations are checked when it is loaded without
importing the checkpoint machinery (torch, the World)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

_WORDS = ("auto", "end")  # the interval policies that are not a number of steps or a time


def parse_interval(every: int | str | None) -> tuple[int | None, float | None]:
    """Parse ``every``: an int is a number of steps; "90s", "5m", "1h" a time. Returns (steps, seconds).

    "auto" (epoch ends, at least ``caldera.checkpoint.AUTO_INTERVAL`` apart) and "end" (only at the end, at a signal or the time
    limit) have no fixed interval: (None, None)."""
    if every is None or (isinstance(every, str) and every.strip() in _WORDS):
        return None, None
    if isinstance(every, int):
        if every <= 0:
            raise ValueError("checkpoint interval must be a positive number of steps")
        return every, None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|min)?\s*", str(every))
    if not match:
        raise ValueError(
            f"checkpoint interval {every!r}: use a number of steps (500), a time ('90s', '5m', '1h'), 'auto' "
            "(epoch ends, at least 10 minutes apart) or 'end' (only at the end)"
        )
    value, unit = float(match.group(1)), match.group(2) or "s"
    return None, value * {"s": 1, "m": 60, "min": 60, "h": 3600}[unit]


def parse_duration(text: str | float | None) -> float | None:
    """Parse a wall-time limit: seconds, '45m', '2h', or Slurm's 'HH:MM:SS' / 'D-HH:MM:SS'."""
    if text is None:
        return None
    try:
        if isinstance(text, (int, float)):
            seconds = float(text)
        elif ":" in text:
            days, _, clock = text.partition("-") if "-" in text else ("0", "", text)
            parts = [int(p) for p in clock.split(":")]
            if len(parts) > 3 or int(days) < 0 or any(p < 0 for p in parts):
                raise ValueError
            parts = [0] * (3 - len(parts)) + parts
            seconds = float(int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2])
        else:
            seconds = parse_interval(text)[1]
    except (ValueError, TypeError, AttributeError, OverflowError):
        raise ValueError(
            f"{text!r} is not a duration: use seconds (7200), '45m', '2h', or 'HH:MM:SS' / 'D-HH:MM:SS'"
        ) from None
    if not 0 <= seconds < float("inf"):  # also NaN
        raise ValueError(f"{text!r}: a duration must be a finite number of seconds, 0 or more")
    return seconds


def check_time_limit(text: str | float | None) -> None:
    """Refuse a time limit that is neither a duration nor "auto" (a ValueError saying what is accepted)."""
    if not (isinstance(text, str) and text.strip() == "auto"):
        try:
            parse_duration(text)
        except ValueError as exc:
            raise ValueError(f"{exc}, or 'auto' (the Slurm job's end)") from None


def job_time_left() -> tuple[float | None, str]:
    """Seconds left in this Slurm job, with where that was read; (None, why not) outside one or without a limit.

    SLURM_JOB_END_TIME (epoch seconds; set by newer Slurm) first, else ``squeue -h -j $SLURM_JOB_ID -o %L`` (the
    time left as Slurm prints it, e.g. '1-02:03:04' or '45:00') when squeue is on PATH."""
    end = os.environ.get("SLURM_JOB_END_TIME", "")
    if end.strip().isdigit():
        return int(end) - time.time(), "SLURM_JOB_END_TIME"
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None, "no SLURM_JOB_END_TIME or SLURM_JOB_ID: not inside a Slurm job"
    squeue = shutil.which("squeue")
    if squeue is None:
        return None, f"Slurm job {job} sets no SLURM_JOB_END_TIME and squeue is not on PATH"
    try:
        out = subprocess.run(
            [squeue, "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=60
        )
        return parse_duration(out.stdout.strip()), f"squeue -j {job} -o %L"
    except (OSError, subprocess.TimeoutExpired, ValueError):  # UNLIMITED, NOT_SET, or squeue failed
        return None, f"squeue gave no time left for job {job}"
