"""The main job, as a user runs it: `caldera train examples/heat_surrogate.toml`."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from caldera.version import __version__
from tests.conftest import ROOT, run_ranks


def test_main_job_trains_and_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "heat"
    proc = subprocess.run(
        [sys.executable, "-m", "caldera.cli", "train", "examples/heat_surrogate.toml",
         "--set", f"run.dir={run_dir}", "--set", "data.args.n_samples=300", "--set", "optim.epochs=3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "epoch 3" in proc.stdout and "val_rel_l2" in proc.stdout
    for name in ("config.toml", "config.resolved.json", "metrics.jsonl", "metrics.csv", "model.pt",
                 "learning_curve.png", "predictions.png"):  # fmt: skip
        assert (run_dir / name).exists(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["train_loss"]
    assert json.loads((run_dir / "config.resolved.json").read_text())["optim"]["epochs"] == 3


def test_info_alone_reports_the_software_and_one_rank():
    proc = subprocess.run(
        [sys.executable, "-m", "caldera.cli", "info"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch " in proc.stdout and "ranks: 1" in proc.stdout and "no problems found" in proc.stdout


@pytest.mark.mpi
def test_info_under_mpiexec_lists_every_rank_and_flags_oversubscribed_threads():
    crowded = run_ranks(2, ["-m", "caldera.cli", "info"], env={"OMP_NUM_THREADS": str(os.cpu_count())})
    assert crowded.returncode == 0, crowded.stderr[-2000:]
    rows = [line.split() for line in crowded.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [r[0] for r in rows] == ["0", "1"] and [r[2] for r in rows] == ["0/2", "1/2"], crowded.stdout
    assert [r[4] for r in rows] == [str(os.cpu_count())] * 2  # each rank's torch threads
    assert "torch threads" in crowded.stdout and "set OMP_NUM_THREADS=" in crowded.stdout  # 2 x all cores


def test_info_flags_ranks_sharing_a_gpu():
    from caldera.info import problems

    rank = {"host": "n1", "threads": 1, "local_size": 2}
    shared = [{**rank, "rank": 0, "device": "cuda:0"}, {**rank, "rank": 1, "device": "cuda:0"}]
    assert any("share cuda:0 on n1" in p for p in problems(shared))
    own = [{**rank, "rank": 0, "device": "cuda:0"}, {**rank, "rank": 1, "device": "cuda:1"}]
    assert not any("share" in p for p in problems(own))


def test_python_m_caldera_and_version_come_from_one_place():
    """``python -m caldera`` is the command (mpiexec without the venv's bin on PATH); the version is written once."""
    proc = subprocess.run(
        [sys.executable, "-m", "caldera", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"caldera {__version__}", proc.stdout + proc.stderr
    assert (
        importlib.metadata.version("caldera") == __version__
    )  # pyproject.toml reads it from caldera.version
    assert (ROOT / "src" / "caldera" / "py.typed").exists() and (ROOT / "LICENSE").exists()
    assert f'version: "{__version__}"' in (ROOT / "CITATION.cff").read_text()
