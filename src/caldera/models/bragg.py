"""BraggNN (Liu et al., IUCrJ 2022): a small CNN with a non-local (self-attention) block that regresses the
sub-pixel centre of a Bragg peak from a detector patch around it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from caldera.errors import ConfigError


class NonLocal(nn.Module):
    """The non-local block: every position attends to every other (embedded Gaussian), added back to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = max(1, channels // 2)
        self.qkv = nn.Conv2d(channels, 3 * self.inner, 1)  # theta, phi and g in one 1x1 convolution
        self.out = nn.Conv2d(self.inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, c, h, w) -> (n, c, h, w)."""
        n, _, h, w = x.shape
        theta, phi, g = self.qkv(x).flatten(2).chunk(3, dim=1)  # each (n, inner, h*w)
        attention = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (n, hw, hw)
        y = (g @ attention.transpose(1, 2)).reshape(n, self.inner, h, w)
        return x + self.out(y)


class BraggNN(nn.Module):
    """Patch (n, 1, size, size) of photon counts -> peak centre (n, 2) as (row, col) / (size - 1).

    The defaults are the published network (3x3 convolutions of 64, 32 and 8 channels without padding, a
    non-local block after the first, dense layers 64-32-16-8-2, LeakyReLU): 4.2 MFLOP per 11x11 patch. Smaller
    ``channels`` and ``dense`` give leaner variants; ``nonlocal_block = false`` drops the attention, and
    ``channels = []`` the convolutions too (a perceptron on the pixels). Each patch is
    scaled to [0, 1] (min-max) inside the network, so callers pass raw counts, and so does an exported model."""

    def __init__(self, size: int = 11, channels: list[int] = (64, 32, 8), dense: list[int] = (64, 32, 16, 8),
                 nonlocal_block: bool = True) -> None:  # type: ignore[assignment]  # fmt: skip
        super().__init__()
        if size - 2 * len(channels) < 1 or (nonlocal_block and not channels):
            raise ConfigError(f"size = {size}, channels = {list(channels)}, nonlocal_block = {nonlocal_block}: "
                             "unpadded 3x3 convolutions must leave pixels, and the non-local block follows the "
                             "first convolution; use fewer channels entries, a larger patch, or no block")  # fmt: skip
        self.size = size
        ins = (1, *channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3) for a, b in zip(ins, channels))
        self.attend = NonLocal(channels[0]) if nonlocal_block else nn.Identity()
        side = size - 2 * len(channels)
        widths = ((channels[-1] if channels else 1) * side * side, *dense)
        self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the centres (n, 2), normalised."""
        lo = x.amin(dim=(-2, -1), keepdim=True)
        hi = x.amax(dim=(-2, -1), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
        if len(self.convs):
            # As published: the attention sees the first convolution's output before its activation.
            x = self.attend(self.convs[0](x))
            for conv in self.convs[1:]:
                x = conv(F.leaky_relu(x, 0.01))
            x = F.leaky_relu(x, 0.01)
        x = x.flatten(1)
        for layer in self.dense:
            x = F.leaky_relu(layer(x), 0.01)
        return self.head(x)
