"""``caldera tune``: hyperparameter search over the whole allocation, with Optuna as the sampler.

The run file's ``[tune]`` section names the metric, the number of trials and the search space (dotted run-file
keys). Every rank trains trials, one at a time and each on its own (one process, one device): in each round rank
0 asks Optuna for one trial per rank, broadcasts them, every rank trains its own, and the results are gathered and
told back. No database or server: the study lives in rank 0's memory and the record in the run directory
(``tune/trials.csv`` after each round, ``tune/best.json``, ``tune/tune.png``). A failing trial (NaN loss, out of
memory, a bad value) is recorded as failed and the search goes on.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from caldera.config import Config, ConfigError, RangeSpec, load_config
from caldera.io import atomic_write_text
from caldera.train.progress import progress_bar
from caldera.world import World, init


def tune(config: str | Path, overrides: list[str] | None = None, trials: int | None = None) -> dict[str, Any]:
    """Run the search the run file's ``[tune]`` section describes; return the best trial (on every rank)."""
    world = init()
    base = load_config(config, overrides)
    spec = base.tune
    if spec is None or not spec.space:
        raise ConfigError(f"{config}: no [tune] section with a space; add e.g. [tune.space] with "
                          '"optim.lr" = { low = 1e-4, high = 1e-1, log = true } (see docs/tune.md)')  # fmt: skip
    n_trials = trials or spec.trials
    if spec.sampler == "grid":
        n_trials = min(n_trials, len(_grid(spec)))
    for key, dims in spec.space.items():  # a mistyped key fails now, not after hours of trials
        load_config(config, overrides, {key: dims[0] if isinstance(dims, list) else dims.low})
    out = base.run_dir / "tune"
    study = _study(
        spec, base.run.seed
    )  # on every rank, so a missing Optuna stops them all alike; rank 0's is used
    rows: list[dict[str, Any]] = []
    # Bound to the real stdout now: trials redirect sys.stdout into their own logs while the bar refreshes.
    bar = progress_bar(world.is_main, "trials", {"best": "-"}, file=sys.stdout, clock="elapsed").start()
    try:
        while len(rows) < n_trials:
            k = min(world.size, n_trials - len(rows))
            asked = [study.ask(_distributions(spec.space)) for _ in range(k)] if world.is_main else []
            params = world.comm.bcast([t.params for t in asked])
            number = len(rows) + world.rank
            mine = (
                _trial(config, overrides, params[world.rank], base, number, world) if world.rank < k else None
            )
            results = world.comm.allgather(mine)[:k]
            _stop_if_metric_unknown(results, spec.metric)
            if world.is_main:
                rows += _tell(study, asked, results)
                _write_table(out / "trials.csv", rows)
                best = _best(rows, spec.direction)
                bar.update(advance=k, total=n_trials, best="-" if best is None else f"{best['value']:.4g}")
            else:
                rows += [{}] * k  # only the count matters off rank 0
    finally:
        bar.close()
    outcome = _finish(out, rows, spec, config) if world.is_main else None
    outcome = world.comm.bcast(outcome)
    if "error" in outcome:  # raised on every rank alike, so that all of them exit the same way
        raise TuneFailed(outcome["error"])
    return outcome


def _study(spec, seed: int):
    try:
        import optuna
    except ImportError:
        raise ConfigError("caldera tune samples with Optuna: pip install optuna (or caldera[tune])") from None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.sampler == "tpe":  # constant_liar: trials asked in one round spread out instead of piling up
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction=spec.direction, sampler=sampler)
    for point in _grid(spec):  # the grid's points are queued; ask() hands them out in order
        study.enqueue_trial(point)
    return study


def _grid(spec) -> list[dict[str, Any]]:
    """Every combination of the space's lists (sampler 'grid'), else nothing."""
    if spec.sampler != "grid":
        return []
    if not all(isinstance(d, list) for d in spec.space.values()):
        raise ConfigError("tune.sampler = 'grid' needs every tune.space entry to be a list of values")
    keys = list(spec.space)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*spec.space.values())]


