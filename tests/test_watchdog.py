"""The hang watchdog: a job whose ranks stop progressing ends with a report naming the stuck rank, never idles."""

import re
import subprocess
import sys
import time

import pytest
import torch

from caldera.config import ConfigError, load_config
from caldera.train.run import build_trainer
from caldera.world import World
from tests.conftest import ROOT, run_ranks

SCRIPT = "tests/scripts/hang.py"


@pytest.mark.mpi
def test_a_rank_blocked_in_python_is_named_with_its_stack_and_the_job_ends():
    t0 = time.monotonic()
    r = run_ranks(3, [SCRIPT, "python", "2"], timeout=120)
    err = r.stderr
    assert r.returncode == 124, err[-3000:]
    assert time.monotonic() - t0 < 90
    assert "finished without a hang" not in r.stdout
    assert "no rank has made progress" in err
    # Rank 1 was slow for steps 1-3 (1 s each, 3 s in all, timeout 2 s): no alarm until it really stopped.
    assert "The others wait for rank(s) 1 (epoch 1, step 4, loading a batch)" in err
    assert re.search(r"ranks 0, 2 +epoch 1, step 4, training step", err)
    assert "in stuck_in_python" in err  # rank 1's own stack, printed at rank 0's request
    assert err.count("thread 'MainThread'") == 3  # every rank's stack


@pytest.mark.mpi
def test_online_training_whose_simulation_is_stuck_in_native_code_holding_the_interpreter_lock():
    r = run_ranks(2, [SCRIPT, "native", "2"], timeout=120)
    err = r.stderr + r.stdout
    assert r.returncode == 124, err[-3000:]
    assert "finished without a hang" not in err
    assert re.search(r"rank 1 +step \d+, simulation; .*silent for", err)  # between two train() rounds
    assert re.search(r"rank 0 +step \d+, training step", err)  # waiting for it in the next round
    assert "The others wait for rank(s) 1: their watchdog threads stopped answering" in err
    assert "in stuck_in_native" in err  # faulthandler's dump: its thread needs no interpreter lock


def test_one_process_watches_itself():
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    r = subprocess.run([sys.executable, SCRIPT, "python", "1.5"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=env)  # fmt: skip
    assert r.returncode == 124, r.stderr[-3000:]
    assert "rank 0 has made no progress for 2 s (epoch 1, step 4, loading a batch)" in r.stderr
    assert "in stuck_in_python" in r.stderr


def test_hang_timeout_in_the_run_file(tmp_path):
    good = {"model": {"name": "mlp"}, "data": {"source": "digits"}}
    model = torch.nn.Linear(2, 2)
    world = World()
    for value, seconds in (("90s", 90.0), ("30m", 1800.0), (0, 0.0), (None, 0.0)):  # None: off in one process
        cfg = load_config({**good, "run": {"hang_timeout": value, "dir": str(tmp_path)}})
        assert build_trainer(cfg, model, 10, world).hang_timeout == seconds
    for bad in ("soon", -5):
        with pytest.raises(ConfigError, match=r"\[run\] hang_timeout = .*use seconds \(600\), a time"):
            load_config({**good, "run": {"hang_timeout": bad}})
