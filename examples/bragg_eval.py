"""Score trained BraggNNs against the classical pseudo-Voigt fit on fresh patches: centre errors in pixels (median,
95th percentile), with and without a neighbouring peak, against peak intensity, and the time per patch of each;
with several runs (one per training seed), the networks' mean and spread over them.

    caldera train examples/bragg.toml          # seed 0: trains, writes runs/bragg/
    caldera train examples/bragg.toml --set run.seed=1 --set run.dir=runs/bragg-s1   # etc.
    python examples/bragg_eval.py runs/bragg runs/bragg-s1 runs/bragg-s2 --out runs/bragg-seeds
Writes evaluation.json, bragg_table.md, bragg_errors.png and bragg_intensity.png into --out (default: the first run
directory). The fit and the centroid see the same patches as every network and do not depend on the training seed:
they are computed once.
Smoke run (seconds, after bragg.toml's smoke run): python examples/bragg_eval.py runs/bragg --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.config import Config
from caldera.errors import ConfigError
from caldera.io import atomic_write_text
from caldera.sims import bragg
from caldera.train.output import pyplot, save_figure
from caldera.train.run import load_runs, spread

SEED = 2024  # patches the run never saw (it trains on its seed and validates on seed + 1)
INTENSITIES = (100, 200, 400, 800, 1600, 3000)  # peak heights in photons for the sweep
# --smoke: a few patches.
SMOKE = {"patches": 60, "per_intensity": 10}
FULL = {"patches": 2000, "per_intensity": 300}


@torch.no_grad()
def locate(model: torch.nn.Module, counts: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The network's centres (n, 2) in pixels for patches (n, size, size) of counts."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(counts[:, None], dtype=np.float32))
    out = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    return out.double().numpy() * (counts.shape[-1] - 1)


def scored(pred: np.ndarray, peaks: bragg.Peaks, seconds: float | None = None) -> dict[str, Any]:
    """Pixel-error summaries of centres (n, 2): all patches, isolated peaks, peaks with a neighbour; µs per patch."""
    err = bragg.errors_px(pred, peaks.centre)
    out = {**bragg.summary(err), "isolated": bragg.summary(err[~peaks.neighbour]), "errors": err}
    if peaks.neighbour.any():
        out["with_neighbour"] = bragg.summary(err[peaks.neighbour])
    if seconds is not None:
        out["us_per_patch"] = seconds * 1e6
    return out


def compare(models: list[torch.nn.Module], peaks: bragg.Peaks) -> dict[str, Any]:
    """The fit and the centroid (once), every network (``network_runs``) and their mean and sd (``network``)."""
    fitted, fit_s = bragg.fit(peaks.counts)
    out = {"fit": scored(fitted, peaks, fit_s), "centroid": scored(bragg.centroid(peaks.counts), peaks),
           "network_runs": []}  # fmt: skip
    for model in models:
        started = time.perf_counter()
        found = locate(model, peaks.counts)
        out["network_runs"].append(scored(found, peaks, (time.perf_counter() - started) / len(peaks.counts)))
    out["network"] = spread_of(out["network_runs"])
    return out


def spread_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The same summaries as one run's, each replaced by its spread over the runs."""
    return {k: spread_of([r[k] for r in runs]) if isinstance(v, dict) else spread([r[k] for r in runs])
            for k, v in runs[0].items() if k != "errors"}  # fmt: skip


def plot_errors(result: dict, path: Path) -> Path:
    """Histograms of the pixel errors of the fit and the network (log-spaced bins)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bins = np.logspace(-3, 1, 60)
    runs = result["network_runs"]
    named = [("fit", result["fit"], "tab:orange")] + [
        (f"network, {name}" if len(runs) > 1 else "network", r, color)
        for name, r, color in zip(
            result["names"], runs, itertools.cycle(("tab:blue", "tab:cyan", "tab:purple"))
        )
    ]
    for name, r, color in named:
        ax.hist(np.clip(r["errors"], 1e-3, 10), bins=bins, histtype="step", lw=1.6 if name == "fit" else 1.0,
                color=color, label=f"{name}: median {r['median_px']:.3f} px, p95 {r['p95_px']:.3f} px")  # fmt: skip
        ax.axvline(r["p95_px"], color=color, ls=":", lw=1)
    ax.set(
        xscale="log", xlabel="centre error (pixels)", ylabel="patches", title="BraggNN vs pseudo-Voigt fit"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_intensity(rows: list[dict], path: Path) -> Path:
    """Median and 95th-percentile error against peak intensity for both (the network: mean ± sd over seeds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [r["intensity"] for r in rows]
    for key, style, what in (("median_px", "o-", "median"), ("p95_px", "s--", "95th percentile")):
        ax.plot(x, [r["fit"][key] for r in rows], style, color="tab:orange", label=f"fit, {what}")
        n = len(rows[0]["network"][key]["values"])
        ax.errorbar(x, [r["network"][key]["mean"] for r in rows], [r["network"][key]["sd"] for r in rows],
                    fmt=style, color="tab:blue", capsize=3,
                    label=f"network, {what}" + (f" (mean ± sd, {n} seeds)" if n > 1 else ""))  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="peak height (photons)", ylabel="centre error (pixels)",
           title="error against intensity")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _public(r: dict) -> dict:
    """A result without its raw per-patch errors, for the JSON file."""
    if isinstance(r, list):
        return [_public(v) if isinstance(v, dict) else v for v in r]
    return {k: _public(v) if isinstance(v, (dict, list)) else v for k, v in r.items() if k != "errors"}


