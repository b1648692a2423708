"""Score trained focus networks and the two classical focus measures on real photographs blurred by known amounts;
with several runs (one per training seed), the networks' mean and spread over them.

    caldera train examples/focus.toml          # seed 0: trains, writes runs/focus/
    caldera train examples/focus.toml --set run.seed=1 --set run.dir=runs/focus-s1   # etc.
    python examples/focus_eval.py runs/focus runs/focus-s1 runs/focus-s2 --out runs/focus-seeds
Smoke run (seconds, after focus.toml's smoke run): python examples/focus_eval.py runs/focus --smoke

The photographs are the ones shipped inside the scikit-image wheel (no download; pip install scikit-image). Each
is cropped to at most 512x512, blurred with the training set's pillbox at each true radius, exposed at one dose,
cut into 64x64 tiles, and scored by the mean of its tiles' estimates. The classical measures (variance of the
Laplacian; Sobel gradient energy at three scales) are calibrated on the runs' own training patches: the data
(``data.args``) must be the same for every run, so they do not depend on the training seed. Writes
focus_evaluation.json, focus_table.md and focus_eval.png into --out (default: the first run directory).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.config import Config
from caldera.errors import ConfigError
from caldera.io import atomic_write_text
from caldera.sims.focus import THRESHOLD, Calibration, defocus, expose, generate, scores, tiles
from caldera.train.output import pyplot, save_figure
from caldera.train.run import load_runs, spread

# Bundled in the scikit-image wheel (the others in skimage.data need pooch and a download).
GRAY = ("camera", "coins", "moon", "text", "page", "brick", "grass", "gravel", "cell", "clock")
COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
RADII = tuple(np.arange(0.0, 6.01, 0.5))
DOSE = 150.0  # electrons per pixel at intensity 1: inside the training range
CALIBRATION_PATCHES = 2048
METHODS = ("cnn", "laplacian", "gradient")
LABELS = {
    "cnn": "CNN (FocusNet)",
    "laplacian": "variance of Laplacian",
    "gradient": "multi-scale gradient energy",
}
# --smoke: three images, three radii, small crops.
SMOKE = {"images": ("camera", "coins", "text"), "radii": (0.0, 2.0, 4.0), "crop": 128, "calibration": 256}


def photographs(names: tuple[str, ...], crop: int) -> dict[str, np.ndarray]:
    """The named scikit-image photographs as grayscale float images in [0, 1], centre-cropped to ``crop``."""
    try:
        from skimage import color, data
    except ImportError:
        raise SystemExit(
            "focus_eval.py needs scikit-image: pip install scikit-image (or 'caldera[science]')"
        ) from None
    out = {}
    for name in names:
        img = getattr(data, name)()
        img = color.rgb2gray(img[..., :3]) if img.ndim == 3 else img / 255.0
        h, w = img.shape
        top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        out[name] = np.asarray(img[top : top + crop, left : left + crop], dtype=np.float64)
    return out


@torch.no_grad()
def cnn_estimate(model: torch.nn.Module, patches: np.ndarray, batch: int = 256) -> np.ndarray:
    """The network's defocus estimate (px) of each patch (n, H, W)."""
    model.eval()
    x = torch.from_numpy(np.asarray(patches, dtype=np.float32)[:, None])
    return (
        torch.cat([model(x[i : i + batch])[:, 0] for i in range(0, len(x), batch)]).numpy().astype(np.float64)
    )


def real_tiles(images: dict[str, np.ndarray], radii, size: int) -> list[tuple[str, float, np.ndarray]]:
    """(image name, true radius, its 64x64 tiles) for every image blurred at every radius and exposed."""
    return [(name, float(r), tiles(expose(defocus(img, r), DOSE, seed=[i, j]), size))
            for i, (name, img) in enumerate(images.items()) for j, r in enumerate(radii)]  # fmt: skip


def evaluate_real(fn, rows: list[tuple[str, float, np.ndarray]]) -> dict[str, Any]:
    """One method's estimate of every (image, radius), its MAE and accuracy, and images/s (estimation only)."""
    fn(rows[0][2])  # warm up (first-call allocations, torch's thread pool)
    start = time.perf_counter()
    est = [float(fn(t).mean()) for _, _, t in rows]
    seconds = time.perf_counter() - start
    pixels = sum(t.size for _, _, t in rows)
    return {"estimate": est, **scores(est, [r for _, r, _ in rows]), "images_per_s": len(rows) / seconds,
            "megapixels_per_s": pixels / seconds / 1e6}  # fmt: skip


