"""Hyperparameter search on 2 ranks, same budget three ways: idle rank-seconds and best score against wall time.

    python benchmarks/bench_tune.py [--trials 24] [--epochs 6] [--repeats 3] [--png docs/img/tune_best_so_far.png]

The search: SmallCNN on scikit-learn's digits, Adam, over the learning rate, the width (4 or 24 channels) and the
batch size (16 or 64), so that trials differ several-fold in cost; score: the best epoch's validation accuracy;
``--trials`` trials of ``--epochs`` epochs; ASHA pruning (reduction factor 2) where the scheme has it. Schemes:

* ``caldera``: ``mpiexec -n 2 caldera tune`` (every rank hands itself the next trial from the shared journal).
* ``optuna``: Optuna as its docs recommend on a cluster: 2 independent worker processes, each running
  ``study.optimize`` on one study in a shared ``JournalFileBackend`` file, stopped by ``MaxTrialsCallback``,
  reporting per epoch to the same pruner; each trial is the same Caldera training run.
* ``rounds``: the old synchronous scheme, reimplemented here as the baseline: rank 0 asks one trial per rank,
  broadcasts them, both train, the results are gathered and told; no pruning.

Times come from the trials themselves (start and end of each trial): the window is first start to last end;
idle rank-seconds = 2 x window - the sum of the trials' durations. Prints per scheme: trials run, idle
rank-seconds and their share, the best score and when it was reached, and the ratios to ``rounds`` (medians over
``--repeats``; repeat r trains with ``run.seed = r`` and seeds every scheme's sampler with r, + 1000 x the rank for
the per-rank samplers of caldera and optuna alike); plots best so far against wall time for the first repeat. The
worker halves of this file run inside the runs (``--worker``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Imported before any trial starts, in every scheme: the first trial's clock must not include them.
from caldera.config import load_config
from caldera.train.callbacks import Callback
from caldera.train.run import train
from caldera.world import World

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RUN_FILE = ROOT / "examples" / "digits_tune.toml"
SPACE = "{optim.lr: {low: 0.0003, high: 0.03, log: true}, model.args.channels: [4, 24], data.batch_size: [16, 64]}"
PRUNER = {"min_resource": 1, "reduction_factor": 2}
SMOKE = {
    "trials": 2,
    "epochs": 1,
    "repeats": 1,
    "png": str(Path(tempfile.gettempdir()) / "caldera-smoke-tune.png"),
}
RANKS = 2


def sets(run_dir: Path, epochs: int, seed: int) -> list[str]:
    """The --set overrides of caldera tune (its trials are the same runs as _train's)."""
    return ["--set", f"run.dir={run_dir}", "--set", f"optim.epochs={epochs}", "--set", f"tune.space={SPACE}",
            "--set", "optim.weight_decay=0.0", "--set", f"run.seed={seed}"]  # fmt: skip


# -- workers: run inside the schemes -------------------------------------------------------------------------------
def _train(params: dict, run_dir: Path, epochs: int, seed: int, trial=None) -> tuple[list[dict], bool]:
    """One trial: Caldera's training run of the run file with ``params``; per-epoch reports to ``trial``."""

    class Prune(Callback):
        pruned = False

        def on_epoch_end(self, trainer, epoch, logs):
            if trial is not None and math.isfinite(logs["val_accuracy"]):
                trial.report(logs["val_accuracy"], epoch + 1)
                if trial.should_prune():
                    self.pruned = trainer.should_stop = True

    values = {**params, "run.dir": str(run_dir), "optim.epochs": epochs, "run.seed": seed, "optim.weight_decay": 0.0,
              "train.progress": False, "train.plot": False}  # fmt: skip
    cfg = load_config(RUN_FILE, None, values)
    prune = Prune()
    history = train(cfg, world=World(), callbacks=[prune])
    return history, prune.pruned


def _suggest(trial) -> dict:
    return {"optim.lr": trial.suggest_float("optim.lr", 3e-4, 3e-2, log=True),
            "model.args.channels": trial.suggest_categorical("model.args.channels", [4, 24]),
            "data.batch_size": trial.suggest_categorical("data.batch_size", [16, 64])}  # fmt: skip


def optuna_worker(out: Path, trials: int, epochs: int, seed: int, index: int) -> None:
    """One of the N processes of Optuna's cluster recipe: optimize a study in a shared journal file."""
    import contextlib
    import io

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.study import MaxTrialsCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed + 1000 * index, constant_liar=True),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(**PRUNER))  # fmt: skip

    def objective(trial):
        with contextlib.redirect_stdout(io.StringIO()):
            history, pruned = _train(_suggest(trial), out / f"trial-{trial.number}", epochs, seed, trial)
        if pruned:
            raise optuna.TrialPruned()
        return max(r["val_accuracy"] for r in history)

    study.optimize(objective, n_trials=trials, callbacks=[MaxTrialsCallback(trials, states=None)])


