"""``caldera stream`` with real ZeroMQ sockets and real MPI ranks: every frame answered exactly once (sequence
numbers counted), results equal to the model applied directly, hostile frames answered with error records,
PUB/SUB drops counted, online fine-tuning from labelled frames lowering the loss."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from caldera.coupling.surrogate import Surrogate
from caldera.stream.consumer import Learner, Stream, load_model, run
from caldera.stream.sim import simulate
from caldera.stream.wire import MAX_HEADER, encode_frame
from tests.conftest import ROOT, mpiexec, tiny_run

zmq = pytest.importorskip("zmq")

SHAPE = (2, 8, 8)  # the tiny heat run's samples: 2 channels on an 8x8 plate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("stream") / "run", n_samples=64, grid=8)


def ports(n: int = 2) -> list[str]:
    """Addresses on free local ports."""
    out = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            out.append(f"tcp://127.0.0.1:{s.getsockname()[1]}")
    return out


def frames(n: int, k: int = 1, seed: int = 0) -> list[np.ndarray]:
    """``n`` frames of ``k`` samples each (k = 1: one bare sample)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((k, *SHAPE) if k > 1 else SHAPE).astype(np.float32) for _ in range(n)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_push_pull_answers_every_frame_once_like_the_model_survives_hostile_frames_ends_on_sigterm(
    run_dir, tmp_path
):
    inp, out = ports()
    n, bad_shape, bad_bytes, bad_dtype = 150, 40, 41, 42
    xs = frames(n, seed=1)
    # Every fourth frame carries 3 samples: frames of several patches share forward passes with single ones.
    xs = [np.stack([x, x + 1, x - 1]) if i % 4 == 0 else x for i, x in enumerate(xs)]

    def make(seq):
        if seq == bad_shape:  # a frame that is not the model's input
            return encode_frame(seq, np.zeros((3, 5), np.float32))
        if seq == bad_bytes:  # a header that lies about the data
            return [encode_frame(seq, xs[seq])[0], b"\x00" * 17]
        if seq == bad_dtype:  # no objects: nothing received may execute code
            return [json.dumps({"seq": seq, "shape": [2, 8, 8], "dtype": "object"}).encode(), b""]
        return xs[seq], None

    def hostile(sock):  # after the frames: messages with no readable sequence number at all
        sock.send_multipart([b"\xff\xfe not json", b"junk"])
        sock.send_multipart([b"[" * (MAX_HEADER + 1), b""])

    summary = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, "-m", "caldera.cli", "stream", str(run_dir), "--in", inp, "--out",
                             out, "--batch", "16", "--shape", "2,8,8", "--summary", str(summary)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())  # fmt: skip
    try:
        # No end message: once all are answered, SIGTERM ends the stream, with its summary.
        report = simulate(
            inp, out, n, make=make, extra=hostile, keep=True, warmup_s=0.2, timeout_s=60, end=False
        )
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    # Every sequence number answered exactly once: by a result, or (the three bad frames) an error record.
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["answered"] == n - 3 and report["error_records"] == 3, report
    assert sorted(report["results"]) == [s for s in range(n) if s not in (bad_shape, bad_bytes, bad_dtype)]
    errors = " ".join(report["errors"])
    assert "shape [3, 5] does not fit the model's samples [2, 8, 8]" in errors, errors
    assert "is 512 bytes but the data has 17" in errors and "\"dtype\" 'object' is not accepted" in errors, (
        errors
    )
    assert report["unknown"] == 2  # the garbage messages' error records, numbered null
    # The results are the model applied directly.
    model = Surrogate.from_run(run_dir, device="cpu")
    for seq, y in report["results"].items():
        np.testing.assert_allclose(y, model(xs[seq] if xs[seq].ndim == 4 else xs[seq][None])[0 if xs[seq].ndim
                                   == 3 else slice(None)], rtol=1e-5, atol=1e-6)  # fmt: skip
    s = json.loads(summary.read_text())
    assert (s["frames"], s["errors"], s["bad_messages"], s["announced"]) == (n - 3, 3, 5, None), s
    assert s["samples"] == sum(
        len(x) if x.ndim == 4 else 1 for i, x in enumerate(xs) if i not in (40, 41, 42)
    )
    assert 1 < s["mean_batch"] <= 16 + 2 and set(s["latency_ms"]) == {"p50", "p95", "p99"}, s
    assert "caldera stream: ready" in stdout and f"{n - 3} frames" in stdout, stdout


