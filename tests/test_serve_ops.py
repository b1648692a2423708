"""caldera serve for operations: Open Inference Protocol v2 routes, Prometheus metrics, named models, bearer
tokens, drain on SIGTERM and many kept-alive clients, each through a real HTTP client against a real server."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from caldera.serve import Ensemble, make_server
from tests.conftest import ROOT
from tests.test_serve import expected, finished_run

TOKEN = "s3cret-token"


def call(port, method, path, body=None, token=TOKEN, kind="application/json"):
    """One request on a fresh connection: (status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": kind}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        text = r.read().decode()
        return (
            r.status,
            r.headers,
            json.loads(text) if r.headers["Content-Type"] == "application/json" else text,
        )
    finally:
        conn.close()


def tensor(x, datatype="FP32", name="input"):
    x = np.asarray(x)
    return {
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]
    }


def metric(text, name, **labels):
    """The value of one sample in Prometheus text exposition format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and (m.group(1) or "") == want:
            return float(m.group(2))
    return 0.0


def test_v2_routes_metrics_two_named_models_and_the_token(tmp_path):
    solo = finished_run(tmp_path / "a", seed=0)
    pair = [finished_run(tmp_path / f"b{i}", seed=i + 1) for i in range(2)]
    models = {"solo": Ensemble.from_runs([tmp_path / "a"], device="cpu"),
              "pair": Ensemble.from_runs([tmp_path / "b0", tmp_path / "b1"], device="cpu")}  # fmt: skip
    server = make_server(models, port=0, max_wait_s=0.001, max_json_mb=0.01, token=TOKEN + "\n")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        # Liveness and readiness are open; everything else needs the token (401 naming the fix, no body read).
        assert call(port, "GET", "/v2/health/live", token=None)[:3:2] == (200, {"live": True})
        assert call(port, "GET", "/v2/health/ready", token=None)[:3:2] == (200, {"ready": True})
        for token in [None, "wrong", TOKEN + "x", ""]:
            status, headers, out = call(port, "GET", "/v2/models/solo", token=token)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), (token, out)
            assert "Authorization: Bearer <token>" in out["error"]
        status, _, out = call(port, "POST", "/v2/models/solo/infer", tensor(np.ones((1, 3))), token="wrong")
        assert status == 401
        assert call(port, "GET", "/metrics", token=None)[0] == 401  # metrics are closed by default
        # Metadata: name, version, tensors with -1 for the batch; the ensemble has a second output, its spread.
        status, _, meta = call(port, "GET", "/v2/models/solo")
        assert status == 200 and meta == {
            "name": "solo", "versions": ["1"], "platform": "pytorch_caldera",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}]}  # fmt: skip
        assert [o["name"] for o in call(port, "GET", "/v2/models/pair/versions/1")[2]["outputs"]] == [
            "output",
            "std",
        ]
        assert call(port, "GET", "/v2/models/pair/ready")[:3:2] == (200, {"name": "pair", "ready": True})
        # Inference with typed tensors: FP64 in -> FP64 out, INT32 in -> FP32 out, flat row-major data, id echoed.
        x = np.random.default_rng(0).normal(size=(2, 3))
        status, _, out = call(port, "POST", "/v2/models/solo/infer", {**tensor(x, "FP64"), "id": "r1"})
        assert status == 200 and out["model_name"] == "solo" and out["id"] == "r1", out
        (y,) = out["outputs"]
        assert y["name"] == "output" and y["datatype"] == "FP64" and y["shape"] == [2, 2]
        np.testing.assert_allclose(np.reshape(y["data"], y["shape"]), expected([solo], x)[0], rtol=1e-5)
        ints = np.array([[1, 2, 3]], dtype=np.int32)
        status, _, out = call(port, "POST", "/v2/models/solo/infer", tensor(ints, "INT32"))
        assert status == 200 and out["outputs"][0]["datatype"] == "FP32"
        np.testing.assert_allclose(out["outputs"][0]["data"], expected([solo], ints)[0].ravel(), rtol=1e-5)
        # The other model, an ensemble: its mean and spread; asking for one output returns only that one.
        status, _, out = call(port, "POST", "/v2/models/pair/infer", tensor(x.astype(np.float32)))
        mean, std = expected(pair, x.astype(np.float32))
        got = {o["name"]: np.reshape(o["data"], o["shape"]) for o in out["outputs"]}
        np.testing.assert_allclose(got["output"], mean, rtol=1e-5)
        np.testing.assert_allclose(got["std"], std, rtol=1e-4, atol=1e-6)
        body = {**tensor(x.astype(np.float32)), "outputs": [{"name": "std"}]}
        assert [o["name"] for o in call(port, "POST", "/v2/models/pair/infer", body)[2]["outputs"]] == ["std"]
        # POST /predict answers for the first model, as before.
        status, _, out = call(port, "POST", "/predict", {"inputs": x.tolist()})
        np.testing.assert_allclose(out["outputs"], expected([solo], x)[0], rtol=1e-5)
        # Mistakes: one JSON error each, with the status the protocol gives it.
        bad = {
            "no model 'nope' here; served: solo, pair": (404, "/v2/models/nope/infer", tensor(x)),
            "has no input 'x'": (400, "/v2/models/solo/infer", tensor(x, name="x")),
            "shape [2, 3] holds 6 values but data has 5": (
                400, "/v2/models/solo/infer",
                {"inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [1] * 5}]}),
            "datatype 'BYTES' is not accepted": (400, "/v2/models/solo/infer", tensor(x, "BYTES")),
            "data is not INT32 numbers": (400, "/v2/models/solo/infer", tensor(x, "INT32")),
            "takes exactly one input tensor": (400, "/v2/models/solo/infer", {"inputs": []}),
            "the body is not JSON": (400, "/v2/models/solo/infer", b"{nope"),
            "shape [1, 5] does not fit the model's [-1, 3]": (400, "/v2/models/solo/infer", tensor(np.ones((1, 5)))),
            "exceeds the server's limit": (413, "/v2/models/solo/infer", tensor(np.ones((1000, 3)))),
        }  # fmt: skip
        for words, (code, path, body) in bad.items():
            status, _, out = call(port, "POST", path, body)
            assert status == code and words in out["error"], (words, status, out)
        assert call(port, "GET", "/v2/models/nope")[0] == 404
        # Metrics count exactly what was sent: per model, route and status; batch sizes; queue depth.
        status, headers, text = call(port, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        infer = "/v2/models/{name}/infer"
        assert metric(text, "caldera_requests_total", model="solo", route=infer, code=200) == 2
        assert metric(text, "caldera_requests_total", model="pair", route=infer, code=200) == 2
        assert metric(text, "caldera_requests_total", model="solo", route=infer, code=400) == 7
        assert metric(text, "caldera_request_errors_total", model="solo", route=infer, code=413) == 1
        assert metric(text, "caldera_requests_total", model="", route="unauthorized", code=401) == 6
        assert metric(text, "caldera_requests_total", model="solo", route="/predict", code=200) == 1
        assert metric(text, "caldera_request_duration_seconds_count", model="pair", route=infer) == 2
        assert (
            metric(text, "caldera_request_duration_seconds_bucket", model="pair", route=infer, le="+Inf") == 2
        )
        # Forward passes: solo answered 3 good requests and the failing [1, 5] one (a pass that raised).
        assert metric(text, "caldera_batch_size_count", model="solo") == 3
        assert metric(text, "caldera_batch_size_sum", model="solo") == 5  # 2 + 1 + 2 samples
        assert metric(text, "caldera_batch_size_bucket", model="solo", le="1") == 1
        assert 'caldera_queue_depth{model="pair"} 0' in text and 'caldera_model_ready{model="solo"} 1' in text
    finally:
        server.shutdown()
        server.drain(5)
        server.server_close()


def test_64_kept_alive_clients_at_once_all_get_answers(tmp_path):
    model = finished_run(tmp_path / "run", seed=0)
    server = make_server(Ensemble.from_runs([tmp_path / "run"], device="cpu"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, x = server.server_address[1], np.ones((1, 3), dtype=np.float32)
    body, go, answers, errors = json.dumps(tensor(x)).encode(), threading.Barrier(64), [], []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # no retry: a reset is a failure
        go.wait()
        try:
            for _ in range(5):
                conn.request("POST", "/v2/models/model/infer", body=body)
                r = conn.getresponse()
                answers.append((r.status, json.loads(r.read())))
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    try:
        threads = [threading.Thread(target=client) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(answers) == 320, errors[:3]
        want = expected([model], x)[0].ravel()
        for status, out in answers:
            assert status == 200
            np.testing.assert_allclose(out["outputs"][0]["data"], want, rtol=1e-5)
    finally:
        server.shutdown()
        server.drain(5)
        server.server_close()


def test_sigterm_drains_a_request_in_flight_then_exits_0(tmp_path):
    model = finished_run(tmp_path / "run", seed=0)
    (tmp_path / "token").write_text(TOKEN + "\n")
    # A 2 s batching window: a lone request waits in the batcher, in flight, while SIGTERM arrives.
    proc = subprocess.Popen([sys.executable, "-m", "caldera.cli", "serve", "--model", f"heat={tmp_path / 'run'}",
                             "--port", "0", "--max-wait-ms", "2000", "--token-file", str(tmp_path / "token")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "1 model on cpu at http://127.0.0.1:" in line and "bearer token required" in line, (
            line + proc.stderr.read()
        )
        port = int(line.split(" at ")[1].split()[0].rsplit(":", 1)[1])
        assert call(port, "GET", "/v2/models/heat")[2]["inputs"][0]["shape"] == [-1, 3]
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # kept alive, idle during the drain
        idle.request("GET", "/v2/health/live")
        assert idle.getresponse().read() == b'{"live": true}'
        x, reply = np.ones((2, 3)), {}
        slow = threading.Thread(target=lambda: reply.update(r=call(port, "POST", "/v2/models/heat/infer",
                                                                     tensor(x, "FP64"))))  # fmt: skip
        slow.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the request is in the server (this metrics request is 1)
            if metric(call(port, "GET", "/metrics")[2], "caldera_requests_in_progress") >= 2:
                break
            time.sleep(0.05)
        assert "r" not in reply  # still waiting in its 2 s batching window
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        slow.join(timeout=30)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 15  # the idle kept-alive connection did not hold it for --timeout-s
        status, _, out = reply["r"]  # the request in flight was answered in full
        assert status == 200, out
        np.testing.assert_allclose(out["outputs"][0]["data"], expected([model], x)[0].ravel(), rtol=1e-5)
        assert "stopped after 1 requests in 1 forward passes" in proc.stdout.read()
        with pytest.raises(ConnectionRefusedError):  # nothing listens any more
            call(port, "GET", "/v2/health/live")
    finally:
        proc.kill()
