"""The consumer side of ``caldera stream``: frames in over ZeroMQ, batched forward passes, results out.

One loop per rank: wait for frames (``poll``), take what has arrived up to ``batch`` samples, run the model once the
batch is full or ``window_ms`` after its first frame came, send each frame's result on. ZeroMQ's own I/O thread
keeps receiving into the socket's queue (at most ``hwm`` messages) while the model runs; when that queue is full a
PUSH sender blocks (PUSH/PULL: nothing is lost), a PUB sender drops (PUB/SUB: the gaps in sequence numbers are
counted). Several ranks under mpiexec each connect a PULL socket to the same PUSH (ZeroMQ deals the frames out);
a non-blocking allgather each loop shares how many frames each rank has answered and the count the end message
announced, so every rank stops in the same round once all were answered.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from caldera.coupling.replay import ReplayBuffer
from caldera.coupling.surrogate import Surrogate
from caldera.io import atomic_write, atomic_write_text
from caldera.log import get_logger
from caldera.serve import model_card, model_dir
from caldera.stream.sockets import open_socket
from caldera.stream.wire import End, Frame, FrameError, decode, encode_error, encode_result

_log = get_logger(__name__)
ARTEFACTS = (".onnx", ".ts", ".pt2")
# Bad frames logged one by one; after that only counted (a hostile sender cannot flood the log).
_MAX_LOGGED = 10


@dataclass
class StreamModel:
    """What the stream runs: a batch function of arrays, the sample shape it takes (if known), the torch module
    behind it (run directories and registry models: what ``--learn`` trains)."""

    predict: Callable[[np.ndarray], np.ndarray]
    input_shape: tuple[int, ...] | None
    module: torch.nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    what: str = ""


def load_model(ref: str, device: str | None = None, trust_code: bool = False) -> StreamModel:
    """A run directory, a registry model ``NAME@VERSION`` or an exported artefact (``.onnx``, ``.ts``, ``.pt2``)."""
    path = Path(ref)
    if path.suffix in ARTEFACTS and path.is_file():
        card = model_card(path.parent)
        shape = tuple(card["inputs"][0]["shape"][1:]) if card else None
        return StreamModel(_artefact(path), shape, what=f"{path.name} (exported)")
    directory = model_dir(ref)
    surrogate = Surrogate.from_run(directory, device=device, trust_code=trust_code)
    card = model_card(directory)
    shape = tuple(card["inputs"][0]["shape"][1:]) if card else None
    return StreamModel(lambda x: np.asarray(surrogate(x)), shape, surrogate.model, surrogate.device, str(ref))


def _artefact(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    if path.suffix == ".onnx":
        import onnxruntime as ort  # optional (caldera[export])

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]
    if path.suffix == ".ts":
        module = torch.jit.load(str(path), map_location="cpu").eval()
    elif path.name.endswith(".aoti.pt2"):
        from torch._inductor import aoti_load_package

        module = aoti_load_package(str(path))
    else:
        module = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return (out[0] if isinstance(out, (list, tuple)) else out).numpy()

    return run


class Learner:
    """Online fine-tuning from labelled frames: they go into a replay buffer; ``steps`` optimizer steps on batches
    drawn from it follow each forward pass that brought labels (interleaved: inference waits for them)."""

    def __init__(self, module: torch.nn.Module, device: torch.device, lr: float = 1e-3, capacity: int = 4096,
                 policy: str = "fifo", batch: int = 32, steps: int = 1, seed: int = 0) -> None:  # fmt: skip
        self.module, self.batch, self.steps = module, batch, steps
        self.buffer = ReplayBuffer(capacity, policy, seed=seed, device=device)
        self.optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        self.losses: list[float] = []

    def learn(self, x: np.ndarray, y: np.ndarray) -> None:
        """Store labelled samples, then take ``steps`` optimizer steps (MSE) on replayed batches."""
        self.buffer.add(x, y)
        self.module.train()
        try:
            for _ in range(self.steps):
                xb, yb = self.buffer.sample(self.batch)
                loss = torch.nn.functional.mse_loss(self.module(xb), yb)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.losses.append(float(loss.detach()))
        finally:
            self.module.eval()

    def save(self, path: str | Path) -> None:
        """Write the fine-tuned weights (a state dict, loadable with ``torch.load(weights_only=True)``)."""
        buf = io.BytesIO()
        torch.save(self.module.state_dict(), buf)
        atomic_write(path, lambda f: f.write(buf.getvalue()))


@dataclass
class _Pending:
    frame: Frame
    x: np.ndarray  # (k, *input shape): k samples
    single: bool  # the frame was one sample (its result loses the batch axis again)


class Stream:
    """One rank's consumer; ``run()`` until the stream ends (all announced frames answered, or SIGTERM)."""

    def __init__(self, model: StreamModel, inp: str, out: str, sub: bool = False, pub: bool = False,
                 batch: int = 64, window_ms: float = 2.0, hwm: int = 1000, max_frame_mb: float = 64,
                 learner: Learner | None = None, comm: Any = None) -> None:  # fmt: skip
        if batch < 1 or not window_ms >= 0 or hwm < 1 or not max_frame_mb > 0:
            raise ValueError(f"stream: --batch ({batch}), --hwm ({hwm}) and --max-frame-mb ({max_frame_mb}) must "
                             f"be positive and --window-ms ({window_ms}) >= 0")  # fmt: skip
        self.model, self.batch, self.window = model, batch, window_ms / 1e3
        self.sub, self.learner, self.comm = sub, learner, comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.shape = model.input_shape
        self.max_bytes = int(max_frame_mb * 2**20)
        self.ctx = zmq.Context()
        try:
            self.inp = open_socket(self.ctx, "sub" if sub else "pull", inp, hwm, self.max_bytes + 65536)
            self.out = open_socket(self.ctx, "pub" if pub else "push", out, hwm)
        except ValueError:
            self.ctx.destroy(linger=0)
            raise
        self.out.setsockopt(zmq.SNDTIMEO, 200)  # a blocked send looks at the stop flag 5 times a second
        self.stop = threading.Event()
        # Counters for the summary.
        self.frames = self.samples = self.errors = self.batches = self.unsent = 0
        self.latencies: list[float] = []
        self.first: float | None = None  # time.time() of the first frame taken, of the last result sent
        self.last: float | None = None
        self.count: int | None = None  # frames the sender announced (end message)
        self.ended = False
        self.gaps = 0  # SUB: sequence numbers skipped (frames the PUB dropped)
        self.bad = 0  # messages answered with an error record (garbage without a sequence number included)
        self._last_seq = -1

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Consume until the end; return this rank's summary (``summary()`` combines the ranks')."""
        pending: list[_Pending] = []
        n = 0
        deadline = 0.0
        poller = zmq.Poller()
        poller.register(self.inp, zmq.POLLIN)
        agree = _Agreement(self.comm) if self.comm is not None else None
        try:
            while True:
                wait = 50.0 if not pending else max(0.0, (deadline - time.monotonic()) * 1e3)
                if poller.poll(wait):
                    while n < self.batch:
                        try:
                            parts = self.inp.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        item = self._take(parts)
                        if item is not None:
                            if not pending:
                                deadline = time.monotonic() + self.window
                            pending.append(item)
                            n += len(item.x)
                if pending and (n >= self.batch or time.monotonic() >= deadline or self.stop.is_set()):
                    self._answer(pending)
                    pending, n = [], 0
                if pending:
                    continue
                handled = self.frames + self.errors
                if agree is not None:
                    if agree.done(handled, self.count, self.stop.is_set() or (self.sub and self.ended)):
                        break
                elif (
                    self.stop.is_set()
                    or (self.sub and self.ended)
                    or (self.count is not None and handled >= self.count)
                ):
                    break
        finally:
            if agree is not None:
                agree.close()
            self.inp.close(0)
            self.out.close()  # LINGER: results still queued get 2 s to leave
            self.ctx.term()
        return self.local_summary()

    def _take(self, parts: list[bytes]) -> _Pending | None:
        """A received message as a frame for the batch, or None (an end message, or an error answered now)."""
        try:
            msg = decode(parts, self.max_bytes)
            if isinstance(msg, End):
                if (
                    self.sub and not self.ended and msg.count is not None
                ):  # frames dropped after the last seen
                    self.gaps += max(0, msg.count - 1 - self._last_seq)
                self.ended = True
                if msg.count is not None:
                    self.count = msg.count
                return None
            x = np.asarray(msg.x)
            shape = tuple(x.shape)
            if self.shape is None:  # no export card: the first frame fixes the sample shape
                self.shape = shape
                _log.info(
                    f"stream: samples of shape {list(shape)} (from frame {msg.seq}: the model has no card)"
                )
            if shape == self.shape:
                x, single = x[None], True
            elif shape[1:] == self.shape and len(shape) >= 1:
                single = False
            else:
                raise FrameError(f"shape {list(shape)} does not fit the model's samples {list(self.shape)} (send "
                                 f"one sample, or several stacked on a first axis)", msg.seq)  # fmt: skip
            if len(x) == 0:
                raise FrameError("the frame holds no samples", msg.seq)
            self._count_gap(msg.seq)
            if self.first is None:
                self.first = time.time()
            return _Pending(msg, x, single)
        except FrameError as exc:
            self._error(exc.seq, str(exc))
            return None

    def _count_gap(self, seq: int) -> None:
        if self.sub and seq > self._last_seq + 1:
            self.gaps += seq - self._last_seq - 1
        self._last_seq = max(self._last_seq, seq)

    def _answer(self, pending: list[_Pending]) -> None:
        """One forward pass for the batch; each frame gets its result (or, if the pass fails, each is retried
        alone so only the frame at fault gets the error)."""
        try:
            outs = self._forward([p.x for p in pending])
        except Exception as exc:
            if len(pending) == 1:
                p = pending[0]
                self._error(p.frame.seq, f"the model failed on this frame: {type(exc).__name__}: {exc}")
                return
            for p in pending:
                self._answer([p])
            return
        size = sum(len(p.x) for p in pending)
        xs, ys = [], []
        for p, y in zip(pending, outs):
            extra: dict[str, Any] = {}
            label = p.frame.label
            if label is not None:
                want = y[0].shape if p.single else y.shape
                if label.shape != want:
                    extra["label_error"] = f"label shape {list(label.shape)} is not the output's {list(want)}"
                elif self.learner is not None:
                    xs.append(p.x)
                    ys.append(label[None] if p.single else label)
            self._send(
                encode_result(p.frame.seq, p.frame.t, y[0] if p.single else y, self.rank, size, **extra)
            )
            self.frames += 1
            self.samples += len(p.x)
            if p.frame.t is not None:
                self.latencies.append(time.time() - p.frame.t)
        self.batches += 1
        self.last = time.time()
        if xs:  # after the results are out: learning delays the next batch, not this one
            self.learner.learn(np.concatenate(xs), np.concatenate(ys))

    def _forward(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.concatenate(xs)  # a copy, also of one frame: received buffers are read-only and torch warns
        y = np.asarray(self.model.predict(x))
        if len(y) != len(x):
            raise ValueError(f"the model returned {len(y)} rows for {len(x)} samples")
        return np.split(y, np.cumsum([len(a) for a in xs])[:-1])

    def _error(self, seq: int | None, message: str) -> None:
        self.errors += seq is not None  # counts toward the frames answered (a garbage message has no number)
        self.bad += 1
        if self.bad <= _MAX_LOGGED:
            _log.warning(f"stream: frame {seq}: {message}" + (" (further bad frames only counted)"
                                                             if self.bad == _MAX_LOGGED else ""))  # fmt: skip
        self._send(encode_error(seq, message, self.rank))

    def _send(self, parts: list[bytes]) -> None:
        """Send on; a PUSH whose receiver is full blocks here (back-pressure), until SIGTERM gives up."""
        while True:
            try:
                self.out.send_multipart(parts)
                return
            except zmq.Again:
                if self.stop.is_set():
                    self.unsent += 1
                    return

    # -- the summary --------------------------------------------------------------------------------------------
    def local_summary(self) -> dict[str, Any]:
        """This rank's counts, its latencies (seconds) and the span from its first frame to its last result."""
        return {"frames": self.frames, "samples": self.samples, "errors": self.errors,
                "bad_messages": self.bad, "batches": self.batches, "unsent": self.unsent,
                "gaps": self.gaps, "count": self.count, "first": self.first, "last": self.last,
                "latencies": self.latencies,
                "learn_losses": self.learner.losses if self.learner is not None else []}  # fmt: skip


