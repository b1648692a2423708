"""The ``caldera stream`` and ``caldera stream-sim`` commands: their arguments and what they run."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from caldera.errors import CheckpointError
from caldera.io import atomic_write_text
from caldera.world import abort_on_uncaught_exception, init, launched_size

INSTALL = "caldera stream needs pyzmq: pip install 'caldera[stream]'"


def add_parsers(sub: Any, trust_help: str) -> None:
    """Add ``stream`` and ``stream-sim`` to the ``caldera`` command's subparsers."""
    p = sub.add_parser(
        "stream", help="run a model on frames streamed over ZeroMQ: batched, answered in order"
    )
    p.add_argument("model", metavar="MODEL",
                   help="run directory, registry model NAME@VERSION, or exported artefact (.onnx, .ts, .pt2)")  # fmt: skip
    p.add_argument("--in", dest="inp", required=True, metavar="ADDR",
                   help="where frames come from: tcp://HOST:PORT connects, @tcp://*:PORT binds")  # fmt: skip
    p.add_argument("--out", required=True, metavar="ADDR", help="where results go (same notation)")
    p.add_argument(
        "--sub", action="store_true", help="receive with SUB from a PUB (default: PULL from a PUSH)"
    )
    p.add_argument("--pub", action="store_true", help="send results with PUB (default: PUSH)")
    p.add_argument("--shape", metavar="D,D,...",
                   help="one sample's shape (default: the export card's; without one, the first frame's, taken as "
                   "one sample); a frame is one sample or several stacked on a first axis")  # fmt: skip
    p.add_argument("--batch", type=int, default=64, help="samples per forward pass at most (default 64)")
    p.add_argument("--window-ms", type=float, default=2.0,
                   help="how long a frame may wait for others to share its forward pass (default 2)")  # fmt: skip
    p.add_argument("--hwm", type=int, default=1000,
                   help="messages queued per socket before the sender blocks (PUSH) or drops (PUB)")  # fmt: skip
    p.add_argument("--max-frame-mb", type=float, default=64, help="largest frame accepted (default 64)")
    p.add_argument("--summary", metavar="PATH", help="write the summary (counts, frames/s, latency) as JSON")
    p.add_argument("--learn", action="store_true",
                   help="fine-tune on frames that carry a label (replay buffer, MSE, Adam) while streaming")  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-3, help="--learn: learning rate (default 1e-3)")
    p.add_argument("--learn-steps", type=int, default=1, help="--learn: optimizer steps per labelled batch")
    p.add_argument("--learn-batch", type=int, default=32, help="--learn: samples per optimizer step")
    p.add_argument("--replay", type=int, default=4096, help="--learn: replay buffer capacity (samples)")
    p.add_argument("--replay-policy", choices=["fifo", "reservoir"], default="fifo",
                   help="--learn: keep the newest samples (fifo, default) or a uniform sample of all")  # fmt: skip
    p.add_argument(
        "--save", metavar="PATH", help="--learn: write the fine-tuned weights (state dict) at the end"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: a GPU per rank if there is one)"
    )
    p.add_argument("--trust-code", action="store_true", help=trust_help)
    s = sub.add_parser(
        "stream-sim", help="a detector simulator: push frames at a rate, collect and check results"
    )
    s.add_argument("--out", required=True, metavar="ADDR", help="where frames go (bound: tcp://*:PORT)")
    s.add_argument("--results", required=True, metavar="ADDR", help="where results come back (bound)")
    s.add_argument("--frames", type=int, default=1000, help="frames to send (default 1000)")
    s.add_argument("--rate", type=float, default=0.0, help="frames per second (default 0: as fast as taken)")
    s.add_argument("--shape", default="1,11,11", help="a frame's shape, comma-separated (default 1,11,11)")
    s.add_argument("--dtype", default="float32", help="a frame's dtype (default float32)")
    s.add_argument("--pub", action="store_true", help="send frames with PUB (default: PUSH)")
    s.add_argument("--results-sub", action="store_true", help="collect with SUB (for caldera stream --pub)")
    s.add_argument("--warmup-s", type=float, default=0.5, help="wait for consumers to connect (default 0.5)")
    s.add_argument("--timeout-s", type=float, default=60.0, help="give up after this (default 60)")
    s.add_argument("--summary", metavar="PATH", help="write the report as JSON")


