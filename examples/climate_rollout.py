"""Roll trained climate forecasters out autoregressively over the validation period and score them, over seeds.

    caldera train examples/climate_forecast.toml      (and the same with --set run.seed=1 ... for more seeds)
    python examples/climate_rollout.py RUN_DIR [RUN_DIR ...] [--out DIR] [--days 10] [--every 4] [--damp]
                                       [--perfect-model M] [--smoke]
Smoke run (seconds, after climate_forecast.toml's smoke run): python examples/climate_rollout.py runs/climate-forecast --damp --perfect-model 2 --smoke

Forecasts start every ``--every`` records (6 h each) of the validation period (the last ``val_fraction`` of the
file, never trained on) and run ``--days`` days, feeding each prediction back in with the known insolation. Scores,
per lead and variable, as forecast centres report them: the latitude-weighted RMSE and the anomaly correlation
coefficient (ACC: anomalies against the harmonic climatology, cos(latitude)-weighted) of the model, persistence
and climatology. With several run directories (training seeds) the model's scores are the mean and standard
deviation over them. ``--damp`` also scores each model's forecasts with their anomalies shrunk per lead by a
factor fitted on forecasts started in the training period (``fit_damping``; the ACC does not change).
References: with several runs, the mean of their forecasts (a seed ensemble); ``--perfect-model M``, the
simulator's own forecasts from the exact state with M draws of the noise to come (``perfect_model_forecasts``):
one member is the best sharp forecast, the members' mean approaches the best forecast in RMSE.
Writes to ``--out`` (default: the run directory, when there is one): ``rollout.json``, ``climate_table.md``
(the tables of docs/climate.md), ``climate_skill.png`` (RMSE and ACC vs lead, mean with a +-1 sd band) and
``climate_maps.png`` (truth, forecast and error of T at a few leads, first run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from caldera.config import Config
from caldera.data.normalize import STATS_FILE, load_stats
from caldera.errors import ConfigError
from caldera.io import atomic_write_text
from caldera.sims.climate import (
    USEFUL_ACC,
    acc_by_lead,
    damped,
    fit_damping,
    last_lead_better,
    perfect_model_skill,
    rmse_by_lead,
    rollout_skill,
    skill_over_runs,
)
from caldera.train.output import pyplot, save_figure
from caldera.train.run import load_runs

# --smoke: a few short forecasts (of a run trained with the smoke line in climate_forecast.toml).
SMOKE = {"days": 0.5, "every": 40, "damp_every": 40}
TABLE_DAYS = (0.25, 1, 2, 3, 5, 7, 10)
UNITS = {"T": "K", "u": "m/s", "v": "m/s"}


class Run(NamedTuple):
    """A finished run's trained model, NetCDF file, validation fraction, input window and normalisation statistics."""

    model: torch.nn.Module
    path: Path
    val_fraction: float
    window: int
    stats: dict


def _same_atmosphere(cfg: Config) -> tuple:
    """What runs scored together must share: the simulation's settings (which make the file's content, wherever
    the file lies), the validation split and the input window."""
    a = cfg.data.args
    return (
        {k: a.get(k) for k in ("days", "nlat", "nlon", "seed")},
        cfg.data.val_fraction,
        a.get("window", 2),
    )


def load_climate_runs(run_dirs: list[Path]) -> list[Run]:
    """The runs (one per training seed), refused in one line (ConfigError) if unfinished or of different data."""
    models, cfgs = load_runs(run_dirs, _same_atmosphere)
    runs = []
    for run_dir, model, cfg in zip(run_dirs, models, cfgs):
        if not (run_dir / STATS_FILE).exists():
            raise ConfigError(
                f"{run_dir}: missing {STATS_FILE}; train first: caldera train examples/climate_forecast.toml"
            )
        path = Path(cfg.data.args.get("path", "climate.nc"))
        stats, _ = load_stats(run_dir / STATS_FILE)
        runs.append(Run(model, path if path.is_absolute() else run_dir / path, cfg.data.val_fraction,
                        int(cfg.data.args.get("window", 2)), stats))  # fmt: skip
    return runs


