"""Serve trained models over HTTP with dynamic batching and ensembles: ``caldera serve RUN_DIR [RUN_DIR ...]``.

Concurrent requests are gathered for at most ``max_wait_s`` (or until ``max_batch`` samples) and answered with one
forward pass; several run directories form an ensemble whose mean and spread come back together; several named
models (``--model NAME=RUN_DIR``) each get their own batching thread. The standard library's threading HTTP server
carries the requests: nothing to install beyond Caldera, no container, no daemon.

    POST /predict   JSON {"inputs": [[...], ...]}      -> {"outputs": [...], "std": [...] (ensembles), "batch": n}
                    or a .npy body (application/x-npy) -> a .npz with "outputs" (and "std")   (the first model)
    GET  /health    models, requests, batches, mean batch size (503 once the batching thread has stopped)
    Open Inference Protocol v2 (KServe, Triton): GET /v2, /v2/health/live, /v2/health/ready, /v2/models/NAME,
                    /v2/models/NAME/ready; POST /v2/models/NAME/infer with typed tensors
    GET  /metrics   Prometheus text format: requests, errors, latency and batch-size histograms, queue depth

No client can stop it answering the others: bodies are read only up to their checked Content-Length and caps,
each request must arrive whole within ``timeout_s``, at most ``max_connections`` threads serve connections, inputs
must be real numbers, a failed forward pass is answered per request, and every refusal is one JSON
``{"error": ...}`` (docs/serve.md lists the limits). With a token, every route but the open ones needs
``Authorization: Bearer <token>``. ``drain()`` (SIGTERM) stops accepting, answers the requests under way, then
returns.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import importlib.metadata
import io
import json
import math
import queue
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.coupling.surrogate import Surrogate
from caldera.log import get_logger
from caldera.registry import is_ref, resolve

_log = get_logger(__name__)

NPY = "application/x-npy"


class Ensemble:
    """The mean (and, for several members, the standard deviation) of surrogates' predictions."""

    def __init__(self, members: Sequence[Surrogate], card: Mapping[str, Any] | None = None) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = list(members)
        self.card = (
            card  # the first member's export card (model.json), when it has one: tensor names and shapes
        )

    @classmethod
    def from_runs(cls, run_dirs: Sequence[str | Path], device: str | None = None,
                  trust_code: bool = False) -> Ensemble:  # fmt: skip
        """One member per finished ``caldera train`` run directory or model reference (see ``model_dir``)."""
        dirs = [model_dir(d) for d in run_dirs]
        members = [Surrogate.from_run(d, device=device, trust_code=trust_code) for d in dirs]
        return cls(members, model_card(dirs[0]))

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = np.stack([np.asarray(m(x)) for m in self.members])
        return outs.mean(axis=0), (outs.std(axis=0) if len(outs) > 1 else None)


def model_dir(ref: str | Path) -> Path:
    """The directory a model argument names: the one place where ``caldera serve``'s arguments become directories.

    A run directory as given; a registry reference (``NAME@VERSION``) is resolved in $CALDERA_REGISTRY, its files'
    hashes checked."""
    return resolve(ref)


def model_card(directory: Path) -> dict[str, Any] | None:
    """The export card of a registry version (``model.json``) or an exported run (``export/model.json``), if any."""
    for path in (directory / "model.json", directory / "export" / "model.json"):
        try:
            card = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(card, dict)
            and isinstance(card.get("inputs"), list)
            and isinstance(card.get("outputs"), list)
        ):
            return card
    return None


def model_name(ref: str | Path) -> str:
    """The name a model argument is served under when none is given: its directory's (or reference's) name."""
    text = str(ref).rstrip("/")
    return text.split("@", 1)[0].rsplit("/", 1)[-1] if "@" in text else Path(text).name


def model_version(ref: str | Path) -> str:
    """The version reported in metadata: a registry reference's number (``NAME@latest`` -> "3"), else "1"."""
    if not is_ref(ref):
        return "1"
    return resolve(ref, verify=False).name.removeprefix("v")


class BatcherStopped(RuntimeError):
    """The batching thread is gone: no request will be answered until the server is restarted."""


@dataclass
class _Request:
    x: np.ndarray
    future: Future


