"""A 1-D CNN chirp detector that is fully convolutional: trained on windows, it scans a long record in one pass."""

from __future__ import annotations

import torch
from torch import nn

from caldera.errors import ConfigError


class ChirpNet(nn.Module):
    """Whitened strain (n, 1, L) -> logits (noise, chirp).

    Unpadded convolutions and poolings only, and a last convolution as wide as what is left of a ``window``: on a
    window of ``window`` samples the output is (n, 2); on a longer input of ``window - 1 + k * stride`` samples it
    is (n, 2, k), position j exactly the logits of the window starting at ``j * stride`` (the strides' product),
    computed once for all the windows that overlap (OverFeat's sliding window). ``width`` scales the channels."""

    def __init__(self, window: int = 512, width: int = 8, head: int = 32) -> None:
        super().__init__()
        c = width
        self.features = nn.Sequential(
            nn.Conv1d(1, c, 16, stride=2), nn.ReLU(),
            nn.Conv1d(c, c, 8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(c, 2 * c, 8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(2 * c, 2 * c, 8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(2 * c, 4 * c, 8), nn.ReLU(),
        )  # fmt: skip
        self.stride = 16  # 2 (first convolution) x 2 x 2 x 2 (poolings)
        with torch.no_grad():
            left = self.features(torch.zeros(1, 1, window)).shape[-1] if window >= 120 else 0
        if left < 1:
            raise ConfigError(f"[model] args.window = {window}: the convolutions need at least 120 samples")
        self.window = window
        self.head = nn.Sequential(nn.Conv1d(4 * c, head, left), nn.ReLU(), nn.Conv1d(head, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1, window) -> (n, 2); (n, 1, window - 1 + k * stride) -> (n, 2, k)."""
        out = self.head(self.features(x))
        return out[..., 0] if x.shape[-1] == self.window else out
