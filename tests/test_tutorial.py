"""docs/tutorial-own-model.md runs as written: its files and commands, in a fresh directory, on 2 MPI ranks, with the
job stopped after its first checkpoint (SIGTERM to the launcher, as a batch system sends) and resumed to the end."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from caldera.checkpoint import REQUEUE_EXIT_CODE
from tests.conftest import ROOT, mpiexec

pytestmark = pytest.mark.mpi

TUTORIAL = ROOT / "docs" / "tutorial-own-model.md"
# ```lang key=value ...  (the marks the tutorial puts on the blocks this test runs)
BLOCK = re.compile(r"^```(\w+)[ \t]+([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks() -> tuple[dict[str, str], dict[str, str]]:
    """The tutorial's files ({name: text}) and commands ({step: command}), in order."""
    files, commands = {}, {}
    for lang, marks, body in BLOCK.findall(TUTORIAL.read_text()):
        mark = dict(m.split("=", 1) for m in marks.split())
        if "file" in mark:
            files[mark["file"]] = body
        elif lang == "bash" and "run" in mark:
            commands[mark["run"]] = body.strip()
    return files, commands


def test_the_tutorial_runs_as_written_with_a_kill_and_a_resume(tmp_path):
    mpiexec()  # skip where MPI is missing (fail under CI)
    files, commands = blocks()
    assert set(files) == {"make_data.py", "my_data.py", "my_model.py", "run.toml"}
    assert list(commands) == ["data", "train", "resume", "predict"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # The commands as a user's shell runs them: this Python's environment first on PATH.
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip

    def run(step: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", commands[step]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    assert run("data").returncode == 0

    # Stop the job once its first checkpoint is on disk, as Ctrl-C, scancel or a time limit would.
    checkpoints = tmp_path / "runs" / "diffuser" / "checkpoints"
    job = subprocess.Popen(["bash", "-c", f"exec {commands['train']}"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 90
    while job.poll() is None and time.monotonic() < deadline and not list(checkpoints.glob("step-*")):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=90)
    assert job.returncode == REQUEUE_EXIT_CODE, (
        f"the job was not stopped half way (exit {job.returncode}):\n{out}"
    )

    resumed = run("resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "diffuser"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 8 and summary["ranks"] == 2 and summary["resumed_from"]
    assert 0 < summary["steps_run"] < summary["steps"] == 8 * 32  # only what the first job had not done
    final = summary["final"]
    assert all(math.isfinite(final[k]) for k in ("train_loss", "val_loss", "val_misfit", "val_conservation"))
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert final["val_misfit"] < history[0]["val_misfit"] / 10  # it learned

    predicted = run("predict")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    pred = np.load(tmp_path / "predictions.npy")
    assert pred.shape == (256, 1, 16, 16) and np.isfinite(pred).all()
