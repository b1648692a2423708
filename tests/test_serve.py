"""caldera serve: dynamic batching gives each caller its own rows, ensembles average, bad requests get 400s,
and no client (malformed, hostile, slow or many at once) stops it from answering the others."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
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


@contextlib.contextmanager
def serving(tmp_path, **limits):
    """A live server on a free port for one model (a finished run); yields (port, model, server)."""
    model = finished_run(tmp_path / "solo", seed=3)
    server = make_server(Ensemble.from_runs([tmp_path / "solo"], device="cpu"), port=0, **limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], model, server
    finally:
        server.shutdown()
        server.server_close()
        server.batcher.close()


def exchange(port, data, timeout=20.0, shut=True):
    """Send raw bytes on a fresh connection; return the reply's (status, headers, body) or None for no reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may answer and close before all of it is sent
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(s)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionError):
            return None
        return response.status, response.headers, response.read()


def strict_json(body):
    """Parse as standard JSON: bare NaN / Infinity tokens (which Python's json accepts) fail."""

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(body, parse_constant=refuse)


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def post_bytes(body, kind="application/json"):
    """A complete POST /predict request, as raw bytes."""
    return (
        f"POST /predict HTTP/1.1\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


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
    serve = [sys.executable, "-m", "caldera.cli", "serve", str(tmp_path / "run")]
    proc = subprocess.Popen([*serve, "--port", "0", "--timeout-s", "5", "--max-connections", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "caldera serve: 1 model on cpu at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        x = np.ones((4, 3), dtype=np.float32)
        out, std = predict(url, x, return_std=True)
        assert std is None  # one model: no spread
        np.testing.assert_allclose(out, expected([model], x)[0], rtol=1e-5)
        # A taken port and a nonsensical limit: one line each, exit 2 (both started side by side: half the wait).
        taken = subprocess.Popen(
            [*serve, "--port", url.rsplit(":", 1)[1]], stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        zero = subprocess.Popen([*serve, "--timeout-s", "0"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert taken.wait(timeout=60) == 2 and "cannot listen on 127.0.0.1:" in taken.stderr.read()
        assert (
            zero.wait(timeout=60) == 2
            and "timeout_s (--timeout-s) must be a positive number" in zero.stderr.read()
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped after 1 requests in 1 forward passes" in proc.stdout.read()
    finally:
        proc.kill()
    missing = subprocess.run([sys.executable, "-m", "caldera.cli", "serve", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert missing.returncode == 2 and "has no config.resolved.json or model.pt" in missing.stderr


def test_hostile_and_malformed_requests_each_get_one_json_error_and_the_server_keeps_serving(tmp_path):
    with serving(tmp_path, max_body_mb=1, max_json_mb=0.5) as (port, model, _):

        def refused(data, code, words, shut=True):
            status, headers, body = exchange(port, data, shut=shut)
            assert status == code and words in strict_json(body)["error"], (status, body)
            return headers

        head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        # A negative length followed by a stream was read without limit; now refused before any body is read.
        headers = refused((head + "Content-Length: -1\r\n\r\n").encode() + b"[" * 1000, 400, "'-1' is not a number",
                          shut=False)  # fmt: skip
        assert headers["Connection"] == "close"
        refused((head + "Content-Length: abc\r\n\r\n").encode(), 400, "'abc' is not a number of bytes")
        refused((head + "\r\n").encode(), 411, "needs a Content-Length")
        refused(
            (head + "Content-Length: 3\r\nContent-Length: 30\r\n\r\n").encode(),
            400,
            "conflicting Content-Length",
        )
        refused((head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode(), 411, "chunked")
        refused((head + f"Content-Length: {2**19 + 1}\r\n\r\n").encode(), 413, "--max-json-mb")
        refused(f"POST /predict HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: {2**20 + 1}\r\n\r\n"
                .encode(), 413, "--max-body-mb")  # fmt: skip
        deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # was a traceback and no reply
        refused(post_bytes(deep), 400, "nested 100001 levels")
        # Brackets hidden in a string fool the cheap scan; the parser's RecursionError is still one 400.
        sneaky = b'{"x": "' + b"]" * 100_000 + b'", "inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        refused(post_bytes(sneaky), 400, "nested too deep")
        for bad in [np.zeros(2, dtype=[("a", "<f4")]), np.ones((2, 3), dtype=np.complex64),
                    np.array([["a", "b", "c"]]), np.ones((1, 3), dtype=np.longdouble)]:  # fmt: skip
            refused(post_bytes(npy(bad), "application/x-npy"), 400, "send real numbers: float16/32/64")
        lying = npy(np.ones((4, 3), dtype=np.float32))[:-8]  # the header promises more data than the body has
        refused(post_bytes(lying, "application/x-npy"), 400, "the .npy header says 48 bytes")
        refused(b"GARBAGE\r\n\r\n", 400, "Bad request")
        refused(b"PUT /predict HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501, "Unsupported method")
        refused(b"GET /health\r\n", 505, "HTTP/0.9 is not supported")

        # NaN outputs (a NaN input runs through the MLP) come back as null: the reply is standard JSON.
        status, _, body = exchange(port, post_bytes(b'{"inputs": [[NaN, 0, 0], [1, 2, 3]]}'))
        out = strict_json(body)
        assert status == 200 and out["outputs"][0] == [None, None], out
        np.testing.assert_allclose(out["outputs"][1], expected([model], [[1, 2, 3]])[0][0], rtol=1e-5)
        # Other dtypes than float32 are taken: float64 and int16 in, the model's answer out.
        url, want = f"http://127.0.0.1:{port}", expected([model], np.ones((2, 3)))[0]
        np.testing.assert_allclose(
            predict(url, np.ones((2, 3), dtype=">f8")), want, rtol=1e-5
        )  # big-endian too
        np.testing.assert_allclose(predict(url, np.ones((2, 3), dtype=np.int16)), want, rtol=1e-5)
        assert json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())["status"] == "ok"


def test_a_batch_that_fails_is_answered_per_request_and_a_dead_batcher_shows_in_health(tmp_path):
    with serving(tmp_path, max_wait_s=0.3) as (port, model, server):
        url = f"http://127.0.0.1:{port}"
        # Two structured dtypes of equal size once shared a batch: np.concatenate raised outside the try, the
        # batching thread died and every later request hung while /health said ok. Now refused on arrival...
        replies = {}

        def send(name, dtype):
            replies[name] = exchange(port, post_bytes(npy(np.zeros(2, dtype=dtype)), "application/x-npy"))

        threads = [threading.Thread(target=send, args=(n, [(n, t)])) for n, t in [("a", "<f4"), ("b", "<i4")]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for name in "ab":
            assert replies[name][0] == 400 and f"dtype [('{name}'" in strict_json(replies[name][2])["error"]
        # ... and the batcher itself survives any batch it is handed: the same pair submitted directly fails per
        # request (each one alone, after the shared pass failed) while good requests around them are answered.
        b = server.batcher
        good = np.ones((2, 3), dtype=np.float32)
        futures = [b.submit(np.zeros(2, dtype=[("a", "<f4")])), b.submit(np.zeros(2, dtype=[("b", "<i4")])),
                   b.submit(good), b.submit(np.ones((1, 5), dtype=np.float32))]  # fmt: skip
        for f in futures[:2] + futures[3:]:
            with pytest.raises(Exception):  # noqa: B017 - numpy's and torch's own words, whatever they are
                b.result(f)
        np.testing.assert_allclose(b.result(futures[2])[0], expected([model], good)[0], rtol=1e-5)
        assert b.alive and predict(url, good).shape == (2, 2)
        assert json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())["status"] == "ok"
        # A batcher that has stopped makes /health say so (503: a load balancer stops sending) and requests get a
        # 503 at once instead of waiting forever.
        b.close()
        code, out = get_json(url + "/health")
        assert (
            code == 503 and out["status"] == "unavailable" and "batching thread has stopped" in out["error"]
        )
        with pytest.raises(RuntimeError, match="answered 503: the batching thread has stopped"):
            predict(url, good)


def get_json(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, strict_json(r.read())
    except urllib.error.HTTPError as err:
        return err.code, strict_json(err.read())


def handler_threads():
    return {t for t in threading.enumerate() if "process_request_thread" in t.name}


def test_slow_clients_are_dropped_after_the_timeout_and_never_hold_more_threads_than_the_cap(tmp_path):
    with serving(tmp_path, timeout_s=1.0, max_connections=4) as (port, model, _):
        partial = post_bytes(npy(np.ones((1, 3), dtype=np.float32)), "application/x-npy")[:-20]
        replies, peak = [None] * 8, 0
        before = (
            handler_threads()
        )  # kept-alive connections of earlier tests' servers, still open in this process

        def stalled(i):  # headers and part of the body, then silence (the socket stays open)
            replies[i] = exchange(port, partial, shut=False)

        def trickle():  # one header line every 0.3 s: each read is quick, the request never completes
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"POST /predict HTTP/1.1\r\n")
                with contextlib.suppress(OSError):
                    for i in range(60):
                        time.sleep(0.3)
                        s.sendall(f"X-Slow-{i}: 1\r\n".encode())
                try:
                    replies.append(s.recv(4096))
                except ConnectionError:  # closed with our last line unread: a reset instead of an end
                    replies.append(b"")

        threads = [threading.Thread(target=stalled, args=(i,)) for i in range(8)]
        threads.append(threading.Thread(target=trickle))
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, len(handler_threads() - before))
            time.sleep(0.05)
        # 9 slow clients, never more than 4 threads: the others waited in the backlog for a slot.
        assert 1 <= peak <= 4, peak
        for status, _, body in replies[:8]:  # every stalled client got its answer once its time was up
            assert status == 408 and "within 1 s (caldera serve --timeout-s)" in strict_json(body)["error"]
        # The trickler was cut off after its second (not fed for 18 s): a 408 if the reply beat the close.
        assert replies[8].startswith(b"HTTP/1.1 408") or replies[8] == b"", replies[8]
        x = np.ones((3, 3), dtype=np.float32)
        np.testing.assert_allclose(predict(f"http://127.0.0.1:{port}", x), expected([model], x)[0], rtol=1e-5)


def test_32_clients_connecting_at_once_on_kept_alive_connections_all_get_answers(tmp_path):
    # The listen backlog was the standard library's 5: some of 32 clients connecting at once were reset.
    with serving(tmp_path) as (port, model, _):
        x = np.ones((1, 3), dtype=np.float32)
        body, go, answers, errors = npy(x), threading.Barrier(32), [], []

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # no retry: a reset is a failure
            go.wait()
            try:
                for _ in range(5):
                    conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/x-npy"})
                    response = conn.getresponse()
                    answers.append((response.status, np.load(io.BytesIO(response.read()))["outputs"]))
            except Exception as exc:
                errors.append(repr(exc))
            finally:
                conn.close()

        threads = [threading.Thread(target=client) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(answers) == 160, errors[:3]
        for status, out in answers:
            assert status == 200
            np.testing.assert_allclose(out, expected([model], x)[0], rtol=1e-5)


def test_fuzzed_requests_never_stop_the_server(tmp_path):
    """Random and mutated request lines, headers and bodies (seeded): each gets a well-formed reply or none."""
    rng = random.Random(17)
    good_json = json.dumps({"inputs": [[0.1, 0.2, 0.3]]}).encode()
    good_npy = npy(np.ones((2, 3), dtype=np.float32))

    def junk(n):
        return bytes(rng.randrange(256) for _ in range(rng.randrange(n)))

    def mutate(data):
        data = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            if data and rng.random() < 0.6:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                at = rng.randrange(len(data) + 1)
                data[at:at] = junk(8)
        return bytes(data)

    def pick(usual, *odd):  # the well-formed part most of the time, so that requests get past the parser
        return usual if rng.random() < 0.7 else rng.choice(odd)

    def case():
        method = pick(b"POST", b"GET", b"PUT", b"DELETE", b"HEAD", b"", junk(10))
        path = pick(b"/predict", b"/predict/", b"/health", b"/", b"/predict?x=1", b"/" + junk(20), b"*")
        version = pick(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b"", junk(10))
        body = rng.choice(
            [good_json, good_npy, mutate(good_json), mutate(good_npy), junk(300), b"", b"[" * 5000]
        )
        kind = pick(
            b"application/x-npy" if body[:1] == b"\x93" else b"application/json", b"text/plain", junk(20)
        )
        length = pick(str(len(body)).encode(), b"-1", b"abc", b"99999999999", b"0", str(len(body) + 10).encode(),
                      b"1e3", b" 12 ", b"+5", junk(6))  # fmt: skip
        headers = [b"Host: fuzz", b"Content-Type: " + kind, b"Content-Length: " + length]
        headers += rng.sample([b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Connection: close",
                               b"Connection: keep-alive", junk(40), b"X-Long: " + b"a" * 70_000, b"Content-Length: 3",
                               b"no colon here"], rng.choice([0, 0, 1, 2]))  # fmt: skip
        rng.shuffle(headers)
        request = method + b" " + path + b" " + version + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
        request = mutate(request) if rng.random() < 0.2 else request
        return request + case() if rng.random() < 0.1 else request  # sometimes a second one pipelined behind

    with serving(tmp_path, timeout_s=1.0, max_body_mb=1, max_json_mb=0.5) as (port, model, _):
        replies = 0
        for _ in range(400):
            reply = exchange(port, case(), timeout=20)
            if reply is None:
                continue
            replies += 1
            status, headers, body = reply
            assert 200 <= status < 600
            if headers.get("Content-Type") == "application/json" and body:  # a HEAD reply has none
                out = strict_json(body)
                assert status == 200 or isinstance(out["error"], str), out
        assert replies > 350, replies  # the connection rarely ends without a reply (a reset as we still send)
        url = f"http://127.0.0.1:{port}"
        code, out = get_json(url + "/health")
        assert code == 200 and out["status"] == "ok", out
        x = np.ones((2, 3), dtype=np.float32)
        np.testing.assert_allclose(predict(url, x), expected([model], x)[0], rtol=1e-5)