def rounds_worker(out: Path, trials: int, epochs: int, seed: int) -> None:
    """The old synchronous scheme: rank 0 asks one trial per rank, all train, gather, tell; repeat."""
    import contextlib
    import io

    import optuna
    from mpi4py import MPI

    comm, records = MPI.COMM_WORLD, []
    rank, size = comm.Get_rank(), comm.Get_size()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    )
    done = 0
    while done < trials:
        k = min(size, trials - done)
        asked = [study.ask() for _ in range(k)] if rank == 0 else []
        params = comm.bcast([_suggest(t) for t in asked])
        mine = None
        if rank < k:
            start = time.time()
            with contextlib.redirect_stdout(io.StringIO()):
                history, _ = _train(params[rank], out / f"trial-{done + rank}", epochs, seed)
            mine = {"start": start, "end": time.time(), "value": max(r["val_accuracy"] for r in history)}
        results = comm.allgather(mine)[:k]
        if rank == 0:
            for trial, r in zip(asked, results, strict=True):
                study.tell(trial, r["value"])
            records += results
        done += k
    if rank == 0:
        (out / "records.json").write_text(json.dumps(records))


# -- the driver ---------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg"}


def _mpi(n: int, args: list[str]) -> list[str]:
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    return [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", str(n), sys.executable, *args]


def _journal_records(path: Path) -> list[dict]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(path)))
    name = storage.get_all_studies()[0].study_name
    study = optuna.load_study(study_name=name, storage=storage)
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is None or t.datetime_complete is None:
            continue
        value = t.value if t.value is not None else None
        out.append(
            {"start": t.datetime_start.timestamp(), "end": t.datetime_complete.timestamp(), "value": value}
        )
    return out


def run_scheme(name: str, work: Path, trials: int, epochs: int, seed: int) -> list[dict]:
    """Run one scheme to the end; return its trials' {start, end, value} (value None: pruned or failed)."""
    out = work / f"{name}-{seed}"
    out.mkdir(parents=True)
    if name == "caldera":
        cmd = _mpi(RANKS, ["-m", "caldera.cli", "tune", str(RUN_FILE), *sets(out, epochs, seed),
                           "--trials", str(trials), "--set", "tune.pruner=asha",
                           "--set", f"tune.pruner_args={json.dumps(PRUNER)}"])  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, env=_env(), cwd=ROOT)
        return _journal_records(out / "tune" / "study.journal")
    if name == "optuna":
        worker = [
            sys.executable,
            str(HERE),
            "--worker",
            "optuna",
            str(out),
            str(trials),
            str(epochs),
            str(seed),
        ]
        procs = [subprocess.Popen([*worker, str(i)], env=_env(), cwd=ROOT) for i in range(RANKS)]
        if any(p.wait() for p in procs):
            raise SystemExit("an Optuna worker failed")
        return _journal_records(out / "study.journal")
    cmd = _mpi(RANKS, [str(HERE), "--worker", "rounds", str(out), str(trials), str(epochs), str(seed)])
    subprocess.run(cmd, check=True, env=_env(), cwd=ROOT)
    return json.loads((out / "records.json").read_text())


