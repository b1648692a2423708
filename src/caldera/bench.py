"""``caldera bench``: time to quality over reference workloads, in the spirit of MLPerf Training (docs/bench.md).

Each workload is a run file plus a quality target on one validation metric. A run trains with its own seed and
stops at the first epoch whose metric meets the target; its time is the wall clock from the first training step
(data generated and model built: excluded, recorded apart) to the end of that epoch's validation. A run that
does not meet the target within the run file's epochs fails. N runs per workload give the olympic mean; the
result file holds every run's curve and the machine's description. ``--compare`` tabulates result files.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caldera.config import load_config
from caldera.errors import ConfigError
from caldera.info import software
from caldera.io import atomic_write_text
from caldera.train.callbacks import Callback
from caldera.train.run import train
from caldera.version import __version__
from caldera.world import World, init

RESULT_VERSION = 1
ROOT = Path(__file__).resolve().parents[2]  # the source checkout, which holds examples/


@dataclass(frozen=True)
class Workload:
    """A reference workload: a run file, the validation metric that judges it, and the target to reach."""

    name: str
    run_file: str  # under examples/
    metric: str  # a key of the epoch logs, e.g. "val_rel_l2"
    direction: str  # "min": reach target or lower; "max": target or higher
    target: float
    why: str  # where the target comes from (the workload's docs page)
    overrides: tuple[str, ...] = ()  # --set lines that make the run file the reference workload
    # --quick: a few seconds per run on a busy 2-core CPU (tiny data), a target met after a few epochs.
    quick_target: float = math.nan
    quick_overrides: tuple[str, ...] = ()

    def met(self, value: float, target: float) -> bool:
        """Whether ``value`` meets ``target`` in this workload's direction (NaN never does)."""
        return value <= target if self.direction == "min" else value >= target


# Bragg peaks are timed with the lean variant (docs/bragg.md): BraggNN itself takes 7 minutes of a core per run.
LEAN_BRAGG = ("model.args.channels=[]", "model.args.dense=[256, 128, 64]", "model.args.nonlocal_block=false")

# The registry. A new workload is one line here (its run file in examples/).
WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("heat", "heat_surrogate.toml", "val_rel_l2", "min", 0.05,
             "the main job (README Quickstart) ends its 15 epochs near rel_l2 0.036; 0.05 is reached with margin",
             quick_target=1.0, quick_overrides=("data.args.n_samples=192", "data.args.grid=16",
                                                 "data.args.steps=10", "model.args.channels=8",
                                                 "optim.warmup_steps=0", "optim.epochs=12")),
    Workload("climate", "climate_forecast.toml", "val_lat_weighted_rmse", "min", 0.03,
             "docs/climate.md: 0.0227 after 8 epochs against 0.0509 for persistence; 0.03 beats persistence 1.7x",
             quick_target=0.04, quick_overrides=("data.args.days=60", "data.args.nlat=8", "data.args.nlon=16",
                                                 "data.num_workers=0", "model.args.channels=4",
                                                 "optim.warmup_steps=0", "optim.epochs=12")),
    Workload("materials", "materials_potential.toml", "val_force_mae", "min", 0.2,
             "docs/materials.md: force MAE 0.120 after 25 epochs against 3.378 for zero force",
             quick_target=1.5, quick_overrides=("data.args.n_configs=300", "data.args.replicas=10",
                                                "model.args.hidden=16", "optim.warmup_steps=0",
                                                "optim.epochs=12")),
    Workload("imaging", "imaging_denoise.toml", "val_psnr", "max", 24.5,
             "docs/imaging.md: the dose-conditioned U-Net's validation PSNR at random doses ends its 3 epochs at "
             "25.04 / 24.96 / 24.56 dB (seeds 0-2)",
             quick_target=12.0, quick_overrides=("data.args.n=60", "data.args.size=32", "data.num_workers=0",
                                                 "data.args.patch=[16, 16]", "data.args.patch_stride=[16, 16]",
                                                 "model.args.channels=4", "optim.warmup_steps=0",
                                                 "optim.epochs=12")),
    Workload("digits", "digits_tune.toml", "val_accuracy", "max", 0.95,
             "benchmarks/bench_async.py's time to 95 % validation accuracy on scikit-learn's digits",
             overrides=("optim.lr=3e-3", "optim.epochs=15"),
             quick_target=0.7, quick_overrides=("model.args.channels=4", "data.batch_size=64", "optim.epochs=12")),
    Workload("bragg", "bragg.toml", "val_peak_error_px", "min", 0.05,
             "docs/bragg.md: the lean variant ends its 8 epochs at a mean centre error of 0.0439 px; the scipy fit's "
             "median is 0.0425 px", overrides=LEAN_BRAGG,
             quick_target=0.35, quick_overrides=(*LEAN_BRAGG, "data.args.n=3000", "optim.epochs=12")),
    Workload("focus", "focus.toml", "val_mae", "min", 0.9,
             "docs/focus.md: the CNN ends at 0.66 px; 0.9 px is the calibrated multi-scale gradient energy's MAE",
             quick_target=1.6, quick_overrides=("data.args.n=320", "model.args.channels=4", "optim.epochs=12")),
    Workload("chirp", "chirp.toml", "val_accuracy", "max", 0.95,
             "docs/chirp.md: the width-8 member ends its 8 epochs at 0.9625 on windows of SNR 5-20 (half noise)",
             quick_target=0.8, quick_overrides=("data.args.n=1500", "model.args.width=4", "optim.warmup_steps=0",
                                                "optim.epochs=12")),
)}  # fmt: skip