class Batcher:
    """Gather concurrent requests into batches: one forward pass per batch, each caller gets its own rows back."""

    def __init__(self, predict: Ensemble, max_batch: int = 64, max_wait_s: float = 0.005) -> None:
        self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
        self.requests = self.batches = self.samples = 0
        self.sizes: Counter[int] = Counter()  # forward passes by samples per pass (the /metrics histogram)
        self.stats_lock = threading.Lock()
        self.error: str | None = None  # why the batching thread died, if it did
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="caldera-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the batching thread still runs (what /health reports as readiness)."""
        return self._thread.is_alive()

    def submit(self, x: np.ndarray) -> Future:
        """Queue a batch of samples; the future's result is (outputs, std or None, size of the batch it ran in)."""
        future: Future = Future()
        if not self._thread.is_alive():  # nobody would take it off the queue
            future.set_exception(BatcherStopped(self._stopped()))
        else:
            self._queue.put(_Request(x, future))
        return future

    def result(self, future: Future) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Wait for a submitted request; raise BatcherStopped rather than wait forever on a dead batching thread."""
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                if not self._thread.is_alive() and not future.done():
                    raise BatcherStopped(self._stopped()) from None

    def _stopped(self) -> str:
        why = f" ({self.error})" if self.error else ""
        return f"the batching thread has stopped{why}; restart caldera serve"

    @property
    def depth(self) -> int:
        """Requests waiting for a forward pass."""
        return self._queue.qsize()

    def close(self) -> None:
        """Finish the queued requests and stop the batching thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        try:
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
        except BaseException as exc:  # recorded for /health (503) and the waiting requests; the thread ends
            self.error = f"{type(exc).__name__}: {exc}"
            raise

    def _run(self, batch: list[_Request]) -> None:
        # Requests of another sample shape or dtype cannot share a forward pass: one pass per kind.
        groups: dict[tuple, list[_Request]] = {}
        for r in batch:
            groups.setdefault((r.x.shape[1:], r.x.dtype.str), []).append(r)
        for group in groups.values():
            if not self._answer(group) and len(group) > 1:
                # The shared pass failed: each request runs alone, so only the one at fault gets the error.
                for r in group:
                    self._answer([r])

    def _answer(self, group: list[_Request]) -> bool:
        """One forward pass for ``group``; every future gets its rows or the error. False if the pass failed."""
        try:
            x = np.concatenate([r.x for r in group]) if len(group) > 1 else group[0].x
            mean, std = self.predict(x)
            if len(mean) != len(x) or (std is not None and len(std) != len(x)):
                raise ValueError(f"the model returned {len(mean)} rows for {len(x)} samples")
        except Exception as exc:  # the model's own words (a shape mismatch, say) go back to each caller
            if len(group) == 1:
                group[0].future.set_exception(exc)
            return False
        with self.stats_lock:
            self.requests, self.batches, self.samples = (
                self.requests + len(group),
                self.batches + 1,
                self.samples + len(x),
            )
            self.sizes[len(x)] += 1
        at = 0
        for r in group:
            rows = slice(at, at + len(r.x))
            r.future.set_result((mean[rows], None if std is None else std[rows], len(x)))
            at += len(r.x)
        return True


# Open Inference Protocol v2 datatypes (BYTES, strings, has no meaning to a model of numbers).
_OIP_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
              "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
              "FP32": np.float32, "FP64": np.float64}  # fmt: skip
_OIP_NAMES = {np.dtype(t).str: name for name, t in _OIP_TYPES.items()}


@dataclass
class Model:
    """One served model: a name, a version, the ensemble behind it, its batcher and its tensors' metadata."""

    name: str
    ensemble: Ensemble
    batcher: Batcher
    version: str = "1"
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        """The OIP v2 model metadata (shapes with -1 where a dimension varies, the batch always)."""
        return {"name": self.name, "versions": [self.version], "platform": "pytorch_caldera",
                "inputs": self.inputs, "outputs": self.outputs}  # fmt: skip


