"""On-the-fly (active) learning of an interatomic potential during molecular dynamics.

    python examples/materials_active.py                   # alone (~1-2 min on 2 cores)
    python examples/materials_active.py --seeds 0 1 2     # three whole experiments: mean ± sd over them
    python examples/materials_active.py --smoke           # seconds: tiny sizes (the test suite runs this)
Smoke run (seconds): python examples/materials_active.py --smoke
    mpiexec -n 2 python examples/materials_active.py      # each rank runs its own replicas; gradients over MPI

A committee of ``--members`` NeuralPotentials (different initial weights), each trained by its own OnlineTrainer,
starts from a tiny seed set of cold (T = 0.05) 13-atom Lennard-Jones clusters. Replicas of the cluster then run
Langevin dynamics near melting (T = 0.25-0.30) driven by the committee's MEAN forces. Every ``--check-every``
steps the committee's disagreement (std of the members' forces, max over atoms) flags the configurations it is
unsure about: only those are sent to the reference (exact Lennard-Jones here, standing in for DFT), added to the
replay buffers, and the committee trains a few steps, data parallel over the union of all ranks' samples.
A replica whose geometry blows up (atoms overlapping or flying off, forces exploding) restarts from its last
trusted configuration. The same MD is then run with the seed-only committee (no learning) for comparison.

The true force error along the trajectory is computed with the reference FOR EVALUATION ONLY: it is never given
to the model and not counted as a reference call. Rank 0 writes RUN_DIR/active.png and RUN_DIR/active.json.
A seed sets the committee's initial weights, its batch draws, the MD noise and the start clusters (the cold
reference set stays the same); seed 0 is the run docs/materials.md reported before it had several. With several
``--seeds``, each experiment writes into RUN_DIR/seed-S, and RUN_DIR/active_seeds.json and active_seeds.md hold
every seed's numbers with their mean and sample standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import caldera
from caldera.coupling import OnlineTrainer
from caldera.models.potential import NeuralPotential, energy_force_loss
from caldera.sims.atoms import committee_disagreement, lj_energy_forces, pack, sample
from caldera.train.output import pyplot, save_figure
from caldera.train.run import spread
from caldera.world import World

DT = 0.005  # LJ time units, as in caldera.sims.atoms
TRACE_KEYS = ("time", "flagged", "checked", "disagreement", "force_mae", "ref_calls", "guard_calls", "restarts",
              "flagged_disagreement_min")  # fmt: skip
# --smoke: a small committee, a short MD run.
SMOKE = {
    "members": 2,
    "seed_configs": 8,
    "seed_steps": 5,
    "replicas": 2,
    "steps": 40,
    "check_every": 10,
    "train_steps": 2,
    "hidden": 8,
}
Reference = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def build_committee(members: int, world: World, hidden: int = 32, lr: float = 3e-3, batch_size: int = 16,
                    capacity: int = 4096, seed: int = 0) -> list[OnlineTrainer]:  # fmt: skip
    """One OnlineTrainer per committee member; members differ by their initial weights (and batch draws), and
    so do the committees of different ``seed``s."""
    committee = []
    for k in range(members):
        # allreduce broadcasts rank 0's weights, so only the member index (and the seed) matters
        torch.manual_seed(1000 * (seed + 1) + k)
        model = NeuralPotential(hidden=hidden, atom_energy=-3.0)
        committee.append(OnlineTrainer(
            model, torch.optim.Adam(model.parameters(), lr), energy_force_loss, capacity=capacity,
            batch_size=batch_size, strategy="allreduce" if world.size > 1 else "single", world=world,
            seed=1000 * seed + k, verbose=False,
        ))  # fmt: skip
    return committee


def stream(seed: int, *key: int) -> np.random.Generator:
    """The random stream ``key`` of an experiment; seed 0 keeps the streams of the runs before seeds existed."""
    return np.random.default_rng([*key, seed] if seed else list(key))


def seed_set(
    n: int, temperature: float = 0.05, atoms: int = 13, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` reference-labelled snapshots of cold clusters: positions (n, N, 3), targets (n, 1 + 3N)."""
    x, energy, forces, _ = sample(n, atoms, temperature, temperature, replicas=max(1, n // 8), seed=seed)
    return x, pack(energy, forces)


def predict(committee: list[OnlineTrainer], pos: np.ndarray) -> np.ndarray:
    """Every member's forces (K, n, N, 3) on configurations ``pos`` (n, N, 3), as float64."""
    x = torch.from_numpy(pos).float()
    with torch.no_grad():  # the model's forward turns gradients on for the forces by itself
        out = [m.model(x)[:, 1:].reshape(pos.shape).double().numpy() for m in committee]
    return np.stack(out)


def train(committee: list[OnlineTrainer], steps: int) -> float:
    """``steps`` optimizer steps for every member (collective); return the members' mean loss."""
    return float(np.mean([m.train(steps) for m in committee]))


def blow_ups(pos: np.ndarray, forces: np.ndarray, r_min: float = 0.75, r_max: float = 2.7,
             f_max: float = 300.0) -> dict[str, np.ndarray]:  # fmt: skip
    """Which replicas (n,) have left physics, and how: overlapping atoms, an atom flying off, exploding forces.

    The bounds are far outside what the reference visits at T <= 0.3 (closest pair 0.96, radius 1.9, |F| 60)."""
    n_atoms = pos.shape[1]
    d = np.linalg.norm(pos[:, :, None] - pos[:, None], axis=-1) + 10 * np.eye(n_atoms)
    radius = np.linalg.norm(pos - pos.mean(1, keepdims=True), axis=-1).max(1)
    finite = np.isfinite(pos).all((1, 2)) & np.isfinite(forces).all((1, 2))
    return {
        "non-finite": ~finite,
        "overlap": finite & (d.min((1, 2)) < r_min),
        "atom flew off": finite & (radius > r_max),
        "force > cap": finite & (np.abs(forces).max((1, 2)) > f_max),
    }


def run_md(committee: list[OnlineTrainer], start: np.ndarray, temps: np.ndarray, steps: int,
           rng: np.random.Generator, check_every: int = 10, threshold: float = 0.5, train_steps: int = 8,
           learn: bool = True, reference: Reference = lj_energy_forces, friction: float = 1.0,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Langevin MD of replicas ``start`` (n, N, 3) on the committee-mean forces; every ``check_every`` steps the
    configurations whose disagreement exceeds ``threshold`` go to ``reference`` and into training (when
    ``learn``). Collective. Return per-check traces summed over all ranks' replicas."""
    world = committee[0].world
    t = temps[:, None, None]
    c1, c2 = np.exp(-friction * DT), np.sqrt((1 - np.exp(-2 * friction * DT)) * t)
    pos, trusted = start.copy(), start.copy()
    vel = rng.normal(size=pos.shape) * np.sqrt(t)
    forces = predict(committee, pos)
    trace: dict[str, Any] = {k: [] for k in TRACE_KEYS}
    # Reference calls by check and by guard, restarts (this rank); labels the committee has trained on (all ranks).
    count = dict.fromkeys(("calls", "guarded", "restarts", "trained_on"), 0)
    causes: dict[str, int] = {}  # restarts by reason, this rank
    last_restart = np.full(len(pos), -(10**9))
    for step in range(1, steps + 1):
        f = forces.mean(0)
        vel = vel + 0.5 * DT * f  # BAOAB, as caldera.sims.atoms.langevin, but on the committee-mean forces
        pos = pos + 0.5 * DT * vel
        vel = c1 * vel + c2 * rng.normal(size=pos.shape)
        pos = pos + 0.5 * DT * vel
        forces = predict(committee, pos)
        vel = vel + 0.5 * DT * forces.mean(0)
        bad = _guard(committee, reference if learn else None, forces.mean(0), step, pos, vel, trusted, start, t,
                     rng, count, causes, last_restart, 10 * check_every)  # fmt: skip
        if bad.any():
            forces = predict(committee, pos)
        if step % check_every:
            continue
        spread = committee_disagreement(forces)
        flag = (spread > threshold) & ~bad
        trusted[~flag & ~bad] = pos[~flag & ~bad]
        if learn and flag.any():  # the expensive call, only where the committee is unsure
            count["calls"] += _label(committee, reference, pos[flag])
            trusted[flag] = pos[flag]
        err = np.abs(forces.mean(0) - lj_energy_forces(pos)[1]).mean((1, 2))  # EVALUATION ONLY: never learnt
        low = float(spread[flag].min()) if flag.any() else np.inf
        row = (int(flag.sum()), len(pos), float(spread.sum()), float(err.sum()), count["calls"] + count["guarded"],
               count["guarded"], count["restarts"], low, int(learn) * (count["calls"] + count["guarded"]))  # fmt: skip
        sums = world.comm.allgather(row)
        _record(trace, step * DT, sums)
        loss = float("nan")
        # New labels on some rank: every rank trains (collective), so the ranks stay in step.
        if sum(s[-1] for s in sums) > count["trained_on"]:
            loss = train(committee, train_steps)
            forces = predict(committee, pos)  # the next half-kick on the updated committee
        count["trained_on"] = sum(s[-1] for s in sums)
        if log and step % (check_every * 20) == 0:
            log(_progress(trace, loss))
    trace["restart_causes"] = _merge(world.comm.allgather(causes))
    return trace


def _guard(committee: list[OnlineTrainer], reference: Reference | None, f: np.ndarray, step: int, pos: np.ndarray,
           vel: np.ndarray, trusted: np.ndarray, start: np.ndarray, t: np.ndarray, rng: np.random.Generator,
           count: dict[str, int], causes: dict[str, int], last_restart: np.ndarray, soon: int) -> np.ndarray:  # fmt: skip
    """Restart the replicas whose MD on mean forces ``f`` blew up (in place: positions, velocities, trust); return
    which did. With a ``reference``, the finite ones among them are labelled first."""
    why = blow_ups(pos, f)
    bad = np.any(list(why.values()), axis=0)
    if not bad.any():
        return bad
    # A finite geometry the model mishandled (an atom leaving) is worth a reference call: it is exactly what the
    # committee got wrong while agreeing. Overlaps and NaNs are not physics worth learning.
    physical = bad & ~why["overlap"] & ~why["non-finite"]
    if reference is not None and physical.any():
        count["guarded"] += _label(committee, reference, pos[physical])
    # Back to the last configuration the committee (or the reference) vouched for, fresh velocities; a replica that
    # fails again soon after is on a path out of that configuration (e.g. an atom evaporating): back to its start.
    again = bad & (step - last_restart < soon)
    pos[bad], trusted[again] = trusted[bad], start[again]
    pos[again] = start[again]
    vel[bad] = rng.normal(size=vel[bad].shape) * np.sqrt(t[bad])
    last_restart[bad] = step
    count["restarts"] += int(bad.sum())
    for reason, hit in why.items():
        causes[reason] = causes.get(reason, 0) + int(hit.sum())
    return bad


def _label(committee: list[OnlineTrainer], reference: Reference, pos: np.ndarray) -> int:
    """Call the reference on ``pos`` and add the labelled configurations to every member's buffer."""
    energy, forces = reference(pos)
    for m in committee:
        m.add(pos, pack(energy, forces))
    return len(pos)


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    """Add up per-rank counters."""
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _record(trace: dict[str, Any], time_: float, sums: list[tuple]) -> None:
    """Append one check's numbers, summed (or averaged per replica) over the ranks."""
    checked = sum(s[1] for s in sums)
    trace["time"].append(time_)
    for i, key in ((0, "flagged"), (1, "checked"), (4, "ref_calls"), (5, "guard_calls"), (6, "restarts")):
        trace[key].append(sum(s[i] for s in sums))
    trace["disagreement"].append(sum(s[2] for s in sums) / checked)
    trace["force_mae"].append(sum(s[3] for s in sums) / checked)
    trace["flagged_disagreement_min"].append(min(s[7] for s in sums))


def _progress(trace: dict[str, Any], loss: float) -> str:
    window = slice(-40, None)
    frac = sum(trace["flagged"][window]) / sum(trace["checked"][window])
    return (f"t {trace['time'][-1]:5.1f}  flagged {frac:5.1%}  disagreement {np.mean(trace['disagreement'][window]):.3f}"
            f"  force MAE (eval) {np.mean(trace['force_mae'][window]):.3f}  reference calls {trace['ref_calls'][-1]}"
            f"  restarts {trace['restarts'][-1]}" + (f"  loss {loss:.3g}" if loss == loss else ""))  # fmt: skip


def tail_mean(values: list[float], fraction: float = 0.25) -> float:
    """Mean over the last ``fraction`` of a trace: the state the run ended in."""
    n = max(1, int(len(values) * fraction))
    return float(np.mean(values[-n:]))


def smooth(values: list[float], width: int) -> np.ndarray:
    """Moving average (same length, shorter windows at the start)."""
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(0, i - width)
    return (c[i] - c[lo]) / (i - lo)


def plot(active: dict[str, Any], seed_only: dict[str, Any], threshold: float,
         replicas: int, path: Path) -> Path:  # fmt: skip
    """Reference-call fraction, disagreement, true force error and cumulative reference calls vs MD time."""
    plt = pyplot()
    fig, ax = plt.subplots(2, 2, figsize=(10, 6.4))
    t = np.array(active["time"])
    every = round((t[1] - t[0]) / DT) if len(t) > 1 else 1
    share = np.array(active["flagged"]) / (np.array(active["checked"]) * every)
    ax[0, 0].plot(t, smooth(list(share), 20), color="C0")
    ax[0, 0].set(
        ylabel="share of replica-steps",
        ylim=(0, None),
        title=f"MD steps that called the reference (checks every {every}: max {1 / every:.0%})",
    )
    for key, a, title in (("disagreement", ax[0, 1], "committee disagreement (max over atoms)"),
                          ("force_mae", ax[1, 0], "true force MAE of the mean model (evaluation only)")):  # fmt: skip
        a.plot(
            t,
            smooth(seed_only[key], 20),
            color="C3",
            label=f"seed-only committee ({seed_only['restarts'][-1]} blow-ups restarted)",
        )
        a.plot(
            t,
            smooth(active[key], 20),
            color="C0",
            label=f"on-the-fly learning ({active['restarts'][-1]} blow-ups restarted)",
        )
        a.set(yscale="log", title=title, ylabel="ε/σ")
        a.legend()
    ax[0, 1].axhline(threshold, color="k", ls=":", lw=1, label="threshold")
    ax[1, 1].plot(t, active["ref_calls"], color="C0", label="on-the-fly: reference calls")
    ax[1, 1].plot(
        t, t / DT * replicas, color="0.5", ls="--", label="reference MD: one call per step per replica"
    )
    ax[1, 1].set(yscale="log", ylabel="reference calls (cumulated)", title="cost")
    ax[1, 1].legend()
    for a in ax.flat:
        a.set_xlabel("MD time (LJ units)")
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Seed the committee, run on-the-fly learning MD, rerun the MD seed-only; write active.png/json (per seed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=3, help="committee size")
    p.add_argument("--seed-configs", type=int, default=32, help="cold reference configurations to start from")
    p.add_argument("--seed-steps", type=int, default=300, help="optimizer steps on the seed set")
    p.add_argument("--replicas", type=int, default=8, help="MD replicas per rank")
    p.add_argument("--steps", type=int, default=2000, help="MD steps")
    p.add_argument("--t-min", type=float, default=0.25)
    p.add_argument("--t-max", type=float, default=0.30)
    p.add_argument("--check-every", type=int, default=10, help="MD steps between disagreement checks")
    p.add_argument("--threshold", type=float, default=0.5, help="disagreement (ε/σ) above which to call the "
                   "reference")  # fmt: skip
    p.add_argument("--train-steps", type=int, default=8, help="optimizer steps per member after new labels")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one whole experiment per seed")
    p.add_argument("--run-dir", type=Path, default=Path("runs/materials-active"))
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    world = caldera.init(seed=0)
    if len(args.seeds) == 1:
        return experiment(args, world, args.seeds[0], args.run_dir)
    runs = {s: experiment(args, world, s, args.run_dir / f"seed-{s}") for s in args.seeds}
    summary = {key: spread([float(n[key]) for n in runs.values()]) for key, _, _ in SEED_ROWS}
    if world.is_main:
        text = seeds_table(summary, list(runs))
        (args.run_dir / "active_seeds.json").write_text(
            json.dumps({"seeds": list(runs), "per_seed": runs, "summary": summary}, indent=1)
        )
        (args.run_dir / "active_seeds.md").write_text(text)
        print(text, flush=True)
        print(f"wrote {args.run_dir / 'active_seeds.json'} and active_seeds.md", flush=True)
    return {"per_seed": runs, "summary": summary}


def experiment(args: argparse.Namespace, world: World, seed: int, run_dir: Path) -> dict[str, Any]:
    """One whole on-the-fly experiment and its seed-only comparison under ``seed``; rank 0 writes its files."""
    log = (lambda s: print(s, flush=True)) if world.is_main else None
    start_time = time.perf_counter()

    committee = build_committee(args.members, world, args.hidden, seed=seed)
    x, y = seed_set(args.seed_configs)
    for m in committee:
        m.add(x[world.rank :: world.size], y[world.rank :: world.size])  # the ranks' shares make up the set
    seed_loss = train(committee, args.seed_steps)
    seed_only = [copy.deepcopy(m.model) for m in committee]
    if log:
        log(f"seed {seed}: {args.members} members trained on {len(x)} cold configurations (T = 0.05): loss "
            f"{seed_loss:.3g}")  # fmt: skip

    replicas = args.replicas * world.size
    temps = np.linspace(args.t_min, args.t_max, replicas)[world.rank :: world.size]
    start = x[stream(seed, 7).integers(len(x), size=args.replicas)]  # cold seed configurations
    md = dict(steps=args.steps, check_every=args.check_every, threshold=args.threshold)
    active = run_md(committee, start, temps, rng=stream(seed, 3, world.rank), log=log,
                    train_steps=args.train_steps, **md)  # fmt: skip
    for m, weights in zip(committee, seed_only):
        m.model.load_state_dict(weights.state_dict())
    frozen = run_md(committee, start, temps, rng=stream(seed, 3, world.rank), learn=False, **md)
    numbers = summarize(active, frozen, args.steps, replicas, time.perf_counter() - start_time, world.size)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        plot(active, frozen, args.threshold, replicas, run_dir / "active.png")
        traces = {"active": active, "seed_only": frozen}
        (run_dir / "active.json").write_text(json.dumps({"summary": numbers, "traces": traces}, indent=1))
        print(headline(numbers), flush=True)
        print(f"wrote {run_dir / 'active.png'} and active.json", flush=True)
    return numbers


# The numbers reported over seeds, in table order: key, label, format.
SEED_ROWS = [("reference_calls", "reference calls", "{:.0f}"),
             ("cost_fraction", "share of the replica-steps that called the reference", "{:.2%}"),
             ("force_mae_active_last_quarter", "force MAE along the trajectory, last quarter: on-the-fly", "{:.3f}"),
             ("force_mae_seed_only_last_quarter", "the same, seed-only committee", "{:.3f}"),
             ("restarts_active", "blow-ups restarted: on-the-fly", "{:.1f}"),
             ("restarts_seed_only", "blow-ups restarted: seed-only", "{:.1f}"),
             ("wall_s", "wall time (s)", "{:.0f}")]  # fmt: skip


def seeds_table(summary: dict[str, dict[str, Any]], seeds: list[int]) -> str:
    """Markdown: mean ± sd over the seeds and every seed's value, per number."""
    out = [f"| over seeds {', '.join(map(str, seeds))} | mean ± sd | per seed |", "| --- | --- | --- |"]
    for key, label, fmt in SEED_ROWS:
        s = summary[key]
        out.append(f"| {label} | **{fmt.format(s['mean'])}** ± {fmt.format(s['sd'])} | "
                   f"{', '.join(fmt.format(v) for v in s['values'])} |")  # fmt: skip
    return "\n".join(out) + "\n"


def summarize(active: dict, frozen: dict, steps: int, replicas: int, seconds: float, ranks: int) -> dict:
    """The run's numbers: reference calls against ab initio MD, final force errors, blow-ups."""
    md_calls = steps * replicas  # reference MD would call it once per step per replica
    return {
        "ranks": ranks, "replicas": replicas, "md_steps": steps, "reference_calls": active["ref_calls"][-1],
        "reference_calls_by_guard": active["guard_calls"][-1],
        "reference_md_calls": md_calls, "cost_fraction": active["ref_calls"][-1] / md_calls,
        "checks": sum(active["checked"]), "flagged_fraction_last_quarter": tail_mean(active["flagged"])
        / tail_mean(active["checked"]),
        "force_mae_active_last_quarter": tail_mean(active["force_mae"]),
        "force_mae_seed_only_last_quarter": tail_mean(frozen["force_mae"]),
        "force_mae_active_first_check": active["force_mae"][0],
        "restarts_active": active["restarts"][-1], "restarts_seed_only": frozen["restarts"][-1],
        "restart_causes_active": active["restart_causes"], "restart_causes_seed_only": frozen["restart_causes"],
        "wall_s": seconds,
    }  # fmt: skip


def headline(n: dict) -> str:
    """The honest one-paragraph result."""
    return (
        f"{n['reference_calls']} reference calls instead of {n['reference_md_calls']} ({n['md_steps']} MD steps x "
        f"{n['replicas']} replicas): {n['cost_fraction']:.1%} of the cost of reference MD.\n"
        f"force MAE of the committee mean along its trajectory (last quarter, reference used for evaluation only): "
        f"{n['force_mae_active_last_quarter']:.3f} with on-the-fly learning vs "
        f"{n['force_mae_seed_only_last_quarter']:.3f} for the seed-only committee; blow-ups (restarts): "
        f"{n['restarts_active']} vs {n['restarts_seed_only']}. {n['wall_s']:.0f} s on {n['ranks']} rank(s)."
    )


if __name__ == "__main__":
    main()
