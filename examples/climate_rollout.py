"""Roll a trained climate forecaster out autoregressively over the validation period and score it.

    caldera train examples/climate_forecast.toml
    python examples/climate_rollout.py runs/climate-forecast [--days 10] [--every 4] [--smoke]
Smoke run (seconds, after climate_forecast.toml's smoke run): python examples/climate_rollout.py runs/climate-forecast --smoke

Forecasts start every ``--every`` records (6 h each) of the validation period (the last ``val_fraction`` of the
file, never trained on) and run ``--days`` days, feeding each prediction back in with the known insolation.
Writes to the run directory: ``rollout.json`` (latitude-weighted RMSE per lead and variable for the model,
persistence and climatology), ``climate_skill.png`` (RMSE vs lead) and ``climate_maps.png`` (truth, forecast
and error of T at a few leads).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from caldera.config import load_config
from caldera.data.normalize import STATS_FILE, load_stats
from caldera.io import atomic_write_text
from caldera.sims.climate import rollout_skill
from caldera.train.output import pyplot, save_figure
from caldera.train.run import load_run_model
from caldera.train.rundir import RunDir

# --smoke: a few short forecasts (of a run trained with the smoke line in climate_forecast.toml).
SMOKE = {"days": 0.5, "every": 40}


def load_run(run_dir: Path) -> tuple[torch.nn.Module, Path, float, int, dict]:
    """A finished run's trained model, NetCDF file, validation fraction, input window and normalisation
    statistics."""
    files = RunDir(run_dir)
    missing = [*files.missing(), *([STATS_FILE] if not (run_dir / STATS_FILE).exists() else [])]
    if missing:
        raise SystemExit(
            f"{run_dir}: missing {', '.join(missing)}; train first: caldera train examples/climate_forecast.toml"
        )
    cfg = load_config(files.read_config())  # refuses code the run directory names (docs/security.md)
    model = load_run_model(files, cfg)
    path = Path(cfg.data.args.get("path", "climate.nc"))
    stats, _ = load_stats(run_dir / STATS_FILE)
    window = int(cfg.data.args.get("window", 2))
    return model, path if path.is_absolute() else run_dir / path, cfg.data.val_fraction, window, stats


def crossings(skill: dict) -> dict[str, dict[str, float | None]]:
    """Per variable: the last lead (h) at which the model still beats persistence / climatology (None: never)."""
    out = {}
    for i, var in enumerate(skill["variables"]):
        model = skill["model"][:, i]
        row = {}
        for base in ("persistence", "climatology"):
            better = model < skill[base][:, i]
            row[f"beats_{base}_until_h"] = float(skill["lead_hours"][better].max()) if better.any() else None
            row[f"beats_{base}_from_h"] = float(skill["lead_hours"][better].min()) if better.any() else None
        out[var] = row
    return out


def plot_skill(skill: dict, path: Path) -> Path:
    """Latitude-weighted RMSE vs lead time, one panel per variable."""
    plt = pyplot()
    units = {"T": "K", "u": "m/s", "v": "m/s"}
    fig, axes = plt.subplots(1, len(skill["variables"]), figsize=(4.6 * len(skill["variables"]), 3.8))
    days = skill["lead_hours"] / 24
    for i, (ax, var) in enumerate(zip(axes, skill["variables"])):
        for name, style in (("model", "C0-"), ("persistence", "C1--"), ("climatology", "C2:")):
            ax.plot(days, skill[name][:, i], style, label=name, lw=2)
        ax.set(xlabel="lead time (days)", ylabel=f"lat-weighted RMSE ({units.get(var, '')})", title=var)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_maps(skill: dict, path: Path, leads_h: tuple[float, ...] = (6, 48, 120, 240)) -> Path:
    """Truth, forecast and error of T at a few leads, for the first forecast start."""
    plt = pyplot()
    leads = [int(np.argmin(np.abs(skill["lead_hours"] - h))) for h in leads_h]
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
    parser.add_argument(
        "run_dir", type=Path, help="run directory of `caldera train examples/climate_forecast.toml`"
    )
    parser.add_argument("--days", type=float, default=10.0, help="forecast length in days")
    parser.add_argument("--every", type=int, default=4, help="start a forecast every this many records")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    model, path, val_fraction, window, stats = load_run(args.run_dir)
    steps = round(args.days * 4)  # the file holds a record every 6 h
    skill = rollout_skill(model, path, stats, val_fraction, max_lead=steps, every=args.every, window=window)
    report = {"starts": len(skill["starts"]), "crossings": crossings(skill)}
    for name in ("model", "persistence", "climatology"):
        report[name] = {v: skill[name][:, i].round(4).tolist() for i, v in enumerate(skill["variables"])}
    report["lead_hours"] = skill["lead_hours"].tolist()
    atomic_write_text(args.run_dir / "rollout.json", json.dumps(report, indent=1))
    plot_skill(skill, args.run_dir / "climate_skill.png")
    plot_maps(skill, args.run_dir / "climate_maps.png")
    print(f"{len(skill['starts'])} forecasts of {args.days:g} days from the validation period")
    print("lead_h  " + "  ".join(f"{v}: model/persist/clim".ljust(26) for v in skill["variables"]))
    for k in sorted({0, 3, 7, 19, steps - 1} & set(range(steps))):
        cells = [f"{skill[n][k, i]:7.3f}" for i in range(len(skill["variables"])) for n in
                 ("model", "persistence", "climatology")]  # fmt: skip
        print(f"{skill['lead_hours'][k]:6.0f}  " + "  ".join(" ".join(cells[j : j + 3]).ljust(26) for j in
                                                            range(0, len(cells), 3)))  # fmt: skip
    for var, row in report["crossings"].items():
        print(f"{var}: beats persistence up to {row['beats_persistence_until_h']} h, "
              f"climatology up to {row['beats_climatology_until_h']} h")  # fmt: skip
    print(f"wrote {args.run_dir / 'rollout.json'}, climate_skill.png, climate_maps.png")


if __name__ == "__main__":
    main()
