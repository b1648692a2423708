"""The ``caldera`` command: ``train``, ``check``, ``tune``, ``predict``, ``export``, ``publish``, ``models``,
``serve``, ``info``, ``launch``.

``caldera train RUN.toml [--set section.key=value ...] [--resume [CKPT]] [--time-limit 2h]`` trains alone or
under ``mpiexec``/``srun``; ``caldera launch -n N [--max-restarts R] -- cmd`` starts N ranks; ``caldera info``
(alone or under the launcher) prints what the job sees and the set-up problems it shows; ``caldera tune RUN.toml``
searches the run file's ``[tune]`` space with every rank; ``caldera serve RUN_DIR...`` answers predictions over
HTTP with dynamic batching (several run directories: an ensemble); ``caldera predict RUN_DIR... [--out pred.npy]``
applies a finished run's model to a split of its data (or another file) on every rank; ``caldera export RUN_DIR``
writes it, in physical units, as safetensors/TorchScript/AOTInductor/ONNX files, each verified (docs/export.md);
``caldera publish RUN_DIR [--name N] [--tag T]`` makes it a version of the model registry on the shared filesystem
and ``caldera models list|show|diff|rm`` reads it; RUN_DIR may then be ``NAME@VERSION`` (docs/registry.md).
``caldera bench [WORKLOAD ...] [--runs N] [--quick]`` measures time to quality over reference workloads and
``caldera bench --compare A.json B.json`` tabulates results (docs/bench.md).
``caldera stream MODEL --in ADDR --out ADDR`` runs a model on frames streamed over ZeroMQ, ``caldera stream-sim``
feeds it like a detector (docs/stream.md).
Exit codes: 0 done, 2 bad config or usage (export: also a format that cannot be made), 85 stopped for the wall
time with a checkpoint (requeue me), 1 anything else (export: an artefact beyond tolerance).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any

from caldera.checkpoint import REQUEUE_EXIT_CODE, Preempted
from caldera.comm.torchdist import exit_process
from caldera.durations import check_time_limit
from caldera.errors import CheckpointError, ConfigError, DataError
from caldera.log import level_from_env
from caldera.stream.commands import add_parsers as add_stream_parsers
from caldera.stream.commands import sim_command, stream_command
from caldera.train.progress import progress_interval
from caldera.version import __version__

TRUST_HELP = (
    "import the code the run directory names by import path (model, data source, loss, metrics); "
    "only for runs whose author you trust: importing runs their code (docs/security.md)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caldera", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"caldera {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train from a run file (alone, or under mpiexec/srun)")
    p_train.add_argument("config", help="run file (.toml or .yaml)")
    p_train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")  # fmt: skip
    p_train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                         help="continue from the newest good checkpoint of the run (or the one given)")  # fmt: skip
    p_train.add_argument("--force", action="store_true",
                         help="with --resume: continue even though the run file differs from the checkpoint's")  # fmt: skip
    p_train.add_argument("--time-limit", metavar="DURATION",
                         help="stop with a checkpoint before this wall time ('2h', '01:59:00', or 'auto': the "
                              "Slurm job's end); exit code 85")  # fmt: skip
    p_check = sub.add_parser("check", help="validate a run file and print the resolved config")
    p_check.add_argument("config")
    p_check.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p_tune = sub.add_parser("tune", help="hyperparameter search over the run file's [tune] space (all ranks)")
    p_tune.add_argument("config", help="run file with a [tune] section")
    p_tune.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p_tune.add_argument("--trials", type=int, help="override tune.trials")
    p_tune.add_argument("--resume", action="store_true",
                        help="continue the study in the run directory (after a stop, a kill or a requeue)")  # fmt: skip
    p_tune.add_argument("--time-limit", metavar="DURATION",
                        help="start no trial after, and stop running ones before, this wall time; exit code 85")  # fmt: skip
    p_serve = sub.add_parser(
        "serve", help="serve finished runs over HTTP: dynamic batching; several = an ensemble"
    )
    p_serve.add_argument("runs", nargs="*", metavar="RUN_DIR",
                         help="run directories of finished `caldera train` runs, or registry models NAME@VERSION: one model "
                         "(several: an ensemble)")  # fmt: skip
    p_serve.add_argument("--model", action="append", default=[], metavar="NAME=RUN[,RUN...]",
                         help="a named model: run directories or NAME@VERSION (repeatable; several: an ensemble)")  # fmt: skip
    p_serve.add_argument("--token-file", metavar="PATH",
                         help="require 'Authorization: Bearer <the file's token>' on every route but --open-routes")  # fmt: skip
    p_serve.add_argument("--open-routes", default=",".join(("/v2/health/live", "/v2/health/ready")),
                         metavar="ROUTE,...", help="routes answered without the token (default: liveness, readiness)")  # fmt: skip
    p_serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    p_serve.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    p_serve.add_argument("--max-batch", type=int, default=64, help="samples per forward pass at most")
    p_serve.add_argument("--max-wait-ms", type=float, default=5.0,
                         help="how long a request may wait for others to share its forward pass")  # fmt: skip
    p_serve.add_argument("--max-body-mb", type=float, default=256, help="largest .npy request accepted")
    p_serve.add_argument("--max-json-mb", type=float, default=16,
                         help="largest JSON request accepted (parsing costs ~14x its size in memory)")  # fmt: skip
    p_serve.add_argument("--timeout-s", type=float, default=30.0,
                         help="a connection must send each whole request within this (else 408 and closed)")  # fmt: skip
    p_serve.add_argument("--max-connections", type=int, default=256,
                         help="connections served at once; more wait to be accepted")  # fmt: skip
    p_serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: a GPU if there is one)")
    p_serve.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p_serve.add_argument("--tp", type=int, metavar="N",
                         help="model parallel: the N ranks of the job (mpiexec -n N) each hold 1/N of the model's "
                         "tensor-parallel layers (the run's [parallel] plan); rank 0 answers HTTP")  # fmt: skip
    p_serve.add_argument("--hang-timeout", default=None, metavar="DURATION",
                         help="with --tp: end the job when the ranks make no progress inside a forward pass for "
                         "this long (default 30m; 0: off)")  # fmt: skip
    p_predict = sub.add_parser(
        "predict", help="apply a finished run's model to a dataset on every rank: predictions and scores"
    )
    p_predict.add_argument("run", metavar="RUN_DIR", nargs="+",
                           help="run directory of a finished `caldera train` run, or a registry model NAME@VERSION "
                           "(several: an ensemble, written as mean and spread)")  # fmt: skip
    p_predict.add_argument("--split", choices=["val", "train", "all"], default="val",
                           help="which part of the run's data (default val)")  # fmt: skip
    p_predict.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                           help="override the run's config, e.g. --set data.args.path=2025.nc (repeatable)")  # fmt: skip
    p_predict.add_argument(
        "--out", help="write the predictions, in sample order: .nc, .h5 or .npy (+ a .json of scores)"
    )
    p_predict.add_argument("--batch-size", type=int, help="samples per forward pass on each rank")
    p_predict.add_argument("--no-score", action="store_true", help="predict only (the data has no targets)")
    p_predict.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p_predict.add_argument("--tp", type=int, metavar="N",
                           help="model parallel: groups of N ranks each hold one model's tensor shards (the run's "
                           "[parallel] plan); the groups share the samples")  # fmt: skip
    p_export = sub.add_parser(
        "export", help="a finished run's model, in physical units, as files that run without Python; verified"
    )
    p_export.add_argument("run", metavar="RUN_DIR", help="run directory of a finished `caldera train` run")
    p_export.add_argument("--format", default="safetensors,torchscript,pt2,onnx",
                          help="comma-separated: safetensors, torchscript, pt2 (ExportedProgram + AOTInductor "
                          "package), onnx (default all)")  # fmt: skip
    p_export.add_argument("--out", help="directory for the artefacts and model.json (default RUN_DIR/export)")
    p_export.add_argument("--device", default="cpu",
                          help="cuda: also compile the AOTInductor package for the GPU (model.aoti-cuda.pt2)")  # fmt: skip
    p_export.add_argument(
        "--samples", type=int, default=32, help="held-out samples to verify each artefact on"
    )
    p_export.add_argument("--threads", type=int, metavar="N",
                          help="compile the CPU AOTInductor package for N threads per call (1 when each MPI rank "
                          "owns one core: fastest for small models; default: the caller's thread pool)")  # fmt: skip
    p_export.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the verification")
    p_export.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (physical units)")
    p_export.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override the run's config (repeatable)")  # fmt: skip
    p_export.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p_publish = sub.add_parser(
        "publish", help="publish a finished run to the model registry as a new immutable version (NAME@N)"
    )
    p_publish.add_argument("run", metavar="RUN_DIR", help="run directory of a finished `caldera train` run")
    p_publish.add_argument("--name", help="model name (default: the run directory's name)")
    p_publish.add_argument(
        "--tag", action="append", default=[], help="point this tag at the new version (repeatable)"
    )
    p_publish.add_argument(
        "--registry", metavar="DIR", help="registry directory (default: $CALDERA_REGISTRY)"
    )
    p_publish.add_argument("--format", default="safetensors",
                           help="what caldera export writes into the version: safetensors (always) plus e.g. pt2 "
                           "(the C API's AOTInductor package), torchscript, onnx")  # fmt: skip
    p_publish.add_argument("--threads", type=int, metavar="N", help="as caldera export --threads (pt2)")
    p_publish.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p_models = sub.add_parser("models", help="the model registry: list, show, diff, rm")
    p_models.add_argument("action", choices=["list", "show", "diff", "rm"])
    p_models.add_argument("ref", nargs="?", metavar="NAME[@VERSION]", help="NAME@3, NAME@latest, NAME@TAG")
    p_models.add_argument("other", nargs="?", metavar="NAME@VERSION", help="diff: the second version")
    p_models.add_argument("--registry", metavar="DIR", help="registry directory (default: $CALDERA_REGISTRY)")
    sub.add_parser(
        "info", help="what this job sees: software, GPUs, MPI, every rank's place; set-up problems"
    )
    add_stream_parsers(sub, TRUST_HELP)
    p_bench = sub.add_parser(
        "bench", help="time to quality over reference workloads (MLPerf-style); --compare"
    )
    p_bench.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="heat, climate, ... (default: all)")
    p_bench.add_argument(
        "--runs", type=int, default=5, help="seeded runs per workload (default 5; >= 3: olympic mean)"
    )
    p_bench.add_argument("--quick", action="store_true", help="tiny data and targets, seconds per run (CI)")
    p_bench.add_argument("--out", default="bench.json", help="result file (default bench.json)")
    p_bench.add_argument("--target", action="append", default=[], metavar="WORKLOAD=VALUE",
                         help="another quality target for a workload (repeatable)")  # fmt: skip
    p_bench.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override every workload's config, e.g. --set parallel.strategy=allreduce")  # fmt: skip
    p_bench.add_argument("--seed", type=int, default=0, help="seed of the first run (then +1 per run)")
    p_bench.add_argument("--dir", default="runs/bench", help="where the runs' directories go")
    p_bench.add_argument("--compare", nargs="+", metavar="RESULT.json", help="print a table of result files")
    p_launch = sub.add_parser(
        "launch", help="start N ranks with mpiexec (or srun inside Slurm): launch -n N -- cmd"
    )
    p_launch.add_argument("-n", "--ranks", type=int, required=True, help="number of ranks")
    p_launch.add_argument("--launcher", choices=["auto", "mpiexec", "srun"], default="auto")
    p_launch.add_argument("--max-restarts", type=int, default=0,
                          help="relaunch a failed job up to R times; `caldera train` then resumes from its "
                          "last checkpoint (exit code 85, stopped with a checkpoint, is passed through for "
                          "a requeue instead)")  # fmt: skip
    p_launch.add_argument("--grace", type=float, default=120.0, metavar="SECONDS",
                          help="after SIGTERM/SIGINT/SIGUSR1 (passed to the ranks as SIGUSR1: checkpoint and exit "
                          "85), how long to wait before ending the ranks (default 120)")  # fmt: skip
    p_launch.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        help="-- command to run on every rank; a caldera command may drop the caldera: launch -n 2 train run.toml",
    )
    return parser


def run() -> None:
    """The ``caldera`` command as a process: ``main``, then exit with its code (``exit_process`` says why not
    ``sys.exit`` alone)."""
    exit_process(main())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``caldera`` command."""
    args = _parser().parse_args(argv)
    try:  # a wrong setting in the environment stops now, not after the data is built
        level_from_env()
        progress_interval()
    except ConfigError as exc:
        _error(str(exc))
        return 2
    if args.command == "launch":
        return _launch(args)
    if args.command == "info":
        from caldera.info import report

        return report()
    if args.command == "serve":
        return _serve(args)
    if args.command in ("stream", "stream-sim"):
        return (stream_command if args.command == "stream" else sim_command)(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "export":
        return _export(args)
    if args.command in ("publish", "models"):
        return _registry(args)
    if args.command == "bench":
        return _guarded(lambda: _bench(args))
    from caldera.config import load_config

    try:
        # --trials is tune.trials: the same bounds, checked before any trial runs.
        trials = getattr(args, "trials", None)
        cfg = load_config(args.config, args.set, None if trials is None else {"tune.trials": trials})
        if args.command == "check":
            print(cfg.model_dump_json(indent=2))
            return 0
        if args.command == "tune":
            from caldera.tune import TuneFailed, tune
            from caldera.tune.search import resume_requested

            _check_time_limit(args.time_limit)
            try:
                tune(args.config, args.set, args.trials, resume_requested(args.resume), args.time_limit)
            except TuneFailed as exc:
                _error(str(exc))
                return 1
            return 0
        from caldera.train.run import train

        _check_time_limit(args.time_limit)
        # A relaunch by `caldera launch --max-restarts` asks every rank to resume through the environment.
        resume = args.resume or os.environ.get("CALDERA_RESUME") == "1"
        train(cfg, args.config, resume=resume, time_limit=args.time_limit, force=args.force)
    except (ConfigError, CheckpointError) as exc:
        _error(str(exc))
        return 2
    except DataError as exc:  # a missing or broken input file: one line naming it, not a traceback
        return _data_error(exc)
    except Preempted as stop:
        _error(str(stop))
        return REQUEUE_EXIT_CODE
    return 0


def _check_time_limit(text: str | None) -> None:
    """Refuse a bad ``--time-limit`` now, before any data is read or model built."""
    try:
        check_time_limit(text)
    except ValueError as exc:
        raise ConfigError(f"--time-limit {exc}") from None


def _commands() -> set[str]:
    """The names of the subcommands (``train``, ``predict``, ...)."""
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def _launch(args: argparse.Namespace) -> int:
    from caldera.launch import launch

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    # `caldera launch -n 2 train run.toml`: a Caldera command named without the `caldera` in front (no program of
    # that name on PATH) runs as this Python's `caldera`, instead of Open MPI's "executable not found".
    if cmd and cmd[0] in _commands() and shutil.which(cmd[0]) is None:
        cmd = [sys.executable, "-m", "caldera", *cmd]
    try:
        return launch(args.ranks, cmd, args.launcher, max_restarts=args.max_restarts, grace=args.grace)
    except (RuntimeError, ValueError) as exc:
        sys.stderr.write(f"caldera launch: error: {exc}\n")
        return 2


def _serve(args: argparse.Namespace) -> int:
    import signal

    from caldera.coupling.surrogate import Surrogate
    from caldera.serve import Ensemble, make_server, model_card, model_dir, model_name, model_version

    # Positional run directories are one model (an ensemble if several) named after the first; --model names more.
    specs = [(model_name(args.runs[0]), args.runs)] if args.runs else []
    for spec in args.model:
        name, sep, dirs = spec.partition("=")
        if not sep or not name or not dirs:
            _error(f"serve: --model {spec!r}: write NAME=RUN_DIR (several run directories: NAME=DIR1,DIR2)")
            return 2
        specs.append((name, dirs.split(",")))
    if not specs:
        _error("serve: give a run directory (caldera serve RUN_DIR) or --model NAME=RUN_DIR")
        return 2
    if len({name for name, _ in specs}) < len(specs):
        _error(f"serve: model names {[n for n, _ in specs]} repeat; give each --model its own NAME")
        return 2
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            _error(f"serve: cannot read --token-file {args.token_file}: {exc}")
            return 2
    group = None
    if args.tp is not None:  # model parallel: each rank holds its shards; rank 0 serves, the others follow
        if len(specs) != 1 or len(specs[0][1]) != 1:
            _error(
                "serve --tp: model-parallel serving takes one model (one RUN_DIR); drop --tp for an ensemble"
            )
            return 2
        try:
            group = _serving_group(specs[0][1][0], args)
        except (FileNotFoundError, ConfigError, ValueError) as exc:
            _error(str(exc))
            return 2
        if not group.leading:
            # Each rank gets SIGTERM from the scheduler: the followers wait for the leader to drain and stop them.
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            group.follow()
            return 0
    try:
        models = {
            name: Ensemble.from_runs(dirs, device=args.device, trust_code=args.trust_code) if group is None
            else Ensemble([Surrogate(group.model, group.world.device)], model_card(model_dir(dirs[0])))
            for name, dirs in specs
        }  # fmt: skip
        server = make_server(models, args.host, args.port, args.max_batch, args.max_wait_ms / 1e3,
                             args.max_body_mb, args.max_json_mb, args.timeout_s, args.max_connections, token,
                             [r for r in args.open_routes.split(",") if r],
                             {name: model_version(dirs[0]) for name, dirs in specs})  # fmt: skip
    except (FileNotFoundError, ConfigError, ValueError) as exc:
        _error(str(exc))
        return _stopped(group, 2)
    except OSError as exc:  # the port is taken, the address is not this host's
        _error(f"serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another --port")
        return _stopped(group, 2)
    host, port = server.server_address[:2]
    first = next(iter(models.values()))
    kinds = [
        f"{name} ({len(e.members)} members)" if len(e.members) > 1 else name for name, e in models.items()
    ]
    what = (f"an ensemble of {len(first.members)} models" if len(first.members) > 1 else "1 model") \
        if len(models) == 1 else f"{len(models)} models: {', '.join(kinds)}"  # fmt: skip
    if group is not None:
        what += f" in {args.tp} tensor-parallel shards (ranks 0-{args.tp - 1})"
    auth = ", bearer token required" if token else ""
    print(f"caldera serve: {what} on {first.members[0].device} at http://{host}:{port} "
          f"(POST /predict, /v2/models/NAME/infer; GET /health, /metrics{auth}; Ctrl-C stops)", flush=True)  # fmt: skip
    # SIGTERM (Slurm, Kubernetes, kill) drains like Ctrl-C: stop accepting, answer the requests under way, exit 0.
    # Under --tp also SIGUSR1: what `caldera launch` passes its ranks on SIGTERM.
    for sig in (signal.SIGTERM,) if group is None else (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        cut = server.drain()
        server.server_close()
        _stopped(group, 0)
    b = server.batcher
    print(f"caldera serve: stopped after {b.requests} requests in {b.batches} forward passes"
          + (f"; {cut} requests cut off by the drain limit" if cut else ""), flush=True)  # fmt: skip
    return 0


def _serving_group(run: str, args: argparse.Namespace) -> Any:
    """This rank's shards of ``run`` for ``serve --tp`` (``caldera.parallel_infer.ServingGroup``)."""
    from caldera.durations import parse_duration
    from caldera.parallel_infer import ServingGroup
    from caldera.world import init

    try:
        timeout = parse_duration(args.hang_timeout)
    except ValueError as exc:
        raise ConfigError(f"serve --hang-timeout {exc}") from None
    return ServingGroup(run, args.tp, init(device=args.device), args.device, args.trust_code, timeout)


def _stopped(group: Any, code: int) -> int:
    """Release a serving group's followers (model parallel; nothing otherwise); return ``code``."""
    if group is not None:
        group.stop()
    return code


def _predict(args: argparse.Namespace) -> int:
    from caldera.predict import predict

    def run() -> int:
        runs = args.run[0] if len(args.run) == 1 else args.run  # several: an ensemble
        predict(runs, args.split, args.set, args.out, args.batch_size, score=not args.no_score,
                trust_code=args.trust_code, tp=args.tp)  # fmt: skip
        return 0

    return _guarded(run)


def _export(args: argparse.Namespace) -> int:
    from caldera.export import export

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    return _guarded(lambda: export(args.run, formats, args.out, args.device, args.samples, args.rtol, args.atol,
                                   args.set, args.trust_code, threads=args.threads).code)  # fmt: skip


def _registry(args: argparse.Namespace) -> int:
    from caldera.registry.commands import models_command, publish_command

    if args.command == "models" and args.action != "list" and not args.ref:
        _error(f"models {args.action} needs a model: caldera models {args.action} NAME@VERSION")
        return 2
    if args.command == "models" and args.action == "diff" and not args.other:
        _error("models diff needs two versions: caldera models diff NAME@1 NAME@2")
        return 2
    return _guarded(lambda: (publish_command if args.command == "publish" else models_command)(args))


def _bench(args: argparse.Namespace) -> int:
    from caldera.bench import bench, compare, parse_targets

    if args.compare:
        print(compare(args.compare))
        return 0
    bench(args.workloads, args.runs, args.quick, args.out, parse_targets(args.target), args.set, args.dir,
          args.seed)  # fmt: skip
    return 0


def _guarded(command: Callable[[], int]) -> int:
    """Run a command; bad input (a ConfigError) is one line and exit 2, bad data goes through ``_data_error``."""
    try:
        return command()
    except ConfigError as exc:
        _error(str(exc))
        return 2
    except DataError as exc:
        return _data_error(exc)


def _data_error(exc: Exception) -> int:
    """Report bad input data; under MPI end every rank, since the other ranks may already wait in a collective."""
    from caldera.world import launched_size

    if launched_size() > 1:
        from caldera.world import init

        init().abort(f"{exc}", code=2)
    _error(str(exc))
    return 2


def _error(message: str) -> None:
    """Print a message once per job (rank 0), not once per rank."""
    from caldera.world import launched_size

    rank = 0
    if launched_size() > 1:
        from caldera.world import init

        rank = init().rank
    if rank == 0:
        sys.stderr.write(f"caldera: {message if message.startswith('stopped') else 'error: ' + message}\n")


if __name__ == "__main__":
    sys.exit(main())
