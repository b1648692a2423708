"""caldera serve: dynamic batching gives each caller its own rows, ensembles average, bad requests get 400s."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from caldera.config import Config
from caldera.serve import Ensemble, make_server, predict
from caldera.train.run import build_model
from tests.conftest import ROOT


def finished_run(path, seed):
    """A run directory as `caldera train` leaves it: resolved config and weights (an MLP 3 -> 8 -> 2)."""
    cfg = Config.model_validate(
        {"model": {"name": "mlp", "args": {"sizes": [3, 8, 2]}}, "data": {"source": "digits"}}
    )
    torch.manual_seed(seed)
    model = build_model(cfg)
    path.mkdir()
    (path / "config.resolved.json").write_text(json.dumps(cfg.model_dump(), default=str))
    torch.save(model.state_dict(), path / "model.pt")
    return model


def post(url, payload, kind="application/json"):
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def ensemble_server(tmp_path):
    models = [finished_run(tmp_path / f"run{i}", seed=i) for i in range(2)]
    ensemble = Ensemble.from_runs([tmp_path / "run0", tmp_path / "run1"], device="cpu")
    server = make_server(ensemble, port=0, max_batch=64, max_wait_s=0.2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", models, server
    server.shutdown()
    server.server_close()
    server.batcher.close()


def expected(models, x):
    with torch.no_grad():
        outs = torch.stack([m(torch.as_tensor(x, dtype=torch.float32)) for m in models]).double()
    return outs.mean(0).numpy(), outs.std(0, unbiased=False).numpy()


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_rows(ensemble_server):
    url, models, server = ensemble_server
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(1 + i % 3, 3)).astype(np.float32) for i in range(8)]
    answers: dict[int, tuple] = {}
    go = threading.Barrier(len(inputs))

    def client(i):
        go.wait()
        answers[i] = predict(url, inputs[i], return_std=True)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, x in enumerate(inputs):
        mean, std = expected(models, x)
        np.testing.assert_allclose(answers[i][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answers[i][1], std, rtol=1e-4, atol=1e-6)  # the ensemble's spread
    health = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())
    assert health["models"] == 2 and health["requests"] == 8
    assert health["batches"] < 8 and health["mean_batch"] > 1, health  # requests were batched together


def test_json_requests_and_mistakes_get_clear_answers_and_the_server_keeps_serving(ensemble_server):
    url, models, _ = ensemble_server
    code, out = post(url + "/predict", json.dumps({"inputs": [[0.1, 0.2, 0.3]]}).encode())
    assert code == 200 and out["batch"] == 1
    np.testing.assert_allclose(out["outputs"], expected(models, [[0.1, 0.2, 0.3]])[0], rtol=1e-5)
    code, out = post(url + "/predict", json.dumps({"inputs": [[1.0, 2.0]]}).encode())  # 2 features, not 3
    assert code == 400 and "could not take inputs of shape [1, 2]" in out["error"], out
    code, out = post(url + "/predict", b"{not json")
    assert code == 400 and '{"inputs": [sample, ...]}' in out["error"]
    code, out = post(url + "/predict", b"garbage", kind="application/x-npy")
    assert code == 400 and "not a .npy array" in out["error"]
    code, out = post(url + "/nowhere", b"{}")
    assert code == 404 and "POST /predict" in out["error"]
    with pytest.raises(
        RuntimeError, match=r"answered 400: the model could not take inputs of shape \[1, 5\]"
    ):
        predict(url, np.zeros((1, 5)))  # the Python client raises with the server's words
    assert predict(url, np.zeros((2, 3))).shape == (2, 2)  # still serving


def test_the_command_serves_a_run_and_stops_on_sigterm(tmp_path):
    model = finished_run(tmp_path / "run", seed=0)
    proc = subprocess.Popen([sys.executable, "-m", "caldera.cli", "serve", str(tmp_path / "run"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "caldera serve: 1 model on cpu at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        x = np.ones((4, 3), dtype=np.float32)
        out, std = predict(url, x, return_std=True)
        assert std is None  # one model: no spread
        np.testing.assert_allclose(out, expected([model], x)[0], rtol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped after 1 requests in 1 forward passes" in proc.stdout.read()
    finally:
        proc.kill()
    missing = subprocess.run([sys.executable, "-m", "caldera.cli", "serve", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert missing.returncode == 2 and "has no config.resolved.json or model.pt" in missing.stderr
