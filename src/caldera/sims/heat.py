"""A built-in 2-D heat-diffusion simulation that makes surrogate-training data with NumPy alone.

Each sample is a square plate with a smooth random conductivity field k(x, y) and a random initial temperature
(a few Gaussian hot spots). The simulation integrates  dT/dt = div(k grad T)  with explicit finite volumes and
zero-temperature (Dirichlet) edges. A surrogate learns the map (T0, k) -> T(t_end): what a user would otherwise
run the simulation for.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def _smooth_field(rng: np.random.Generator, n: int, grid: int, modes: int = 3) -> np.ndarray:
    """Random smooth fields in [0, 1]: a few low Fourier modes."""
    x = np.linspace(0, 1, grid)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    out = np.zeros((n, grid, grid))
    for kx in range(1, modes + 1):
        for ky in range(1, modes + 1):
            a = rng.normal(size=(n, 1, 1)) / (kx * ky)
            phase = rng.uniform(0, 2 * np.pi, size=(n, 2, 1, 1))
            out += a * np.sin(np.pi * kx * xx + phase[:, 0]) * np.sin(np.pi * ky * yy + phase[:, 1])
    lo = out.min(axis=(1, 2), keepdims=True)
    hi = out.max(axis=(1, 2), keepdims=True)
    return (out - lo) / (hi - lo + 1e-12)


def _hot_spots(rng: np.random.Generator, n: int, grid: int, spots: int = 3) -> np.ndarray:
    x = np.linspace(0, 1, grid)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    t = np.zeros((n, grid, grid))
    for _ in range(spots):
        cx, cy = rng.uniform(0.2, 0.8, size=(2, n, 1, 1))
        width = rng.uniform(0.05, 0.12, size=(n, 1, 1))
        t += rng.uniform(0.5, 1.0, size=(n, 1, 1)) * np.exp(
            -((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2)
        )
    return t


def simulate(t0: np.ndarray, k: np.ndarray, steps: int, dt: float) -> np.ndarray:
    """Advance temperatures ``t0`` (n, g, g) by ``steps`` explicit steps of div(k grad T), zero edges."""
    t = t0.copy()
    # Conductivity on cell faces: the harmonic mean keeps flux continuous across a jump in k.
    kx = 2 * k[:, 1:, :] * k[:, :-1, :] / (k[:, 1:, :] + k[:, :-1, :])
    ky = 2 * k[:, :, 1:] * k[:, :, :-1] / (k[:, :, 1:] + k[:, :, :-1])
    for _ in range(steps):
        fx = kx * (t[:, 1:, :] - t[:, :-1, :])
        fy = ky * (t[:, :, 1:] - t[:, :, :-1])
        div = np.zeros_like(t)
        div[:, :-1, :] += fx
        div[:, 1:, :] -= fx
        div[:, :, :-1] += fy
        div[:, :, 1:] -= fy
        t += dt * div
        t[:, 0, :] = t[:, -1, :] = t[:, :, 0] = t[:, :, -1] = 0.0
    return t


DT = 0.2  # time step in grid units: stable since 4 * max(k) * dt <= 1


def initial_conditions(rng: np.random.Generator, n: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` random plates: initial temperatures (a few hot spots, zero edges) and conductivities in
    [0.2, 1], each (n, grid, grid)."""
    k = 0.2 + 0.8 * _smooth_field(rng, n, grid)
    t0 = _hot_spots(rng, n, grid)
    t0[:, 0, :] = t0[:, -1, :] = t0[:, :, 0] = t0[:, :, -1] = 0.0
    return t0, k


def generate(
    n_samples: int = 1024, grid: int = 32, steps: int = 40, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return inputs (n, 2, g, g) = [T0, k] and targets (n, 1, g, g) = T(end), as float32 arrays."""
    t0, k = initial_conditions(np.random.default_rng(seed), n_samples, grid)
    t_end = simulate(t0, k, steps, DT)
    x = np.stack([t0, k], axis=1).astype(np.float32)
    y = t_end[:, None].astype(np.float32)
    return x, y


def dataset(n_samples: int = 1024, grid: int = 32, steps: int = 40, seed: int = 0) -> TensorDataset:
    """Return the heat-diffusion samples as a TensorDataset of (inputs [T0, k], target T_end)."""
    x, y = generate(n_samples, grid, steps, seed)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
