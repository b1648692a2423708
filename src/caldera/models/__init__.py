"""Built-in single-device models (no torch.distributed or mpi4py here: parallelism is applied from outside)."""

from __future__ import annotations

import torch
from torch import nn

from caldera.names import MODELS as MODELS  # the table of built-in names


class MLP(nn.Sequential):
    """A multilayer perceptron: ``sizes = [in, hidden..., out]`` with ReLU between layers.

    An ``nn.Sequential``, so the pipeline strategy can split it into stages."""

    def __init__(self, sizes: list[int] = (1024, 2048, 2048, 10)) -> None:  # type: ignore[assignment]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """A small image classifier: two conv blocks and a linear head (works from 8x8 images upward)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 32, image_size: int = 8):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * c * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.head(self.features(x))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GELU()
    )


class UNetSmall(nn.Module):
    """A two-level U-Net for field-to-field surrogates (input and output on the same grid)."""

    def __init__(self, in_channels: int = 2, out_channels: int = 1, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.enc1 = _block(in_channels, c)
        self.enc2 = _block(c, 2 * c)
        self.mid = _block(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = _block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = _block(2 * c, c)
        self.out = nn.Conv2d(c, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map input fields (n, in, g, g) to output fields (n, out, g, g); g must be divisible by 4."""
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        m = self.mid(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


from caldera.models.bragg import BraggNN  # noqa: E402  (the application models need nothing above)
from caldera.models.climate import ClimateNet  # noqa: E402
from caldera.models.potential import NeuralPotential  # noqa: E402
from caldera.models.transformer import Transformer  # noqa: E402

__all__ = ["MLP", "MODELS", "BraggNN", "ClimateNet", "NeuralPotential", "SmallCNN", "Transformer",
           "UNetSmall"]  # fmt: skip
