"""Time to accuracy of the asynchronous strategies vs. synchronous all-reduce: same run, same model and data.

    python benchmarks/bench_async.py [--repeats 3] [--target 0.95] [--epochs 10] [--png docs/img/async_accuracy.png]

SmallCNN(channels=32) on scikit-learn's digits (20 % held out for validation), SGD (lr 0.03, momentum 0.9), global
batch 32, 2 workers, each with 1 thread: ``allreduce`` (2 ranks), ``async-shared`` (1 process starting 2 worker
processes, lock-free), ``async-ps`` (1 server + 2 worker ranks, unbounded staleness), ``local-sgd`` (2 ranks,
averaging every 4 steps after 10 synchronous ones). Two scenarios: equal workers, and the last worker slowed 2x
(it sleeps as long as one of its steps computes: a straggler, as on a noisy supercomputer). Each run records its
weights with a timestamp 8 times per epoch (from the moment every worker is ready); the validation accuracy of
each record is computed after the run, off the clock. Prints the median time to ``--target`` accuracy over the
repeats (runs alternate), its ratio to allreduce, and plots accuracy vs. wall time (the median run of each).
Targets: with the straggler, the best asynchronous strategy reaches the target >= 1.3x sooner than allreduce;
without it, none is more than 1.2x slower. The worker half of this file runs inside the runs (``--worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from caldera.train.callbacks import Callback

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
STRATEGIES = ["allreduce", "async-shared", "async-ps", "local-sgd"]
# --smoke: the straggler scenario (its slow worker is the one code path the equal one lacks), one epoch, a
# reachable target, the plot into the temporary directory; allreduce and one asynchronous strategy (the other two
# run through the same code here, and tests/test_async_strategies.py trains each on real ranks).
SMOKE = {
    "strategies": ["allreduce", "async-ps"],
    "repeats": 1,
    "epochs": 1,
    "target": 0.0,
    "timing_steps": 20,
    "scenarios": ["straggler"],
    "png": str(Path(tempfile.gettempdir()) / "caldera-smoke-async.png"),
}
WORKERS, BATCH, CHANNELS, LR, RECORDS_PER_EPOCH = 2, 32, 32, 0.03, 8


class SlowLoss(nn.Module):
    """Cross-entropy that first sleeps ``seconds`` on the straggler (a module: worker processes unpickle it)."""

    def __init__(self, seconds: float, straggler: int) -> None:
        super().__init__()
        self.seconds, self.straggler = seconds, straggler

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        me = os.environ.get("CALDERA_WORKER_INDEX", os.environ.get("OMPI_COMM_WORLD_RANK", "-1"))
        if self.seconds and int(me) == self.straggler:
            time.sleep(self.seconds)
        return nn.functional.cross_entropy(out, target)


def data():
    from caldera.data import digits, split_dataset

    return split_dataset(digits(), 0.2, seed=0)


# -- worker: runs inside each run ----------------------------------------------------------------------------------
def worker(name: str, slow: float, epochs: int, out: str) -> None:
    import caldera
    import caldera.parallel.async_shared  # noqa: F401  (importing a strategy module registers its name)
    import caldera.parallel.local_sgd  # noqa: F401
    import caldera.parallel.param_server  # noqa: F401
    from caldera.comm.buckets import flatten
    from caldera.models import SmallCNN
    from caldera.parallel import make_strategy
    from caldera.parallel._async import WorkItems

    world = caldera.init(seed=0)
    torch.set_num_threads(1)
    train, val = data()
    model = SmallCNN(channels=CHANNELS)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    per_epoch = WorkItems(train, BATCH, WORKERS, 1).per_epoch  # work items (worker steps) per epoch
    every = per_epoch // RECORDS_PER_EPOCH
    options = {
        "allreduce": {},
        "local-sgd": {"sync_every": 4, "sync_warmup_steps": 10},
        "async-shared": {"workers": WORKERS, "record_every": every},
        "async-ps": {"servers": 1, "record_every": every},
    }[name]
    straggler = WORKERS - 1 if name == "async-shared" else world.size - 1
    strategy = make_strategy(name, **options)
    trainer = caldera.Trainer(model, optimizer, SlowLoss(slow, straggler), max_epochs=epochs, batch_size=BATCH,
                              strategy=strategy, progress=False, world=world, seed=0)  # fmt: skip
    if strategy.runs_own_loop:  # asynchronous: the strategy records its own snapshots
        strategy.fit(trainer, train, None)
        records = [(s.time_s, s.items, s.weights) for s in strategy.snapshots]
        extra = {k: strategy.stats.get(k) for k in ("updates_per_worker", "staleness_mean", "staleness_max")}
    else:
        recorder = _Recorder(every // WORKERS, strategy, flatten)
        trainer.callbacks.append(recorder)
        trainer.fit(train, None)
        records, extra = recorder.records, {}
    if world.is_main:
        xv, yv = val.tensors
        params = [p for p in model.parameters() if p.requires_grad]
        curve = []
        with torch.no_grad():
            model.eval()
            for t, items, weights in records:
                torch.nn.utils.vector_to_parameters(weights, params)
                curve.append((t, items / per_epoch, (model(xv).argmax(1) == yv).float().mean().item()))
        Path(out).write_text(json.dumps({"curve": curve, **extra}))


class _Recorder(Callback):
    """Copy the weights every ``every`` steps (local-sgd: at the next averaging), on rank 0."""

    def __init__(self, every: int, strategy, flatten) -> None:
        self.every, self.strategy, self.flatten = every, strategy, flatten
        self.records: list = []

    def on_fit_start(self, trainer) -> None:
        trainer.world.barrier()
        self.t0, self.next = time.monotonic(), self.every

    def on_step_end(self, trainer) -> None:
        step = trainer.global_step
        averaged = getattr(self.strategy, "last_average_step", step) == step
        if step >= self.next and averaged:
            if trainer.world.is_main:
                params = [p for p in trainer.model.parameters() if p.requires_grad]
                self.records.append((time.monotonic() - self.t0, step * WORKERS, self.flatten(params)))
            while self.next <= step:
                self.next += self.every


# -- driver --------------------------------------------------------------------------------------------------------
def step_time(steps: int = 200) -> float:
    """Median seconds of one worker step (forward, backward, SGD step) at the per-worker batch, 1 thread."""
    from caldera.models import SmallCNN

    torch.set_num_threads(1)
    train, _ = data()
    x, y = train.tensors[0][: BATCH // WORKERS], train.tensors[1][: BATCH // WORKERS]
    model = SmallCNN(channels=CHANNELS)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return statistics.median(times[steps // 4 :])


def run(name: str, slow: float, epochs: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        args = [str(HERE), "--worker", name, "--slow", str(slow), "--epochs", str(epochs), "--out", f.name]
        if name == "async-shared":
            cmd = [sys.executable, *args]
        else:
            ranks = WORKERS + 1 if name == "async-ps" else WORKERS
            mpiexec = str(Path(sys.executable).parent / "mpiexec")
            cmd = [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), sys.executable, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


def time_to(curve: list, target: float) -> float:
    return next((t for t, _, acc in curve if acc >= target), float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--png", default=str(ROOT / "docs" / "img" / "async_accuracy.png"))
    parser.add_argument("--worker")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--out")
    parser.add_argument("--timing-steps", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--scenarios", nargs="+", default=["equal", "straggler"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, one repeat (the test suite runs this)"
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.worker:
        worker(args.worker, args.slow, args.epochs, args.out)
        return

    delay = step_time(args.timing_steps)
    print(f"one worker step: {delay * 1e3:.2f} ms; the straggler sleeps that long before each of its steps")
    scenarios = {s: slow for s, slow in {"equal": 0.0, "straggler": delay}.items() if s in args.scenarios}
    runs: dict = {(s, n): [] for s in scenarios for n in args.strategies}
    for r in range(args.repeats):
        for scenario, slow in scenarios.items():
            for name in args.strategies:
                result = run(name, slow, args.epochs)
                result["tta"] = time_to(result["curve"], args.target)
                runs[scenario, name].append(result)
                t_end, epochs_done, final = result["curve"][-1]
                print(f"  repeat {r + 1}: {scenario:9s} {name:12s} time to {args.target:.0%}: {result['tta']:.2f} s, "
                      f"{epochs_done / t_end:.2f} epochs/s, final accuracy {final:.3f} {_extra(result)}",
                      flush=True)  # fmt: skip

    print(
        f"\n| scenario | strategy | time to {args.target:.0%} val. accuracy (median of {args.repeats}) | "
        "vs. allreduce | epochs/s | final accuracy | updates per worker (repeat 1) | staleness mean / max |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    verdict = {}
    for scenario in scenarios:
        base = statistics.median(r["tta"] for r in runs[scenario, "allreduce"])
        for name in args.strategies:
            rs = runs[scenario, name]
            tta = statistics.median(r["tta"] for r in rs)
            verdict[scenario, name] = base / tta
            ups = rs[0].get("updates_per_worker") or "-"
            stale = (f"{statistics.median(r['staleness_mean'] for r in rs):.2f} / "
                     f"{max(r['staleness_max'] for r in rs)}") if rs[0].get("staleness_mean") is not None else "-"  # fmt: skip
            final = statistics.median(r["curve"][-1][2] for r in rs)
            speed = statistics.median(r["curve"][-1][1] / r["curve"][-1][0] for r in rs)
            print(
                f"| {scenario} | {name} | {tta:.2f} s | {base / tta:.2f}x | {speed:.2f} | {final:.3f} | {ups} | "
                f"{stale} |"
            )
    if "straggler" in scenarios:
        best = max(verdict["straggler", n] for n in args.strategies[1:])
        print(f"\nstraggler: best asynchronous strategy {best:.2f}x sooner than allreduce (target >= 1.3x)")
    if "equal" in scenarios:
        worst = min(verdict["equal", n] for n in args.strategies[1:])
        slowest = 1 / worst if worst else float("inf")  # inf: some strategy never reached the target
        print(
            f"equal workers: slowest asynchronous strategy {slowest:.2f}x allreduce's time (target <= 1.2x)"
        )
    plot(runs, scenarios, args.strategies, args.target, Path(args.png))


def _extra(result: dict) -> str:
    if result.get("updates_per_worker") is None:
        return ""
    return (
        f"(updates per worker {result['updates_per_worker']}, staleness mean {result['staleness_mean']:.2f})"
    )


def plot(runs: dict, scenarios: dict, strategies: list[str], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scenarios), figsize=(11, 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, scenario in zip(axes, scenarios):
        for name in strategies:
            rs = sorted(runs[scenario, name], key=lambda r: r["tta"])
            median_run = rs[len(rs) // 2]
            ts, _, accs = zip(*median_run["curve"])
            ax.plot(ts, accs, linewidth=1.3, label=f"{name} ({median_run['tta']:.2f} s)")
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        title = "equal workers" if scenario == "equal" else "one worker slowed 2x"
        ax.set(title=f"{title}: 2 workers", xlabel="wall time since start of training (s)", ylim=(0.6, 1.0))
        ax.legend(loc="lower right", title=f"time to {target:.0%}")
    axes[0].set_ylabel("validation accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
