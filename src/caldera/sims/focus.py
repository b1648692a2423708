"""Focus detection for electron microscopy: specimen-like textures seen out of focus, and the classical measures.

A specimen is a random mix of three textures, each common in EM images: cells (soft-edged ellipses, some with a
darker membrane ring), fibres (thin Gaussian-profile lines at random angles) and band-limited noise (a power-law
spectrum cut at a random frequency: stain granularity, ice, carbon film). Its mean intensity and contrast are
random per image. The microscope sees it through a defocus point-spread function and counts electrons:
``image = Poisson(dose * pillbox_r(specimen)) / dose``.

The point spread is a *pillbox* (a uniform disk of radius ``r`` pixels, anti-aliased at its edge, normalised to
sum 1): the geometric-optics blur of a defocused aperture-limited system, whose radius grows linearly with the
defocus (``r = defocus * aperture semi-angle``). It is the standard model where the blur spans several pixels;
the wave-optical PSF (an Airy pattern with defocus phase, or EM's contrast transfer function) adds rings and
contrast reversals that depend on wavelength, spherical aberration and aperture, parameters a calibration-free
study like this one does not have. The pillbox keeps the one property every focus measure relies on: high
spatial frequencies vanish as ``r`` grows (its transfer function is ``2 J1(k r) / (k r)``).

The target is ``r`` in pixels (regression); a patch is *in focus* when ``r < THRESHOLD``. ``dataset`` is the
``[data] source`` ``focus``; ``laplacian_variance`` and ``gradient_energy`` are the classical measures and
``Calibration`` maps them to a defocus estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from caldera.data.formats import DataError

R_MAX = 6.0  # largest defocus radius in the training set, pixels
THRESHOLD = 2.0  # in focus when r < THRESHOLD px: a blur disk of 4 px diameter is visibly soft at 64x64
DOSE = (50.0, 500.0)  # electrons per pixel at intensity 1: drawn log-uniformly per image
SCALES = (1, 2, 4)  # gradient energy at these block-averaging factors
_BLOCK = 128  # patches generated per block: bounded memory, and block b draws from its own seeded stream
_SUPERSAMPLE = 8  # sub-pixel samples per axis when a pixel's share of the disk is measured


# -- the specimen ----------------------------------------------------------------------------------------------


def _band_noise(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """Gaussian noise with a power-law spectrum k^-beta cut off at a random frequency; unit std per image."""
    k = np.sqrt(np.fft.fftfreq(side)[:, None] ** 2 + np.fft.rfftfreq(side)[None, :] ** 2)
    beta = rng.uniform(0.5, 1.5, size=(n, 1, 1))
    cut = rng.uniform(0.08, 0.5, size=(n, 1, 1))  # cycles per pixel; 0.5 is Nyquist
    amp = np.where(k > 0, np.maximum(k, 1e-3) ** -beta, 0.0) * np.exp(-((k / cut) ** 4))
    spec = np.fft.rfft2(rng.normal(size=(n, side, side))) * amp
    out = np.fft.irfft2(spec, s=(side, side))
    return out / (out.std(axis=(1, 2), keepdims=True) + 1e-12)


def _cells(rng: np.random.Generator, n: int, xx: np.ndarray, yy: np.ndarray, count: int = 10) -> np.ndarray:
    """Soft-edged ellipses of random density, some with a dark membrane ring."""
    out = np.zeros((n, *xx.shape))
    side = xx.shape[0]
    for _ in range(count):
        cx, cy = rng.uniform(0, side, size=(2, n, 1, 1))
        a, b = rng.uniform(2.0, side / 3, size=(2, n, 1, 1))
        theta = rng.uniform(0, np.pi, size=(n, 1, 1))
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the ellipse's edge
        edge = rng.uniform(0.3, 1.0, size=(n, 1, 1)) / np.minimum(a, b)  # edge width in units of d: 0.3-1 px
        inside = 1.0 / (1.0 + np.exp(np.clip((d - 1.0) / edge, -50, 50)))
        ring = rng.uniform(0, 1, size=(n, 1, 1)) * np.exp(-(((d - 1.0) / (2 * edge)) ** 2))
        out += rng.uniform(-1, 1, size=(n, 1, 1)) * inside - ring
    return out


def _fibres(rng: np.random.Generator, n: int, xx: np.ndarray, yy: np.ndarray, count: int = 6) -> np.ndarray:
    """Straight fibres with a Gaussian profile, 0.5-2 px wide, at random positions and angles."""
    out = np.zeros((n, *xx.shape))
    side = xx.shape[0]
    for _ in range(count):
        cx, cy = rng.uniform(0, side, size=(2, n, 1, 1))
        theta = rng.uniform(0, np.pi, size=(n, 1, 1))
        width = rng.uniform(0.5, 2.0, size=(n, 1, 1))
        dist = (xx - cx) * np.sin(theta) - (yy - cy) * np.cos(theta)
        out += rng.choice([-1.0, 1.0], size=(n, 1, 1)) * np.exp(-0.5 * (dist / width) ** 2)
    return out


def specimens(n: int, side: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Return ``n`` random specimen textures (n, side, side) in [0, 1], of random mean intensity and contrast."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    parts = [_band_noise(rng, n, side), _cells(rng, n, xx, yy), _fibres(rng, n, xx, yy)]
    parts = [p / (p.std(axis=(1, 2), keepdims=True) + 1e-12) for p in parts]
    weights = rng.dirichlet([1.0, 1.0, 1.0], size=n)
    mix = sum(w[:, None, None] * p for w, p in zip(weights.T, parts))
    mix = (mix - mix.mean(axis=(1, 2), keepdims=True)) / (mix.std(axis=(1, 2), keepdims=True) + 1e-12)
    mean = rng.uniform(0.3, 0.7, size=(n, 1, 1))
    contrast = np.exp(rng.uniform(np.log(0.04), np.log(0.2), size=(n, 1, 1)))  # std / 1; 5x range
    return np.clip(mean + contrast * mix, 0.0, 1.0)


# -- the microscope ------------------------------------------------------------------------------------------------


def pillbox(radius: float, half: int | None = None) -> np.ndarray:
    """The defocus PSF: a disk of ``radius`` px, each pixel weighted by its area inside, summing to 1.

    (2 half + 1) square, ``half`` defaulting to ceil(radius). A disk of radius <= 0.5 lies inside its own pixel,
    so it is a delta: the identity on a pixelated image."""
    if radius < 0:
        raise ValueError(f"radius = {radius}: a defocus blur radius is >= 0 pixels")
    half = int(math.ceil(radius)) if half is None else half
    s = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - 0.5  # sub-pixel offsets inside one pixel
    c = np.arange(-half, half + 1)
    y = (c[:, None] + s[None, :]).reshape(-1)
    inside = (y[:, None] ** 2 + y[None, :] ** 2 <= radius**2 + 1e-12).astype(np.float64)
    k = inside.reshape(2 * half + 1, _SUPERSAMPLE, 2 * half + 1, _SUPERSAMPLE).mean(axis=(1, 3))
    if k.sum() == 0:  # a disk smaller than the sub-pixel grid: the centre pixel takes it all
        k[half, half] = 1.0
    return k / k.sum()


def defocus(images: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
    """Blur images (n, H, W) (or one (H, W)) with the pillbox of ``radius`` px, one radius or one per image.

    Reflecting edges; an FFT convolution per image, so the cost does not grow with the radius."""
    x = np.asarray(images, dtype=np.float64)
    one = x.ndim == 2
    x = x[None] if one else x
    r = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(x),))
    if np.all(r == 0):
        return (x[0] if one else x).copy()
    half = int(math.ceil(r.max()))
    pad = np.pad(x, ((0, 0), (half, half), (half, half)), mode="reflect")
    h, w = pad.shape[1:]
    kernels = np.zeros((len(x), h, w))
    for i, ri in enumerate(r):
        # Centred at (0, 0) with wrap-around, so the circular convolution does not shift the image.
        kernels[i, : 2 * half + 1, : 2 * half + 1] = pillbox(float(ri), half)
    kernels = np.roll(kernels, (-half, -half), axis=(1, 2))
    out = np.fft.irfft2(np.fft.rfft2(pad) * np.fft.rfft2(kernels), s=(h, w))[:, half : half + x.shape[1],
                                                                              half : half + x.shape[2]]  # fmt: skip
    return out[0] if one else out


def expose(images: np.ndarray, dose: float | np.ndarray, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Count electrons: Poisson(dose * image) / dose, dose per pixel at intensity 1 (one or one per image)."""
    rng = np.random.default_rng(seed)
    d = np.asarray(dose, dtype=np.float64)
    d = d.reshape(-1, *([1] * (images.ndim - 1))) if d.ndim else d
    return rng.poisson(np.clip(images, 0, None) * d) / d


