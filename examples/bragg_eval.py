"""Score a trained BraggNN against the classical pseudo-Voigt fit on fresh patches: centre errors in pixels (median,
95th percentile), with and without a neighbouring peak, against peak intensity, and the time per patch of each.

    caldera train examples/bragg.toml          # trains, writes runs/bragg/
    python examples/bragg_eval.py              # this script: evaluation.json, bragg_errors.png, bragg_intensity.png
Smoke run (seconds, after bragg.toml's smoke run): python examples/bragg_eval.py runs/bragg --smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from caldera.config import load_config
from caldera.io import atomic_write_text
from caldera.sims import bragg
from caldera.train.output import pyplot, save_figure
from caldera.train.run import load_run_model
from caldera.train.rundir import RunDir

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


def compare(model: torch.nn.Module, peaks: bragg.Peaks) -> dict[str, dict[str, float]]:
    """Pixel errors and µs per patch of the fit, the network and the centroid on the same patches."""
    fitted, fit_s = bragg.fit(peaks.counts)
    started = time.perf_counter()
    found = locate(model, peaks.counts)
    nn_s = (time.perf_counter() - started) / len(peaks.counts)
    out = {}
    for name, pred, seconds in (("fit", fitted, fit_s), ("network", found, nn_s),
                                ("centroid", bragg.centroid(peaks.counts), None)):  # fmt: skip
        err = bragg.errors_px(pred, peaks.centre)
        out[name] = {**bragg.summary(err), "isolated": bragg.summary(err[~peaks.neighbour]),
                     "errors": err, **({"us_per_patch": seconds * 1e6} if seconds else {})}  # fmt: skip
        if peaks.neighbour.any():
            out[name]["with_neighbour"] = bragg.summary(err[peaks.neighbour])
    return out


def plot_errors(result: dict, path: Path) -> Path:
    """Histograms of the pixel errors of the fit and the network (log-spaced bins)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bins = np.logspace(-3, 1, 60)
    for name, color in (("fit", "tab:orange"), ("network", "tab:blue")):
        r = result[name]
        ax.hist(np.clip(r["errors"], 1e-3, 10), bins=bins, histtype="step", lw=1.6, color=color,
                label=f"{name}: median {r['median_px']:.3f} px, p95 {r['p95_px']:.3f} px")  # fmt: skip
        ax.axvline(r["p95_px"], color=color, ls=":", lw=1)
    ax.set(
        xscale="log", xlabel="centre error (pixels)", ylabel="patches", title="BraggNN vs pseudo-Voigt fit"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_intensity(rows: list[dict], path: Path) -> Path:
    """Median and 95th-percentile error against peak intensity for both."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [r["intensity"] for r in rows]
    for name, color in (("fit", "tab:orange"), ("network", "tab:blue")):
        ax.plot(x, [r[name]["median_px"] for r in rows], "o-", color=color, label=f"{name}, median")
        ax.plot(x, [r[name]["p95_px"] for r in rows], "s--", color=color, label=f"{name}, 95th percentile")
    ax.set(xscale="log", yscale="log", xlabel="peak height (photons)", ylabel="centre error (pixels)",
           title="error against intensity")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "errors"}


def main() -> None:
    """Evaluate the run directory given on the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", default="runs/bragg")
    p.add_argument("--smoke", action="store_true", help="seconds: a few patches (the test suite runs this)")
    args = p.parse_args()
    s = SMOKE if args.smoke else FULL
    run_dir = Path(args.run_dir)
    files = RunDir(run_dir)
    cfg = load_config(files.read_config())  # refuses code the run directory names (docs/security.md)
    model = load_run_model(files, cfg)
    a = cfg.data.args
    size, neighbours = a.get("size", bragg.SIZE), a.get("neighbours", bragg.NEIGHBOURS)
    intensity, slope = a.get("intensity", bragg.INTENSITY), a.get("slope", bragg.SLOPE)
    result = compare(model, bragg.patches(s["patches"], size, intensity, neighbours, slope, seed=SEED))
    sweep = [{"intensity": i, **{k: _public(v) for k, v in compare(
        model, bragg.patches(s["per_intensity"], size, i, neighbours, slope, seed=SEED + 1)).items()}}
        for i in INTENSITIES]  # fmt: skip
    body = {"patches": s["patches"], "seed": SEED, **{k: _public(v) for k, v in result.items()},
            "intensity_sweep": sweep}  # fmt: skip
    atomic_write_text(run_dir / "evaluation.json", json.dumps(body, indent=2))
    plot_errors(result, run_dir / "bragg_errors.png")
    plot_intensity(sweep, run_dir / "bragg_intensity.png")
    for name in ("fit", "network", "centroid"):
        r = result[name]
        t = f", {r['us_per_patch']:.1f} µs/patch" if "us_per_patch" in r else ""
        print(f"{name:<9} median {r['median_px']:.4f} px  p95 {r['p95_px']:.4f} px  (isolated peaks: median "
              f"{r['isolated']['median_px']:.4f}, p95 {r['isolated']['p95_px']:.4f}){t}")  # fmt: skip
    for r in sweep:
        print(f"peak {r['intensity']:>5} photons: fit median {r['fit']['median_px']:.4f} p95 {r['fit']['p95_px']:.4f}"
              f" | network median {r['network']['median_px']:.4f} p95 {r['network']['p95_px']:.4f}")  # fmt: skip
    print(f"wrote {run_dir / 'evaluation.json'}, bragg_errors.png, bragg_intensity.png")


if __name__ == "__main__":
    main()
