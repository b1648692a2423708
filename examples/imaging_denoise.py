"""Score trained low-dose denoisers against the classical baselines at every dose: PSNR and SSIM of the noisy
input, the best Gaussian filter, BM3D after the generalised Anscombe transform, and the network (mean and spread
over the training seeds given), the time per image of each, a figure of restored images and one of quality vs dose.

    caldera train examples/imaging_denoise.toml                      # seed 0: runs/imaging-denoise/
    caldera train examples/imaging_denoise.toml --set run.seed=1 --set run.dir=runs/imaging-denoise-s1   # etc.
    python examples/imaging_denoise.py runs/imaging-denoise runs/imaging-denoise-s1 runs/imaging-denoise-s2
Writes evaluation.json, imaging_table.md, imaging_restoration.png and imaging_dose.png into --out (default: the
first run directory). The baselines are tuned on training images (the stack's first images), scored on fresh
objects (seed 12345) that no method saw, and kept in --out/baselines.json for the next call with the same settings.
Smoke run (seconds, after imaging_denoise.toml's smoke run): python examples/imaging_denoise.py runs/imaging-denoise --smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.config import Config
from caldera.errors import ConfigError
from caldera.io import atomic_write_text
from caldera.sims.phantoms import gaussian_baseline, gaussian_blur, generate, psnr_np, with_level
from caldera.sims.restoration import bm3d_gat, ssim, tune_bm3d
from caldera.train.output import pyplot, save_figure
from caldera.train.run import load_runs, spread

SETTINGS = {"doses": [2.5, 5.0, 10.0, 20.0, 40.0, 80.0], "eval_images": 40, "eval_seed": 12345,
            "tune_images": 6, "bm3d_scales": [0.9, 1.0, 1.15, 1.3], "time_images": 4}  # fmt: skip
# --smoke: two doses, a few images, one BM3D scale.
SMOKE = {"doses": [5.0, 40.0], "eval_images": 2, "eval_seed": 12345, "tune_images": 1, "bm3d_scales": [1.0],
         "time_images": 1}  # fmt: skip
FIGURE_DOSES = (2.5, 10.0, 80.0)


@torch.no_grad()
def restore(
    model: torch.nn.Module, noisy: np.ndarray, dose: float, conditioned: bool, batch: int = 40
) -> np.ndarray:
    """Run the network over whole images (n, H, W) at ``dose`` in batches (with the noise level if it takes one)."""
    model.eval()
    x = with_level(noisy, dose) if conditioned else np.asarray(noisy, dtype=np.float32)[:, None]
    parts = [model(torch.from_numpy(x[i : i + batch])).numpy()[:, 0] for i in range(0, len(x), batch)]
    return np.concatenate(parts)


def timed(fn: Any, images: np.ndarray, *args: Any) -> tuple[Any, float]:
    """Return fn(images, *args) and the CPU time it took per image in milliseconds: CPU time, not wall time,
    so that other jobs on a shared machine do not inflate it (one thread: run with OMP_NUM_THREADS=1)."""
    t = time.process_time()
    out = fn(images, *args)
    return out, 1e3 * (time.process_time() - t) / len(images)


def baselines(s: dict[str, Any], geometry: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Noisy, Gaussian and BM3D+GAT scores per dose; parameters tuned on training images, cached in ``out``."""
    cache, key = out / "baselines.json", {k: v for k, v in {**s, **geometry}.items() if k != "time_images"}
    if cache.exists() and (old := json.loads(cache.read_text())).get("settings") == key:
        return old["doses"]
    rows = []
    size, blur, seed = geometry["size"], geometry["blur"], geometry["stack_seed"]
    for dose in s["doses"]:
        tn, tc = generate(s["tune_images"], size, dose, blur, seed)  # the stack's first (training) objects
        sigma, _ = gaussian_baseline(tn, tc)
        scale, _ = tune_bm3d(tn, tc, dose, s["bm3d_scales"])
        noisy, clean = generate(s["eval_images"], size, dose, blur, s["eval_seed"])
        gauss, bm3d = gaussian_blur(noisy, sigma), bm3d_gat(noisy, dose, scale)
        rows.append({"dose": dose, "noisy": {"psnr": psnr_np(noisy, clean), "ssim": ssim(noisy, clean)},
                     "gaussian": {"sigma": sigma, "psnr": psnr_np(gauss, clean), "ssim": ssim(gauss, clean)},
                     "bm3d": {"scale": scale, "psnr": psnr_np(bm3d, clean), "ssim": ssim(bm3d, clean)}})  # fmt: skip
        print(f"dose {dose:g}: Gaussian sigma {sigma:g} {rows[-1]['gaussian']['psnr']:.2f} dB, BM3D+GAT scale "
              f"{scale:g} {rows[-1]['bm3d']['psnr']:.2f} dB", flush=True)  # fmt: skip
    atomic_write_text(cache, json.dumps({"settings": key, "doses": rows}, indent=2))
    return rows


