"""A small CNN that estimates the defocus blur radius of an image patch (focus detection, docs/focus.md)."""

from __future__ import annotations

import torch
from torch import nn


class FocusNet(nn.Module):
    """Patch (n, 1, H, W) -> defocus radius in pixels (n, 1): a learned multi-scale energy measure.

    Each patch is standardised first (zero mean, unit std), so the estimate follows the shape of the spectrum, not
    the specimen's brightness or contrast. A full-resolution convolution sees the finest detail, then each of
    ``scales - 1`` stride-2 convolutions halves the resolution; after every one the log mean square of each
    channel (a learned band's energy, as Tenengrad is a fixed one's) goes to a small MLP. Energy pooling with a log
    matters: a blur shows as a *ratio* of band energies, which a log turns into the difference a linear layer can
    take (plain average pooling trained to chance level in the same number of steps). Pooling over the whole patch
    makes the network indifferent to the patch size (64 px in training)."""

    def __init__(self, channels: int = 16, scales: int = 4, hidden: int = 32) -> None:
        super().__init__()
        c = channels
        self.stages = nn.ModuleList(
            [nn.Conv2d(1, c, 3, padding=1)]
            + [nn.Sequential(nn.GELU(), nn.Conv2d(c, c, 3, stride=2, padding=1)) for _ in range(scales - 1)]
        )
        self.head = nn.Sequential(nn.Linear(scales * c, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the estimated defocus radius (px) of each patch."""
        x = (x - x.mean(dim=(-2, -1), keepdim=True)) / (x.std(dim=(-2, -1), keepdim=True) + 1e-4)
        energies = []
        for stage in self.stages:
            x = stage(x)
            energies.append(torch.log(x.pow(2).mean(dim=(-2, -1)) + 1e-6))
        return self.head(torch.cat(energies, dim=1))