def table(result: dict[str, Any], sweep: list[dict[str, Any]]) -> str:
    """Markdown: errors of each method (the network: mean ± sd over the seeds, then each seed), then per intensity."""
    n = len(result["network_runs"])
    out = ["| method | median px | p95 px | isolated peaks: median / p95 | with a neighbour: median / p95 |",
           "| --- | --- | --- | --- | --- |"]  # fmt: skip

    def cells(r: dict[str, Any], value) -> str:
        parts = [value(r["median_px"]), value(r["p95_px"]),
                 f"{value(r['isolated']['median_px'])} / {value(r['isolated']['p95_px'])}"]  # fmt: skip
        w = r.get("with_neighbour")
        parts.append(f"{value(w['median_px'])} / {value(w['p95_px'])}" if w else "")
        return " | ".join(parts)

    def plain(v: float) -> str:
        return f"{v:.4f}"

    def pm(s: dict[str, Any]) -> str:
        return f"{s['mean']:.4f} ± {s['sd']:.4f}"

    for name in ("centroid", "fit"):
        out.append(f"| {name} (does not depend on the seed) | {cells(result[name], plain)} |")
    out.append(f"| network, mean ± sd over {n} seed{'s' * (n > 1)} | {cells(result['network'], pm)} |")
    if n > 1:
        for name, r in zip(result["names"], result["network_runs"]):
            out.append(f"| network, {name} | {cells(r, plain)} |")
    out += ["", "| peak (photons) | " + " | ".join(str(r["intensity"]) for r in sweep) + " |",
            "| --- |" + " --- |" * len(sweep),
            "| fit median / p95 | " + " | ".join(f"{r['fit']['median_px']:.3f} / {r['fit']['p95_px']:.3f}"
                                                for r in sweep) + " |",
            f"| network median / p95, mean ± sd over {n} seed{'s' * (n > 1)} | " + " | ".join(
                f"{r['network']['median_px']['mean']:.3f} ± {r['network']['median_px']['sd']:.3f} / "
                f"{r['network']['p95_px']['mean']:.3f} ± {r['network']['p95_px']['sd']:.3f}" for r in sweep) + " |"]  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    """Evaluate the run directories given on the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="*", default=["runs/bragg"], help="one per training seed")
    p.add_argument("--out", type=Path, help="where the results go (default: the first run directory)")
    p.add_argument("--smoke", action="store_true", help="seconds: a few patches (the test suite runs this)")
    args = p.parse_args()
    s = SMOKE if args.smoke else FULL
    out = args.out or Path(args.run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)

    def patch_settings(cfg: Config) -> dict:
        a = cfg.data.args
        return {"size": a.get("size", bragg.SIZE), "intensity": a.get("intensity", bragg.INTENSITY),
                "neighbours": a.get("neighbours", bragg.NEIGHBOURS), "slope": a.get("slope", bragg.SLOPE)}  # fmt: skip

    try:
        models, cfgs = load_runs(args.run_dirs, patch_settings)
    except ConfigError as exc:
        p.error(str(exc))
    data = patch_settings(cfgs[0])
    size, neighbours, intensity, slope = data["size"], data["neighbours"], data["intensity"], data["slope"]
    result = compare(models, bragg.patches(s["patches"], size, intensity, neighbours, slope, seed=SEED))
    result["names"] = [Path(r).name for r in args.run_dirs]
    sweep = [{"intensity": i, **_public(compare(
        models, bragg.patches(s["per_intensity"], size, i, neighbours, slope, seed=SEED + 1)))}
        for i in INTENSITIES]  # fmt: skip
    body = {"runs": args.run_dirs, "patches": s["patches"], "seed": SEED, **_public(result),
            "intensity_sweep": sweep}  # fmt: skip
    atomic_write_text(out / "evaluation.json", json.dumps(body, indent=2))
    plot_errors(result, out / "bragg_errors.png")
    plot_intensity(sweep, out / "bragg_intensity.png")
    text = table(result, sweep)
    atomic_write_text(out / "bragg_table.md", text)
    print(text)
    t = result["network"]["us_per_patch"]
    print(f"µs per patch: fit {result['fit']['us_per_patch']:.1f}, network {t['mean']:.1f} ± {t['sd']:.1f}")
    print(f"wrote {out / 'evaluation.json'}, bragg_table.md, bragg_errors.png, bragg_intensity.png")


if __name__ == "__main__":
    main()
