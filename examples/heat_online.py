"""Train a heat-diffusion surrogate *while* the simulation runs, then let it stand in for the solver.

    python examples/heat_online.py                      # alone (~1 min on 2 cores)
    mpiexec -n 2 python examples/heat_online.py         # 2 ranks: each simulates its own plates
Smoke run (seconds): python examples/heat_online.py --smoke

Every round, each rank advances its plates by one leap of ``--leap`` solver steps, offers the pairs
(T_now, k) -> T_next to its replay buffer, and the model takes a few optimizer steps on batches drawn from all ranks'
buffers. Cooled plates are replaced by new random ones, so what the simulation produces keeps changing; the
reservoir buffer keeps a uniform sample of everything seen. Checkpoints hold the model, the buffers and the
simulation state: run the same command again after a kill and it continues; SIGTERM (Slurm's warning) or
``--time-limit`` checkpoints and exits 85 for a requeue. At the end the surrogate advances
fresh plates leap by leap and is compared with the solver (error and time per leap, ``rollout.png``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import caldera
from caldera.checkpoint import REQUEUE_EXIT_CODE
from caldera.coupling import OnlineTrainer, Surrogate
from caldera.models import UNetSmall
from caldera.sims import heat
from caldera.train.metrics import rel_l2
from caldera.train.output import pyplot, save_figure

# --smoke: a few rounds on a few small plates.
SMOKE = {
    "rounds": 4,
    "plates": 4,
    "grid": 16,
    "leap": 4,
    "capacity": 64,
    "steps_per_round": 2,
    "checkpoint_every": 2,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=120, help="simulation leaps (each followed by training)")
    p.add_argument("--steps-per-round", type=int, default=4, help="optimizer steps after each leap")
    p.add_argument("--plates", type=int, default=16, help="plates simulated per rank")
    p.add_argument("--leap", type=int, default=10, help="solver steps the surrogate learns to jump")
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--capacity", type=int, default=1024, help="replay buffer size per rank")
    p.add_argument("--checkpoint-every", type=int, default=20, help="rounds between evaluation + checkpoint")
    p.add_argument(
        "--time-limit", help="wall time ('2h', '01:59:00'): checkpoint and exit 85 a minute before it"
    )
    p.add_argument("--run-dir", default="runs/heat-online")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    world = caldera.init(seed=0)
    model = UNetSmall(in_channels=2, out_channels=1, channels=16)
    online = OnlineTrainer(
        model, torch.optim.Adam(model.parameters(), lr=2e-3), torch.nn.MSELoss(), metrics={"rel_l2": rel_l2},
        capacity=args.capacity, policy="reservoir", batch_size=32,
        strategy="allreduce" if world.size > 1 else "single", world=world, run_dir=args.run_dir,
        time_limit=args.time_limit,
    )  # fmt: skip
    rng = np.random.default_rng([1, world.rank])  # each rank simulates different plates
    val_x, val_y = pairs(
        *heat.initial_conditions(np.random.default_rng([2, world.rank]), 32, args.grid), args.leap
    )
    state = online.restore()  # the simulation state saved with the last checkpoint, or None
    if state is None:
        t, k = heat.initial_conditions(rng, args.plates, args.grid)
        age = np.zeros(args.plates, dtype=int)
    else:
        t, k, age, rng.bit_generator.state = state

    for _ in range(online.rounds, args.rounds):
        t_next = heat.simulate(t, k, args.leap, heat.DT)
        online.add(np.stack([t, k], axis=1), t_next[:, None])
        online.train(args.steps_per_round)
        t, age = t_next, age + 1
        cooled = age >= 8  # a plate near equilibrium teaches little: start a new one
        if cooled.any():
            t[cooled], k[cooled] = heat.initial_conditions(rng, int(cooled.sum()), args.grid)
            age[cooled] = 0
        if online.rounds % args.checkpoint_every == 0 or online.should_stop:
            online.evaluate(val_x, val_y)
            online.checkpoint(extra=(t, k, age, rng.bit_generator.state))
        if online.should_stop:  # SIGTERM or the wall time: the checkpoint holds everything, requeue
            if world.is_main:
                print(f"stopping ({online.stop_reason}): run the same command again to continue", flush=True)
            sys.exit(REQUEUE_EXIT_CODE)
    online.finish()
    if world.is_main:
        compare_rollout(Surrogate(online.model), args.grid, args.leap, Path(args.run_dir))


def pairs(t: np.ndarray, k: np.ndarray, leap: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [T, k] and targets T after ``leap`` solver steps."""
    return np.stack([t, k], axis=1), heat.simulate(t, k, leap, heat.DT)[:, None]


def compare_rollout(surrogate: Surrogate, grid: int, leap: int, run_dir: Path, leaps: int = 4) -> None:
    """Advance fresh plates ``leaps`` leaps with the solver and with the surrogate; print error and time."""
    t0, k = heat.initial_conditions(np.random.default_rng(12345), 64, grid)
    truth, guess = t0, t0.astype(np.float32)
    solver_s = surrogate_s = 0.0
    print(f"surrogate vs solver on 64 new plates, {leap} solver steps per leap:")
    for i in range(1, leaps + 1):
        start = time.perf_counter()
        truth = heat.simulate(truth, k, leap, heat.DT)
        solver_s += time.perf_counter() - start
        start = time.perf_counter()
        guess = surrogate(np.stack([guess, k.astype(np.float32)], axis=1))[:, 0]
        surrogate_s += time.perf_counter() - start
        err = np.linalg.norm(guess - truth) / np.linalg.norm(truth)
        print(f"  leap {i}: relative L2 error {err:.3f}")
    print(f"  time for {leaps} leaps: solver {solver_s * 1e3:.1f} ms, surrogate {surrogate_s * 1e3:.1f} ms")
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    lo, hi = float(truth[0].min()), float(truth[0].max())
    for ax, img, title in ((axes[0], truth[0], "solver"), (axes[1], guess[0], "surrogate"),
                           (axes[2], guess[0] - truth[0], "difference")):  # fmt: skip
        im = ax.imshow(img, cmap="coolwarm" if title == "difference" else "inferno",
                       **({} if title == "difference" else {"vmin": lo, "vmax": hi}))  # fmt: skip
        ax.set_title(f"{title} after {leaps * leap} steps")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    print(f"  wrote {save_figure(fig, run_dir / 'rollout.png')}")


if __name__ == "__main__":
    main()