def per_image_mae(result: dict[str, Any], estimate: list[float]) -> dict[str, float]:
    """MAE (px) over the radii of each photograph."""
    truth, names = np.array(result["truth"]), np.array(result["image"])
    err = np.abs(np.array(estimate) - truth)
    return {name: float(err[names == name].mean()) for name in dict.fromkeys(result["image"])}


def plot(result: dict, path: Path) -> Path:
    """Estimated against true defocus, one panel per method: every image (dots; the first run's for the CNN) and
    the mean over images (one line per run for the CNN)."""
    plt = pyplot()
    truth = np.array(result["truth"])
    radii = np.unique(truth)
    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 4.6), sharey=True)
    for ax, method in zip(axes, METHODS):
        runs = result["cnn_runs"] if method == "cnn" else [result[method]]
        est = np.array(runs[0]["estimate"])
        ax.scatter(truth + np.random.default_rng(0).uniform(-0.1, 0.1, len(truth)), est, s=8, alpha=0.5)
        for k, run in enumerate(runs):
            e = np.array(run["estimate"])
            ax.plot(radii, [e[truth == t].mean() for t in radii], "-o", color="k", alpha=1.0 if k == 0 else 0.5,
                    ms=3, lw=1, label="mean over images" + (" (one line per seed)" if len(runs) > 1 else ""))  # fmt: skip
        ax.plot([0, radii.max()], [0, radii.max()], color="grey", ls="--", lw=1, label="ideal")
        ax.axhline(THRESHOLD, color="r", ls=":", lw=1)
        ax.axvline(THRESHOLD, color="r", ls=":", lw=1, label=f"in/out threshold {THRESHOLD:g} px")
        if len(runs) > 1:
            s = result["cnn"]
            title = (f"MAE {s['mae_px']['mean']:.2f} ± {s['mae_px']['sd']:.2f} px, accuracy "
                     f"{s['accuracy']['mean']:.0%} ± {s['accuracy']['sd']:.0%} ({len(runs)} seeds)")  # fmt: skip
        else:
            title = f"MAE {runs[0]['mae_px']:.2f} px, accuracy {runs[0]['accuracy']:.0%}"
        ax.set(title=f"{LABELS[method]}\n{title}", xlabel="true defocus radius (px)")
    axes[0].set_ylabel("estimated defocus radius (px)")
    handles, labels = axes[0].get_legend_handles_labels()
    keep = dict(zip(labels, handles))  # one legend entry per label (the CNN has a line per seed)
    axes[0].legend(keep.values(), keep.keys(), loc="upper left", fontsize=8)
    fig.suptitle(f"{len(set(result['image']))} scikit-image photographs, pillbox blur, dose {DOSE:g}")
    fig.tight_layout()
    return save_figure(fig, path)