def score(run: Run, steps: int, every: int, damp_every: int | None) -> dict:
    """One run's scores (lead, variable) and, for the maps, its forecasts."""
    model, path, val_fraction, window, stats = run
    skill = rollout_skill(model, path, stats, val_fraction, max_lead=steps, every=every, window=window)
    if damp_every:
        fit = rollout_skill(model, path, stats, val_fraction, max_lead=steps, every=damp_every, window=window,
                            period="train")  # fmt: skip
        skill["damping"] = fit_damping(fit)
        skill["damped"] = rmse_by_lead(damped(skill, skill["damping"]), skill["truth"])
        skill["damped_persistence"] = rmse_by_lead(
            damped(skill, fit_damping(fit, "persist"), "persist"), skill["truth"]
        )
    return skill


def references(skills: list[dict], path: Path, members: int) -> dict[str, np.ndarray]:
    """Scores that bound and extend the runs': the runs' mean forecast (a seed ensemble, with several runs) and
    the simulator's own forecasts from the exact state (``members`` > 0: one member and their mean)."""
    first, out = skills[0], {}
    if len(skills) > 1:
        mean = np.mean([s["forecast"] for s in skills], axis=0)
        out.update(ensemble=rmse_by_lead(mean, first["truth"]), ensemble_acc=acc_by_lead(mean, first["truth"],
                                                                                         first["clim"]))  # fmt: skip
    if members:
        out.update(perfect_model_skill(path, first, members))
    return out


REFERENCE_NAMES = {"ensemble": "mean of the runs' forecasts", "perfect": "perfect model, one member",
                   "perfect_mean": "perfect model, mean of the members"}  # fmt: skip


