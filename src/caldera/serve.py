"""Serve trained models over HTTP with dynamic batching and ensembles: ``caldera serve RUN_DIR [RUN_DIR ...]``.

Concurrent requests are gathered for at most ``max_wait_s`` (or until ``max_batch`` samples) and answered with one
forward pass; several run directories form an ensemble whose mean and spread come back together. The standard
library's threading HTTP server carries the requests: nothing to install beyond Caldera, no container, no daemon.

    POST /predict   JSON {"inputs": [[...], ...]}      -> {"outputs": [...], "std": [...] (ensembles), "batch": n}
                    or a .npy body (application/x-npy) -> a .npz with "outputs" (and "std")
    GET  /health    models, requests, batches, mean batch size (503 once the batching thread has stopped)

No client can stop it answering the others: bodies are read only up to their checked Content-Length and caps,
each request must arrive whole within ``timeout_s``, at most ``max_connections`` threads serve connections, inputs
must be real numbers, a failed forward pass is answered per request, and every refusal is one JSON
``{"error": ...}`` (docs/serve.md lists the limits).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import queue
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
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
        return True


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

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.expired:
            self.send_error(408, self._late())
            return False
        if self.request_version == "HTTP/0.9":  # no status line or headers: a client could not tell an error
            self.send_error(505, "HTTP/0.9 is not supported: send HTTP/1.0 or HTTP/1.1 requests")
            return False
        return True

    def handle_expect_100(self) -> bool:
        # Refuse a body we would not take before the client sends it (curl asks first for bodies over 1 MiB).
        try:
            self._body_size()
        except _Refused as exc:
            self._reply(exc.code, {"error": str(exc)}, close=True)
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:
        self.server.track(self, busy=True)
        if urllib.parse.urlsplit(self.path).path.rstrip("/") != "/health":
            return self._reply(404, {"error": f"no {self.path}; use POST /predict or GET /health"})
        b = self.server.batcher
        stats = {"models": len(b.predict.members), "requests": b.requests, "batches": b.batches,
                 "mean_batch": b.samples / b.batches if b.batches else 0.0}  # fmt: skip
        if not b.alive:  # readiness: a server whose batcher died must not look healthy to a load balancer
            return self._reply(503, {"status": "unavailable", "error": b._stopped(), **stats})
        self._reply(200, {"status": "ok", **stats})

    def do_POST(self) -> None:
        try:
            self._predict()
        except (ConnectionError, TimeoutError):  # the client went away: nobody to answer
            raise
        except Exception as exc:  # a bug of ours still gets one JSON reply, and the server one line on stderr
            self.server.handle_error(self.connection, self.client_address)
            self._reply(500, {"error": f"internal error: {type(exc).__name__}: {exc}"}, close=True)

    def _predict(self) -> None:
        try:
            if urllib.parse.urlsplit(self.path).path.rstrip("/") != "/predict":
                # The body stays unread: the connection closes rather than parse it as the next request.
                raise _Refused(404, f"no {self.path}; use POST /predict or GET /health", close=True)
            binary = self.headers.get("Content-Type", "").startswith(NPY)
            body = self._read_body(self._body_size())
            self.server.track(self, busy=True)
            try:
                x = _parse(body, binary)
            except ValueError as exc:
                raise _Refused(400, str(exc)) from None
            del body  # a JSON body's text is no longer needed while the request waits for its batch
            try:
                mean, std, batch = self.server.batcher.result(self.server.batcher.submit(x))
            except BatcherStopped as exc:
                raise _Refused(503, str(exc)) from None
            except Exception as exc:
                raise _Refused(
                    400, f"the model could not take inputs of shape {list(x.shape)}: {exc}"
                ) from None
        except _Refused as exc:
            return self._reply(exc.code, {"error": str(exc)}, close=exc.close)
        if binary:
            buf = io.BytesIO()
            np.savez(buf, outputs=mean, **({} if std is None else {"std": std}))
            return self._send(200, buf.getvalue(), "application/x-npz")
        out = {"outputs": _jsonable(mean), "batch": batch}
        if std is not None:
            out["std"] = _jsonable(std)
        self._reply(200, out)

    def _body_size(self) -> int:
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
        binary = self.headers.get("Content-Type", "").startswith(NPY)
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

    def _send(self, code: int, body: bytes, kind: str, close: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.server.track(self, busy=False)  # the next request's clock starts now

    def log_message(self, format: str, *args: Any) -> None:  # one line per request would drown the console
        pass


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

    def __init__(self, address: tuple[str, int], batcher: Batcher, max_body: int, max_json: int,
                 timeout_s: float, max_connections: int) -> None:  # fmt: skip
        self.batcher, self.max_body, self.max_json = batcher, max_body, max_json
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadlines: dict[_Handler, float] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(address, _Handler)  # binds: a taken port raises here (server_close needs the above)
        self._reaper = threading.Thread(target=self._reap, name="caldera-serve-reaper", daemon=True)
        self._reaper.start()

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
        print(f"caldera serve: {client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def make_server(ensemble: Ensemble, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
                max_wait_s: float = 0.005, max_body_mb: float = 256, max_json_mb: float = 16,
                timeout_s: float = 30.0, max_connections: int = 256) -> _Server:  # fmt: skip
    """An HTTP server for ``ensemble`` (call ``serve_forever()``; ``port=0`` picks a free port)."""
    for name, value in [("max_batch", max_batch), ("max_body_mb", max_body_mb), ("max_json_mb", max_json_mb),
                        ("timeout_s", timeout_s), ("max_connections", max_connections)]:  # fmt: skip
        if not value > 0 or not math.isfinite(value):
            raise ValueError(
                f"serve: {name} (--{name.replace('_', '-')}) must be a positive number, got {value}"
            )
    batcher = Batcher(ensemble, max_batch, max_wait_s)
    try:
        return _Server((host, port), batcher, int(max_body_mb * 2**20), int(max_json_mb * 2**20), timeout_s,
                       max_connections)  # fmt: skip
    except BaseException:
        batcher.close()
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
