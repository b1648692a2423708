"""Metrics: each maps (prediction, target) to a batch mean; the trainer weights by batch size and reduces
the sums over ranks so every rank reports the metric of the whole dataset."""

from __future__ import annotations

from collections.abc import Callable

import torch

from caldera.names import METRICS as METRICS  # the table of built-in names

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose arg-max class equals the target."""
    return (pred.argmax(dim=-1) == target).float().mean()


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    return (pred - target).abs().mean()


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error of the batch."""
    return ((pred - target) ** 2).mean().sqrt()


def rel_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ||pred - target|| / ||target|| (the usual surrogate-model error)."""
    diff = (pred - target).flatten(1).norm(dim=1)
    return (diff / target.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()


def psnr(pred: torch.Tensor, target: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample (``peak``: the largest true value), averaged over the batch."""
    mse = ((pred - target) ** 2).flatten(1).mean(dim=1)
    return (10 * torch.log10(peak**2 / mse.clamp_min(1e-12))).mean()


HIGHER_IS_BETTER = ("accuracy", "psnr")


def mode(name: str) -> str:
    """``"max"`` for a metric column where higher is better (``val_accuracy``, ``val_psnr``), else ``"min"``."""
    return "max" if name.endswith(HIGHER_IS_BETTER) else "min"