class TargetStop(Callback):
    """Stop the trainer at the first epoch whose ``metric`` meets ``target``; record the curve and the clock.

    The clock starts when training starts (``on_fit_start``: data and model are built) and stops at the end of
    the epoch's validation. The epoch logs are already reduced over the ranks, so every rank stops together."""

    def __init__(self, workload: Workload, target: float) -> None:
        self.workload, self.target = workload, target
        self.start = 0.0
        self.curve: list[list[float]] = []  # [epoch, metric, seconds since the start]
        self.seconds: float | None = None

    def on_fit_start(self, trainer) -> None:
        """Start the clock."""
        self.start = time.perf_counter()

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        """Check the metric; stop when it meets the target."""
        elapsed = time.perf_counter() - self.start
        metric = self.workload.metric
        if metric not in logs:
            raise ConfigError(f"bench {self.workload.name}: metric {metric!r} is not in the epoch logs "
                              f"({', '.join(sorted(logs))}); fix the workload's metric")  # fmt: skip
        value = float(logs[metric])
        self.curve.append([epoch + 1, value, round(elapsed, 4)])
        if self.workload.met(value, self.target):
            self.seconds = elapsed
            trainer.should_stop = True


def olympic_mean(seconds: Sequence[float | None]) -> tuple[float | None, str]:
    """The olympic mean of run times (None: a failed run) and how it was taken.

    N >= 3: drop the fastest and the slowest run, average the rest; a failed run counts as the slowest, so one
    failure is dropped and two or more leave no result. N < 3: nothing can be dropped; the plain mean, and no
    result if any run failed."""
    if not seconds:
        return None, "no runs"
    if len(seconds) < 3:
        done = [s for s in seconds if s is not None]
        return (
            sum(done) / len(done) if len(done) == len(seconds) else None
        ), "mean of all runs (fewer than 3)"
    ordered = sorted(math.inf if s is None else s for s in seconds)[1:-1]
    if any(math.isinf(s) for s in ordered):
        return None, "olympic mean: more than one run failed"
    return sum(ordered) / len(ordered), "olympic mean (fastest and slowest dropped)"


