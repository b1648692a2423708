"""A dose-conditioned U-Net for low-dose image restoration (``caldera.sims.phantoms``)."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GELU()
    )


class DenoiseUNet(nn.Module):
    """A U-Net of ``levels`` resolutions that restores channel 0 of its input (the noisy image) given the other
    channels (the noise level map): it predicts the correction to the image, so at high dose it starts near the
    identity instead of having to learn it."""

    def __init__(
        self, in_channels: int = 2, out_channels: int = 1, channels: int = 32, levels: int = 3
    ) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels = {levels}: a U-Net needs at least 2 resolutions")
        widths = [channels * 2**i for i in range(levels)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])])
        self.down.extend(_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths[:-1], widths[1:])
        )
        self.merge = nn.ModuleList(_block(2 * a, a) for a in widths[:-1])
        self.out = nn.Conv2d(widths[0], out_channels, 1)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs (n, in, H, W) (image first) to restored images (n, out, H, W); H, W divisible by
        2**(levels - 1)."""
        skips, h = [], x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else nn.functional.max_pool2d(h, 2))
            skips.append(h)
        for i in reversed(range(self.levels - 1)):
            h = self.merge[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return x[:, : self.out.out_channels] + self.out(h)
