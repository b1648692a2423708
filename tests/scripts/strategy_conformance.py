"""Every strategy through the same checks, on the ranks of this job (2 under mpiexec) or on one process.

Usage: mpiexec -n 2 python strategy_conformance.py RUN_DIR NAME...   (main rank prints one JSON line per name)
A name is a registered strategy, or NAME+zero for allreduce with its optimizer sharded; the toy strategy of
toy_strategy.py is registered by importing it. A strategy that refuses this world size says so in one ValueError
("refused"): the test then runs it on one process.

Step-by-step strategies: setup, 3 steps, validation, the checkpoint state into a fresh instance (built with other
initial weights) that takes the 4th step like the original, and the same weights and validation loss as 'single'
on the same global batches; close. Loop strategies (runs_own_loop): a 1-epoch fit with a checkpoint, a fresh
instance resumed from it for a 2nd epoch, compared with 'single' over the same 2 epochs.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

import caldera
from caldera.checkpoint import Checkpointer
from caldera.comm.local import LocalComm
from caldera.parallel import make_strategy
from caldera.world import World

sys.path.insert(0, str(Path(__file__).parent))
import toy_strategy  # noqa: E402, F401  (registers "toy-sum-average")

GLOBAL, STEPS = 8, 4
# Options under which the math says the strategy equals one process on the global batch. local-sgd averages its
# momentum too: with per-rank state (the default) a checkpoint holds rank 0's, so a resume is not the same step.
OPTIONS = {"local-sgd": {"sync_every": 1, "average_state": True}, "async-ps": {"max_staleness": 0}, "async-shared": {"workers": 1},
           "allreduce+zero": {"shard_optimizer": True}, "allreduce+zero2": {"shard_optimizer": True, "shard_gradients": True},
           "tensor": {"plan": {"0": "colwise", "2": "rowwise"}}}  # fmt: skip
g = torch.Generator().manual_seed(7)
X, Y = torch.randn(STEPS * GLOBAL, 6, generator=g), torch.randn(STEPS * GLOBAL, 3, generator=g)
XV, YV = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)


def trainer(name, world, seed=0, **kw):
    """A fresh trainer with a fresh instance of ``name``'s strategy (other initial weights per ``seed``)."""
    strategy, options = name.split("+")[0], OPTIONS.get(name, {})
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return caldera.Trainer(model, opt, nn.MSELoss(), world=world, strategy=make_strategy(strategy, **options),
                           batch_size=GLOBAL, progress=False, plot=False, seed=3, **kw)  # fmt: skip


def weights(t):
    t.strategy.consolidate("checkpoint")  # whole and agreed on every rank (pipeline stages, sharded state)
    return torch.cat([p.detach().flatten() for p in t.model.parameters()]).clone()


def local(t, k):
    shard, shards = t.strategy.data_shards(t.world)
    x, y = X[k * GLOBAL : (k + 1) * GLOBAL], Y[k * GLOBAL : (k + 1) * GLOBAL]
    return x.tensor_split(shards)[shard], y.tensor_split(shards)[shard]


def stepwise(name, world):
    t = trainer(name, world)
    assert not t.strategy.runs_own_loop
    start = torch.cat([p.detach().flatten() for p in t.model.parameters()]).clone()
    losses = [float(t.train_step(*local(t, k))[0]) for k in range(STEPS - 1)]
    t.strategy.consolidate("validation")
    val = t.evaluate((XV, YV))["loss"]
    state = world.comm.bcast(t.shared_state())  # rank 0 saves; every rank loads
    fresh = trainer(name, world, seed=1)
    fresh.net = fresh.strategy.setup(
        fresh.model, fresh.optimizer, world
    )  # Trainer.fit's order: setup, restore
    fresh.load_state_dict(state)
    for tr in (t, fresh):
        tr.train_step(*local(tr, STEPS - 1))
    mine, theirs = weights(t), weights(fresh)
    ref = trainer("single", World(comm=LocalComm()))
    for k in range(STEPS - 1):
        ref.train_step(X[k * GLOBAL : (k + 1) * GLOBAL], Y[k * GLOBAL : (k + 1) * GLOBAL])
    ref_val = ref.evaluate((XV, YV))["loss"]
    ref.train_step(X[-GLOBAL:], Y[-GLOBAL:])
    t.strategy.consolidate("outputs")
    for tr in (t, fresh, ref):
        tr.strategy.close()
    spread = torch.stack(world.comm.allgather(mine))
    return {"finite": all(v == v for v in losses), "moved": float((mine - start).abs().max()),
            "roundtrip_diff": float((mine - theirs).abs().max()), "single_diff": float((mine - weights(ref)).abs().max()),
            "val_diff": abs(val - ref_val), "spread": float((spread - spread[0]).abs().max())}  # fmt: skip


def looped(name, world, run_dir):
    out = {}
    ckpt = Checkpointer(f"{run_dir}/{name}", world, every="end")
    t = trainer(name, world, max_epochs=1, checkpointer=ckpt)
    assert t.strategy.runs_own_loop
    first = t.fit((X, Y))
    t2 = trainer(
        name, world, seed=1, max_epochs=2, resume=True, checkpointer=Checkpointer(f"{run_dir}/{name}", world)
    )
    second = t2.fit((X, Y))
    ref = trainer("single", World(comm=LocalComm()), max_epochs=2)
    ref.fit((X, Y))
    w = torch.cat([p.detach().flatten() for p in t2.model.parameters()])
    out["finite"] = all(h["train_loss"] == h["train_loss"] for h in first + second)
    out["epochs"] = [len(first), len(second)]
    out["resumed"] = t2.resumed_from is not None
    out["single_diff"] = float(
        (w - torch.cat([p.detach().flatten() for p in ref.model.parameters()])).abs().max()
    )
    return out


def check(name, world, run_dir):
    """The checks of ``name`` on ``world``: a dict of measurements, or {"refused": message}."""
    try:
        loop = make_strategy(name.split("+")[0]).runs_own_loop
        return looped(name, world, run_dir) if loop else stepwise(name, world)
    except ValueError as e:  # ConfigError too: a strategy that cannot run on this many ranks
        if "mpiexec" in str(e) or "ranks" in str(e):
            return {"refused": str(e)}
        raise


if __name__ == "__main__":
    world = caldera.init()
    torch.set_num_threads(1)
    for name in sys.argv[2:]:
        result = check(name, world, sys.argv[1])
        if world.is_main:
            print(json.dumps({"name": name, **result}), flush=True)