def summarise(records: list[dict]) -> dict:
    """Window, idle rank-seconds, best score and when; best so far against time from the first start."""
    t0, t1 = min(r["start"] for r in records), max(r["end"] for r in records)
    busy = sum(r["end"] - r["start"] for r in records)
    window = t1 - t0
    curve, best = [], None
    for r in sorted(records, key=lambda r: r["end"]):
        if r["value"] is not None and (best is None or r["value"] > best):
            best = r["value"]
            curve.append((r["end"] - t0, best))
    return {"trials": len(records), "window_s": window, "idle_s": max(0.0, RANKS * window - busy),
            "idle_share": max(0.0, 1 - busy / (RANKS * window)), "best": best,
            "best_at_s": curve[-1][0] if curve else None, "curve": curve}  # fmt: skip


def _median(done: list[dict]) -> dict:
    """The median of each number over the repeats (best_at_s over the repeats that completed a trial)."""
    keys = ("trials", "window_s", "idle_s", "idle_share", "best", "best_at_s")
    return {
        k: statistics.median(v) if (v := [d[k] for d in done if d[k] is not None]) else None for k in keys
    }


def plot(results: dict[str, dict], path: str, trials: int, epochs: int) -> None:
    from caldera.train.output import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for name, s in results.items():
        if not s["curve"]:
            continue
        xs = [x for x, _ in s["curve"]] + [s["window_s"]]  # from the first completed trial to the last end
        ys = [y for _, y in s["curve"]] + [s["best"]]
        ax.step(xs, ys, where="post", label=f"{name} (idle {100 * s['idle_share']:.0f} %)")
    ax.set(xlabel="wall time from the first trial (s)", ylabel="best val_accuracy so far",
           title=f"{trials} trials x {epochs} epochs on {RANKS} ranks")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    save_figure(fig, Path(path))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--png", default=str(ROOT / "docs" / "img" / "tune_best_so_far.png"))
    parser.add_argument("--smoke", action="store_true", help="2 trials of 1 epoch; the plot into a temp dir")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, out, trials, epochs, seed, *rest = args.worker
        if kind == "optuna":
            optuna_worker(Path(out), int(trials), int(epochs), int(seed), int(rest[0]))
        else:
            rounds_worker(Path(out), int(trials), int(epochs), int(seed))
        return
    if args.smoke:
        vars(args).update(SMOKE)
    runs: dict[str, list[dict]] = {name: [] for name in ("caldera", "optuna", "rounds")}
    with tempfile.TemporaryDirectory() as work:
        for seed in range(args.repeats):  # the schemes alternate: a slow spell of the machine hits all alike
            for name, done in runs.items():
                done.append(summarise(run_scheme(name, Path(work), args.trials, args.epochs, seed)))
    results = {name: _median(done) for name, done in runs.items()}
    base = results["rounds"]
    print(
        f"{args.trials} trials x {args.epochs} epochs on {RANKS} ranks, medians of {args.repeats} repeats "
        "(times from the trials' own clocks)"
    )
    print(f"{'scheme':8} {'trials':>6} {'window s':>9} {'idle rank-s':>12} {'idle %':>7} {'best':>7} {'at s':>6} "
          f"{'window vs rounds':>17}")  # fmt: skip
    for name, s in results.items():
        at = f"{s['best_at_s']:.1f}" if s["best_at_s"] is not None else "-"
        best = f"{s['best']:.4f}" if s["best"] is not None else "-"
        print(f"{name:8} {s['trials']:>6} {s['window_s']:>9.1f} {s['idle_s']:>12.1f} {100 * s['idle_share']:>6.1f}% "
              f"{best:>7} {at:>6} {s['window_s'] / base['window_s']:>16.2f}x")  # fmt: skip
    plot({name: done[0] for name, done in runs.items()}, args.png, args.trials, args.epochs)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
