"""Bragg peaks in high-energy diffraction microscopy: detector patches, their centres, and the classical fit.

A patch is ``size x size`` detector pixels (11x11, BraggNN's size) cut around a diffraction peak. The peak is a 2-D
pseudo-Voigt with a sub-pixel centre, separate full widths at half maximum along the two axes and a random
Lorentzian fraction ``eta``::

    r2 = ((col - x0) / wx)**2 + ((row - y0) / wy)**2
    I  = background + amplitude * ((1 - eta) * exp(-4 ln2 r2) + eta / (1 + 4 r2))

sampled at the pixel centres, on a background that slopes gently across the patch (diffuse scattering, the
tails of other peaks and rings: up to ``SLOPE`` of its level per pixel, in a random direction); the detector counts photons, so a pixel records
``Poisson(I)``. ``amplitude`` (the peak's height in photons, the *intensity*) is drawn log-uniformly from a
range. A fraction of patches also holds part of a neighbouring peak near an edge, as crops of a crowded detector
frame do. The target is the main peak's centre (row, col) divided by ``size - 1``: 0 at the first pixel's centre,
1 at the last (BraggNN's normalised coordinates); the error is reported in pixels.

``patches`` makes them (vectorised, seeded); ``dataset`` is the ``[data] source`` ``bragg``; ``fit`` is the
classical baseline (a least-squares pseudo-Voigt fit per patch from the centroid, scipy.optimize); ``centroid``
the trivial one; ``peak_error_px`` the metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import least_squares
from torch.utils.data import TensorDataset

from caldera.errors import ConfigError

SIZE = 11  # BraggNN's patch side in pixels
INTENSITY = (100.0, 3000.0)  # peak heights in photons: log-uniform between these
FWHM = (1.5, 3.5)  # full widths at half maximum in pixels, per axis: uniform between these
BACKGROUND = (2.0, 20.0)  # background at the patch centre in photons per pixel: uniform between these
SLOPE = 0.1  # the background changes by up to this fraction of its level per pixel (a plane)
OFFSET = 1.0  # the centre lies within this many pixels of the central pixel (crops around the maximum)
NEIGHBOURS = 0.3  # fraction of patches with part of a neighbouring peak
LN2x4 = 4.0 * np.log(2.0)
_BLOCK = 4096  # patches per block: bounded memory, and block b draws from its own seeded stream


@dataclass
class Peaks:
    """A batch of patches and the truth behind them (pixel units; ``centre`` is (row, col))."""

    counts: np.ndarray  # (n, size, size) float32 photon counts
    centre: np.ndarray  # (n, 2) float64
    amplitude: np.ndarray  # (n,)
    fwhm: np.ndarray  # (n, 2) (along rows, along cols)
    eta: np.ndarray  # (n,)
    background: np.ndarray  # (n,) at the patch centre
    slope: np.ndarray  # (n,) photons per pixel per pixel
    neighbour: np.ndarray  # (n,) bool


def pseudo_voigt(rows: np.ndarray, cols: np.ndarray, y0, x0, wy, wx, eta) -> np.ndarray:
    """The unit-height 2-D pseudo-Voigt at pixel positions (broadcasting; widths are FWHM in pixels)."""
    r2 = ((cols - x0) / wx) ** 2 + ((rows - y0) / wy) ** 2
    return (1.0 - eta) * np.exp(-LN2x4 * r2) + eta / (1.0 + 4.0 * r2)


def _block(rng: np.random.Generator, n: int, size: int, intensity: tuple[float, float], neighbours: float,
           slope: float, noise: bool) -> Peaks:  # fmt: skip
    mid = (size - 1) / 2
    centre = mid + rng.uniform(-OFFSET, OFFSET, size=(n, 2))
    lo, hi = intensity
    amplitude = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))
    fwhm = rng.uniform(*FWHM, size=(n, 2))
    eta = rng.uniform(0.0, 1.0, size=n)
    background = rng.uniform(*BACKGROUND, size=n)
    grid = np.arange(size, dtype=np.float64)
    rows, cols = grid[None, :, None], grid[None, None, :]

    def col(a: np.ndarray) -> np.ndarray:
        return a[:, None, None]

    grad = background * rng.uniform(0.0, slope, size=n)  # photons per pixel, per pixel
    tilt = rng.uniform(0, 2 * np.pi, size=n)
    plane = (
        col(background) + col(grad * np.sin(tilt)) * (rows - mid) + col(grad * np.cos(tilt)) * (cols - mid)
    )
    flux = plane + col(amplitude) * pseudo_voigt(
        rows, cols, col(centre[:, 0]), col(centre[:, 1]), col(fwhm[:, 0]), col(fwhm[:, 1]), col(eta)
    )
    # A neighbour: centred 5-7 px from the patch centre in a random direction (its flank inside the patch),
    # at most 70 % of the main peak's height so that the main peak stays the brightest.
    has = rng.uniform(size=n) < neighbours
    angle = rng.uniform(0, 2 * np.pi, size=n)
    dist = rng.uniform(5.0, 7.0, size=n)
    ny, nx = mid + dist * np.sin(angle), mid + dist * np.cos(angle)
    n_amp = amplitude * rng.uniform(0.2, 0.7, size=n) * has
    n_fwhm = rng.uniform(*FWHM, size=(n, 2))
    n_eta = rng.uniform(0.0, 1.0, size=n)
    flux += col(n_amp) * pseudo_voigt(
        rows, cols, col(ny), col(nx), col(n_fwhm[:, 0]), col(n_fwhm[:, 1]), col(n_eta)
    )
    counts = rng.poisson(flux) if noise else flux
    return Peaks(counts.astype(np.float32), centre, amplitude, fwhm, eta, background, grad, has)


def patches(n: int, size: int = SIZE, intensity: float | tuple[float, float] = INTENSITY,
            neighbours: float = NEIGHBOURS, slope: float = SLOPE, seed: int = 0, noise: bool = True,
            start: int = 0) -> Peaks:  # fmt: skip
    """Patches ``start .. start + n`` of the seed's stream (the same whichever way the stream is cut into calls).

    ``intensity``: one peak height in photons, or a (low, high) range drawn log-uniformly; ``noise = False``
    gives the expected counts (no Poisson noise); ``slope = 0`` a flat background."""
    lo, hi = (float(intensity), float(intensity)) if np.isscalar(intensity) else map(float, intensity)
    if n < 1 or size < 5 or not 0 < lo <= hi or not 0 <= neighbours <= 1 or not 0 <= slope <= 0.2:
        raise ConfigError(  # a ValueError; `caldera train` prints it as one line and exits 2
            f"n = {n}, size = {size}, intensity = {intensity}, neighbours = {neighbours}, slope = {slope}: need "
            "n >= 1 patches of at least 5x5 pixels, peak heights > 0 photons (low <= high), a neighbour fraction "
            "in [0, 1] and a background slope in [0, 0.2] (of its level per pixel)"
        )
    parts = []
    for b in range(start // _BLOCK, (start + n - 1) // _BLOCK + 1):
        block = _block(np.random.default_rng([seed, b]), _BLOCK, size, (lo, hi), neighbours, slope, noise)
        a, z = max(start - b * _BLOCK, 0), min(start + n - b * _BLOCK, _BLOCK)
        parts.append({k: v[a:z] for k, v in vars(block).items()})
    return Peaks(**{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def targets(centre: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Centres in pixels (row, col) -> the normalised coordinates the model learns (0..1 across the patch)."""
    return (np.asarray(centre) / (size - 1)).astype(np.float32)


