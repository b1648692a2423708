"""Coupling with a running simulation: replay buffer, online trainer (alone and on real ranks), surrogates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from caldera.config import Config
from caldera.coupling import OnlineTrainer, ReplayBuffer, Surrogate
from caldera.coupling.stream import _pack, _unpack
from caldera.models import UNetSmall
from caldera.sims import heat
from caldera.train.run import build_model
from tests.conftest import ROOT, mpiexec, run_ranks


def stream(buffer: ReplayBuffer, n: int, chunk: int, first: int = 0) -> None:
    """Offer the samples first..first+n-1 (the value is the arrival index) in chunks."""
    for start in range(first, first + n, chunk):
        v = torch.arange(start, min(first + n, start + chunk), dtype=torch.float32)
        buffer.add(v[:, None], v)


def test_fifo_keeps_the_newest_and_reservoir_a_uniform_sample_of_the_whole_stream():
    fifo, reservoir = ReplayBuffer(1000, "fifo"), ReplayBuffer(1000, "reservoir", seed=1)
    for buf in (fifo, reservoir):
        stream(buf, 10_000, chunk=37)  # chunks do not divide the capacity: exercises wrap-around
        assert len(buf) == 1000 and buf.seen == 10_000
        assert torch.equal(buf.x[:, 0], buf.y)  # inputs and targets stay paired
    assert sorted(fifo.y.tolist()) == list(range(9000, 10_000))
    kept = reservoir.y
    assert len(set(kept.tolist())) == 1000  # no sample stored twice
    # Uniform over 0..9999: mean 4999.5, standard error ~91 for 1000 draws; a FIFO would give 9499.5.
    assert abs(float(kept.mean()) - 4999.5) < 400
    assert float((kept < 5000).float().mean()) == pytest.approx(0.5, abs=0.08)


def test_one_batch_larger_than_the_buffer_keeps_its_newest_samples():
    buf = ReplayBuffer(4, "fifo")
    buf.add(torch.arange(10.0)[:, None], torch.arange(10.0))
    assert sorted(buf.y.tolist()) == [6, 7, 8, 9]


def test_a_restored_buffer_continues_exactly_like_the_original():
    a = ReplayBuffer(50, "reservoir", seed=3)
    stream(a, 120, chunk=7)
    b = ReplayBuffer(50, "reservoir", seed=99)
    b.load_state_dict(a.state_dict())
    for buf in (a, b):  # the same further stream into both...
        stream(buf, 80, chunk=9, first=120)
    assert torch.equal(a.y, b.y) and a.seen == b.seen  # ...and the same replacements
    assert torch.equal(a.sample(16)[1], b.sample(16)[1])
    with pytest.raises(ValueError, match="capacity 50, policy 'reservoir'"):
        ReplayBuffer(10, "fifo").load_state_dict(a.state_dict())


def test_bad_samples_are_refused_whole_with_the_problem_named():
    buf = ReplayBuffer(8)
    buf.add(np.zeros((2, 3)), np.zeros(2))
    assert buf.x.dtype == torch.float32  # a float64 simulation feeds a float32 model
    bad = np.zeros((4, 3))
    bad[2, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"x of sample\(s\) \[2\] .* NaN or inf; nothing of the batch was stored"
    ):
        buf.add(bad, np.zeros(4))
    assert len(buf) == 2 and buf.seen == 2
    with pytest.raises(ValueError, match=r"shape \(4,\) but the buffer holds \(3,\)"):
        buf.add(np.zeros((1, 4)), np.zeros(1))
    with pytest.raises(ValueError, match="2 inputs but 3 targets"):
        buf.add(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="unknown replay policy 'lifo'"):
        ReplayBuffer(8, "lifo")
    with pytest.raises(ValueError, match="empty replay buffer"):
        ReplayBuffer(8).sample(1)


def linear_stream(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 4))
    return x, x @ np.array([[1.0], [-2.0], [0.5], [3.0]])


def test_online_training_learns_from_a_stream_and_writes_its_run_directory(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    online = OnlineTrainer(model, torch.optim.Adam(model.parameters(), lr=0.05), torch.nn.MSELoss(),
                           capacity=256, batch_size=32, run_dir=tmp_path / "run", verbose=False)  # fmt: skip
    rng = np.random.default_rng(0)
    val_x, val_y = linear_stream(rng, 200)
    first = None
    for _ in range(30):
        online.add(*linear_stream(rng, 16))
        loss = online.train(5)
        first = first if first is not None else loss
    out = online.evaluate(val_x, val_y)
    online.finish()
    assert loss < first / 20 and out["val_loss"] < first / 20, (first, loss, out)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["seen"] == 480 and rows[-1]["buffered"] == 256
    assert rows[-1]["val_loss"] == pytest.approx(out["val_loss"])  # evaluation joins the round's row
    for name in ("model.pt", "summary.json", "online.png", "metrics.csv"):
        assert (tmp_path / "run" / name).is_file(), name
    assert online.restore() is None  # no checkpoint taken: a fresh start


def test_online_training_refuses_what_it_cannot_do(tmp_path):
    model = torch.nn.Linear(4, 1)
    args = (model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss())
    with pytest.raises(ValueError, match="use 'single', 'allreduce' or 'local-sgd'"):
        OnlineTrainer(*args, strategy="async-shared")
    online = OnlineTrainer(*args, verbose=False)
    with pytest.raises(ValueError, match=r"replay buffer of rank\(s\) \[0\] is empty"):
        online.train(1)
    with pytest.raises(RuntimeError, match="need a run directory"):
        online.checkpoint()


@pytest.mark.mpi
def test_online_training_on_two_ranks_equals_one_process_and_restores_exactly(tmp_path):
    proc = run_ranks(2, ["tests/scripts/online_equivalence.py", str(tmp_path / "run")], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK equivalence" in proc.stdout and "OK restore" in proc.stdout, proc.stdout


@pytest.mark.mpi
def test_a_simulation_and_a_trainer_on_separate_ranks_exchange_samples_and_weights():
    script = "tests/scripts/coupled_job.py"
    cmd = [mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", "3", sys.executable, script, "simulation",
           ":", "-n", "2", sys.executable, script, "trainer"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "TRAINERS 2 received 90 samples from 3 simulation ranks, each once" in proc.stdout, proc.stdout
    # Every simulation rank got trained weights back, bit for bit one version the trainers published, and could
    # use its own communicator.
    for rank in range(3):
        line = f"SIM {rank}/3 sent 30 of 90 versions>=1 True trained-weights True a-published-version True of"
        assert line in proc.stdout, proc.stdout


@pytest.mark.mpi
def test_a_failing_simulation_rank_ends_the_coupled_job_promptly_with_its_cause():
    script = "tests/scripts/coupled_job.py"
    cmd = [mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", "3", sys.executable, script, "simulation",
           "--die", ":", "-n", "2", sys.executable, script, "trainer"]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - start < 45
    assert "rank 1/5 failed: RuntimeError: simulation rank 1 blew up on purpose" in proc.stderr, proc.stderr[
        -3000:
    ]


def test_a_coupled_job_without_simulation_ranks_is_refused_with_the_launch_line():
    code = "from caldera.coupling import connect; connect('trainer')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0
    assert (
        "0 simulation and 1 trainer rank(s)" in proc.stderr
        and "mpiexec -n 4 python simulation.py" in proc.stderr
    )


def test_weights_travel_as_one_byte_buffer_and_come_back_exact():
    state = {"w": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16), "n": torch.tensor(7),
             "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 2, dtype=torch.float64)}  # fmt: skip
    payload, layout = _pack(state.items())
    assert payload.dtype == np.uint8 and payload.nbytes == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    back = _unpack(payload, layout)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k


def test_a_surrogate_rebuilds_a_finished_run_and_answers_in_the_callers_types(tmp_path):
    cfg = Config.model_validate({"model": {"name": "mlp", "args": {"sizes": [3, 8, 2]}},
                                 "data": {"source": "digits"}})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    (tmp_path / "config.resolved.json").write_text(json.dumps(cfg.model_dump(), default=str))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    surrogate = Surrogate.from_run(tmp_path, batch_size=7)  # smaller than the input: answers in pieces
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = surrogate(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64 and y.shape == (20, 2)
    with torch.no_grad():
        expected = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert torch.is_tensor(surrogate(torch.zeros(2, 3)))
    # A double-precision simulation may ask for a double-precision model: the float64 pass differs from float32.
    double = Surrogate.from_run(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        exact = model.double()(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(double(x), exact, rtol=1e-12)
    assert np.abs(double(x) - y).max() > 1e-9
    with pytest.raises(FileNotFoundError, match="no config.resolved.json or model.pt"):
        Surrogate.from_run(tmp_path / "missing")


def test_the_online_example_stops_for_the_wall_time_and_resumes(tmp_path):
    # One process: the two-rank path of the same calls (and its exact restore) is tests/scripts/online_equivalence.
    cmd = [sys.executable, "examples/heat_online.py", "--plates", "4", "--grid", "16", "--leap", "4", "--capacity",
           "64", "--steps-per-round", "2", "--checkpoint-every", "5", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    # The time limit is already within its one-minute margin: the first round checkpoints and exits 85 (requeue).
    first = subprocess.run([*cmd, "--rounds", "8", "--time-limit", "0"], capture_output=True, text=True,
                           timeout=180, cwd=ROOT)  # fmt: skip
    assert first.returncode == 85, first.stdout + first.stderr
    assert "stopping (time limit on rank 0)" in first.stdout, first.stdout
    second = subprocess.run([*cmd, "--rounds", "8"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from" in second.stdout and "(round 1, step 2)" in second.stdout, second.stdout
    assert "leap 4: relative L2 error" in second.stdout and (tmp_path / "run" / "rollout.png").is_file()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, 9)) and "val_loss" in rows[0]  # evaluated at the stop


def leap_data(
    rank: int, leaps: int, plates: int, grid: int, steps: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The (T, k) input and T_next target of examples/heat_coupled.py's simulation rank ``rank`` at leap ``leaps``
    (its own rng and solver: the run is deterministic up to the surrogate's weights)."""
    t, k = heat.initial_conditions(np.random.default_rng([1, rank]), plates, grid)
    for _ in range(leaps - 1):
        t = heat.simulate(t, k, steps, heat.DT)
    return np.stack([t, k], axis=1), heat.simulate(t, k, steps, heat.DT)


