"""Classical restorers and image quality for low-dose (Poisson) imaging: the baselines a reviewer expects.

- ``anscombe`` / ``inverse_anscombe``: the generalised Anscombe transform (GAT) for Poisson-Gaussian counts, which
  makes the noise roughly Gaussian of unit variance, and the closed-form approximation of its exact unbiased
  inverse (Makitalo & Foi, IEEE TIP 20(1) 2011 and 22(1) 2013), which removes the bias the plain algebraic
  inverse leaves at low counts.
- ``bm3d_gat``: BM3D (Dabov et al. 2007; the ``bm3d`` package) in the stabilised domain: transform, denoise with
  ``sigma = scale`` (1 in theory; ``scale`` is tuned on training images), invert.
- ``ssim``: the structural similarity of Wang et al. (IEEE TIP 13(4) 2004) with its 11x11 Gaussian window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, over the valid part of the image, averaged over images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from caldera.data.formats import require

# E[anscombe(z)] for z = 0 counts: a stabilised value at or below it means "no photons".
_ZERO = 2.0 * math.sqrt(3.0 / 8.0)


def anscombe(counts: np.ndarray, read_noise: float = 0.0, gain: float = 1.0) -> np.ndarray:
    """The generalised Anscombe transform of ``counts`` (gain * Poisson + Gaussian of sd ``read_noise``):
    ``2/gain * sqrt(gain * z + 3/8 gain^2 + read_noise^2)``; the result has about unit noise variance."""
    z = np.asarray(counts, dtype=np.float64)
    return 2.0 / gain * np.sqrt(np.maximum(gain * z + 0.375 * gain**2 + read_noise**2, 0.0))


def inverse_anscombe(d: np.ndarray, read_noise: float = 0.0, gain: float = 1.0) -> np.ndarray:
    """The closed-form approximation of the exact unbiased inverse of ``anscombe`` (Makitalo & Foi 2011, 2013):
    maps the expected transformed value back to the expected count, where the algebraic inverse
    ``(d/2)^2 - 3/8`` is biased low at a few counts."""
    d = np.maximum(np.asarray(d, dtype=np.float64), _ZERO)
    s = math.sqrt(1.5)
    z = 0.25 * d**2 + 0.25 * s / d - 1.375 / d**2 + 0.625 * s / d**3 - 0.125 - (read_noise / gain) ** 2
    return np.maximum(z, 0.0) * gain


def bm3d_gat(noisy: np.ndarray, dose: float, scale: float = 1.0, read_noise: float = 0.0) -> np.ndarray:
    """BM3D after the generalised Anscombe transform, per image: ``noisy`` (n, H, W) is counts / ``dose``
    (``caldera.sims.phantoms.expose``); return restored intensities of the same shape."""
    bm3d = require("bm3d", "the BM3D baseline", "bm3d")
    out = np.empty(np.shape(noisy), dtype=np.float64)
    for i, image in enumerate(np.asarray(noisy, dtype=np.float64)):
        stable = anscombe(image * dose, read_noise)
        out[i] = inverse_anscombe(bm3d.bm3d(stable, scale), read_noise) / dose
    return out


def tune_bm3d(noisy: np.ndarray, clean: np.ndarray, dose: float,
              scales: Any = (0.8, 0.9, 1.0, 1.1, 1.25, 1.4)) -> tuple[float, float]:  # fmt: skip
    """Return (scale, PSNR) of the BM3D+GAT noise scale that best restores ``noisy`` (training images)."""
    from caldera.sims.phantoms import psnr_np

    best, scale = max((psnr_np(bm3d_gat(noisy, dose, float(s)), clean), float(s)) for s in scales)
    return scale, best


def _window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-0.5 * ((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) / sigma) ** 2)
    g /= g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(pred: np.ndarray, target: np.ndarray, peak: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004) of image stacks (n, H, W), Gaussian window 11x11 sigma 1.5, data range
    ``peak``; images must be at least 11x11."""
    x = torch.as_tensor(np.asarray(pred), dtype=torch.float64)[:, None]
    y = torch.as_tensor(np.asarray(target), dtype=torch.float64)[:, None]
    w = _window()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2

    def blur(a: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(a, w)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean(dim=(1, 2, 3)).mean())
