"""Serve trained models over HTTP with dynamic batching and ensembles: ``caldera serve RUN_DIR [RUN_DIR ...]``.

Concurrent requests are gathered for at most ``max_wait_s`` (or until ``max_batch`` samples) and answered with one
forward pass; several run directories form an ensemble whose mean and spread come back together. The standard
library's threading HTTP server carries the requests: nothing to install beyond Caldera, no container, no daemon.

    POST /predict   JSON {"inputs": [[...], ...]}      -> {"outputs": [...], "std": [...] (ensembles), "batch": n}
                    or a .npy body (application/x-npy) -> a .npz with "outputs" (and "std")
    GET  /health    models, requests, batches, mean batch size
"""

from __future__ import annotations

import http.client
import io
import json
import queue
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from caldera.coupling.surrogate import Surrogate

NPY = "application/x-npy"


class Ensemble:
    """The mean (and, for several members, the standard deviation) of surrogates' predictions."""

    def __init__(self, members: Sequence[Surrogate]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = list(members)

    @classmethod
    def from_runs(cls, run_dirs: Sequence[str | Path], device: str | None = None,
                  trust_code: bool = False) -> Ensemble:  # fmt: skip
        """One member per finished ``caldera train`` run directory (``trust_code``: see Surrogate.from_run)."""
        return cls([Surrogate.from_run(d, device=device, trust_code=trust_code) for d in run_dirs])

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = np.stack([np.asarray(m(x)) for m in self.members])
        return outs.mean(axis=0), (outs.std(axis=0) if len(outs) > 1 else None)


@dataclass
class _Request:
    x: np.ndarray
    future: Future


class Batcher:
    """Gather concurrent requests into batches: one forward pass per batch, each caller gets its own rows back."""

    def __init__(self, predict: Ensemble, max_batch: int = 64, max_wait_s: float = 0.005) -> None:
        self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
        self.requests = self.batches = self.samples = 0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="caldera-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: np.ndarray) -> Future:
        """Queue a batch of samples; the future's result is (outputs, std or None, size of the batch it ran in)."""
        future: Future = Future()
        self._queue.put(_Request(x, future))
        return future

    def close(self) -> None:
        """Finish the queued requests and stop the batching thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, n, stop = [first], len(first.x), False
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                n += len(item.x)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Request]) -> None:
        # Requests of another sample shape or dtype cannot share a forward pass (and a malformed one must not fail
        # the others): one pass per kind.
        groups: dict[tuple, list[_Request]] = {}
        for r in batch:
            groups.setdefault((r.x.shape[1:], r.x.dtype.str), []).append(r)
        for group in groups.values():
            x = np.concatenate([r.x for r in group]) if len(group) > 1 else group[0].x
            try:
                mean, std = self.predict(x)
            except Exception as exc:  # the model's own words (a shape mismatch, say) go back to each caller
                for r in group:
                    r.future.set_exception(exc)
                continue
            self.requests, self.batches, self.samples = (
                self.requests + len(group),
                self.batches + 1,
                self.samples + len(x),
            )
            at = 0
            for r in group:
                rows = slice(at, at + len(r.x))
                r.future.set_result((mean[rows], None if std is None else std[rows], len(x)))
                at += len(r.x)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: a client sending many requests reuses its connection
    # Headers and body leave in two writes; with Nagle's algorithm on, the body would wait for the client's
    # delayed ACK (~40 ms per request on a kept-alive connection).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/health":
            return self._reply(404, {"error": f"no {self.path}; use POST /predict or GET /health"})
        b = self.server.batcher
        self._reply(200, {"status": "ok", "models": len(b.predict.members), "requests": b.requests,
                          "batches": b.batches, "mean_batch": b.samples / b.batches if b.batches else 0.0})  # fmt: skip

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/predict":
            return self._reply(404, {"error": f"no {self.path}; use POST /predict or GET /health"})
        size = int(self.headers.get("Content-Length") or 0)
        if size > self.server.max_body:
            return self._reply(413, {"error": f"request of {size} bytes exceeds the server's limit of "
                                              f"{self.server.max_body} (caldera serve --max-body-mb)"})  # fmt: skip
        body = self.rfile.read(size)
        binary = self.headers.get("Content-Type", "").startswith(NPY)
        try:
            x = _parse(body, binary)
        except ValueError as exc:
            return self._reply(400, {"error": str(exc)})
        try:
            mean, std, batch = self.server.batcher.submit(x).result()
        except Exception as exc:
            return self._reply(
                400, {"error": f"the model could not take inputs of shape {list(x.shape)}: {exc}"}
            )
        if binary:
            buf = io.BytesIO()
            np.savez(buf, outputs=mean, **({} if std is None else {"std": std}))
            return self._send(200, buf.getvalue(), "application/x-npz")
        out = {"outputs": mean.tolist(), "batch": batch}
        if std is not None:
            out["std"] = std.tolist()
        self._reply(200, out)

    def _reply(self, code: int, payload: dict[str, Any]) -> None:
        self._send(code, json.dumps(payload).encode(), "application/json")

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # one line per request would drown the console
        pass


def _parse(body: bytes, binary: bool) -> np.ndarray:
    if binary:
        try:
            x = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"the body is not a .npy array ({exc}); send numpy.save() output") from None
    else:
        try:
            x = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f'send JSON {{"inputs": [sample, ...]}} (a list of equally shaped samples): {exc}'
            ) from None
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(
            f"inputs must be a non-empty batch (first dimension = samples), got shape {list(x.shape)}"
        )
    return x


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], batcher: Batcher, max_body: int) -> None:
        super().__init__(address, _Handler)
        self.batcher, self.max_body = batcher, max_body


def make_server(ensemble: Ensemble, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
                max_wait_s: float = 0.005, max_body_mb: float = 256) -> _Server:  # fmt: skip
    """An HTTP server for ``ensemble`` (call ``serve_forever()``; ``port=0`` picks a free port)."""
    return _Server((host, port), Batcher(ensemble, max_batch, max_wait_s), int(max_body_mb * 2**20))


def predict(url: str, x: Any, timeout: float = 60.0, return_std: bool = False) -> Any:
    """Client: send ``x`` (a batch) to a ``caldera serve`` at ``url`` as .npy; return the outputs (and std).

    Each thread keeps its connection to the server open between calls (a simulation calling every step pays
    for the TCP handshake once)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(x))
    target = urllib.parse.urlsplit(url)
    for attempt in range(2):  # a kept connection the server has since closed: reconnect once
        conn = _connection(target.hostname or "127.0.0.1", target.port or 80, timeout, fresh=attempt > 0)
        try:
            conn.request("POST", target.path.rstrip("/") + "/predict", body=buf.getvalue(),
                         headers={"Content-Type": NPY})  # fmt: skip
            response = conn.getresponse()
            body = response.read()
            break
        except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
            if attempt:
                raise
    if response.status != 200:
        raise RuntimeError(f"caldera serve at {url} answered {response.status}: {json.loads(body)['error']}")
    out = np.load(io.BytesIO(body))
    return (out["outputs"], out.get("std")) if return_std else out["outputs"]


_local = threading.local()


def _connection(host: str, port: int, timeout: float, fresh: bool) -> http.client.HTTPConnection:
    """This thread's open connection to ``host:port``."""
    conns = _local.__dict__.setdefault("conns", {})
    if fresh or (host, port) not in conns:
        if (host, port) in conns:
            conns[(host, port)].close()
        conns[(host, port)] = http.client.HTTPConnection(host, port, timeout=timeout)
    return conns[(host, port)]