@pytest.mark.mpi
def test_the_coupled_example_improves_the_surrogate_inside_the_simulation(tmp_path):
    # --max-pending 0: each leap waits until the trainer took the last one, so weights come back during the run.
    script = "examples/heat_coupled.py"
    opts = ["--leaps", "8", "--check-every", "4", "--plates", "2", "--grid", "16", "--max-pending", "0",
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    cmd = [mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, script, "simulation",
           *opts, ":", "-n", "1", sys.executable, script, "trainer", *opts]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "16 samples sent" in proc.stdout, proc.stdout
    found = re.search(
        r"leap 8: surrogate error on this leap ([\d.]+) \(weights received: (\d+)\)", proc.stdout
    )
    assert found and int(found[2]) >= 1, proc.stdout
    # The same leap-8 samples of both simulation ranks, scored by the untrained model (seed 0, as the example)
    # and by the trainer's saved model.pt.
    data = [leap_data(rank, 8, plates=2, grid=16) for rank in range(2)]
    torch.manual_seed(0)
    untrained = Surrogate(UNetSmall(in_channels=2, out_channels=1, channels=16))
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    trained = Surrogate(UNetSmall(in_channels=2, out_channels=1, channels=16))
    trained.model.load_state_dict(saved)  # strict: the saved weights are the example's whole model

    def error(surrogate: Surrogate) -> float:
        return float(np.mean([np.linalg.norm(surrogate(x)[:, 0] - y) / np.linalg.norm(y) for x, y in data]))

    # Trained weights reached the simulation's surrogate (untrained, it scores ~1.2; measured 0.3-0.98 there).
    assert float(found[1]) < 0.9 * error(untrained), (found[0], error(untrained))
    assert error(trained) < 0.9 * error(untrained), (error(trained), error(untrained))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["seen"] == 2 * 16  # every sample of both simulation ranks reached the trainer
    assert (tmp_path / "run" / "online.png").is_file()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_fresh_online_run_sets_an_older_runs_checkpoints_aside(tmp_path):
    # Two online runs in one run directory: the second never resumed, so its checkpoints must not mix with (or
    # overwrite, at the same step numbers) the first's; nothing of the first is deleted.
    def run(steps):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        online = OnlineTrainer(model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), capacity=16,
                               batch_size=4, run_dir=tmp_path, verbose=False, hang_timeout=0)  # fmt: skip
        online.add(torch.randn(8, 3), torch.randn(8, 1))
        online.train(steps)
        return online.checkpoint(extra={"steps": steps})

    first = run(2)
    second = run(2)
    assert first == second  # the same step number...
    aside = list((tmp_path / "checkpoints").glob("previous-*/step-*"))
    assert [p.name for p in aside] == [first.name]  # ...and the first run's checkpoint kept beside it
    assert torch.load(aside[0] / "rank-00000.pt", weights_only=True)["extra"] == {"steps": 2}