def _tensors(ensemble: Ensemble) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input and output metadata: the export card's names and shapes where the model has one, else read off the
    first and last layers with weights (-1 where they cannot tell)."""
    member = ensemble.members[0]
    if ensemble.card is not None:  # what `caldera export` recorded from the run's data: every size known
        names = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "int64": "INT64", "int32": "INT32"}
        inputs, outputs = ([{"name": t["name"], "datatype": names.get(t.get("dtype"), "FP32"), "shape": t["shape"]}
                            for t in ensemble.card[side]] for side in ("inputs", "outputs"))  # fmt: skip
        if len(ensemble.members) > 1:
            outputs.append({**outputs[0], "name": "std"})
        return inputs, outputs
    layers = [m for m in member.model.modules() if getattr(m, "weight", None) is not None]
    dtype = _OIP_NAMES.get(np.dtype(str(member.dtype).removeprefix("torch.")).str, "FP32")

    def shape(layer: Any, first: bool) -> list[int]:
        if isinstance(layer, torch.nn.Linear):
            return [-1, layer.in_features if first else layer.out_features]
        if isinstance(layer, torch.nn.modules.conv._ConvNd):
            dims = layer.weight.dim() - 2
            return [-1, layer.in_channels if first else layer.out_channels, *[-1] * dims]
        return [-1]

    inputs = [{"name": "input", "datatype": dtype, "shape": shape(layers[0], True) if layers else [-1]}]
    outputs = [{"name": "output", "datatype": dtype, "shape": shape(layers[-1], False) if layers else [-1]}]
    if len(ensemble.members) > 1:  # the ensemble's spread, per output value
        outputs.append({**outputs[0], "name": "std"})
    return inputs, outputs


# Latency buckets (seconds) for the /metrics histogram: a batching window is milliseconds, a queue can be seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and histograms for ``GET /metrics``, written in the Prometheus text exposition format (0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (model, route, code)
        # (model, route): the histogram's bucket counts, then the sum and the count of the latencies
        self.latency: dict[tuple[str, str], list[float]] = {}

    def observe(self, model: str, route: str, code: int, seconds: float) -> None:
        """Count one answered request and its latency (arrival of the request line to the reply sent)."""
        with self._lock:
            self.requests[(model, route, code)] += 1
            h = self.latency.setdefault((model, route), [0.0] * (len(_LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(_LATENCY_BUCKETS):
                if seconds <= bound:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(self, models: Mapping[str, Model], max_batch: int, in_progress: int) -> str:
        """The exposition text: these counters, per model its batch sizes and queue depth, requests under way."""
        out = ["# HELP caldera_requests_total Requests answered, by model, route and HTTP status.",
               "# TYPE caldera_requests_total counter"]  # fmt: skip
        with self._lock:
            requests, latency = dict(self.requests), {k: list(v) for k, v in self.latency.items()}
        errors = []
        for (model, route, code), n in sorted(requests.items()):
            labels = f'model="{model}",route="{route}",code="{code}"'
            out.append(f"caldera_requests_total{{{labels}}} {n}")
            if code >= 400:
                errors.append(f"caldera_request_errors_total{{{labels}}} {n}")
        out += ["# HELP caldera_request_errors_total Requests answered with a 4xx or 5xx status.",
                "# TYPE caldera_request_errors_total counter", *errors,
                "# HELP caldera_request_duration_seconds Time from a request's arrival to its reply.",
                "# TYPE caldera_request_duration_seconds histogram"]  # fmt: skip
        for (model, route), h in sorted(latency.items()):
            labels = f'model="{model}",route="{route}"'
            for bound, n in zip(_LATENCY_BUCKETS, h, strict=False):
                out.append(f'caldera_request_duration_seconds_bucket{{{labels},le="{bound:g}"}} {n:g}')
            out += [f'caldera_request_duration_seconds_bucket{{{labels},le="+Inf"}} {h[-1]:g}',
                    f"caldera_request_duration_seconds_sum{{{labels}}} {h[-2]:.6f}",
                    f"caldera_request_duration_seconds_count{{{labels}}} {h[-1]:g}"]  # fmt: skip
        bounds = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b < max_batch] + [max_batch]
        out += ["# HELP caldera_batch_size Samples per forward pass.", "# TYPE caldera_batch_size histogram"]
        for name, m in models.items():
            with m.batcher.stats_lock:
                sizes, samples, batches = dict(m.batcher.sizes), m.batcher.samples, m.batcher.batches
            for bound in bounds:
                n = sum(c for size, c in sizes.items() if size <= bound)
                out.append(f'caldera_batch_size_bucket{{model="{name}",le="{bound}"}} {n}')
            out += [f'caldera_batch_size_bucket{{model="{name}",le="+Inf"}} {batches}',
                    f'caldera_batch_size_sum{{model="{name}"}} {samples}',
                    f'caldera_batch_size_count{{model="{name}"}} {batches}']  # fmt: skip
        out += [
            "# HELP caldera_queue_depth Requests waiting for a forward pass.",
            "# TYPE caldera_queue_depth gauge",
        ]
        out += [f'caldera_queue_depth{{model="{name}"}} {m.batcher.depth}' for name, m in models.items()]
        out += ["# HELP caldera_model_ready Whether the model's batching thread runs (1) or has stopped (0).",
                "# TYPE caldera_model_ready gauge"]  # fmt: skip
        out += [f'caldera_model_ready{{model="{name}"}} {int(m.batcher.alive)}' for name, m in models.items()]
        out += ["# HELP caldera_requests_in_progress Requests received and not yet answered (this one included).",
                "# TYPE caldera_requests_in_progress gauge", f"caldera_requests_in_progress {in_progress}"]  # fmt: skip
        return "\n".join(out) + "\n"


class _Refused(Exception):
    """A request answered with an error status: ``code`` and one line saying what to send instead."""

    def __init__(self, code: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.code, self.close = code, close


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: a client sending many requests reuses its connection
    # Headers and body leave in two writes; with Nagle's algorithm on, the body would wait for the client's
    # delayed ACK (~40 ms per request on a kept-alive connection).
    disable_nagle_algorithm = True
    expired = False  # set by the server's reaper when this connection overran its deadline

    def setup(self) -> None:
        # A socket timeout bounds every single read and write (a client that stops reading our reply); the
        # server's reaper bounds the whole request (a client trickling one byte at a time).
        self.timeout = self.server.timeout_s
        super().setup()
        self.server.track(self, busy=False)

    def finish(self) -> None:
        self.server.untrack(self)
        super().finish()

    def handle_expect_100(self) -> bool:
        # Refuse a body we would not take before the client sends it (curl asks first for bodies over 1 MiB).
        try:
            self._body_size(self.headers.get("Content-Type", "").startswith(NPY))
        except _Refused as exc:
            self._reply(exc.code, {"error": str(exc)}, close=True)
            return False
        return super().handle_expect_100()

    def parse_request(self) -> bool:
        self._start, self._route, self._model = time.perf_counter(), "other", ""
        if not super().parse_request():
            return False
        if self.expired:
            self.send_error(408, self._late())
            return False
        if self.request_version == "HTTP/0.9":  # no status line or headers: a client could not tell an error
            self.send_error(505, "HTTP/0.9 is not supported: send HTTP/1.0 or HTTP/1.1 requests")
            return False
        self.server.begin(self)
        return True

    def _authorized(self, path: str) -> bool:
        """Whether the request may proceed; if not, it has been answered 401 (the body, if any, left unread)."""
        token = self.server.token
        if token is None or path in self.server.open_routes:
            return True
        given = self.headers.get("Authorization", "").encode("latin-1", "replace")
        if hmac.compare_digest(given, b"Bearer " + token):  # constant time: no guessing it byte by byte
            return True
        self._route = "unauthorized"
        why = "no Authorization header" if not given else "a wrong token"
        self._send(401, json.dumps({"error": f"{why}: send 'Authorization: Bearer <token>' with the server's "
                                             "token (caldera serve --token-file)"}).encode(),
                   "application/json", close=True, extra={"WWW-Authenticate": 'Bearer realm="caldera"'})  # fmt: skip
        return False

    def do_GET(self) -> None:
        self.server.track(self, busy=True)
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if not self._authorized(path):
            return None
        try:
            self._get(path)
        except _Refused as exc:
            self._reply(exc.code, {"error": str(exc)}, close=exc.close)

    def _get(self, path: str) -> None:
        models, parts = self.server.models, path.split("/")
        if path == "/metrics":
            self._route = "/metrics"
            text = self.server.metrics.render(models, self.server.max_batch, self.server.in_progress)
            return self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/health":
            self._route, b = "/health", self.server.batcher
            stats = {"models": len(self.server.default.ensemble.members), "names": list(models),
                     "requests": b.requests, "batches": b.batches,
                     "mean_batch": b.samples / b.batches if b.batches else 0.0}  # fmt: skip
            if not self.server.ready:  # readiness: a server that cannot answer must not look healthy
                return self._reply(503, {"status": "unavailable", "error": self.server.unready(), **stats})
            return self._reply(200, {"status": "ok", **stats})
        if path == "/v2":
            self._route = "/v2"
            return self._reply(200, {"name": "caldera", "version": _version(), "extensions": []})
        if path == "/v2/health/live":  # the process answers: alive, even while draining
            self._route = path
            return self._reply(200, {"live": True})
        if path == "/v2/health/ready":
            self._route = path
            if not self.server.ready:
                return self._reply(503, {"ready": False, "error": self.server.unready()})
            return self._reply(200, {"ready": True})
        if parts[:3] == ["", "v2", "models"] and len(parts) >= 4:
            model, rest = self._v2_model(parts)
            if rest == []:
                self._route = "/v2/models/{name}"
                return self._reply(200, model.metadata())
            if rest == ["ready"]:
                self._route = "/v2/models/{name}/ready"
                if not model.batcher.alive or self.server.draining:
                    why = model.batcher._stopped() if not model.batcher.alive else "the server is draining"
                    return self._reply(503, {"name": model.name, "ready": False, "error": why})
                return self._reply(200, {"name": model.name, "ready": True})
        raise _Refused(
            404, f"no GET {self.path}; see GET /v2/models/NAME, /v2/health/ready, /health, /metrics"
        )

    def _v2_model(self, parts: list[str]) -> tuple[Model, list[str]]:
        """The model a /v2/models/NAME[/versions/V]/... path names, and the rest of the path; _Refused 404 if none."""
        name, rest = urllib.parse.unquote(parts[3]), parts[4:]
        model = self.server.models.get(name)
        if model is None:
            raise _Refused(404, f"no model {name!r} here; served: {', '.join(self.server.models)}")
        self._model = name
        if rest[:1] == ["versions"] and len(rest) >= 2:
            if rest[1] != model.version:
                raise _Refused(404, f"model {name!r} has no version {rest[1]!r}; served: {model.version}")
            rest = rest[2:]
        return model, rest

    def do_POST(self) -> None:
        try:
            path = urllib.parse.urlsplit(self.path).path.rstrip("/")
            if not self._authorized(path):
                return None
            self._post(path)
        except (ConnectionError, TimeoutError):  # the client went away: nobody to answer
            raise
        except Exception as exc:  # a bug of ours still gets one JSON reply, and the server one line on stderr
            self.server.handle_error(self.connection, self.client_address)
            self._reply(500, {"error": f"internal error: {type(exc).__name__}: {exc}"}, close=True)

    def _post(self, path: str) -> None:
        try:
            parts = path.split("/")
            if path == "/predict":
                self._route, model, oip = "/predict", self.server.default, False
            elif parts[:3] == ["", "v2", "models"] and len(parts) >= 5:
                try:
                    model, rest = self._v2_model(parts)
                except _Refused as exc:  # the body stays unread: the connection closes
                    raise _Refused(exc.code, str(exc), close=True) from None
                if rest != ["infer"]:
                    raise _Refused(404, f"no POST {self.path}; use POST /v2/models/NAME/infer", close=True)
                self._route, oip = "/v2/models/{name}/infer", True
            else:
                # The body stays unread: the connection closes rather than parse it as the next request.
                raise _Refused(
                    404, f"no POST {self.path}; use POST /predict or /v2/models/NAME/infer", close=True
                )
            self._model = model.name
            binary = not oip and self.headers.get("Content-Type", "").startswith(NPY)
            body = self._read_body(self._body_size(binary))
            self.server.track(self, busy=True)
            try:
                x, request_id, wanted = (
                    _parse_infer(body, model) if oip else (_parse(body, binary), None, None)
                )
            except ValueError as exc:
                raise _Refused(400, str(exc)) from None
            del body  # a JSON body's text is no longer needed while the request waits for its batch
            try:
                mean, std, batch = model.batcher.result(model.batcher.submit(x))
            except BatcherStopped as exc:
                raise _Refused(503, str(exc)) from None
            except Exception as exc:
                raise _Refused(
                    400, f"the model could not take inputs of shape {list(x.shape)}: {exc}"
                ) from None
        except _Refused as exc:
            return self._reply(exc.code, {"error": str(exc)}, close=exc.close)
        if oip:
            return self._reply(200, _infer_reply(model, mean, std, request_id, wanted))
        if binary:
            buf = io.BytesIO()
            np.savez(buf, outputs=mean, **({} if std is None else {"std": std}))
            return self._send(200, buf.getvalue(), "application/x-npz")
        out = {"outputs": _jsonable(mean), "batch": batch}
        if std is not None:
            out["std"] = _jsonable(std)
        self._reply(200, out)

    def _body_size(self, binary: bool) -> int:
        """The request's Content-Length, checked against the limits; _Refused (closing) if it is not acceptable."""
        # Chunked or otherwise encoded, a body's length is not known before it is read: refused.
        if "Transfer-Encoding" in self.headers:
            raise _Refused(411, "chunked (Transfer-Encoding) request bodies are not accepted: send a Content-Length",
                           close=True)  # fmt: skip
        lengths = {v.strip() for v in self.headers.get_all("Content-Length", [])}
        if not lengths:
            raise _Refused(411, "a POST needs a Content-Length header", close=True)
        if len(lengths) > 1:  # a proxy in front might pick the other one: where would this request end?
            raise _Refused(400, f"conflicting Content-Length headers {sorted(lengths)}", close=True)
        text = lengths.pop()
        if not text.isdigit() or not text.isascii():  # a sign, a fraction, 'abc': nothing to count bytes by
            raise _Refused(400, f"Content-Length {text[:40]!r} is not a number of bytes", close=True)
        size = int(text)
        # Parsing JSON costs ~14x its size in memory: JSON bodies have their own, smaller cap.
        cap = self.server.max_body if binary else self.server.max_json
        option, kind = ("--max-body-mb", "a .npy") if binary else ("--max-json-mb", "a JSON")
        if size > cap:
            raise _Refused(413, f"{kind} request of {size} bytes exceeds the server's limit of {cap} "
                                f"(caldera serve {option}; large batches travel best as .npy)", close=True)  # fmt: skip
        return size

    def _read_body(self, size: int) -> np.ndarray:
        """Exactly ``size`` bytes of body (as uint8: untouched pages of a stalled upload cost no memory)."""
        body = np.empty(size, dtype=np.uint8)
        view, got = memoryview(body), 0
        try:
            while got < size:
                n = self.rfile.readinto(view[got:])
                if not n:
                    break
                got += n
        except TimeoutError:
            raise _Refused(408, self._late(), close=True) from None
        if got < size:
            if self.expired:
                raise _Refused(408, self._late(), close=True)
            raise _Refused(400, f"the body ended after {got} of {size} bytes (Content-Length)", close=True)
        return body

    def _late(self) -> str:
        return (f"the request did not arrive within {self.server.timeout_s:g} s "
                "(caldera serve --timeout-s)")  # fmt: skip

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The standard library's own refusals (a malformed request line, too many headers, an unknown method)
        # answer in JSON like every other error, with a status line even to a request too broken to have one.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self._reply(code, {"error": message or self.responses.get(code, ("error",))[0]}, close=True)

    def _reply(self, code: int, payload: dict[str, Any], close: bool = False) -> None:
        try:  # NaN and infinities are never bare tokens on the wire (_jsonable turns them into null)
            body = json.dumps(payload, allow_nan=False).encode()
        except ValueError as exc:
            code, close = 500, True
            body = json.dumps({"error": f"reply not encodable as JSON: {exc}"}).encode()
        self._send(code, body, "application/json", close)

    def _send(self, code: int, body: bytes, kind: str, close: bool = False,
              extra: dict[str, str] | None = None) -> None:  # fmt: skip
        close = close or self.server.draining  # a draining server takes no further request on this connection
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        # Counted before the body goes out: a client that reads this reply and then asks /metrics must find it
        # there (counted after the write, a fast client could overtake this thread's bookkeeping).
        start = getattr(self, "_start", None)
        if start is not None:  # None: refused before a request line was read
            self.server.metrics.observe(self._model, self._route, code, time.perf_counter() - start)
        try:
            self.end_headers()
            self.wfile.write(body)
        finally:
            self.server.track(self, busy=False)  # the next request's clock starts now
            self.server.end(self)

    def log_message(self, format: str, *args: Any) -> None:  # one line per request would drown the console
        pass