@pytest.mark.mpi
def test_two_consumer_ranks_share_the_frames_and_answer_each_exactly_once(run_dir, tmp_path):
    inp, out = ports()
    n = 300
    ready = threading.Event()
    report = {}
    sim = threading.Thread(daemon=True, target=lambda: report.update(simulate(inp, out, n, rate=2000, shape=SHAPE,
                                                                  ready=ready, warmup_s=0.5, timeout_s=90)))  # fmt: skip
    sim.start()
    summary = tmp_path / "summary.json"
    cmd = [mpiexec(), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-m", "caldera.cli",
           "stream", str(run_dir), "--in", inp, "--out", out, "--summary", str(summary)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        for line in proc.stdout:
            if "caldera stream: ready" in line:
                break
        ready.set()
        sim.join(timeout=90)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        ready.set()
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    # The union of the ranks' answers is exactly 0..n-1, none twice.
    assert (report["answered"], report["lost"], report["duplicated"], report["error_records"]) == (n, 0, 0, 0)
    s = json.loads(summary.read_text())
    assert s["ranks"] == 2 and sum(s["per_rank_frames"]) == n and min(s["per_rank_frames"]) > 0, s
    assert s["missing"] == 0 and s["frames_per_s"] > 0 and "on 2 rank(s)" in stdout, stdout


def test_pub_sub_with_a_slow_consumer_counts_the_dropped_frames(run_dir):
    inp, out = ports()
    n = 600
    model = load_model(str(run_dir), device="cpu")
    model.input_shape = SHAPE
    # Frames of 64 samples, one forward pass each, behind queues of 2 messages: the publisher outruns it.
    stream = Stream(model, inp, out, sub=True, pub=True, batch=64, hwm=2)
    result = {}
    consumer = threading.Thread(target=lambda: result.update(stream.run()), daemon=True)
    consumer.start()
    report = simulate(inp, out, n, shape=(64, *SHAPE), pub=True, results_sub=True, warmup_s=0.5, drain_s=2.0,
                      hwm=2, timeout_s=60)  # fmt: skip
    consumer.join(timeout=30)
    stream.stop.set()  # if the end message never came: the thread ends, the assertion below says so
    assert not consumer.is_alive() and result, "the consumer did not stop at the end message"
    # Every frame is either answered or counted as a gap; none twice.
    assert result["gaps"] > 0 and result["frames"] + result["gaps"] == n, result
    assert result["count"] == n and report["duplicated"] == 0, report
    assert report["answered"] <= result["frames"]  # the results' PUB may drop too


def test_learn_from_labelled_frames_lowers_the_loss(run_dir, tmp_path):
    inp, out = ports()
    n, k = 40, 4
    xs = frames(n, k, seed=3)
    target = [0.5 * x[:, :1] + 0.25 for x in xs]  # a map the small U-Net can learn within the stream

    model = load_model(str(run_dir), device="cpu")
    model.input_shape = SHAPE
    learner = Learner(model.module, model.device, lr=1e-2, batch=16, steps=2, seed=0)
    result, stop = {}, threading.Event()
    consumer = threading.Thread(daemon=True, target=lambda: result.update(
        run(model, inp, out, str(tmp_path / "s.json"), stop=stop, batch=k, learner=learner)))  # fmt: skip
    consumer.start()
    report = simulate(inp, out, n, make=lambda s: (xs[s], target[s]), keep=True, warmup_s=0.2, timeout_s=60)
    consumer.join(timeout=30)
    stop.set()
    assert result == json.loads((tmp_path / "s.json").read_text()), (
        "the consumer did not stop at the end message"
    )
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    # Each result comes from the model as it was when the frame arrived: later frames are predicted better.
    err = [float(np.mean((report["results"][s] - target[s]) ** 2)) for s in range(n)]
    early, late = np.mean(err[:8]), np.mean(err[-8:])
    assert late < 0.5 * early, (early, late)
    assert result["learn"]["steps"] == 2 * n and result["learn"]["loss_last"] < result["learn"]["loss_first"]
    learner.save(tmp_path / "tuned.pt")
    state = torch.load(tmp_path / "tuned.pt", weights_only=True)
    assert set(state) == set(model.module.state_dict())


def test_an_exported_artefact_is_run_with_its_cards_sample_shape(run_dir, tmp_path):
    surrogate = Surrogate.from_run(run_dir, device="cpu")
    x = frames(1, k=5, seed=4)[0]
    program = torch.export.export(surrogate.model, (torch.from_numpy(x),))  # as `caldera export --format pt2`
    torch.export.save(program, str(tmp_path / "model.exported.pt2"))
    card = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, *SHAPE]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1, 8, 8]}]}  # fmt: skip
    (tmp_path / "model.json").write_text(json.dumps(card))
    model = load_model(str(tmp_path / "model.exported.pt2"))
    assert model.input_shape == SHAPE and model.module is None and "exported" in model.what
    np.testing.assert_allclose(model.predict(x), surrogate(x), rtol=1e-5, atol=1e-6)
