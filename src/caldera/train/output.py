"""The run's figures: learning curve and predictions as PNG, written atomically (rank 0; files: train.rundir)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from caldera.io import atomic_write


def plot_learning_curve(rows: list[dict[str, float]], path: Path) -> Path:
    """Plot every loss and metric against the epoch (log scale for losses)."""
    plt = pyplot()
    keys = [k for k in rows[0] if k not in ("epoch", "time_s", "lr")]
    losses = [k for k in keys if "loss" in k]
    others = [k for k in keys if k not in losses]
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(5 + 5 * bool(others), 4), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for k in losses:
        axes[0, 0].plot(epochs, [r.get(k) for r in rows], marker="o", label=k)
    axes[0, 0].set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    axes[0, 0].legend()
    if others:
        for k in others:
            axes[0, 1].plot(epochs, [r.get(k) for r in rows], marker="o", label=k)
        axes[0, 1].set(xlabel="epoch", title="metrics")
        axes[0, 1].legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_predictions(
    inputs: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, path: Path
) -> Path | None:
    """Plot prediction vs. ground truth: fields side by side for grids, a scatter for everything else."""
    plt = pyplot()
    if target.dim() == 4 and target.shape[1] == 1:
        n = min(3, target.shape[0])
        fig, axes = plt.subplots(n, 4, figsize=(13, 3.2 * n), squeeze=False)
        for i in range(n):
            t, p = target[i, 0].numpy(), pred[i, 0].numpy()
            lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
            panels = [(inputs[i, 0].numpy(), "input (channel 0)", None), (t, "ground truth", (lo, hi)),
                      (p, "prediction", (lo, hi)), (p - t, "error", None)]  # fmt: skip
            for ax, (img, title, lim) in zip(axes[i], panels):
                im = ax.imshow(img, cmap="coolwarm" if title == "error" else "inferno",
                               vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)  # fmt: skip
                ax.set_title(title)
                ax.axis("off")
                fig.colorbar(im, ax=ax, fraction=0.046)
    elif target.is_floating_point():
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        t, p = target.flatten().numpy(), pred.flatten().numpy()
        ax.scatter(t, p, s=4, alpha=0.5)
        ax.plot([t.min(), t.max()], [t.min(), t.max()], "k--", lw=1)
        ax.set(xlabel="ground truth", ylabel="prediction", title="prediction vs. ground truth")
    else:
        return None  # class labels: the accuracy curve says it better than a picture
    fig.tight_layout()
    return save_figure(fig, path)


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` atomically in the format of ``path``'s suffix, and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))