def _version() -> str:
    try:
        return importlib.metadata.version("caldera")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        return "unknown"


def _parse_infer(body: np.ndarray, model: Model) -> tuple[np.ndarray, Any, list[str] | None]:
    """An OIP v2 inference request: (the input tensor, the request's id, the outputs asked for or None for all)."""
    text = body.tobytes()
    depth = _depth(text)
    if depth > _MAX_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep; inputs need at most {_MAX_DEPTH}")
    expected = model.inputs[0]["name"]
    usage = (f'send {{"inputs": [{{"name": "{expected}", "shape": [n, ...], "datatype": "FP32", '
             '"data": [...row-major...]}]}')  # fmt: skip
    try:
        request = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the body is not JSON ({str(exc)[:200]}); {usage}") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ValueError(f"model {model.name!r} takes exactly one input tensor; {usage}")
    tensor = inputs[0]
    name, shape, kind, data = (tensor.get(k) for k in ("name", "shape", "datatype", "data"))
    if name != expected:
        raise ValueError(f"model {model.name!r} has no input {name!r}; its input is {expected!r}")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"input {name!r}: shape {shape!r} must be a non-empty list of sizes (batch first)")
    if kind not in _OIP_TYPES:
        raise ValueError(
            f"input {name!r}: datatype {kind!r} is not accepted; send one of {', '.join(_OIP_TYPES)}"
        )
    if not isinstance(data, list):
        raise ValueError(f"input {name!r}: data must be a list of numbers (flat, row-major)")
    dtype = np.dtype(_OIP_TYPES[kind])
    try:
        if dtype.kind == "f":
            x = np.asarray(data, dtype=dtype)
        else:  # integers and booleans must be given as such: 1.5 as INT32 is refused, not truncated
            x = np.asarray(data)
            if x.size and x.dtype.kind not in ("b" if dtype.kind == "b" else "biu"):
                raise ValueError(f"{kind} data holds {x.dtype} values")
            if (
                x.size
                and dtype.kind in "iu"
                and (x.min() < np.iinfo(dtype).min or x.max() > np.iinfo(dtype).max)
            ):
                raise ValueError(f"values outside {kind}'s range")
            x = x.astype(dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"input {name!r}: data is not {kind} numbers ({str(exc)[:200]})") from None
    if x.size != math.prod(shape):
        raise ValueError(
            f"input {name!r}: shape {shape} holds {math.prod(shape)} values but data has {x.size}"
        )
    if shape[0] == 0:
        raise ValueError(f"input {name!r}: the batch (first dimension) is empty")
    declared = model.inputs[0][
        "shape"
    ]  # -1 where any size goes (the batch; every size the card does not fix)
    if len(declared) > 1 and (
        len(shape) != len(declared) or any(d not in (-1, n) for d, n in zip(declared, shape))
    ):
        raise ValueError(f"input {name!r}: shape {shape} does not fit the model's {declared} (-1: any size)")
    wanted = request.get("outputs")
    names = [o["name"] for o in model.outputs]
    if wanted is not None:
        if not isinstance(wanted, list) or not all(
            isinstance(o, dict) and o.get("name") in names for o in wanted
        ):
            raise ValueError(f'outputs {wanted!r}: ask for some of {names} as [{{"name": ...}}]')
        wanted = [o["name"] for o in wanted]
    return x.reshape(shape), request.get("id"), wanted


