"""The built-in heat simulation obeys the physics it claims to simulate."""

import numpy as np

from caldera.sims.heat import dataset, generate, simulate


def test_sine_mode_decays_at_the_discrete_rate():
    g, k, dt, steps = 33, 0.5, 0.2, 30
    x = np.arange(g) / (g - 1)
    mode = np.sin(np.pi * x)[:, None] * np.sin(np.pi * x)[None, :]
    out = simulate(mode[None], np.full((1, g, g), k), steps, dt)
    # Eigenvalue of the 5-point Laplacian for the lowest mode with h = 1 (grid units).
    lam = 2 * 4 * np.sin(np.pi / (2 * (g - 1))) ** 2
    expected = mode * (1 - dt * k * lam) ** steps
    np.testing.assert_allclose(out[0], expected, atol=1e-12)


def test_heat_only_leaves_through_the_cold_edges():
    x, y = generate(n_samples=8, grid=24, steps=30, seed=1)
    total_before = x[:, 0].sum(axis=(1, 2))
    total_after = y[:, 0].sum(axis=(1, 2))
    assert np.all(total_after < total_before) and np.all(y >= -1e-6)
    assert np.all(x[:, 1] >= 0.2 - 1e-6) and np.all(x[:, 1] <= 1.0 + 1e-6)


def test_dataset_is_seeded():
    a, b = dataset(16, 16, 5, seed=3), dataset(16, 16, 5, seed=3)
    assert a.tensors[0].shape == (16, 2, 16, 16) and a.tensors[1].shape == (16, 1, 16, 16)
    assert all(np.array_equal(u.numpy(), v.numpy()) for u, v in zip(a.tensors, b.tensors))