def stream_command(args: argparse.Namespace) -> int:
    """``caldera stream``: exit 0 when the stream ended cleanly, 2 on bad arguments."""
    try:
        from caldera.stream.consumer import Learner, load_model, run, stop_on_signals
    except ImportError as exc:
        return _fail(f"{INSTALL} ({exc})")
    stop = threading.Event()
    stop_on_signals(stop)  # from now: a SIGTERM while the model loads still ends with a summary
    comm = world = None
    if launched_size() > 1:
        if args.sub:
            return _fail("stream: --sub on several ranks would give every rank every frame; use PULL (the "
                         "default) with a PUSH sender, which deals the frames out")  # fmt: skip
        if args.inp.startswith("@") or args.out.startswith("@"):
            return _fail("stream: on several ranks every rank connects (only one process can bind a port): "
                         "write --in/--out as tcp://HOST:PORT and let the instrument and collector bind")  # fmt: skip
        world = init()
        abort_on_uncaught_exception(world)
        comm = world.comm.comm
    try:
        model = load_model(args.model, args.device, args.trust_code)
        if args.shape:
            try:
                model.input_shape = tuple(int(d) for d in args.shape.split(","))
            except ValueError:
                return _fail(f"stream: --shape {args.shape!r}: write sizes separated by commas, e.g. 1,11,11")
        learner = None
        if args.learn:
            if model.module is None:
                return _fail("stream: --learn needs a run directory or registry model (an exported artefact "
                             "cannot be trained)")  # fmt: skip
            learner = Learner(model.module, model.device, args.lr, args.replay, args.replay_policy,
                              args.learn_batch, args.learn_steps)  # fmt: skip
        result = run(model, args.inp, args.out, args.summary, comm, stop, sub=args.sub, pub=args.pub, batch=args.batch,
                     window_ms=args.window_ms, hwm=args.hwm, max_frame_mb=args.max_frame_mb, learner=learner)  # fmt: skip
    except (FileNotFoundError, ValueError, CheckpointError, ImportError) as exc:
        if world is not None:  # the other ranks may already wait for this one: end them all
            world.abort(str(exc), code=2)
        return _fail(str(exc))
    if args.save and learner is not None and (comm is None or comm.Get_rank() == 0):
        learner.save(args.save)
    return 0 if result is None or not result.get("missing") else 1


def sim_command(args: argparse.Namespace) -> int:
    """``caldera stream-sim``: exit 0 when no frame was lost or answered twice (PUSH), 1 otherwise."""
    try:
        from caldera.stream.sim import describe, report_json, simulate
    except ImportError as exc:
        return _fail(f"{INSTALL} ({exc})")
    try:
        shape = tuple(int(d) for d in args.shape.split(","))
    except ValueError:
        return _fail(f"stream-sim: --shape {args.shape!r}: write sizes separated by commas, e.g. 1,11,11")
    try:
        report = simulate(args.out, args.results, args.frames, args.rate, shape, args.dtype, args.pub,
                          args.results_sub, timeout_s=args.timeout_s, warmup_s=args.warmup_s)  # fmt: skip
    except ValueError as exc:
        return _fail(f"stream-sim: {exc}")
    except TimeoutError as exc:
        return _fail(str(exc))
    print(describe(report), flush=True)
    if args.summary:
        atomic_write_text(args.summary, report_json(report))
    ok = report["lost"] == 0 and report["duplicated"] == 0 or args.pub
    return 0 if ok else 1


def _fail(message: str) -> int:
    sys.stderr.write(f"caldera: error: {message}\n")
    return 2