def _infer_reply(model: Model, mean: np.ndarray, std: np.ndarray | None, request_id: Any,
                 wanted: list[str] | None) -> dict[str, Any]:  # fmt: skip
    """The OIP v2 inference response: each output tensor flat, row-major, with its shape and datatype."""
    tensors = {model.outputs[0]["name"]: mean}
    if std is not None:
        tensors["std"] = std
    outputs = [{"name": name, "shape": list(a.shape), "datatype": _OIP_NAMES.get(a.dtype.str, "FP64"),
                "data": _jsonable(a.reshape(-1))}
               for name, a in tensors.items() if wanted is None or name in wanted]  # fmt: skip
    reply: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if request_id is not None:
        reply["id"] = request_id
    return reply


def _jsonable(a: np.ndarray) -> list:
    """``a`` as nested lists, NaN and infinities as None (JSON null: the reply stays valid JSON)."""
    finite = np.isfinite(a)
    if finite.all():
        return a.tolist()
    out = a.astype(object)
    out[~finite] = None
    return out.tolist()


# Real numbers only: a structured, complex, string or object array has no meaning to a model (complex would
# silently lose its imaginary part), and float128 has no torch type.
_KINDS = {"b": "booleans", "i": "signed integers", "u": "unsigned integers", "f": "floats"}
_ALLOWED = "send real numbers: float16/32/64, (u)int8-64 or bool arrays"
# JSON nesting: a batch of d-dimensional samples needs d + 2 levels; numpy allows 64 dimensions.
_MAX_DEPTH = 64
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _parse(body: np.ndarray, binary: bool) -> np.ndarray:
    x = _parse_npy(body) if binary else _parse_json(body.tobytes())
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(
            f"inputs must be a non-empty batch (first dimension = samples), got shape {list(x.shape)}"
        )
    return x