def table(agg: dict) -> str:
    """Markdown tables of RMSE and ACC per lead for each variable (model: mean +- sd over runs)."""
    lead, runs = np.asarray(agg["lead_hours"]), agg["runs"]
    rows = [int(np.argmin(np.abs(lead - d * 24))) for d in TABLE_DAYS if d * 24 <= lead[-1]]
    pm = (lambda m, s: f"{m:.2f} ± {s:.2f}") if runs > 1 else (lambda m, s: f"{m:.2f}")
    damp = "damped" in agg
    tables = [("RMSE", ["model", "persistence", "climatology"])]
    tables += [("RMSE", ["damped", "damped_persistence", "climatology"])] if damp else []
    tables += [("ACC", ["model_acc", "persistence_acc", "climatology_acc"])]
    tables += [("Activity (RMS of the forecast's anomalies / the truth's)", ["model_activity"])]
    lines = []
    for metric, names in tables:
        head = " / ".join(n.removesuffix("_acc").removesuffix("_activity").replace("_", " ") for n in names)
        lines += [f"{metric}: {head} (model: mean ± sd over {runs} run(s))", ""]
        lines += ["| lead | " + " | ".join(f"{v} ({UNITS.get(v, '')})" if metric == "RMSE" else v
                                            for v in agg["variables"]) + " |"]  # fmt: skip
        lines += ["| --- |" + " --- |" * len(agg["variables"])]
        for k in rows:
            h = lead[k]
            cells = []
            for i in range(len(agg["variables"])):
                vals = [pm(agg[names[0]][k, i], agg[names[0] + "_sd"][k, i])]
                vals += [f"{agg[n][k, i]:.2f}" for n in names[1:]]
                cells.append(" / ".join(vals))
            label = f"{h:g} h" if h < 24 else f"{h / 24:g} d"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    refs = [n for n in REFERENCE_NAMES if n in agg.get("references", {})]
    if refs:
        ref = agg["references"]
        lines += [f"References, RMSE (ACC): {' / '.join(REFERENCE_NAMES[n] for n in refs)} / climatology", ""]
        lines += ["| lead | " + " | ".join(f"{v} ({UNITS.get(v, '')})" for v in agg["variables"]) + " |"]
        lines += ["| --- |" + " --- |" * len(agg["variables"])]
        for k in rows:
            h = lead[k]
            cells = [" / ".join([*(f"{ref[n][k, i]:.2f} ({ref[n + '_acc'][k, i]:.2f})" for n in refs),
                                 f"{agg['climatology'][k, i]:.2f}"]) for i in range(len(agg["variables"]))]  # fmt: skip
            label = f"{h:g} h" if h < 24 else f"{h / 24:g} d"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        for n in refs:
            until = [f"{var} {last_lead_better(lead, ref[n][:, i] < agg['climatology'][:, i])} h"
                     for i, var in enumerate(agg["variables"])]  # fmt: skip
            lines.append(f"- {REFERENCE_NAMES[n]}: beats climatology to {', '.join(until)}")
        lines.append("")
    for var, row in agg["crossings"].items():
        line = (f"{var}: beats climatology to {row['model_beats_climatology_until_h']} h (mean; mean + sd: "
                f"{row['model_beats_climatology_until_h_mean_plus_sd']} h; each run: "
                f"{row['model_beats_climatology_until_h_each_run']}), persistence to "
                f"{row['model_beats_persistence_until_h']} h (mean + sd: "
                f"{row['model_beats_persistence_until_h_mean_plus_sd']} h); ACC >= {USEFUL_ACC} to "
                f"{row['model_acc_useful_until_h']} h (persistence: {row['persistence_acc_useful_until_h']} h)")  # fmt: skip
        if damp:
            line += (f"; damped: beats climatology to {row['damped_beats_climatology_until_h']} h (mean + sd: "
                     f"{row['damped_beats_climatology_until_h_mean_plus_sd']} h; each run: "
                     f"{row['damped_beats_climatology_until_h_each_run']}), damped persistence to "
                     f"{row['damped_beats_damped_persistence_until_h']} h (mean + sd: "
                     f"{row['damped_beats_damped_persistence_until_h_mean_plus_sd']} h)")  # fmt: skip
        lines.append(f"- {line}")
    return "\n".join(lines) + "\n"


def plot_skill(agg: dict, path: Path) -> Path:
    """RMSE (top) and ACC (bottom) vs lead, one column per variable; the model as mean with a +-1 sd band."""
    plt = pyplot()
    nv = len(agg["variables"])
    fig, axes = plt.subplots(2, nv, figsize=(4.6 * nv, 7.8), squeeze=False)
    days = np.asarray(agg["lead_hours"]) / 24
    runs = f" ({agg['runs']} seeds)" if agg["runs"] > 1 else ""
    for i, var in enumerate(agg["variables"]):
        for row, suffix, ylabel in ((0, "", f"lat-weighted RMSE ({UNITS.get(var, '')})"), (1, "_acc", "ACC")):
            ax = axes[row, i]
            models = [("model", "C0")] + ([("damped", "C3")] if row == 0 and "damped" in agg else [])
            for name, color in models:
                mean, sd = agg[name + suffix][:, i], agg[name + suffix + "_sd"][:, i]
                ax.plot(days, mean, "-", color=color, lw=2, label=name + runs)
                ax.fill_between(days, mean - sd, mean + sd, color=color, alpha=0.25, lw=0)
            ax.plot(days, agg["persistence" + suffix][:, i], "C1--", lw=2, label="persistence")
            if row == 0 and "damped" in agg:
                ax.plot(days, agg["damped_persistence"][:, i], "C1-.", lw=1, label="damped persistence")
            ax.plot(days, agg["climatology" + suffix][:, i], "C2:", lw=2, label="climatology")
            for (name, label), style in zip(REFERENCE_NAMES.items(), ("C4-", "k--", "k-")):
                if name + suffix in agg.get("references", {}):
                    ax.plot(days, agg["references"][name + suffix][:, i], style, lw=1, label=label)
            if row == 1:
                ax.axhline(USEFUL_ACC, color="0.4", lw=1)
            ax.set(xlabel="lead time (days)", ylabel=ylabel, title=var)
            ax.grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    return save_figure(fig, path)


