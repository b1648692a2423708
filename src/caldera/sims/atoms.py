"""A built-in Lennard-Jones cluster whose Langevin molecular dynamics makes interatomic-potential training data.

Atoms (reduced units: epsilon = sigma = mass = k_B = 1) interact by the Lennard-Jones pair potential
phi(r) = 4 (r^-12 - r^-6), whose energy and forces are known in closed form. Independent replicas of one cluster
(13 atoms by default: the magic-number icosahedron, which melts near T = 0.3) run Langevin dynamics, each at its
own temperature between a cold solid and a hot liquid-like droplet, and are sampled every few steps. Each sample
is (positions (N, 3), [total energy, forces (3N)]): what a machine-learned potential learns to reproduce.
Validation data are whole held-out replicas, so neighbouring snapshots of one trajectory never straddle the split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

R_MIN = 2 ** (1 / 6)  # the pair distance at the bottom of the Lennard-Jones well


def lj_energy_forces(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the Lennard-Jones energies (n,) and forces (n, N, 3) of configurations ``pos`` (n, N, 3)."""
    diff = pos[:, :, None, :] - pos[:, None, :, :]  # r_i - r_j
    n_atoms = pos.shape[1]
    r2 = (diff**2).sum(-1) + np.eye(n_atoms)  # the diagonal gets 1 to avoid 0/0; it is masked below
    inv6 = np.where(np.eye(n_atoms, dtype=bool), 0.0, r2**-3)
    energy = 2.0 * (inv6**2 - inv6).sum(axis=(1, 2))  # 4 (r^-12 - r^-6), each pair counted twice
    # F_i = sum_j 24 (2 r^-12 - r^-6) / r^2 (r_i - r_j)
    coef = 24.0 * (2.0 * inv6**2 - inv6) / r2
    forces = (coef[..., None] * diff).sum(axis=2)
    return energy, forces


def lattice_cluster(n_atoms: int) -> np.ndarray:
    """The ``n_atoms`` sites of an fcc lattice (nearest-neighbour distance R_MIN) closest to the origin, centred."""
    k = int(np.ceil(n_atoms ** (1 / 3))) + 2
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = grid[grid.sum(1) % 2 == 0] * (R_MIN / np.sqrt(2))  # fcc = even-parity sites of a cubic grid
    sites = sites[np.lexsort((sites[:, 2], sites[:, 1], sites[:, 0], (sites**2).sum(1)))][:n_atoms]
    return sites - sites.mean(0)


