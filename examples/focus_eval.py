"""Score a trained focus network and the two classical focus measures on real photographs blurred by known amounts.

    caldera train examples/focus.toml          # trains, writes runs/focus/
    python examples/focus_eval.py               # this script: focus_evaluation.json and focus_eval.png there
Smoke run (seconds, after focus.toml's smoke run): python examples/focus_eval.py runs/focus --smoke

The photographs are the ones shipped inside the scikit-image wheel (no download; pip install scikit-image). Each
is cropped to at most 512x512, blurred with the training set's pillbox at each true radius, exposed at one dose,
cut into 64x64 tiles, and scored by the mean of its tiles' estimates. The classical measures (variance of the
Laplacian; Sobel gradient energy at three scales) are calibrated on the run's own training patches.
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
from caldera.sims.focus import THRESHOLD, Calibration, defocus, expose, generate, scores, tiles
from caldera.train.output import pyplot, save_figure
from caldera.train.run import load_run_model
from caldera.train.rundir import RunDir

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


def estimators(model, calibrations):
    """Method name -> function from patches (n, H, W) to defocus estimates (n,)."""
    return {"cnn": lambda p: cnn_estimate(model, p), **{m: c.predict for m, c in calibrations.items()}}


def evaluate_real(estimate, images: dict[str, np.ndarray], radii, size: int) -> dict:
    """Per method: the estimate of every (image, radius), MAE and accuracy, and images/s (estimation only)."""
    rows = []
    for i, (name, img) in enumerate(images.items()):
        for j, r in enumerate(radii):
            rows.append((name, float(r), tiles(expose(defocus(img, r), DOSE, seed=[i, j]), size)))
    out = {"truth": [r for _, r, _ in rows], "image": [n for n, _, _ in rows]}
    for method, fn in estimate.items():
        fn(rows[0][2])  # warm up (first-call allocations, torch's thread pool)
        start = time.perf_counter()
        est = [float(fn(t).mean()) for _, _, t in rows]
        seconds = time.perf_counter() - start
        pixels = sum(t.size for _, _, t in rows)
        out[method] = {"estimate": est, **scores(est, out["truth"]), "images_per_s": len(rows) / seconds,
                       "megapixels_per_s": pixels / seconds / 1e6}  # fmt: skip
    return out


def plot(result: dict, path: Path) -> Path:
    """Estimated against true defocus, one panel per method: every image (dots) and the mean over images."""
    plt = pyplot()
    truth = np.array(result["truth"])
    radii = np.unique(truth)
    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 4.6), sharey=True)
    for ax, method in zip(axes, METHODS):
        r = result[method]
        est = np.array(r["estimate"])
        ax.scatter(truth + np.random.default_rng(0).uniform(-0.1, 0.1, len(truth)), est, s=8, alpha=0.5)
        ax.plot(radii, [est[truth == t].mean() for t in radii], "k-o", ms=3, label="mean over images")
        ax.plot([0, radii.max()], [0, radii.max()], color="grey", ls="--", lw=1, label="ideal")
        ax.axhline(THRESHOLD, color="r", ls=":", lw=1)
        ax.axvline(THRESHOLD, color="r", ls=":", lw=1, label=f"in/out threshold {THRESHOLD:g} px")
        ax.set(title=f"{LABELS[method]}\nMAE {r['mae_px']:.2f} px, accuracy {r['accuracy']:.0%}",
               xlabel="true defocus radius (px)")  # fmt: skip
    axes[0].set_ylabel("estimated defocus radius (px)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{len(set(result['image']))} scikit-image photographs, pillbox blur, dose {DOSE:g}")
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    """Evaluate the run directory given on the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", default="runs/focus")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args()
    vars(args).update(SMOKE if args.smoke else {"images": GRAY + COLOUR, "radii": RADII, "crop": 512,
                                                "calibration": CALIBRATION_PATCHES})  # fmt: skip
    run_dir = Path(args.run_dir)
    files = RunDir(run_dir)
    cfg = load_config(files.read_config())  # refuses code the run directory names (docs/security.md)
    model = load_run_model(files, cfg)
    a = cfg.data.args
    size, r_max = a.get("size", 64), a.get("r_max", 6.0)
    dose = (a.get("dose_min", 50.0), a.get("dose_max", 500.0))
    n = a.get("n", 4096)
    n_val = int(n * cfg.data.val_fraction)
    # Calibrate on the run's training patches; score on its held-out ones (the same seeded set the run saw).
    x_cal, r_cal = generate(min(args.calibration, n - n_val), size, r_max, dose, cfg.run.seed)
    calibrations = {m: Calibration.fit(m, x_cal, r_cal) for m in ("laplacian", "gradient")}
    estimate = estimators(model, calibrations)
    x_val, r_val = generate(n_val, size, r_max, dose, cfg.run.seed, start=n - n_val)
    result = {
        "synthetic_val": {"patches": n_val, **{m: scores(fn(x_val), r_val) for m, fn in estimate.items()}}
    }
    result["real"] = evaluate_real(estimate, photographs(args.images, args.crop), args.radii, size)
    result["settings"] = {"dose": DOSE, "threshold_px": THRESHOLD, "crop": args.crop, "tile": size,
                          "torch_threads": torch.get_num_threads(), "calibration_patches": len(x_cal)}  # fmt: skip
    atomic_write_text(run_dir / "focus_evaluation.json", json.dumps(result, indent=2))
    plot(result["real"], run_dir / "focus_eval.png")
    s, real = result["synthetic_val"], result["real"]
    print(f"{len(real['truth'])} blurred photographs ({len(args.images)} images x {len(args.radii)} radii), "
          f"synthetic validation {s['patches']} patches:")  # fmt: skip
    for m in METHODS:
        print(f"  {LABELS[m]:28s} real: MAE {real[m]['mae_px']:.2f} px, accuracy {real[m]['accuracy']:.1%}, "
              f"{real[m]['images_per_s']:.1f} images/s | synthetic: MAE {s[m]['mae_px']:.2f} px, "
              f"accuracy {s[m]['accuracy']:.1%}")  # fmt: skip
    print(f"wrote {run_dir / 'focus_evaluation.json'}, focus_eval.png")


if __name__ == "__main__":
    main()
