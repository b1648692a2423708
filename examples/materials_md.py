"""Molecular dynamics with a trained neural-network potential, side by side with the reference Lennard-Jones one.

Usage: python examples/materials_md.py RUN_DIR [--steps 4000] [--temperature 0.2] [--replicas 8] [--smoke]
Smoke run (seconds, after materials_potential.toml's smoke run): python examples/materials_md.py runs/materials-potential --smoke

Loads RUN_DIR/model.pt (from `caldera train examples/materials_potential.toml`), prepares ``replicas`` clusters by
Langevin dynamics at ``temperature``, then integrates each twice in the microcanonical ensemble (velocity Verlet,
no thermostat): once with the learned forces, once with the reference forces. Writes RUN_DIR/md.png (total-energy
drift; pair-distance distribution) and RUN_DIR/md.json, and prints the numbers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from caldera.coupling import Surrogate
from caldera.sims.atoms import langevin, lattice_cluster, lj_energy_forces
from caldera.train.output import pyplot, save_figure
from caldera.train.rundir import RunDir

DT = 0.005  # the time step the training data were made with (LJ time units)
# --smoke: two replicas, a short preparation and a few steps.
SMOKE = {"steps": 20, "replicas": 2, "prepare_steps": 50}
EnergyForces = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def load_potential(run_dir: Path) -> tuple[EnergyForces, int]:
    """Return the trained model as a NumPy energy/force function (float64), and the number of atoms it saw."""
    # The surrogate a simulation would call: NumPy in, NumPy out, in the precision the integrator runs in.
    surrogate = Surrogate.from_run(run_dir, dtype=torch.float64)

    def energy_forces(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = surrogate(pos)  # [energy, forces]: the model's forward turns gradients on for the forces itself
        return out[:, 0], out[:, 1:].reshape(pos.shape)

    cfg = json.loads(RunDir(run_dir).config_resolved.read_text())
    return energy_forces, cfg["data"]["args"].get("atoms", 13)


def nve(pos: np.ndarray, vel: np.ndarray, potential: EnergyForces, steps: int, every: int = 10):
    """Velocity Verlet; return total energies (steps + 1, n) and snapshots of the positions (every ``every``)."""
    energy, forces = potential(pos)
    totals, frames = [energy + 0.5 * (vel**2).sum((1, 2))], []
    for step in range(1, steps + 1):
        vel = vel + 0.5 * DT * forces
        pos = pos + DT * vel
        energy, forces = potential(pos)
        vel = vel + 0.5 * DT * forces
        totals.append(energy + 0.5 * (vel**2).sum((1, 2)))
        if step % every == 0:
            frames.append(pos)
    return np.array(totals), np.array(frames)


def pair_distances(frames: np.ndarray) -> np.ndarray:
    """All distinct pair distances in snapshots (..., N, 3)."""
    n = frames.shape[-2]
    d = np.linalg.norm(frames[..., :, None, :] - frames[..., None, :, :], axis=-1)
    i, j = np.triu_indices(n, 1)
    return d[..., i, j].ravel()


def plot(t: np.ndarray, drift: dict[str, np.ndarray], dists: dict[str, np.ndarray], path: Path) -> Path:
    """Energy drift per atom over time, and the pair-distance distributions of both potentials."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0.8, 3.2, 97)
    for (name, d), style in zip(drift.items(), ("-", "--")):
        a.plot(t, d.mean(1), style, label=f"{name} (mean of replicas)")
    a.set(xlabel="time (LJ units)", ylabel="(E_total(t) - E_total(0)) / N", title="NVE total-energy drift")
    for (name, r), style in zip(dists.items(), ("-", "--")):
        b.hist(r, bins=bins, density=True, histtype="step", ls=style, lw=1.5, label=name)
    b.set(xlabel="pair distance r (sigma)", ylabel="density", title="pair-distance distribution")
    for ax in (a, b):
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run both trajectories, write md.png and md.json into the run directory, return the numbers."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prepare-steps", type=int, default=1000, help="Langevin steps that prepare the replicas")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if not (args.run_dir / "model.pt").exists():
        p.error(f"{args.run_dir / 'model.pt'} not found: train first with "
                "`caldera train examples/materials_potential.toml` and pass its run directory")  # fmt: skip
    learned, n_atoms = load_potential(args.run_dir)
    rng = np.random.default_rng(args.seed)
    start = np.repeat(lattice_cluster(n_atoms)[None], args.replicas, axis=0)
    pos, vel = langevin(start, np.full(args.replicas, args.temperature), args.prepare_steps, rng)
    vel -= vel.mean(1, keepdims=True)  # no drift of the centre of mass
    runs = {
        name: nve(pos, vel, fn, args.steps)
        for name, fn in (("learned", learned), ("reference LJ", lj_energy_forces))
    }
    drift = {name: (e - e[0]) / n_atoms for name, (e, _) in runs.items()}
    dists = {name: pair_distances(frames) for name, (_, frames) in runs.items()}
    hist = {k: np.histogram(v, bins=np.linspace(0.8, 3.2, 49), density=True)[0] for k, v in dists.items()}
    on_learned = runs["learned"][1].reshape(-1, n_atoms, 3)
    ref_e = lj_energy_forces(on_learned)[0]
    numbers = {
        "drift_per_atom_learned": float(np.abs(drift["learned"][-1]).mean()),
        "drift_per_atom_reference": float(np.abs(drift["reference LJ"][-1]).mean()),
        "pair_distribution_l1": float(np.abs(hist["learned"] - hist["reference LJ"]).sum() * 0.05),
        "energy_mae_per_atom_on_learned_trajectory": float(
            np.abs(learned(on_learned)[0] - ref_e).mean() / n_atoms
        ),
    }
    plot(np.arange(args.steps + 1) * DT, drift, dists, args.run_dir / "md.png")
    (args.run_dir / "md.json").write_text(json.dumps(numbers, indent=2))
    for k, v in numbers.items():
        print(f"{k:45s} {v:.4g}")
    print(f"wrote {args.run_dir / 'md.png'}")
    return numbers


if __name__ == "__main__":
    main()