def system() -> dict[str, Any]:
    """The hardware and software a result was measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "caldera": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "os": platform.platform(), "software": software(), "git": _git(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip


def _git() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes), if Caldera runs from one."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _run_file(w: Workload) -> Path:
    for base in (ROOT / "examples", Path.cwd() / "examples"):
        if (base / w.run_file).is_file():
            return base / w.run_file
    raise ConfigError(
        f"bench {w.name}: run file examples/{w.run_file} not found; run from a Caldera checkout"
    )


def parse_targets(items: Sequence[str]) -> dict[str, float]:
    """``--target NAME=VALUE`` lines as a dict; a wrong name or value is a ConfigError."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in WORKLOADS:
            raise ConfigError(f"bench --target {item!r}: write WORKLOAD=VALUE with a workload of "
                              f"{', '.join(WORKLOADS)}")  # fmt: skip
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(f"bench --target {item!r}: {text!r} is not a finite number")
        out[name] = value
    return out


def plan(names: Sequence[str], quick: bool, targets: dict[str, float], overrides: Sequence[str],
         runs: int) -> list[dict[str, Any]]:  # fmt: skip
    """Check every workload, target and override before any run: a mistake costs no training time."""
    if runs < 1:
        raise ConfigError(f"bench --runs {runs}: give at least 1 (3 or more for an olympic mean)")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ConfigError(f"bench: unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")  # fmt: skip
    missing = [n for n in targets if n not in (names or WORKLOADS)]
    if missing:
        raise ConfigError(f"bench --target {missing[0]}=...: that workload is not in this bench run")
    out = []
    for name in names or list(WORKLOADS):
        w = WORKLOADS[name]
        sets = [*w.overrides, *(w.quick_overrides if quick else ()), *overrides]
        path = _run_file(w)
        cfg = load_config(path, sets)  # a bad --set is named now
        target = targets.get(name, w.quick_target if quick else w.target)
        out.append(
            {"workload": w, "path": path, "sets": sets, "target": target, "max_epochs": cfg.optim.epochs}
        )
    return out


def run_once(item: dict[str, Any], seed: int, run_dir: Path, world: World) -> dict[str, Any]:
    """One seeded run of a workload to its target; its record (time to quality, curve, setup time)."""
    w: Workload = item["workload"]
    stop = TargetStop(w, item["target"])
    fixed = {"run.seed": seed, "run.dir": str(run_dir), "train.progress": False, "train.plot": False}
    cfg = load_config(item["path"], item["sets"], fixed)
    # A fresh directory: a run must not resume, nor reuse data simulated by an earlier bench with other settings.
    if world.is_main and run_dir.exists():
        shutil.rmtree(run_dir)
    world.comm.bcast(None)  # the other ranks wait until it is gone
    log = io.StringIO()
    begin = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train(cfg, item["path"], world=world, callbacks=[stop])
    finally:  # the trainer's own lines, kept beside the run (also when it raised)
        if world.is_main and run_dir.is_dir():
            atomic_write_text(run_dir / "bench.log", log.getvalue())
    total = time.perf_counter() - begin
    return {"seed": seed, "reached": stop.seconds is not None,
            "seconds": None if stop.seconds is None else round(stop.seconds, 4), "epochs": len(stop.curve),
            "setup_seconds": round(stop.start - begin, 4) if stop.start else None,
            "total_seconds": round(total, 4), "curve": stop.curve, "run_dir": str(run_dir)}  # fmt: skip


