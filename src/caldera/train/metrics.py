"""Metrics: each maps (prediction, target) to a batch mean; the trainer weights by batch size and reduces
the sums over ranks so every rank reports the metric of the whole dataset."""

from __future__ import annotations

from collections.abc import Callable

import torch

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


METRICS: dict[str, Metric] = {"accuracy": accuracy, "mae": mae, "rmse": rmse, "rel_l2": rel_l2}