def plot_maps(skill: dict, path: Path, leads_h: tuple[float, ...] = (6, 48, 120, 240)) -> Path:
    """Truth, forecast and error of T at a few leads, for the first forecast start."""
    plt = pyplot()
    leads = sorted({int(np.argmin(np.abs(skill["lead_hours"] - h))) for h in leads_h})
    fig, axes = plt.subplots(len(leads), 3, figsize=(13, 2.4 * len(leads)), squeeze=False)
    truth, pred = skill["truth"][0, :, 0], skill["forecast"][0, :, 0]
    lo, hi = float(truth.min()), float(truth.max())
    extent = (0, 360, -90, 90)
    for row, k in zip(axes, leads):
        err = pred[k] - truth[k]
        lim = float(np.abs(err).max()) or 1.0
        panels = [(truth[k], "truth", "inferno", lo, hi), (pred[k], "forecast", "inferno", lo, hi),
                  (err, "forecast - truth", "coolwarm", -lim, lim)]  # fmt: skip
        for ax, (img, title, cmap, vmin, vmax) in zip(row, panels):
            im = ax.imshow(img, origin="lower", extent=extent, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            ax.set_title(f"T {title}, lead {skill['lead_hours'][k]:g} h")
            fig.colorbar(im, ax=ax, fraction=0.046, label="K")
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", type=Path, nargs="+",
                        help="run directories of `caldera train examples/climate_forecast.toml` (one per seed)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help="where to write (default: the run directory, when there is one)"
    )
    parser.add_argument("--days", type=float, default=10.0, help="forecast length in days")
    parser.add_argument("--every", type=int, default=4, help="start a forecast every this many records")
    parser.add_argument(
        "--damp", action="store_true", help="also score anomaly-damped forecasts (fit on training)"
    )
    parser.add_argument(
        "--damp-every", type=int, default=16, help="training-period forecasts to fit --damp on"
    )
    parser.add_argument("--perfect-model", type=int, default=0, metavar="M",
                        help="also score the simulator's own M-member forecasts from the exact state (the bound)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.out is None and len(args.run_dirs) > 1:
        parser.error("several run directories: give --out DIR for the combined results")
    out = args.out or args.run_dirs[0]
    steps = round(args.days * 4)  # the file holds a record every 6 h
    try:
        runs = load_climate_runs(args.run_dirs)
    except ConfigError as exc:
        parser.error(str(exc))
    skills = [score(run, steps, args.every, args.damp_every if args.damp else None) for run in runs]
    agg = skill_over_runs(skills)
    agg["references"] = references(skills, runs[0].path, args.perfect_model)
    report = {
        k: v.round(4).tolist() if isinstance(v, np.ndarray) else v
        for k, v in agg.items()
        if k != "references"
    }
    report["references"] = {k: v.round(4).tolist() for k, v in agg["references"].items()}
    report["run_dirs"] = [str(d) for d in args.run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "rollout.json", json.dumps(report, indent=1))
    text = table(agg)
    atomic_write_text(out / "climate_table.md", text)
    plot_skill(agg, out / "climate_skill.png")
    plot_maps(skills[0], out / "climate_maps.png")
    print(f"{agg['starts']} forecasts of {args.days:g} days from the validation period, {agg['runs']} run(s)")
    print(text)
    print(f"wrote {out / 'rollout.json'}, climate_table.md, climate_skill.png, climate_maps.png")


if __name__ == "__main__":
    main()