def dataset(n: int = 40000, size: int = SIZE, intensity: list[float] | float = INTENSITY,
            neighbours: float = NEIGHBOURS, slope: float = SLOPE, seed: int = 0,
            val_fraction: float = 0.1) -> dict[str, TensorDataset]:  # fmt: skip
    """Return ``{"train", "val"}``: photon-count patches (n, 1, size, size) -> centres (n, 2), normalised.

    Validation is a separate stream (seed + 1), not a slice of the training one."""
    intensity = intensity if np.isscalar(intensity) else tuple(intensity)
    n_val = int(round(n * val_fraction))
    out = {}
    for name, count, s in (("train", n - n_val, seed), ("val", n_val, seed + 1)):
        if count > 0:
            p = patches(count, size, intensity, neighbours, slope, seed=s)
            out[name] = TensorDataset(
                torch.from_numpy(p.counts[:, None]), torch.from_numpy(targets(p.centre, size))
            )
    return out


def peak_error_px(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean distance in pixels between predicted and true centres of 11x11 patches (normalised coordinates)."""
    return ((pred - target).float().norm(dim=-1) * (SIZE - 1)).mean()


# -- baselines ------------------------------------------------------------------------------------------------------


def centroid(counts: np.ndarray) -> np.ndarray:
    """Centre of mass (row, col) in pixels of each patch above its median (the background estimate): (n, 2)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c.reshape(-1, *c.shape[-2:])
    w = np.clip(c - np.median(c, axis=(1, 2), keepdims=True), 0, None) + 1e-12
    rows, cols = np.arange(c.shape[1]), np.arange(c.shape[2])
    total = w.sum(axis=(1, 2))
    return np.stack([(w.sum(2) * rows).sum(1) / total, (w.sum(1) * cols).sum(1) / total], axis=1)


def _model_and_jacobian(p: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amp, y0, x0, wy, wx, eta, bg = p
    u, v = (cols - x0) / wx, (rows - y0) / wy
    r2 = u * u + v * v
    g, lor = np.exp(-LN2x4 * r2), 1.0 / (1.0 + 4.0 * r2)
    shape = (1.0 - eta) * g + eta * lor
    d_r2 = amp * ((1.0 - eta) * g * -LN2x4 - 4.0 * eta * lor * lor)  # d model / d r2
    jac = np.stack([shape, d_r2 * -2 * v / wy, d_r2 * -2 * u / wx, d_r2 * -2 * v * v / wy, d_r2 * -2 * u * u / wx,
                    amp * (lor - g), np.ones_like(r2)], axis=1)  # fmt: skip
    return bg + amp * shape, jac


def fit_one(counts: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Least-squares pseudo-Voigt fit of one patch (Poisson weights), from its centroid: (row, col) in pixels."""
    c = np.asarray(counts, dtype=np.float64)
    size_y, size_x = c.shape
    rows, cols = np.indices(c.shape).reshape(2, -1).astype(np.float64)
    z = c.ravel()
    weight = 1.0 / np.sqrt(np.maximum(z, 1.0))  # Poisson: variance = counts
    y0, x0 = centroid(c)[0] if start is None else start
    bg = float(np.median(c))
    p0 = [max(z.max() - bg, 1.0), y0, x0, 2.5, 2.5, 0.5, bg]
    lower = [0.0, -1.0, -1.0, 0.5, 0.5, 0.0, -np.inf]
    upper = [np.inf, size_y, size_x, 2.0 * size_y, 2.0 * size_x, 1.0, np.inf]
    p0 = np.clip(p0, np.add(lower, 1e-6), np.subtract(upper, 1e-6))

    def residual(p):
        return (_model_and_jacobian(p, rows, cols)[0] - z) * weight

    def jacobian(p):
        return _model_and_jacobian(p, rows, cols)[1] * weight[:, None]

    out = least_squares(residual, p0, jac=jacobian, bounds=(lower, upper), method="trf", x_scale="jac")
    return out.x[1:3]


def fit(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """The classical baseline over patches (n, size, size): fitted centres (n, 2) in pixels, and seconds per patch."""
    c = np.asarray(counts).reshape(-1, *np.shape(counts)[-2:])
    started = time.perf_counter()
    centres = np.stack([fit_one(p) for p in c])
    return centres, (time.perf_counter() - started) / len(c)


def errors_px(pred: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Distance in pixels between predicted and true centres (both (n, 2) in pixels)."""
    return np.linalg.norm(np.asarray(pred, dtype=np.float64) - centre, axis=-1)


def summary(err: np.ndarray) -> dict[str, float]:
    """Median, 95th percentile and mean of pixel errors."""
    return {
        "median_px": float(np.median(err)),
        "p95_px": float(np.percentile(err, 95)),
        "mean_px": float(err.mean()),
    }