def bench(names: Sequence[str] = (), runs: int = 5, quick: bool = False, out: str | Path = "bench.json",
          targets: dict[str, float] | None = None, overrides: Sequence[str] = (), work_dir: str | Path = "runs/bench",
          seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Run each workload ``runs`` times (seeds ``seed``, ``seed + 1``, ...) to its target; write and return the
    result (rank 0 writes ``out`` atomically after every run, so an interrupted bench keeps what it measured)."""
    items = plan(names, quick, targets or {}, overrides, runs)
    world = init()
    result: dict[str, Any] = {
        "caldera_bench": RESULT_VERSION, "quick": quick, "ranks": world.size, "runs_per_workload": runs,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": _load(), "timed": "from the first training step (data built, model built) to the end "
        "of the validation of the first epoch that meets the target", "system": system(), "workloads": {},
    }  # fmt: skip
    for item in items:
        w: Workload = item["workload"]
        entry: dict[str, Any] = {
            "run_file": f"examples/{w.run_file}", "overrides": item["sets"], "metric": w.metric,
            "direction": w.direction, "target": item["target"], "max_epochs": item["max_epochs"], "why": w.why,
            "runs": [],
        }  # fmt: skip
        result["workloads"][w.name] = entry
        for i in range(runs):
            record = run_once(item, seed + i, Path(work_dir) / w.name / f"run-{seed + i}", world)
            entry["runs"].append(record)
            times = [r["seconds"] for r in entry["runs"]]
            entry["time_to_quality_s"], entry["method"] = olympic_mean(times)
            entry["failures"] = sum(t is None for t in times)
            result["load_average_end"] = _load()
            if world.is_main:
                atomic_write_text(out, json.dumps(result, indent=1) + "\n")
                sign = "<=" if w.direction == "min" else ">="
                got = f"{record['seconds']:.2f} s" if record["reached"] else "FAILED (target not reached)"
                last = record["curve"][-1][1] if record["curve"] else math.nan
                print(f"bench {w.name} run {i + 1}/{runs} seed {record['seed']}: {got}, {record['epochs']} epochs, "
                      f"{w.metric} {last:.4g} (target {sign} {item['target']:g})", flush=True)  # fmt: skip
        if world.is_main:
            tq = entry["time_to_quality_s"]
            print(f"bench {w.name}: time to quality {'-' if tq is None else f'{tq:.2f} s'} "
                  f"({entry['method']}; {entry['failures']} failed)", flush=True)  # fmt: skip
    if world.is_main:
        print(f"bench: wrote {out}", flush=True)
    return result


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def compare(paths: Sequence[str | Path]) -> str:
    """A markdown table of time to quality across result files: one row per workload, ratios to the first file."""
    results = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"bench --compare: cannot read {p}: {exc}") from None
        if not isinstance(data, dict) or data.get("caldera_bench") != RESULT_VERSION:
            raise ConfigError(
                f"bench --compare: {p} is not a caldera bench result (version {RESULT_VERSION})"
            )
        results.append((str(p), data))
    names = list(dict.fromkeys(n for _, d in results for n in d["workloads"]))
    head = ["workload", "target", *(f"{label} (s)" for label, _ in results)]
    head += [f"{label} / {results[0][0]}" for label, _ in results[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in names:
        entries = [d["workloads"].get(name) for _, d in results]
        ref = next((e for e in entries if e), {})
        sign = "<=" if ref.get("direction") == "min" else ">="
        cells = [name, f"{ref.get('metric')} {sign} {ref.get('target'):g}"]
        for e in entries:
            if e is None:
                cells.append("-")
                continue
            tq, n = e.get("time_to_quality_s"), len(e["runs"])
            cells.append(f"{'failed' if tq is None else f'{tq:.2f}'} ({n - e['failures']}/{n} reached)")
        base = entries[0]
        for e in entries[1:]:
            if (
                base is None
                or e is None
                or base.get("time_to_quality_s") is None
                or e.get("time_to_quality_s") is None
            ):
                cells.append("-")
            elif (e["metric"], e["target"]) != (base["metric"], base["target"]):
                cells.append("n/a (targets differ)")
            else:
                cells.append(f"{e['time_to_quality_s'] / base['time_to_quality_s']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label, d in results:
        s = d["system"]
        lines.append(f"- {label}: {s['cpu']}, {s['cores']} cores, {d['ranks']} rank(s), torch {s['torch']} "
                     f"({s['torch_threads']} threads), caldera {s['caldera']} {s.get('git') or ''}, "
                     f"{'quick, ' if d['quick'] else ''}load {d.get('load_average_start')}, {d['started']}")  # fmt: skip
    return "\n".join(lines)