def summary(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' summaries combined: totals, frames/s over the whole job's span, latency percentiles (ms)."""
    total = {k: sum(r[k] for r in ranks) for k in ("frames", "samples", "errors", "bad_messages", "batches",
                                                   "unsent", "gaps")}  # fmt: skip
    firsts = [r["first"] for r in ranks if r["first"] is not None]
    lasts = [r["last"] for r in ranks if r["last"] is not None]
    span = max(lasts) - min(firsts) if firsts and lasts else 0.0
    lat = np.asarray([v for r in ranks for v in r["latencies"]]) * 1e3
    counts = [r["count"] for r in ranks if r["count"] is not None]
    losses = [r["learn_losses"] for r in ranks if r["learn_losses"]]
    out = {**total, "ranks": len(ranks), "per_rank_frames": [r["frames"] for r in ranks],
           "announced": max(counts) if counts else None, "seconds": round(span, 6),
           "frames_per_s": round(total["frames"] / span, 1) if span > 0 else None,
           "samples_per_s": round(total["samples"] / span, 1) if span > 0 else None,
           "mean_batch": round(total["samples"] / total["batches"], 2) if total["batches"] else None,
           "latency_ms": {f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 95, 99)} if len(lat)
           else None}  # fmt: skip
    if out["announced"] is not None:
        # Announced but neither answered nor known to be dropped before Caldera (SUB's gaps).
        out["missing"] = max(0, out["announced"] - total["frames"] - total["errors"] - total["gaps"])
    if losses:
        first, last = losses[0][: max(1, len(losses[0]) // 10)], losses[0][-max(1, len(losses[0]) // 10) :]
        out["learn"] = {"steps": len(losses[0]), "loss_first": float(np.mean(first)),
                        "loss_last": float(np.mean(last))}  # fmt: skip
    return out


def describe(s: dict[str, Any]) -> str:
    """One line for the terminal."""
    lat = s["latency_ms"]
    line = (f"caldera stream: {s['frames']} frames ({s['samples']} samples) on {s['ranks']} rank(s) in "
            f"{s['seconds']:.3f} s: {s['frames_per_s']} frames/s, mean batch {s['mean_batch']}")  # fmt: skip
    if lat:
        line += f", latency p50 {lat['p50']} ms p95 {lat['p95']} ms p99 {lat['p99']} ms"
    line += f"; {s['errors']} error records"
    if s["gaps"]:
        line += f"; {s['gaps']} frames dropped before Caldera (gaps in sequence numbers)"
    if s.get("missing"):
        line += f"; {s['missing']} announced frames not answered"
    if "learn" in s:
        line += f"; learned {s['learn']['steps']} steps, loss {s['learn']['loss_first']:.4g} -> {s['learn']['loss_last']:.4g}"
    return line


class _Agreement:
    """A non-blocking allgather each round of (frames answered, count announced, stop) across the consumer ranks:
    every rank sees the same numbers, so all leave the loop in the same round."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.send = np.zeros(3, np.int64)
        self.recv = np.zeros((comm.Get_size(), 3), np.int64)
        self.request = None

    def done(self, handled: int, count: int | None, stop: bool) -> bool:
        if self.request is None:
            self.send[:] = (handled, -1 if count is None else count, int(stop))
            self.request = self.comm.Iallgather(self.send, self.recv)
            return False
        if not self.request.Test():
            return False
        self.request = None
        announced = int(self.recv[:, 1].max())
        return bool(self.recv[:, 2].any()) or (announced >= 0 and int(self.recv[:, 0].sum()) >= announced)

    def close(self) -> None:
        if self.request is not None:
            self.request.Wait()


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the stream answers the frames it holds, then ends with its summary."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def run(model: StreamModel, inp: str, out: str, summary_path: str | None = None, comm: Any = None,
        stop: threading.Event | None = None, **options: Any) -> dict[str, Any] | None:  # fmt: skip
    """Run the stream on this rank (collective over ``comm``); rank 0 prints and writes the combined summary and
    returns it (other ranks: None). SIGTERM and SIGINT end it cleanly (``stop``: an event that does instead)."""
    stream = Stream(model, inp, out, comm=comm, **options)
    if stop is not None:
        stream.stop = stop
    if comm is not None:
        comm.Barrier()  # every rank's sockets are open: the "ready" line below speaks for all
    if stream.rank == 0:
        kinds = ("SUB" if stream.sub else "PULL", "PUB" if options.get("pub") else "PUSH")
        size = comm.Get_size() if comm is not None else 1
        print(f"caldera stream: ready: {model.what} on {size} rank(s) ({model.device}), frames from {inp} "
              f"({kinds[0]}), results to {out} ({kinds[1]}); SIGTERM or an end message stops", flush=True)  # fmt: skip
    if stop is None and threading.current_thread() is threading.main_thread():
        stop_on_signals(stream.stop)
    mine = stream.run()
    ranks = comm.gather(mine, root=0) if comm is not None else [mine]
    if ranks is None:
        return None
    result = summary(ranks)
    print(describe(result), flush=True)
    if summary_path:
        atomic_write_text(summary_path, json.dumps(result, indent=2) + "\n")
    return result