def langevin(
    pos: np.ndarray, temps: np.ndarray, steps: int, rng: np.random.Generator, dt: float = 0.005,
    friction: float = 1.0, vel: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Advance replicas ``pos`` (n, N, 3) at temperatures ``temps`` (n,) by BAOAB Langevin steps; return
    (positions, velocities)."""
    t = temps[:, None, None]
    vel = rng.normal(size=pos.shape) * np.sqrt(t) if vel is None else vel
    c1 = np.exp(-friction * dt)
    c2 = np.sqrt((1 - c1**2) * t)
    _, f = lj_energy_forces(pos)
    for _ in range(steps):
        vel = vel + 0.5 * dt * f
        pos = pos + 0.5 * dt * vel
        vel = c1 * vel + c2 * rng.normal(size=pos.shape)
        pos = pos + 0.5 * dt * vel
        _, f = lj_energy_forces(pos)
        vel = vel + 0.5 * dt * f
    return pos, vel


def sample(
    n_configs: int = 2000, atoms: int = 13, t_min: float = 0.05, t_max: float = 0.35, replicas: int = 40,
    every: int = 20, equilibrate: int = 400, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Run ``replicas`` Langevin trajectories (temperatures evenly spaced in [t_min, t_max]) and take snapshots
    every ``every`` steps; return positions (n, N, 3), energies (n,), forces (n, N, 3), replica index (n,)."""
    _check(n_configs, atoms, t_min, t_max, replicas, every)
    rng = np.random.default_rng(seed)
    temps = np.linspace(t_min, t_max, replicas)
    start = lattice_cluster(atoms)
    pos = np.repeat(start[None], replicas, axis=0) + 0.01 * rng.normal(size=(replicas, atoms, 3))
    pos, vel = langevin(pos, temps, equilibrate, rng)
    frames = []
    for _ in range(-(-n_configs // replicas)):
        pos, vel = langevin(pos, temps, every, rng, vel=vel)
        frames.append(pos - pos.mean(axis=1, keepdims=True))  # the drift of the centre of mass means nothing
    x = np.stack(frames, axis=1).reshape(-1, atoms, 3)[:n_configs]  # replica-major order
    replica = np.repeat(np.arange(replicas), len(frames))[:n_configs]
    energy, forces = lj_energy_forces(x)
    return x, energy, forces, replica


def _check(n_configs: int, atoms: int, t_min: float, t_max: float, replicas: int, every: int) -> None:
    if atoms < 2:
        raise ValueError(f"atoms = {atoms}: a potential needs at least 2 atoms; try atoms = 13")
    if not 0 < t_min <= t_max:
        raise ValueError(
            f"temperatures t_min = {t_min}, t_max = {t_max}: need 0 < t_min <= t_max (e.g. 0.05, 0.35)"
        )
    if t_max > 0.5:
        raise ValueError(
            f"t_max = {t_max}: clusters evaporate above about T = 0.5 in LJ units; use t_max <= 0.5"
        )
    if replicas < 1 or every < 1 or n_configs < replicas:
        raise ValueError(f"need replicas >= 1, every >= 1 and n_configs >= replicas (got replicas = {replicas}, "
                         f"every = {every}, n_configs = {n_configs})")  # fmt: skip


def pack(energy: np.ndarray, forces: np.ndarray) -> np.ndarray:
    """Targets as the model outputs them: (n, 1 + 3N) = [total energy, forces flattened]."""
    return np.concatenate([energy[:, None], forces.reshape(len(energy), -1)], axis=1)


def dataset(
    n_configs: int = 2000, atoms: int = 13, t_min: float = 0.05, t_max: float = 0.35, replicas: int = 40,
    val_fraction: float = 0.1, seed: int = 0,
) -> tuple[TensorDataset, TensorDataset] | dict[str, TensorDataset]:  # fmt: skip
    """Return (train, val) TensorDatasets of (positions (N, 3), [energy, forces (3N)]), float32; validation holds
    whole replicas spread over the temperature range (none when ``val_fraction`` is 0)."""
    x, energy, forces, replica = sample(n_configs, atoms, t_min, t_max, replicas, seed=seed)
    x, y = torch.from_numpy(x).float(), torch.from_numpy(pack(energy, forces)).float()
    n_val = int(round(val_fraction * replicas))
    if n_val == 0:
        return {"train": TensorDataset(x, y)}
    if n_val >= replicas:
        raise ValueError(
            f"val_fraction = {val_fraction} leaves no training replica out of {replicas}; lower it"
        )
    held = np.isin(replica, np.linspace(0, replicas - 1, n_val).round().astype(int))
    val, train = torch.from_numpy(held), torch.from_numpy(~held)
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def baselines(target: torch.Tensor) -> dict[str, float]:
    """The errors of trivial predictors on targets (n, 1 + 3N): zero force, and the mean energy per atom."""
    n_atoms = (target.shape[1] - 1) // 3
    e = target[:, 0].double() / n_atoms
    return {
        "zero_force_mae": float(target[:, 1:].abs().mean()),
        "mean_energy_mae": float((e - e.mean()).abs().mean()),
    }


def committee_disagreement(forces: np.ndarray) -> np.ndarray:
    """Uncertainty of a committee's forces (K, n, N, 3): the members' force std, max over atoms -> (n,)."""
    if forces.ndim != 4 or forces.shape[0] < 2 or forces.shape[-1] != 3:
        raise ValueError(f"committee forces must be (members >= 2, configurations, atoms, 3); got shape "
                         f"{forces.shape}")  # fmt: skip
    # Per atom, the root mean square deviation of the force vectors from the committee mean (as in DP-GEN's
    # max_devi_f); the worst atom decides, because one badly described atom is enough to derail MD.
    spread = np.sqrt(((forces - forces.mean(0)) ** 2).sum(-1).mean(0))
    return spread.max(-1)