def generate(n: int, size: int = 64, r_max: float = R_MAX, dose: tuple[float, float] = DOSE, seed: int = 0,
             start: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Return ``(patches (n, size, size) float32, radius (n,) float32)``: patches ``start .. start + n`` of the
    seed's set, each a specimen blurred by a uniform random radius in [0, r_max] and exposed at a log-uniform
    random dose in ``dose``."""
    half = int(math.ceil(r_max)) + 1
    xs, rs = [], []
    for b in range(start // _BLOCK, (start + n - 1) // _BLOCK + 1):
        rng = np.random.default_rng([seed, b])  # patch i is the same however the set is cut into calls
        # Made larger and cropped: the blur near the edge sees real specimen, not a reflection of it.
        spec = specimens(_BLOCK, size + 2 * half, rng)
        r = rng.uniform(0.0, r_max, size=_BLOCK)
        d = np.exp(rng.uniform(np.log(dose[0]), np.log(dose[1]), size=_BLOCK))
        img = expose(defocus(spec, r)[:, half:-half, half:-half], d, rng)
        lo, hi = max(start - b * _BLOCK, 0), min(start + n - b * _BLOCK, _BLOCK)
        xs.append(img[lo:hi])
        rs.append(r[lo:hi])
    return np.concatenate(xs).astype(np.float32), np.concatenate(rs).astype(np.float32)


def dataset(n: int = 4096, size: int = 64, r_max: float = R_MAX, dose_min: float = DOSE[0],
            dose_max: float = DOSE[1], seed: int = 0, val_fraction: float = 0.1) -> dict[str, TensorDataset]:  # fmt: skip
    """Return ``{"train", "val"}``: patches (1, size, size) -> defocus radius (1,) in px; validation is the last
    ``val_fraction`` of the seed's set."""
    if n < 2 or size < 16 or r_max <= 0 or not 0 < dose_min <= dose_max:
        raise DataError(f"[data] args: n = {n}, size = {size}, r_max = {r_max}, dose = [{dose_min}, {dose_max}]: "
                        "need n >= 2, size >= 16 (patch side, px), r_max > 0 (px) and 0 < dose_min <= dose_max")  # fmt: skip
    x, r = generate(n, size, r_max, (dose_min, dose_max), seed)
    x, y = torch.from_numpy(x[:, None]), torch.from_numpy(r[:, None])
    n_val = int(n * val_fraction)
    if n_val == 0:
        return {"train": TensorDataset(x, y)}
    return {"train": TensorDataset(x[:-n_val], y[:-n_val]), "val": TensorDataset(x[-n_val:], y[-n_val:])}


# -- the classical measures ----------------------------------------------------------------------------------------


def laplacian_variance(images: np.ndarray) -> np.ndarray:
    """Variance of the 5-point Laplacian over each image (n, H, W) -> (n,): the classic sharpness measure."""
    x = np.asarray(images, dtype=np.float64)
    c = x[:, 1:-1, 1:-1]
    lap = x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4 * c
    return lap.var(axis=(1, 2))


def gradient_energy(images: np.ndarray, scales: tuple[int, ...] = SCALES) -> np.ndarray:
    """Tenengrad (mean squared Sobel gradient) of each image (n, H, W) at block-averaging ``scales`` -> (n, S)."""
    x = np.asarray(images, dtype=np.float64)
    out = []
    for s in scales:
        h, w = x.shape[1] // s * s, x.shape[2] // s * s
        y = x[:, :h, :w].reshape(len(x), h // s, s, w // s, s).mean(axis=(2, 4))
        # Sobel: a [1, 2, 1] smoothing across, a central difference along.
        sm_r = y[:, :-2] + 2 * y[:, 1:-1] + y[:, 2:]  # smoothed down the rows
        sm_c = y[:, :, :-2] + 2 * y[:, :, 1:-1] + y[:, :, 2:]
        gx = sm_r[:, :, 2:] - sm_r[:, :, :-2]
        gy = sm_c[:, 2:, :] - sm_c[:, :-2, :]
        out.append((gx**2 + gy**2).mean(axis=(1, 2)))
    return np.stack(out, axis=1)


def features(method: str, images: np.ndarray) -> np.ndarray:
    """The log-features a calibrated classical measure sees: 'laplacian' (log VoL) or 'gradient' (log Tenengrad
    at each scale and the log image variance, so that the fit can divide contrast out)."""
    eps = 1e-12
    if method == "laplacian":
        return np.log(laplacian_variance(images) + eps)[:, None]
    if method == "gradient":
        var = np.asarray(images, dtype=np.float64).var(axis=(1, 2))
        return np.log(np.concatenate([gradient_energy(images), var[:, None]], axis=1) + eps)
    raise ValueError(f"method = {method!r}: choose 'laplacian' or 'gradient'")


@dataclass
class Calibration:
    """A classical focus measure made a defocus estimate: a least-squares linear score of its log-features, then a
    monotone map from score to radius through binned medians of the training set."""

    method: str
    weights: np.ndarray
    knots: np.ndarray
    values: np.ndarray

    @classmethod
    def fit(cls, method: str, images: np.ndarray, radius: np.ndarray, bins: int = 24) -> Calibration:
        """Fit on training patches (n, H, W) with known radii (n,)."""
        f = features(method, images)
        a = np.concatenate([f, np.ones((len(f), 1))], axis=1)
        w = np.linalg.lstsq(a, np.asarray(radius, np.float64), rcond=None)[0]
        score = a @ w
        order = np.argsort(score)
        groups = np.array_split(order, bins)
        knots = np.array([score[g].mean() for g in groups])
        values = np.maximum.accumulate([np.median(radius[g]) for g in groups])  # monotone in the score
        return cls(method, w, knots, values)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Estimated defocus radius (px) of each patch (n, H, W)."""
        f = features(self.method, images)
        score = np.concatenate([f, np.ones((len(f), 1))], axis=1) @ self.weights
        return np.interp(score, self.knots, self.values)


def tiles(image: np.ndarray, size: int = 64) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` tiles of one image (H, W) -> (t, size, size); the remainder is cut off."""
    h, w = image.shape[0] // size, image.shape[1] // size
    if h == 0 or w == 0:
        raise ValueError(f"image of shape {image.shape} is smaller than one {size}x{size} tile")
    t = image[: h * size, : w * size].reshape(h, size, w, size).swapaxes(1, 2)
    return t.reshape(h * w, size, size)


def scores(estimate: np.ndarray, truth: np.ndarray, threshold: float = THRESHOLD) -> dict[str, Any]:
    """MAE (px) of defocus estimates and accuracy of the in/out-of-focus call at ``threshold``."""
    estimate, truth = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    return {"mae_px": float(np.abs(estimate - truth).mean()),
            "accuracy": float(((estimate >= threshold) == (truth >= threshold)).mean())}  # fmt: skip
