"""Score a trained low-dose denoiser on whole held-out images: PSNR of the noisy input, of the best Gaussian
filter and of the network; a figure of one image; PSNR against dose for a network trained at one dose.

    caldera train examples/imaging_denoise.toml        # trains, writes runs/imaging-denoise/
    python examples/imaging_denoise.py                  # this script: evaluation.json and two PNGs there
Smoke run (seconds, after imaging_denoise.toml's smoke run): python examples/imaging_denoise.py runs/imaging-denoise --smoke
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from caldera.config import load_config
from caldera.io import atomic_write_text
from caldera.sims.phantoms import gaussian_baseline, gaussian_blur, generate, psnr_np
from caldera.train.output import pyplot, save_figure
from caldera.train.run import load_run_model
from caldera.train.rundir import RunDir

DOSES = (2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
SWEEP_IMAGES = 64
# --smoke: the dose sweep at two doses on a few images.
SMOKE = {"doses": (5.0, 40.0), "sweep_images": 8}


@torch.no_grad()
def restore(model: torch.nn.Module, noisy: np.ndarray, batch: int = 32) -> np.ndarray:
    """Run the network over whole images (n, H, W) in batches."""
    model.eval()
    parts = [
        model(torch.from_numpy(noisy[i : i + batch, None])).numpy()[:, 0] for i in range(0, len(noisy), batch)
    ]
    return np.concatenate(parts)


def held_out(cfg, run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The validation images of the run: the last val_fraction of the stack, as the data pipeline split it."""
    path = Path(cfg.data.args.get("path") or run_dir / "phantoms.h5")
    with h5py.File(path, "r") as f:
        n = len(f["noisy"])
        start = n - int(n * cfg.data.val_fraction)
        return f["noisy"][start:], f["clean"][start:]


def scores(model: torch.nn.Module, noisy: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """PSNR (dB) of the noisy images, the best Gaussian filter and the network, against the clean objects."""
    sigma, gauss = gaussian_baseline(noisy, clean)
    return {"noisy": psnr_np(noisy, clean), "gaussian": gauss, "gaussian_sigma": sigma,
            "network": psnr_np(restore(model, noisy), clean)}  # fmt: skip


def plot_example(model, noisy, clean, sigma, path: Path) -> Path:
    """Noisy / Gaussian / network / clean / network error for the first held-out image."""
    plt = pyplot()
    x, y = noisy[:1], clean[:1]
    panels = [(x[0], f"noisy ({psnr_np(x, y):.1f} dB)"),
              (gaussian_blur(x, sigma)[0], f"Gaussian σ={sigma:g} ({psnr_np(gaussian_blur(x, sigma), y):.1f} dB)"),
              (restore(model, x)[0], f"U-Net ({psnr_np(restore(model, x), y):.1f} dB)"), (y[0], "clean object")]  # fmt: skip
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    err = axes[4].imshow(panels[2][0] - y[0], cmap="coolwarm", vmin=-0.3, vmax=0.3)
    axes[4].set_title("U-Net - clean")
    axes[4].axis("off")
    fig.colorbar(err, ax=axes[4], fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_dose(rows: list[dict[str, float]], train_dose: float, path: Path) -> Path:
    """PSNR against dose for the three restorations."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    doses = [r["dose"] for r in rows]
    for key, label in (("network", "U-Net (trained at one dose)"), ("gaussian", "best Gaussian filter"),
                       ("noisy", "noisy input")):  # fmt: skip
        ax.plot(doses, [r[key] for r in rows], marker="o", label=label)
    ax.axvline(train_dose, color="k", ls=":", lw=1, label=f"training dose {train_dose:g}")
    ax.set(xscale="log", xlabel="dose (photons per pixel at full intensity)", ylabel="PSNR (dB)",
           title="restoration quality vs dose")  # fmt: skip
    ax.set_xticks(doses, [f"{d:g}" for d in doses])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    """Evaluate the run directory given on the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", default="runs/imaging-denoise")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args()
    vars(args).update(SMOKE if args.smoke else {"doses": DOSES, "sweep_images": SWEEP_IMAGES})
    run_dir = Path(args.run_dir)
    files = RunDir(run_dir)
    cfg = load_config(files.read_config())  # refuses code the run directory names (docs/security.md)
    model = load_run_model(files, cfg)
    noisy, clean = held_out(cfg, run_dir)
    result = {"held_out": {"images": len(noisy), **scores(model, noisy, clean)}}
    a = cfg.data.args
    size, blur, dose = a.get("size", 64), a.get("blur", 0.7), a.get("dose", 10.0)
    # Fresh objects (another seed) at each dose: the network saw neither these images nor these doses.
    result["dose_sweep"] = [
        {"dose": d, **scores(model, *generate(args.sweep_images, size, d, blur, seed=12345))}
        for d in args.doses
    ]
    atomic_write_text(run_dir / "evaluation.json", json.dumps(result, indent=2))
    plot_example(
        model, noisy, clean, result["held_out"]["gaussian_sigma"], run_dir / "imaging_restoration.png"
    )
    plot_dose(result["dose_sweep"], dose, run_dir / "imaging_dose.png")
    h = result["held_out"]
    print(f"{h['images']} held-out images: noisy {h['noisy']:.2f} dB, best Gaussian (sigma {h['gaussian_sigma']:g} px)"
          f" {h['gaussian']:.2f} dB, U-Net {h['network']:.2f} dB")  # fmt: skip
    for r in result["dose_sweep"]:
        print(
            f"dose {r['dose']:5g}: noisy {r['noisy']:.2f}  Gaussian {r['gaussian']:.2f}  U-Net {r['network']:.2f} dB"
        )
    print(f"wrote {run_dir / 'evaluation.json'}, imaging_restoration.png, imaging_dose.png")


if __name__ == "__main__":
    main()
