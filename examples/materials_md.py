"""Score trained neural-network potentials on their validation replicas and run molecular dynamics with them,
side by side with the reference Lennard-Jones potential; with several runs (one per training seed), the mean and
spread over them.

    caldera train examples/materials_potential.toml                  # seed 0: runs/materials-potential/
    caldera train examples/materials_potential.toml --set run.seed=1 --set run.dir=runs/materials-potential-s1
    python examples/materials_md.py runs/materials-potential runs/materials-potential-s1 runs/materials-potential-s2
Usage: python examples/materials_md.py RUN_DIR [RUN_DIR ...] [--out DIR] [--steps 4000] [--temperature 0.2]
       [--replicas 8] [--smoke]
Smoke run (seconds, after materials_potential.toml's smoke run): python examples/materials_md.py runs/materials-potential --smoke

For each RUN_DIR/model.pt (from `caldera train examples/materials_potential.toml`): the force and energy errors on
the run's validation replicas, next to the trivial predictors (zero force, mean energy). Then ``replicas``
clusters are prepared by Langevin dynamics at ``temperature`` (the same clusters for every run) and each is
integrated in the microcanonical ensemble (velocity Verlet, no thermostat) with every run's learned forces and
once with the reference forces. Writes md.png (total-energy drift; pair-distance distribution), md.json and
materials_table.md into --out (default: the first run directory), and prints the table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.config import Config
from caldera.coupling import Surrogate
from caldera.errors import ConfigError
from caldera.io import atomic_write_text
from caldera.models.potential import energy_mae, force_mae
from caldera.sims.atoms import baselines, langevin, lattice_cluster, lj_energy_forces
from caldera.train.output import pyplot, save_figure
from caldera.train.run import build_data, load_runs, spread

DT = 0.005  # the time step the training data were made with (LJ time units)
# --smoke: two replicas, a short preparation and a few steps.
SMOKE = {"steps": 20, "replicas": 2, "prepare_steps": 50}
EnergyForces = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# The headline numbers, in table order: key, label, format.
ROWS = [("force_mae", "force MAE on the validation replicas (ε/σ per component)", "{:.3f}"),
        ("force_mae_percent", "the same, in % of the zero-force MAE", "{:.1f}"),
        ("energy_mae", "energy MAE per atom on the validation replicas (ε)", "{:.4f}"),
        ("energy_mae_percent", "the same, in % of the mean-energy MAE", "{:.1f}"),
        ("drift_per_atom_learned", "NVE total-energy drift per atom, learned forces", "{:.2g}"),
        ("pair_distribution_l1", "pair-distance distribution, L1 distance to the reference's", "{:.3f}"),
        ("energy_mae_per_atom_on_learned_trajectory", "energy error per atom along the learned trajectory (ε)",
         "{:.4f}")]  # fmt: skip


def as_potential(model: torch.nn.Module) -> EnergyForces:
    """Return the trained model as a NumPy energy/force function (float64; the model is cast in place)."""
    # The surrogate a simulation would call: NumPy in, NumPy out, in the precision the integrator runs in.
    surrogate = Surrogate(model, dtype=torch.float64)

    def energy_forces(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = surrogate(pos)  # [energy, forces]: the model's forward turns gradients on for the forces itself
        return out[:, 0], out[:, 1:].reshape(pos.shape)

    return energy_forces


def validation_scores(model: torch.nn.Module, cfg: Config) -> tuple[dict[str, float], dict[str, Any]]:
    """The run's errors on its validation replicas (rebuilt from its run file), the trivial predictors' errors,
    and the data settings."""
    _, val = build_data(cfg)
    x, y = val.tensors
    model.eval()
    with torch.no_grad():  # the model turns gradients on for its forces itself
        pred = torch.cat([model(chunk) for chunk in x.split(256)])
    base = baselines(y)
    scores = {"force_mae": float(force_mae(pred, y)), "energy_mae": float(energy_mae(pred, y))}
    scores["force_mae_percent"] = 100 * scores["force_mae"] / base["zero_force_mae"]
    scores["energy_mae_percent"] = 100 * scores["energy_mae"] / base["mean_energy_mae"]
    data = {"args": dict(cfg.data.args), "val_fraction": cfg.data.val_fraction, "n_val": len(y), **base}
    return scores, data


def table(summary: dict[str, dict[str, Any]], reference: dict[str, float], data: dict[str, Any]) -> str:
    """A Markdown table: mean ± sd over the runs, every run's value, and the trivial predictor or reference."""
    n = len(summary["force_mae"]["values"])
    head = f"| metric | mean ± sd over {n} seed{'s' * (n > 1)} | per seed | trivial predictor / reference |"
    beside = {"force_mae": f"{data['zero_force_mae']:.3f} (zero force)",
              "energy_mae": f"{data['mean_energy_mae']:.4f} (mean energy)",
              "drift_per_atom_learned": f"{reference['drift_per_atom_reference']:.2g} (reference LJ)"}  # fmt: skip
    out = [head, "| --- | --- | --- | --- |"]
    for key, label, fmt in ROWS:
        s = summary[key]
        out.append(f"| {label} | **{fmt.format(s['mean'])}** ± {fmt.format(s['sd'])} | "
                   f"{', '.join(fmt.format(v) for v in s['values'])} | {beside.get(key, '')} |")  # fmt: skip
    return "\n".join(out) + "\n"


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
    """Energy drift per atom over time, and the pair-distance distributions, of every run and the reference."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0.8, 3.2, 97)
    # The reference last, in black, over the learned runs.
    styles = {name: {"ls": "--", "color": "k"} if name == "reference LJ" else {"ls": "-"} for name in drift}
    for name, d in drift.items():
        a.plot(t, d.mean(1), lw=1, label=f"{name} (mean of replicas)", **styles[name])
    a.set(xlabel="time (LJ units)", ylabel="(E_total(t) - E_total(0)) / N", title="NVE total-energy drift")
    for name, r in dists.items():
        b.hist(r, bins=bins, density=True, histtype="step", lw=1.5, label=name, **styles[name])
    b.set(xlabel="pair distance r (sigma)", ylabel="density", title="pair-distance distribution")
    for ax in (a, b):
        ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def md_scores(potential: EnergyForces, traj: tuple[np.ndarray, np.ndarray], ref_hist: np.ndarray,
              n_atoms: int) -> dict[str, float]:  # fmt: skip
    """Drift, pair-distance agreement with the reference MD and the energy error along one learned trajectory."""
    totals, frames = traj
    on_learned = frames.reshape(-1, n_atoms, 3)
    return {
        "drift_per_atom_learned": float(np.abs((totals[-1] - totals[0]) / n_atoms).mean()),
        "pair_distribution_l1": float(np.abs(histogram(pair_distances(frames)) - ref_hist).sum() * 0.05),
        "energy_mae_per_atom_on_learned_trajectory": float(
            np.abs(potential(on_learned)[0] - lj_energy_forces(on_learned)[0]).mean() / n_atoms
        ),
    }


def histogram(r: np.ndarray) -> np.ndarray:
    """Pair-distance density in 48 bins of 0.05 sigma from 0.8 to 3.2."""
    return np.histogram(r, bins=np.linspace(0.8, 3.2, 49), density=True)[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score every run, run the MD, write md.png, md.json and materials_table.md into --out, return md.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", type=Path, nargs="+", help="one per training seed")
    p.add_argument("--out", type=Path, help="where md.json, md.png and the table go (default: the first run)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prepare-steps", type=int, default=1000, help="Langevin steps that prepare the replicas")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    try:  # runs compared side by side must share their data settings
        models, cfgs = load_runs(args.run_dirs, lambda cfg: dict(cfg.data.args))
    except ConfigError as exc:
        p.error(
            f"{exc} (train with `caldera train examples/materials_potential.toml` and pass its run directory)"
        )
    out = args.out or args.run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    scores, data = [], None
    for model, cfg in zip(models, cfgs):
        s, data = validation_scores(model, cfg)
        scores.append(s)
    n_atoms = data["args"].get("atoms", 13)
    rng = np.random.default_rng(args.seed)
    start = np.repeat(lattice_cluster(n_atoms)[None], args.replicas, axis=0)
    pos, vel = langevin(start, np.full(args.replicas, args.temperature), args.prepare_steps, rng)
    vel -= vel.mean(1, keepdims=True)  # no drift of the centre of mass
    ref = nve(pos, vel, lj_energy_forces, args.steps)  # one reference MD: the same clusters for every run
    ref_hist = histogram(pair_distances(ref[1]))
    reference = {"drift_per_atom_reference": float(np.abs((ref[0][-1] - ref[0][0]) / n_atoms).mean())}
    drift, dists = {}, {}
    for run_dir, model, s in zip(args.run_dirs, models, scores):
        learned = as_potential(model)
        traj = nve(pos, vel, learned, args.steps)
        s.update(md_scores(learned, traj, ref_hist, n_atoms))
        name = f"learned, {run_dir.name}" if len(args.run_dirs) > 1 else "learned"
        drift[name], dists[name] = (traj[0] - traj[0][0]) / n_atoms, pair_distances(traj[1])
    drift["reference LJ"], dists["reference LJ"] = (ref[0] - ref[0][0]) / n_atoms, pair_distances(ref[1])
    summary = {key: spread([s[key] for s in scores]) for key, _, _ in ROWS}
    settings = {k: vars(args)[k] for k in ("steps", "temperature", "replicas", "seed", "prepare_steps")}
    result = {"runs": [str(r) for r in args.run_dirs], "settings": settings, "data": data,
              "torch_threads": torch.get_num_threads(), "reference": reference,
              "per_run": dict(zip(map(str, args.run_dirs), scores)), "summary": summary}  # fmt: skip
    plot(np.arange(args.steps + 1) * DT, drift, dists, out / "md.png")
    atomic_write_text(out / "md.json", json.dumps(result, indent=2))
    text = table(summary, reference, data)
    atomic_write_text(out / "materials_table.md", text)
    print(text)
    print(f"wrote {out / 'md.json'}, materials_table.md, md.png")
    return result


if __name__ == "__main__":
    main()