def table(result: dict[str, Any]) -> str:
    """Markdown: the methods on real photographs and synthetic validation patches (the CNN: mean ± sd over the
    seeds and each seed's value), then the MAE per photograph."""
    real, synth = result["real"], result["synthetic_val"]
    n = len(real["cnn_runs"])
    out = [f"| method | real photographs: MAE (px) | accuracy (in/out at {THRESHOLD:g} px) | images/s | "
           "synthetic validation: MAE (px) | accuracy |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    c, cs = real["cnn"], synth["cnn"]
    out.append(f"| {LABELS['cnn']}, mean ± sd over {n} seed{'s' * (n > 1)} | **{c['mae_px']['mean']:.2f}** ± "
               f"{c['mae_px']['sd']:.2f} | **{c['accuracy']['mean']:.1%}** ± {c['accuracy']['sd']:.1%} | "
               f"{c['images_per_s']['mean']:.1f} | **{cs['mae_px']['mean']:.2f}** ± {cs['mae_px']['sd']:.2f} | "
               f"**{cs['accuracy']['mean']:.1%}** ± {cs['accuracy']['sd']:.1%} |")  # fmt: skip
    if n > 1:
        out.append(f"| {LABELS['cnn']}, per seed | {', '.join(f'{v:.2f}' for v in c['mae_px']['values'])} | "
                   f"{', '.join(f'{v:.1%}' for v in c['accuracy']['values'])} | "
                   f"{', '.join(f'{v:.1f}' for v in c['images_per_s']['values'])} | "
                   f"{', '.join(f'{v:.2f}' for v in cs['mae_px']['values'])} | "
                   f"{', '.join(f'{v:.1%}' for v in cs['accuracy']['values'])} |")  # fmt: skip
    for m in METHODS[1:]:
        out.append(f"| {LABELS[m]} (does not depend on the seed) | {real[m]['mae_px']:.2f} | "
                   f"{real[m]['accuracy']:.1%} | {real[m]['images_per_s']:.0f} | {synth[m]['mae_px']:.2f} | "
                   f"{synth[m]['accuracy']:.1%} |")  # fmt: skip
    out += ["", f"MAE per photograph (px): CNN (mean ± sd over {n} seed{'s' * (n > 1)}) / gradient energy / "
                "variance of the Laplacian", "", "| image | CNN | gradient energy | Laplacian |",
            "| --- | --- | --- | --- |"]  # fmt: skip
    for name, cnn in real["per_image_mae"]["cnn"].items():
        out.append(f"| {name} | {cnn['mean']:.2f} ± {cnn['sd']:.2f} | {real['per_image_mae']['gradient'][name]:.2f}"
                   f" | {real['per_image_mae']['laplacian'][name]:.2f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    """Evaluate the run directories given on the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="*", default=["runs/focus"], help="one per training seed")
    p.add_argument("--out", type=Path, help="where the results go (default: the first run directory)")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args()
    vars(args).update(SMOKE if args.smoke else {"images": GRAY + COLOUR, "radii": RADII, "crop": 512,
                                                "calibration": CALIBRATION_PATCHES})  # fmt: skip
    out = args.out or Path(args.run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)

    def data_settings(cfg: Config) -> dict:
        return {**cfg.data.args, "val_fraction": cfg.data.val_fraction}

    try:
        models, cfgs = load_runs(args.run_dirs, data_settings)
    except ConfigError as exc:
        p.error(str(exc))
    data = data_settings(cfgs[0])
    size, r_max = data.get("size", 64), data.get("r_max", 6.0)
    dose = (data.get("dose_min", 50.0), data.get("dose_max", 500.0))
    n, seed = data.get("n", 4096), data.get("seed", 0)
    n_val = int(n * data["val_fraction"])
    # Calibrate on the runs' training patches; score on their held-out ones (the same seeded set the runs saw:
    # the data source's seed, not the training seed).
    x_cal, r_cal = generate(min(args.calibration, n - n_val), size, r_max, dose, seed)
    calibrations = {m: Calibration.fit(m, x_cal, r_cal) for m in ("laplacian", "gradient")}
    x_val, r_val = generate(n_val, size, r_max, dose, seed, start=n - n_val)
    rows = real_tiles(photographs(args.images, args.crop), args.radii, size)
    real = {"truth": [r for _, r, _ in rows], "image": [name for name, _, _ in rows]}
    synth: dict[str, Any] = {"patches": n_val}
    for m, c in calibrations.items():
        real[m], synth[m] = evaluate_real(c.predict, rows), scores(c.predict(x_val), r_val)
    real["cnn_runs"] = [evaluate_real(lambda t, m=model: cnn_estimate(m, t), rows) for model in models]
    synth["cnn_runs"] = [scores(cnn_estimate(model, x_val), r_val) for model in models]
    real["cnn"] = {
        k: spread([r[k] for r in real["cnn_runs"]]) for k in ("mae_px", "accuracy", "images_per_s")
    }
    synth["cnn"] = {k: spread([r[k] for r in synth["cnn_runs"]]) for k in ("mae_px", "accuracy")}
    cnn_per_image = [per_image_mae(real, r["estimate"]) for r in real["cnn_runs"]]
    real["per_image_mae"] = {"cnn": {name: spread([p[name] for p in cnn_per_image]) for name in cnn_per_image[0]},
                             **{m: per_image_mae(real, real[m]["estimate"]) for m in calibrations}}  # fmt: skip
    result = {"runs": args.run_dirs, "synthetic_val": synth, "real": real}
    result["settings"] = {"dose": DOSE, "threshold_px": THRESHOLD, "crop": args.crop, "tile": size,
                          "torch_threads": torch.get_num_threads(), "calibration_patches": len(x_cal)}  # fmt: skip
    atomic_write_text(out / "focus_evaluation.json", json.dumps(result, indent=2))
    plot(real, out / "focus_eval.png")
    text = table(result)
    atomic_write_text(out / "focus_table.md", text)
    print(f"{len(real['truth'])} blurred photographs ({len(args.images)} images x {len(args.radii)} radii), "
          f"synthetic validation {n_val} patches:\n")  # fmt: skip
    print(text)
    print(f"wrote {out / 'focus_evaluation.json'}, focus_table.md, focus_eval.png")


if __name__ == "__main__":
    main()