def _parse_npy(body: np.ndarray) -> np.ndarray:
    """The array in a .npy body, without copying it; the header is checked before the data is looked at."""
    head = io.BytesIO(body[:65536].tobytes())  # numpy reads headers up to 10 000 bytes
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
        else:
            raise ValueError(f".npy format version {version} is not accepted (1.0 and 2.0 are)")
    except Exception as exc:
        raise ValueError(f"the body is not a .npy array ({exc}); send numpy.save() output") from None
    if dtype.kind not in _KINDS or dtype.itemsize > 8:
        raise ValueError(f"inputs of dtype {dtype} are not accepted: {_ALLOWED}")
    count = math.prod(shape)
    if len(body) - head.tell() != count * dtype.itemsize:
        raise ValueError(f"the .npy header says {count * dtype.itemsize} bytes of data (shape {list(shape)}, "
                         f"{dtype}) but the body carries {len(body) - head.tell()}; send numpy.save() output")  # fmt: skip
    x = np.frombuffer(body, dtype, count, head.tell())
    x = x.reshape(shape[::-1]).T if fortran else x.reshape(shape)
    if not dtype.isnative:  # torch takes only the machine's byte order
        x = x.astype(dtype.newbyteorder("="))
    return x


def _parse_json(body: bytes) -> np.ndarray:
    # Counted before parsing: a deep nest costs the parser's recursion, and a cheap scan (brackets inside
    # strings included, which only errs towards refusing) rejects it first; RecursionError stays caught.
    depth = _depth(body)
    if depth > _MAX_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep; inputs need at most {_MAX_DEPTH}")
    try:
        x = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
    except RecursionError:
        raise ValueError(f"JSON nested too deep; inputs need at most {_MAX_DEPTH} levels") from None
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise ValueError(
            f'send JSON {{"inputs": [sample, ...]}} (a list of equally shaped samples): {exc}'
        ) from None
    return x