def _distributions(space: dict[str, list[Any] | RangeSpec]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for key, dims in space.items():
        if isinstance(dims, list):
            dists[key] = CategoricalDistribution(dims)
        elif all(isinstance(v, int) for v in (dims.low, dims.high)) and isinstance(dims.step or 1, int):
            dists[key] = IntDistribution(dims.low, dims.high, log=dims.log, step=dims.step or 1)
        else:
            dists[key] = FloatDistribution(dims.low, dims.high, log=dims.log, step=dims.step)
    return dists


def _trial(
    config, overrides, params: dict[str, Any], base: Config, number: int, world: World
) -> dict[str, Any]:
    """Train one trial alone on this rank's device; its output goes to its own directory and log."""
    from caldera.comm.local import LocalComm
    from caldera.train.run import train

    trial_dir = base.run_dir / "trials" / f"trial-{number:04d}"
    fixed = {"run.dir": str(trial_dir), "train.progress": False, "train.plot": False}
    start = time.perf_counter()
    trial_dir.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    try:
        cfg = load_config(config, overrides, {**params, **fixed})
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            history = train(cfg, config, world=World(device=world.device, comm=LocalComm()))
        value, error, metrics = _score(history, base.tune), None, sorted(history[-1]) if history else []
    except Exception as exc:  # noqa: BLE001 -- whatever a trial raises fails that trial, not the search
        value, error, metrics = None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}", None
    atomic_write_text(trial_dir / "trial.log", log.getvalue())
    return {"number": number, "rank": world.rank, "params": params, "value": value, "error": error,
            "metrics": metrics, "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def _score(history: list[dict[str, float]], spec) -> float | None:
    values = [row[spec.metric] for row in history if math.isfinite(row.get(spec.metric, math.nan))]
    if not values:
        return None
    return min(values) if spec.direction == "minimize" else max(values)


def _stop_if_metric_unknown(results: list[dict[str, Any]], metric: str) -> None:
    for r in results:
        if r["metrics"] and metric not in r["metrics"]:
            raise ConfigError(f"tune.metric = {metric!r} is not a metric of this run; it has: "
                              f"{', '.join(m for m in r['metrics'] if m not in ('epoch', 'lr', 'time_s'))}")  # fmt: skip


def _tell(study, asked, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import optuna

    rows = []
    for trial, r in zip(asked, results, strict=True):
        if r["value"] is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, r["value"])
        state = "complete" if r["value"] is not None else "failed"
        rows.append({"trial": r["number"], "rank": r["rank"], "state": state, "value": r["value"],
                     "seconds": r["seconds"], **r["params"], "error": r["error"] or ""})  # fmt: skip
    return rows


def _best(rows: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        return None
    pick = min if direction == "minimize" else max
    return pick(done, key=lambda r: r["value"])


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())


class TuneFailed(RuntimeError):
    """Every trial of the search failed."""


def _finish(out: Path, rows, spec, config) -> dict[str, Any]:
    """Write best.json and tune.png and print the outcome; return the summary (or {"error": why})."""
    best = _best(rows, spec.direction)
    failed = sum(r["state"] == "failed" for r in rows)
    if best is None:
        first = next(r["error"] for r in rows if r["error"])
        return {"error": f"all {len(rows)} trials failed; the first: {first} (logs: {out.parent}/trials/)"}
    params = {k: best[k] for k in spec.space}
    sets = " ".join(f"--set {k}={_literal(v)}" for k, v in params.items())
    summary = {"trial": best["trial"], spec.metric: best["value"], "params": params, "trials": len(rows),
               "failed": failed, "command": f"caldera train {config} {sets}".strip()}  # fmt: skip
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2))
    _plot(out / "tune.png", rows, spec)
    print(
        f"best of {len(rows)} trials ({failed} failed): trial {best['trial']}, {spec.metric} {best['value']:.4g}"
    )
    print(
        "  "
        + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in params.items())
    )
    print(f"  train it: {summary['command']}")
    print(f"  record: {out}/trials.csv, best.json, tune.png")
    return summary


def _literal(value: Any) -> str:
    """``value`` as ``--set`` reads it back (YAML): 1e-05 would be a string there, 1.0e-05 is a float."""
    text = repr(value) if isinstance(value, float) else json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def _plot(path: Path, rows, spec) -> None:
    from caldera.train.output import pyplot, save_figure

    plt = pyplot()
    numeric = [k for k, d in spec.space.items() if isinstance(d, RangeSpec)][:3]
    fig, axes = plt.subplots(1, 1 + len(numeric), figsize=(4.2 * (1 + len(numeric)), 3.4), squeeze=False)
    done = [r for r in rows if r["state"] == "complete"]
    ax = axes[0][0]
    ax.plot([r["trial"] for r in done], [r["value"] for r in done], "o", label="trial")
    pick = min if spec.direction == "minimize" else max
    running, best = [], None
    for r in sorted(done, key=lambda r: r["trial"]):
        best = r["value"] if best is None else pick(best, r["value"])
        running.append(best)
    ax.step(sorted(r["trial"] for r in done), running, where="post", label="best so far")
    ax.set(xlabel="trial", ylabel=spec.metric, title=f"{len(done)} of {len(rows)} trials completed")
    ax.legend()
    for ax, key in zip(axes[0][1:], numeric, strict=False):
        ax.plot([r[key] for r in done], [r["value"] for r in done], "o")
        ax.set(xlabel=key, ylabel=spec.metric, xscale="log" if spec.space[key].log else "linear")
    fig.tight_layout()
    save_figure(fig, path)