def plot_examples(models: list, s: dict[str, Any], geometry: dict[str, Any], rows: list, path: Path) -> Path:
    """Noisy / Gaussian / BM3D+GAT / network (first seed) / clean, for the first evaluation image at three doses."""
    plt = pyplot()
    doses = [d for d in FIGURE_DOSES if d in s["doses"]] or s["doses"][:1]
    fig, axes = plt.subplots(len(doses), 5, figsize=(15, 3.2 * len(doses)), squeeze=False)
    model, conditioned = models[0]
    for ax_row, dose in zip(axes, doses):
        row = next(r for r in rows if r["dose"] == dose)
        x, y = generate(1, geometry["size"], dose, geometry["blur"], s["eval_seed"])
        panels = [(x, f"noisy, dose {dose:g}"), (gaussian_blur(x, row["gaussian"]["sigma"]), "Gaussian"),
                  (bm3d_gat(x, dose, row["bm3d"]["scale"]), "BM3D+GAT"),
                  (restore(model, x, dose, conditioned), "U-Net")]  # fmt: skip
        for ax, (img, title) in zip(ax_row, panels):
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title} ({psnr_np(img, y):.1f} dB)" if title != panels[0][1] else title)
        ax_row[4].imshow(y[0], cmap="gray", vmin=0, vmax=1)
        ax_row[4].set_title("clean object")
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_dose(rows: list[dict[str, Any]], seeds: int, path: Path) -> Path:
    """PSNR and SSIM against dose for every method (the network: mean and sd over seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    doses = [r["dose"] for r in rows]
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for key, label in (("noisy", "noisy input"), ("gaussian", "Gaussian filter (tuned)"),
                           ("bm3d", "BM3D + GAT (tuned)")):  # fmt: skip
            ax.plot(doses, [r[key][metric] for r in rows], marker="o", label=label)
        ax.errorbar(doses, [r["network"][metric]["mean"] for r in rows], [r["network"][metric]["sd"] for r in rows],
                    marker="o", capsize=3, label=f"U-Net (mean ± sd, {seeds} seed{'s' * (seeds > 1)})")  # fmt: skip
        ax.set(xscale="log", xlabel="dose (photons per pixel at full intensity)",
               ylabel="PSNR (dB)" if metric == "psnr" else "SSIM")  # fmt: skip
        ax.set_xticks(doses, [f"{d:g}" for d in doses])
        ax.minorticks_off()
    axes[0].legend()
    fig.tight_layout()
    return save_figure(fig, path)


def table(rows: list[dict[str, Any]], seeds: int) -> str:
    """Markdown tables: PSNR and SSIM per dose per method, and the time per image."""
    head = (
        "| dose | " + " | ".join(f"{r['dose']:g}" for r in rows) + " |\n|" + " --- |" * (len(rows) + 1) + "\n"
    )
    out = []
    for metric, fmt in (("psnr", "{:.2f}"), ("ssim", "{:.3f}")):
        lines = [head]
        for key, label in (("noisy", "noisy input"), ("gaussian", "Gaussian filter (sigma tuned per dose)"),
                           ("bm3d", "BM3D + GAT (scale tuned per dose)")):  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(fmt.format(r[key][metric]) for r in rows) + " |\n")
        cells = [f"**{fmt.format(r['network'][metric]['mean'])}** ± {fmt.format(r['network'][metric]['sd'])}"
                 for r in rows]  # fmt: skip
        lines.append(
            f"| U-Net, mean ± sd over {seeds} seed{'s' * (seeds > 1)} | " + " | ".join(cells) + " |\n"
        )
        out.append(f"{metric.upper()}:\n\n" + "".join(lines))
    times = [("Gaussian filter", statistics.fmean(r["gaussian"]["ms_per_image"] for r in rows)),
             ("BM3D + GAT", statistics.fmean(r["bm3d"]["ms_per_image"] for r in rows)),
             ("U-Net", statistics.fmean(r["network"]["ms_per_image"]["mean"] for r in rows))]  # fmt: skip
    out.append("CPU time per image (ms, one thread, mean over doses):\n\n| method | ms |\n| --- | --- |\n"
               + "".join(f"| {name} | {ms:.2f} |\n" for name, ms in times))  # fmt: skip
    return "\n".join(out)


def main() -> None:
    """Evaluate the run directories given on the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="*", default=["runs/imaging-denoise"], help="one per training seed")
    p.add_argument(
        "--out", type=Path, help="where the tables and figures go (default: the first run directory)"
    )
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args()
    s = SMOKE if args.smoke else SETTINGS
    out = args.out or Path(args.run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)

    def image_geometry(cfg: Config) -> dict:
        a = cfg.data.args
        return {"size": a.get("size", 64), "blur": a.get("blur", 0.7), "stack_seed": a.get("seed", 0)}

    try:
        nets, cfgs = load_runs(args.run_dirs, image_geometry)
    except ConfigError as exc:
        p.error(str(exc))
    geometry = image_geometry(cfgs[0])
    # A dose-conditioned network takes the dose as a second input channel.
    models = [(net, cfg.data.args.get("dose_range") is not None) for net, cfg in zip(nets, cfgs)]
    rows = baselines(s, geometry, out)
    for row in rows:  # timed anew each call (not cached), on the first few evaluation images
        few, _ = generate(s["time_images"], geometry["size"], row["dose"], geometry["blur"], s["eval_seed"])
        row["gaussian"]["ms_per_image"] = timed(gaussian_blur, few, row["gaussian"]["sigma"])[1]
        row["bm3d"]["ms_per_image"] = timed(bm3d_gat, few, row["dose"], row["bm3d"]["scale"])[1]
    for row in rows:
        noisy, clean = generate(
            s["eval_images"], geometry["size"], row["dose"], geometry["blur"], s["eval_seed"]
        )
        scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "ms_per_image": []}
        for model, conditioned in models:
            restored, ms = timed(functools.partial(restore, model), noisy, row["dose"], conditioned)
            scores["psnr"].append(psnr_np(restored, clean))
            scores["ssim"].append(ssim(restored, clean))
            scores["ms_per_image"].append(ms)
        row["network"] = {k: spread(v) for k, v in scores.items()}
    result = {"settings": {**s, **geometry}, "runs": args.run_dirs, "torch_threads": torch.get_num_threads(),
              "doses": rows}  # fmt: skip
    atomic_write_text(out / "evaluation.json", json.dumps(result, indent=2))
    text = table(rows, len(models))
    atomic_write_text(out / "imaging_table.md", text)
    plot_examples(models, s, geometry, rows, out / "imaging_restoration.png")
    plot_dose(rows, len(models), out / "imaging_dose.png")
    print(text)
    print(f"wrote {out / 'evaluation.json'}, imaging_table.md, imaging_restoration.png, imaging_dose.png")


if __name__ == "__main__":
    main()
