"""A detector simulator for ``caldera stream``: frames pushed at a target rate, results collected and checked.

It binds both of its sockets (the instrument is the fixed end; consumers connect): frames go out on a PUSH (or PUB)
socket, results come back on a PULL (or SUB) socket. Each frame carries its sequence number and send time; each
result is matched to its frame, so the report counts frames lost and answered twice and measures the end-to-end
latency on the simulator's own clock. ``make(seq)`` may supply the frames (and labels), e.g. Bragg-peak patches.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from caldera.stream.sockets import open_socket
from caldera.stream.wire import DTYPES, FrameError, encode_end, encode_frame, read_header

# seq -> (frame, label or None), or a whole message as a list of bytes (sent as it is).
Maker = Callable[[int], "tuple[np.ndarray, Any] | list[bytes]"]


def random_frames(shape: tuple[int, ...], dtype: str = "float32", seed: int = 0, pool: int = 16) -> Maker:
    """Frames of standard normal noise (a pool of ``pool`` arrays, cycled: generating them would cost more than
    sending them at high rates), no labels."""
    rng = np.random.default_rng(seed)
    frames = [rng.standard_normal(shape).astype(DTYPES[dtype]) for _ in range(pool)]
    return lambda seq: (frames[seq % pool], None)


class _Collector(threading.Thread):
    """Receive results until stopped; count answers and errors per sequence number, the latency of each."""

    def __init__(self, sock: Any, frames: int) -> None:
        super().__init__(name="caldera-stream-sim-collector", daemon=True)
        self.sock, self.frames = sock, frames
        self.answers = np.zeros(frames, np.int64)
        self.errors = np.zeros(frames, np.int64)
        self.latencies: list[float] = []
        self.error_messages: list[str] = []
        self.unknown = 0  # results of sequence numbers this run never sent, or unreadable
        self.results: dict[int, np.ndarray] = {}  # kept when keep=True (tests compare them)
        self.keep = False
        self.last = time.monotonic()
        self.stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stop.is_set():
            if not poller.poll(50):
                continue
            parts = self.sock.recv_multipart()
            now = time.time()
            self.last = time.monotonic()
            try:
                head = read_header(parts[0])
            except FrameError:
                self.unknown += 1
                continue
            seq = head.get("seq")
            if not isinstance(seq, int) or not 0 <= seq < self.frames:
                self.unknown += 1
                if "error" in head and len(self.error_messages) < 20:
                    self.error_messages.append(f"frame {seq}: {head['error']}")
                continue
            if "error" in head:
                self.errors[seq] += 1
                if len(self.error_messages) < 20:
                    self.error_messages.append(f"frame {seq}: {head['error']}")
                continue
            self.answers[seq] += 1
            if isinstance(head.get("t"), float):
                self.latencies.append(now - head["t"])
            if self.keep and len(parts) == 2:
                self.results[seq] = np.frombuffer(parts[1], DTYPES[head["dtype"]]).reshape(head["shape"])

    def complete(self) -> bool:
        return bool(((self.answers + self.errors) > 0).all())


def simulate(out: str, results: str, frames: int, rate: float = 0.0, shape: tuple[int, ...] = (1, 11, 11),
             dtype: str = "float32", pub: bool = False, results_sub: bool = False, make: Maker | None = None,
             timeout_s: float = 60.0, warmup_s: float = 0.5, drain_s: float = 1.0, hwm: int = 1000,
             keep: bool = False, seed: int = 0, extra: Callable[[Any], None] | None = None,
    ready: threading.Event | None = None, end: bool = True) -> dict[str, Any]:  # fmt: skip
    """Send ``frames`` frames to ``out`` at ``rate`` frames/s (0: as fast as the consumers take them), collect the
    results on ``results``; return the report. ``extra(sock)`` runs after the frames, before the end message (a
    test sends hostile messages there). ``keep``: the report's "results" maps each sequence number to its result;
    ``end``: send the end-of-stream message (else the consumers run on, e.g. for the next run)."""
    if frames < 1 or rate < 0 or timeout_s <= 0:
        raise ValueError(
            f"stream-sim: --frames ({frames}) must be >= 1, --rate ({rate}) >= 0, --timeout-s > 0"
        )
    if make is None and dtype not in DTYPES:
        raise ValueError(
            f"--dtype {dtype!r}: send one of {', '.join(sorted(d for d in DTYPES if d[0].isalpha()))}"
        )
    make = make or random_frames(shape, dtype, seed)
    ctx = zmq.Context()
    collector = None

    def bind(address: str) -> str:  # the simulator binds unless told to connect (">")
        return address if address.startswith(("@", ">")) else "@" + address

    try:
        sender = open_socket(ctx, "pub" if pub else "push", bind(out), hwm)
        sender.setsockopt(zmq.SNDTIMEO, 200)
        collector = _Collector(open_socket(ctx, "sub" if results_sub else "pull", bind(results), hwm), frames)
        collector.keep = keep
        collector.start()
        if ready is not None:  # e.g. set once the consumers said they are connected
            ready.wait(timeout_s)
        time.sleep(warmup_s)  # consumers connect (a PUB sends nothing to a subscriber not yet joined)
        deadline = time.monotonic() + timeout_s
        start = time.perf_counter()
        for seq in range(frames):
            if rate > 0:
                ahead = start + seq / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            made = make(seq)
            # A list of bytes is a whole message as it is (a test's malformed frame), else (array, label).
            parts = made if isinstance(made, list) else encode_frame(seq, made[0], label=made[1])
            _send(sender, parts, deadline)
        sent_s = time.perf_counter() - start
        if extra is not None:
            extra(sender)
        if end:  # without it the consumers run on (until SIGTERM); the report is ready once all are answered
            _send(sender, encode_end(frames), deadline)
        ended = repeated = time.monotonic()
        while time.monotonic() < deadline and not collector.complete():
            now = time.monotonic()
            if pub and now - max(collector.last, ended) > drain_s:
                break  # no result for drain_s: the rest were dropped
            if pub and end and now - repeated > 0.1:  # a full subscriber drops the end message too: repeat it
                sender.send_multipart(encode_end(frames))
                repeated = now
            time.sleep(0.01)
        total_s = time.perf_counter() - start
    finally:
        if collector is not None:
            collector.stop.set()
            collector.join()
        ctx.destroy(linger=0)  # closes both sockets (also when a bind failed or no consumer came)
    a, e = collector.answers, collector.errors
    lat = np.asarray(collector.latencies) * 1e3
    report: dict[str, Any] = {
        "sent": frames, "answered": int((a > 0).sum()), "error_records": int(e.sum()),
        "lost": int(((a + e) == 0).sum()), "duplicated": int(np.maximum(a + e - 1, 0).sum()),
        "unknown": collector.unknown, "target_rate": rate, "send_rate": round(frames / sent_s, 1),
        "answered_per_s": round(int((a > 0).sum()) / total_s, 1), "seconds": round(total_s, 4),
        "latency_ms": {f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 95, 99)} if len(lat) else None,
        "errors": collector.error_messages,
    }  # fmt: skip
    if keep:
        report["results"] = collector.results
    return report


def _send(sock: Any, parts: list[bytes], deadline: float) -> None:
    """Send, blocking while the consumers are full (PUSH back-pressure), up to the deadline."""
    while True:
        try:
            sock.send_multipart(parts)
            return
        except zmq.Again:
            if time.monotonic() > deadline:
                raise TimeoutError("stream-sim: no consumer took a frame before --timeout-s; is caldera stream "
                                   "running and connected to --out?") from None  # fmt: skip


def describe(r: dict[str, Any]) -> str:
    """One line for the terminal."""
    lat = r["latency_ms"]
    line = (f"caldera stream-sim: sent {r['sent']} frames at {r['send_rate']} frames/s (target "
            f"{r['target_rate'] or 'max'}); answered {r['answered']}, error records {r['error_records']}, lost "
            f"{r['lost']}, duplicated {r['duplicated']}")  # fmt: skip
    if lat:
        line += f"; end-to-end latency p50 {lat['p50']} ms p95 {lat['p95']} ms p99 {lat['p99']} ms"
    return line


def report_json(r: dict[str, Any]) -> str:
    """The report as JSON (without kept results)."""
    return json.dumps({k: v for k, v in r.items() if k != "results"}, indent=2) + "\n"
