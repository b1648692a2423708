"""Low-dose imaging: random phantoms seen by a photon-counting detector, stored as an HDF5 stack, and PSNR.

A phantom is a Shepp-Logan-like object: a body ellipse, overlapping inner ellipses of higher or lower density, a
faint smooth texture and a few small bright features (near the resolution limit), with values in [0, 1]. The
detector blurs the photon flux with a Gaussian point-spread function and counts photons: the counts of a pixel
are Poisson with mean ``dose * blur(clean)``, so the recorded image ``counts / dose`` is unbiased with variance
``blur(clean) / dose``. Low dose means few counts and a noisy image; a network learns to restore the clean one.

``write_h5`` makes the file a detector would dump; ``dataset`` (a ``[data] source``) makes it once if missing and
reads it through ``caldera.data.scientific`` in patches; the metric is the built-in ``psnr``.
Command line: ``python -m caldera.sims.phantoms OUT.h5 --n 800 --size 64 --dose 20``.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.comm.base import Communicator
from caldera.data.formats import DataError, require
from caldera.sims import write_once

DOSE = 10.0  # photons per pixel at full intensity (1.0): a low-dose image, about 17 dB PSNR
BLUR = 0.7  # detector point-spread function: Gaussian sigma in pixels
VARIABLES = ("noisy", "clean")
_BLOCK = 64  # images generated per block: bounded memory, and block b draws from its own seeded stream


# -- the object ---------------------------------------------------------------------------------------------------


def _ellipses(rng: np.random.Generator, n: int, xx: np.ndarray, yy: np.ndarray, count: int, center: float,
              axes: tuple[float, float], density: tuple[float, float]) -> np.ndarray:  # fmt: skip
    """Sum of ``count`` random filled ellipses per image: (n, size, size)."""
    out = np.zeros((n, *xx.shape))
    for _ in range(count):
        cx, cy = rng.uniform(-center, center, size=(2, n, 1, 1))
        a, b = rng.uniform(*axes, size=(2, n, 1, 1))
        theta = rng.uniform(0, np.pi, size=(n, 1, 1))
        rho = rng.uniform(*density, size=(n, 1, 1))
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        out += rho * ((u / a) ** 2 + (v / b) ** 2 <= 1.0)
    return out


def _texture(rng: np.random.Generator, n: int, xx: np.ndarray, yy: np.ndarray, modes: int = 4) -> np.ndarray:
    """A smooth random field with zero mean and unit maximum amplitude: a few low Fourier modes."""
    out = np.zeros((n, *xx.shape))
    for kx in range(1, modes + 1):
        for ky in range(1, modes + 1):
            a = rng.normal(size=(n, 1, 1)) / (kx * ky)
            px, py = rng.uniform(0, 2 * np.pi, size=(2, n, 1, 1))
            out += a * np.sin(np.pi * kx * xx + px) * np.sin(np.pi * ky * yy + py)
    return out / (np.abs(out).max(axis=(1, 2), keepdims=True) + 1e-12)


def phantoms(n: int, size: int = 64, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Return ``n`` random phantoms (n, size, size) with values in [0, 1]."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1, 1, size)
    xx, yy = np.meshgrid(x, x, indexing="xy")
    body = _ellipses(rng, n, xx, yy, 1, 0.05, (0.75, 0.95), (0.25, 0.4))
    inside = body > 0
    organs = _ellipses(rng, n, xx, yy, 7, 0.5, (0.06, 0.35), (-0.15, 0.4))
    # Small features of 1-3 pixels: where a denoiser must not smooth the signal away with the noise.
    dots = _ellipses(rng, n, xx, yy, 6, 0.6, (1.5 / size, 3.0 / size), (0.25, 0.5))
    texture = 0.05 * _texture(rng, n, xx, yy)
    return np.clip(body + inside * (organs + dots + texture), 0.0, 1.0)


# -- the detector -------------------------------------------------------------------------------------------------


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Blur the last two axes with a Gaussian of ``sigma`` pixels (separable, reflecting edges)."""
    images = np.asarray(images, dtype=np.float64)
    if sigma <= 0:
        return images.copy()
    radius = max(1, int(np.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    out = images
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(kernel))
    return out


def expose(
    clean: np.ndarray, dose: float, blur: float = BLUR, seed: int | np.random.Generator = 0
) -> np.ndarray:
    """Image ``clean`` at ``dose`` photons per pixel (at intensity 1): Poisson counts of the blurred flux / dose."""
    if dose <= 0:
        raise ValueError(f"dose = {dose}: the dose is photons per pixel and must be > 0 (low dose: 5-50)")
    rng = np.random.default_rng(seed)
    flux = np.clip(gaussian_blur(clean, blur), 0.0, None) * dose
    return rng.poisson(flux) / dose


def generate(n: int, size: int = 64, dose: float = DOSE, blur: float = BLUR, seed: int = 0,
             start: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Return ``(noisy, clean)`` float32 images (n, size, size): images ``start .. start + n`` of the seed's stack."""
    noisy, clean = [], []
    for b in range(start // _BLOCK, (start + n - 1) // _BLOCK + 1):
        rng = np.random.default_rng([seed, b])  # image i is the same however the stack is cut into calls
        c = phantoms(_BLOCK, size, rng)
        lo, hi = max(start - b * _BLOCK, 0), min(start + n - b * _BLOCK, _BLOCK)
        noisy.append(expose(c, dose, blur, rng)[lo:hi])
        clean.append(c[lo:hi])
    return np.concatenate(noisy).astype(np.float32), np.concatenate(clean).astype(np.float32)


# -- the file a detector would dump -------------------------------------------------------------------------------


def write_h5(path: str | os.PathLike, n: int = 800, size: int = 64, dose: float = DOSE, blur: float = BLUR,
             seed: int = 0, level: bool = False) -> Path:  # fmt: skip
    """Write ``n`` low-dose images ("noisy") and their objects ("clean") to HDF5, one chunk per image; with
    ``level``, also each image's noise level map ("level", ``noise_level(dose)``), a dose-conditioned input."""
    h5py = require("h5py", "HDF5")

    _check_geometry(n, size, dose, blur)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: an interrupted write never leaves a half stack under the name.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(_attributes(n, size, dose, blur, seed, level))
            for name, text in (("noisy", "recorded image: photon counts / dose"),
                               ("clean", "the object: expected image at infinite dose, no blur"),
                               ("level", "noise level map: 1/sqrt(dose), the noise sd at full intensity")
                               )[: 3 if level else 2]:  # fmt: skip
                d = f.create_dataset(name, (n, size, size), "float32", chunks=(1, size, size))
                d.attrs.update(description=text, units="intensity (1 = full dose)")
            for start in range(0, n, _BLOCK):
                noisy, clean = generate(min(_BLOCK, n - start), size, dose, blur, seed, start)
                f["noisy"][start : start + len(noisy)] = noisy
                f["clean"][start : start + len(clean)] = clean
                if level:
                    f["level"][start : start + len(noisy)] = noise_level(dose)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _attributes(
    n: int, size: int, dose: float, blur: float, seed: int, level: bool = False
) -> dict[str, Any]:
    return {"dose": float(dose), "blur_sigma_px": float(blur), "seed": int(seed), "n_images": int(n),
            "size": int(size), "noise_model": "noisy = Poisson(dose * gaussian_blur(clean, blur_sigma_px)) / dose",
            "generator": "caldera.sims.phantoms", **({"level_map": True} if level else {})}  # fmt: skip


def _check_geometry(n: int, size: int, dose: float, blur: float) -> None:
    if n < 1 or size < 8:
        raise ValueError(f"n = {n}, size = {size}: need at least 1 image of at least 8x8 pixels")
    if dose <= 0 or blur < 0:
        raise ValueError(
            f"dose = {dose}, blur = {blur}: the dose must be > 0 photons/pixel and the blur >= 0 px"
        )


# -- the training source ------------------------------------------------------------------------------------------


class ImageStackError(DataError):
    """An image stack that cannot be used (``caldera train`` reports it as one line naming the fix)."""


def dataset(path: str | None = None, n: int = 800, size: int = 64, dose: float = DOSE, blur: float = BLUR,
            seed: int = 0, patch: list[int] | None = (32, 32), patch_stride: list[int] | None = (16, 16),
            augment: bool = True, create: bool = True, val_fraction: float = 0.1,
            dose_range: list[float] | None = None, run_dir: str | os.PathLike | None = None,
            comm: Communicator | None = None) -> dict[str, Any]:  # fmt: skip
    """Return ``{"train", "val"}`` patches (noisy -> clean) of an HDF5 stack, writing it first if missing.

    ``path`` defaults to <run dir>/phantoms.h5. With ``create = false`` the file must exist (a real detector
    dump with "noisy" and "clean" stacks); else an existing file must have been made with the same settings.
    ``dose_range = [lo, hi]``: every patch is exposed anew from its clean object at a dose drawn log-uniformly
    in [lo, hi] (fresh noise each step), and the input has two channels, the image and its noise level
    ``1/sqrt(dose)`` (see ``with_level``): one restorer for all doses.
    ``comm``: the ranks that share the file (rank 0 writes it, the others wait); default this process alone."""
    from caldera.data import scientific

    level = dose_range is not None
    file = Path(path) if path is not None else Path(run_dir or ".") / "phantoms.h5"
    if create:
        write_once(
            file,
            lambda: write_h5(file, n, size, dose, blur, seed, level),
            "the image stack",
            ImageStackError,
            comm,
        )
    check_stack(file, _attributes(n, size, dose, blur, seed, level) if create else None)
    # With a dose range the input is (image, noise level): the stack holds the level map of its own dose, so that
    # the stored images can be restored as they are (caldera predict drops the transform that re-exposes them).
    return scientific.dataset(str(file), inputs=["noisy", "level"] if level else ["noisy"], targets=["clean"],
                              patch=patch, patch_stride=patch_stride, normalize=False, val_fraction=val_fraction,
                              transform=_transform(augment, dose_range, blur), run_dir=run_dir,
                              comm=comm)  # fmt: skip


def _transform(augment: bool, dose_range: list[float] | None, blur: float) -> Any:
    if dose_range is None:
        return dihedral if augment else None
    lo, hi = (float(d) for d in dose_range)
    if not 0 < lo <= hi:
        raise ImageStackError(
            f"dose_range = {list(dose_range)}: give [lo, hi] photons per pixel with 0 < lo <= hi"
        )
    return functools.partial(redose, dose_range=(lo, hi), blur=blur, augment=augment)


def noise_level(dose: Any) -> Any:
    """The network's dose input: ``1/sqrt(dose)``, the noise standard deviation at full intensity."""
    return 1.0 / np.sqrt(dose)


def with_level(noisy: np.ndarray, dose: float) -> np.ndarray:
    """Images (n, H, W) at ``dose`` as the dose-conditioned network's input (n, 2, H, W): image, noise level."""
    noisy = np.asarray(noisy, dtype=np.float32)
    return np.stack([noisy, np.full_like(noisy, noise_level(dose))], axis=1)


def redose(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, dose_range: tuple[float, float] = (2.0, 100.0),
           blur: float = BLUR, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Expose each clean patch ``y`` (n, 1, H, W) anew at a dose drawn log-uniformly in ``dose_range``: return
    (image, noise level) inputs (n, 2, H, W) and ``y``. The stack's own noisy images are not used: fresh photon
    noise every step, at every dose, is what makes one network restore all doses."""
    if augment:
        x, y = dihedral(x, y, rng)
    lo, hi = dose_range
    dose = np.exp(rng.uniform(np.log(lo), np.log(hi), size=(len(y), 1, 1, 1)))
    noisy = rng.poisson(np.clip(gaussian_blur(y, blur), 0.0, None) * dose) / dose
    level = np.broadcast_to(noise_level(dose), noisy.shape)
    return np.concatenate([noisy, level], axis=1).astype(np.float32), y


def check_stack(path: str | os.PathLike, expected: dict[str, Any] | None = None) -> None:
    """Raise ``ImageStackError`` naming the fix unless ``path`` is an HDF5 stack of "noisy" and "clean" images
    (made with the ``expected`` attributes, when given)."""
    h5py = require("h5py", "HDF5")

    file = Path(path)
    if not file.exists():
        raise ImageStackError(
            f"{file}: no such image stack (working directory {Path.cwd()}); make it with "
            f"`python -m caldera.sims.phantoms {file}`, or set [data] args.create = true"
        )
    try:
        with h5py.File(file, "r") as f:
            shapes = {k: f[k].shape for k in f if isinstance(f[k], h5py.Dataset)}
            attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}
    except OSError as exc:
        raise ImageStackError(
            f"{file}: not a readable HDF5 file ({exc}); if it is a stack left by an interrupted copy, delete it "
            "(a run with create = true writes it anew), else point [data] args.path at the HDF5 stack"
        ) from None
    missing = [v for v in VARIABLES if v not in shapes]
    if missing or shapes["noisy"] != shapes["clean"] or len(shapes["noisy"]) != 3:
        raise ImageStackError(
            f"{file}: expected datasets 'noisy' and 'clean' of equal shape (images, H, W); found "
            f"{shapes or 'no datasets'}"
        )
    differ = {k: (attrs.get(k), v) for k, v in (expected or {}).items() if _differs(attrs.get(k), v)}
    if differ:
        listing = ", ".join(f"{k} = {had!r} (asked {want!r})" for k, (had, want) in differ.items())
        raise ImageStackError(
            f"{file} was made with other settings: {listing}; delete it to write it anew, or set [data] "
            "args.path to another file"
        )


def _differs(had: Any, want: Any) -> bool:
    if isinstance(want, float):
        return had is None or not np.isclose(float(had), want)
    return str(had.decode() if isinstance(had, bytes) else had) != str(want)


def dihedral(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Turn and flip each image and its target alike, at random: the physics has no preferred direction."""
    square = x.shape[-1] == x.shape[-2]
    ops = rng.integers(0, 8, size=len(x)) if square else 2 * rng.integers(0, 4, size=len(x))
    x, y = x.copy(), y.copy()
    for op in np.unique(ops):
        sel = ops == op
        x[sel], y[sel] = _turn(x[sel], op), _turn(y[sel], op)
    return x, y


def _turn(a: np.ndarray, op: int) -> np.ndarray:
    """The dihedral operation ``op`` (0-7): ``op % 4`` quarter turns, then a mirror when ``op >= 4``."""
    a = np.rot90(a, op % 4, axes=(-2, -1))
    return a[..., ::-1] if op >= 4 else a


# -- quality --------------------------------------------------------------------------------------------------------


def psnr_np(pred: np.ndarray, target: np.ndarray, peak: float = 1.0) -> float:
    """PSNR in dB (``caldera.train.metrics.psnr``) of NumPy image stacks (n, H, W)."""
    from caldera.train.metrics import psnr  # here, not at the top: caldera.data imports this module

    return float(psnr(torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(target)), peak))


def gaussian_baseline(noisy: np.ndarray, clean: np.ndarray,
                      sigmas: Any = None) -> tuple[float, float]:  # fmt: skip
    """Return (sigma, PSNR) of the Gaussian filter that best restores ``noisy``: the classical denoiser, given
    the advantage of a sigma tuned on the very images it is scored on."""
    sigmas = np.arange(0.25, 3.01, 0.25) if sigmas is None else sigmas
    scores = [(psnr_np(gaussian_blur(noisy, s), clean), float(s)) for s in sigmas]
    best, sigma = max(scores)
    return sigma, best


def main(argv: list[str] | None = None) -> int:
    """Write an image stack from the command line."""
    p = argparse.ArgumentParser(prog="python -m caldera.sims.phantoms", description=__doc__.splitlines()[0])
    p.add_argument("path", help="the HDF5 file to write, e.g. data/phantoms.h5")
    p.add_argument("--n", type=int, default=800, help="number of images (default 800)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--dose", type=float, default=DOSE, help=f"photons per pixel at full intensity ({DOSE})")
    p.add_argument("--blur", type=float, default=BLUR, help=f"detector blur sigma in pixels ({BLUR})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", action="store_true", help="also the noise level map (for dose_range)")
    a = p.parse_args(argv)
    out = write_h5(a.path, a.n, a.size, a.dose, a.blur, a.seed, a.level)
    noisy, clean = generate(min(a.n, 64), a.size, a.dose, a.blur, a.seed)
    print(f"wrote {out}: {a.n} images of {a.size}x{a.size} at dose {a.dose:g}; "
          f"noisy-image PSNR {psnr_np(noisy, clean):.1f} dB (first {len(noisy)} images)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
