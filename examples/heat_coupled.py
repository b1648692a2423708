"""A simulation and its trainer on separate ranks of one MPI job; the surrogate improves inside the simulation.

    mpiexec -n 3 python examples/heat_coupled.py simulation : -n 1 python examples/heat_coupled.py trainer
    (add --smoke to both halves: seconds, tiny sizes)

Simulation ranks advance their plates leap by leap (``--leap`` solver steps) and send each leap's
(T, k) -> T_next pairs to a trainer rank. The trainer learns from a replay buffer and publishes its weights back
after every round; each simulation rank keeps a ``Surrogate`` of the newest weights and, every few leaps, checks
how far the surrogate's prediction of the leap it just computed is from the solver. Several trainer ranks train
data-parallel (``-n 2 ... trainer``), each fed by its share of the simulation ranks.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from caldera.coupling import OnlineTrainer, Surrogate, connect
from caldera.models import UNetSmall
from caldera.sims import heat
from caldera.train.metrics import rel_l2

# --smoke: a few leaps of a few small plates.
SMOKE = {"leaps": 8, "check_every": 4, "plates": 2, "grid": 16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=["simulation", "trainer"])
    p.add_argument("--leaps", type=int, default=120, help="leaps each simulation rank computes")
    p.add_argument("--leap", type=int, default=10, help="solver steps per leap")
    p.add_argument("--plates", type=int, default=8, help="plates per simulation rank")
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--check-every", type=int, default=20, help="leaps between surrogate checks")
    p.add_argument(
        "--max-pending", type=int, default=2, help="leaps a simulation rank may run ahead of training"
    )
    p.add_argument("--run-dir", default="runs/heat-coupled")
    p.add_argument("--seed", type=int, default=0, help="initial weights, plates and batches")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    link = connect(args.role, max_pending=args.max_pending)  # first, before anything else that uses MPI
    torch.manual_seed(args.seed)
    model = UNetSmall(in_channels=2, out_channels=1, channels=16)
    if args.role == "simulation":
        simulate(link, model, args)
    else:
        train(link, model, args)


def simulate(link, model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Advance plates, send every leap to the trainer, use the newest surrogate; report from simulation rank 0."""
    rank = link.comm.Get_rank()
    # seed 0 keeps the plates of the runs measured before there was a --seed
    rng = np.random.default_rng([1, rank, args.seed] if args.seed else [1, rank])
    t, k = heat.initial_conditions(rng, args.plates, args.grid)
    surrogate = Surrogate(model)
    solver_s = 0.0
    for leap in range(1, args.leaps + 1):
        start = time.perf_counter()
        t_next = heat.simulate(t, k, args.leap, heat.DT)
        solver_s += time.perf_counter() - start
        x = np.stack([t, k], axis=1)
        link.send(x, t_next[:, None])
        link.refresh(surrogate.model)  # never waits: the newest weights, if any arrived
        if leap % args.check_every == 0:
            err = np.linalg.norm(surrogate(x)[:, 0] - t_next) / np.linalg.norm(t_next)
            errors = link.comm.gather(err)  # the simulation's own communicator
            if rank == 0:
                print(f"leap {leap}: surrogate error on this leap {np.mean(errors):.3f} "
                      f"(weights received: {link.version})", flush=True)  # fmt: skip
        t = t_next
        if leap % 8 == 0:  # cooled plates teach little: new ones
            t, k = heat.initial_conditions(rng, args.plates, args.grid)
    link.close()
    if rank == 0:
        print(f"simulation rank 0: {link.sent} samples sent, solver time {solver_s:.2f} s", flush=True)


def train(link, model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Receive samples, take a few steps, publish the weights; repeat while any simulation rank runs."""
    world = link.world  # the trainer ranks only
    online = OnlineTrainer(model, torch.optim.Adam(model.parameters(), lr=2e-3), torch.nn.MSELoss(),
                           metrics={"rel_l2": rel_l2}, capacity=1024, batch_size=32, world=world,
                           strategy="allreduce" if world.size > 1 else "single", run_dir=args.run_dir,
                           seed=args.seed)  # fmt: skip
    while link.active():
        got = link.receive()
        if got is not None:
            online.add(*got)
        online.train(4)
        link.publish(online.model)
    link.close()
    online.finish()


if __name__ == "__main__":
    main()