def _depth(body: bytes) -> int:
    """The deepest nesting of brackets and braces in ``body``."""
    brackets = np.frombuffer(body.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    deepest = level = 0
    for start in range(0, len(brackets), 1 << 20):  # in slices: bounded memory for a body of brackets only
        # '[' 0x5b and '{' 0x7b have bit 1 set, ']' 0x5d and '}' 0x7d do not: +1 opens, -1 closes.
        steps = (brackets[start : start + (1 << 20)] & 2).astype(np.int32) - 1
        levels = np.cumsum(steps) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog (the standard library's default is 5): 32 clients connecting at once overflowed it and
    # some got "connection reset by peer" or a 1 s SYN retry. The kernel caps it at net.core.somaxconn.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], models: dict[str, Model], max_body: int, max_json: int,
                 timeout_s: float, max_connections: int, max_batch: int, token: bytes | None,
                 open_routes: Sequence[str]) -> None:  # fmt: skip
        self.models, self.default = models, next(iter(models.values()))
        self.batcher = self.default.batcher  # the model POST /predict and /health speak for
        self.max_body, self.max_json, self.max_batch = max_body, max_json, max_batch
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self.token, self.open_routes = token, {r.rstrip("/") for r in open_routes}
        self.metrics = Metrics()
        self.draining = False
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadlines: dict[_Handler, float] = {}
        # Connections with a request under way (its line read, no reply yet): drain() waits for these.
        self._answering: set[_Handler] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closing = threading.Event()
        super().__init__(address, _Handler)  # binds: a taken port raises here (server_close needs the above)
        self._reaper = threading.Thread(target=self._reap, name="caldera-serve-reaper", daemon=True)
        self._reaper.start()

    @property
    def ready(self) -> bool:
        """Whether every model can answer and the server is not draining (readiness for a load balancer)."""
        return not self.draining and all(m.batcher.alive for m in self.models.values())

    def unready(self) -> str:
        if self.draining:
            return "the server is draining (SIGTERM): it answers the requests under way, then stops"
        dead = [m for m in self.models.values() if not m.batcher.alive]
        return "; ".join(f"{m.name}: {m.batcher._stopped()}" for m in dead)

    @property
    def in_progress(self) -> int:
        """Requests whose line has arrived and whose reply has not been sent."""
        return len(self._answering)

    def begin(self, handler: _Handler) -> None:
        """A request line has arrived on ``handler``: drain() waits for its reply."""
        with self._lock:
            self._answering.add(handler)

    def end(self, handler: _Handler) -> None:
        with self._lock:
            self._answering.discard(handler)
            self._idle.notify_all()

    def drain(self, limit_s: float | None = None) -> int:
        """Stop accepting, let the requests under way be answered (within ``limit_s``, default timeout_s plus
        a minute), close the idle kept-alive connections and stop the batchers; return the requests cut off."""
        self.draining = True
        self._closing.set()
        with contextlib.suppress(OSError):
            self.socket.close()  # new connections are refused from here on
        deadline = time.monotonic() + (self.timeout_s + 60 if limit_s is None else limit_s)
        with self._lock:
            while self._answering and time.monotonic() < deadline:
                self._idle.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            cut = len(self._answering)
            idle = [h for h in self._deadlines if h not in self._answering]
        # Kept-alive connections waiting for a next request: end them (their reads see the end of the stream).
        for h in idle:
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RD)
        for m in self.models.values():
            m.batcher.close()
        return cut

    def process_request(self, request: Any, client_address: Any) -> None:
        # At most max_connections handler threads: further connections wait to be accepted (in the backlog,
        # costing no thread) until one ends; idle and slow ones end after timeout_s.
        while not self._slots.acquire(timeout=0.5):
            if self._closing.is_set():
                return self.shutdown_request(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def track(self, handler: _Handler, busy: bool) -> None:
        """Start ``handler``'s clock (it owes a whole request within timeout_s) or stop it (busy: being answered)."""
        with self._lock:
            self._deadlines[handler] = math.inf if busy else time.monotonic() + self.timeout_s

    def untrack(self, handler: _Handler) -> None:
        with self._lock:
            self._deadlines.pop(handler, None)

    def _reap(self) -> None:
        # One thread for all connections: closing the read side of a late one wakes its handler (the read sees
        # the end of the stream), which answers 408 if a request was under way and ends the connection.
        while not self._closing.wait(min(1.0, self.timeout_s / 4)):
            now = time.monotonic()
            with self._lock:
                late = [h for h, deadline in self._deadlines.items() if deadline < now]
                for h in late:
                    self._deadlines[h] = math.inf
            for h in late:
                h.expired = True
                with contextlib.suppress(OSError):  # already closed by the client
                    h.connection.shutdown(socket.SHUT_RD)

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # a client that went away: nothing to report
            return
        _log.error(f"serve: {client_address[0]}: {type(exc).__name__}: {exc}")


# Routes answered without a token by default: orchestrators probe liveness and readiness without credentials.
OPEN_ROUTES = ("/v2/health/live", "/v2/health/ready")


def make_server(models: Ensemble | Mapping[str, Ensemble], host: str = "127.0.0.1", port: int = 8000,
                max_batch: int = 64, max_wait_s: float = 0.005, max_body_mb: float = 256, max_json_mb: float = 16,
                timeout_s: float = 30.0, max_connections: int = 256, token: str | None = None,
                open_routes: Sequence[str] = OPEN_ROUTES, versions: Mapping[str, str] | None = None) -> _Server:  # fmt: skip
    """An HTTP server for one ensemble or several named ones (call ``serve_forever()``; ``port=0``: a free port).

    The first named model answers ``POST /predict``; ``token``: every route but ``open_routes`` needs
    ``Authorization: Bearer <token>``."""
    for name, value in [("max_batch", max_batch), ("max_body_mb", max_body_mb), ("max_json_mb", max_json_mb),
                        ("timeout_s", timeout_s), ("max_connections", max_connections)]:  # fmt: skip
        if not value > 0 or not math.isfinite(value):
            raise ValueError(
                f"serve: {name} (--{name.replace('_', '-')}) must be a positive number, got {value}"
            )
    named = {"model": models} if isinstance(models, Ensemble) else dict(models)
    if not named:
        raise ValueError("serve: give at least one model")
    for name in named:  # names go into URLs and metric labels: nothing to escape in either
        if not name or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
            raise ValueError(f"serve: model name {name!r} must be letters, digits, '-', '_' or '.'; "
                             "name it with --model NAME=RUN_DIR")  # fmt: skip
    if token is not None and not token.strip():
        raise ValueError("serve: the token is empty; put a secret in the --token-file")
    served: dict[str, Model] = {}
    try:
        for name, ensemble in named.items():
            inputs, outputs = _tensors(ensemble)
            served[name] = Model(name, ensemble, Batcher(ensemble, max_batch, max_wait_s),
                                 (versions or {}).get(name, "1"), inputs, outputs)  # fmt: skip
        return _Server((host, port), served, int(max_body_mb * 2**20), int(max_json_mb * 2**20), timeout_s,
                       max_connections, max_batch, None if token is None else token.strip().encode(),
                       open_routes)  # fmt: skip
    except BaseException:
        for m in served.values():
            m.batcher.close()
        raise


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
