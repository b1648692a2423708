"""Run on 3 ranks: local-sgd averaging every step, and async-ps with max_staleness = 0 (1 server + 2 workers),
must both equal synchronous SGD, i.e. one process with the global batch (SGD with momentum and weight decay).

Usage: mpiexec -n 3 python async_equivalence.py
Prints one JSON line on rank 0: max |w - w_ref| for each, and the spread of local-sgd's weights across ranks;
then checks that async-ps hands every rank the workers' averaged BatchNorm statistics.
"""

import json

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
import caldera.parallel.local_sgd  # noqa: F401  (importing a strategy module registers its name)
import caldera.parallel.param_server  # noqa: F401
from caldera.comm.local import LocalComm
from caldera.models import MLP
from caldera.parallel import make_strategy
from caldera.train.run import LRFactor
from caldera.world import World

world = caldera.init()
torch.set_num_threads(1)
g = torch.Generator().manual_seed(123)
# 100 samples, global batch 24: the last batch (4 samples) splits unevenly over 3 ranks.
data = TensorDataset(torch.randn(100, 20, generator=g), torch.randint(0, 5, (100,), generator=g))


def train(strategy, w, scheduled=False, accumulate=1):
    torch.manual_seed(0)
    model = MLP([20, 64, 64, 5])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    # Warm-up then cosine decay over the 15 steps: the servers must apply each global batch's own rate.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, LRFactor("cosine", 4, 15)) if scheduled else None
    trainer = caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=3, batch_size=24, world=w,
                              strategy=strategy, progress=False, seed=3, scheduler=schedule,
                              accumulate=accumulate)  # fmt: skip
    if trainer.strategy.runs_own_loop:
        trainer.fit(data)
    else:
        trainer.fit(data, None)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer.strategy


local, strategy = train(make_strategy("local-sgd", sync_every=1), world)
everyone = torch.stack(world.comm.allgather(local))
ps, ps_strategy = train(make_strategy("async-ps", servers=1, max_staleness=0), world)
ps_scheduled, _ = train(make_strategy("async-ps", servers=1, max_staleness=0), world, scheduled=True)
# Each work item in 2 micro-batches: the workers' gradients, hence the weights, are the same.
ps_micro, _ = train(make_strategy("async-ps", servers=1, max_staleness=0), world, accumulate=2)

# BatchNorm statistics are not served by async-ps: the workers' own are averaged into the final model.
bn = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
bn_trainer = caldera.Trainer(bn, torch.optim.SGD(bn.parameters(), lr=0.05), nn.CrossEntropyLoss(), max_epochs=1,
                             batch_size=24, world=world, strategy=make_strategy("async-ps"), progress=False)  # fmt: skip
bn_trainer.fit(data)
stats = torch.stack(world.comm.allgather(torch.cat([bn[1].running_mean, bn[1].running_var])))
if world.rank == 0:
    ref, _ = train("single", World(comm=LocalComm()))
    ref_scheduled, _ = train("single", World(comm=LocalComm()), scheduled=True)
    print(json.dumps({"local_sgd_diff": (local - ref).abs().max().item(),
                      "local_sgd_spread": (everyone - everyone[0]).abs().max().item(),
                      "local_sgd_averages": strategy.averages, "ps_diff": (ps - ref).abs().max().item(),
                      "ps_scheduled_diff": (ps_scheduled - ref_scheduled).abs().max().item(),
                      "ps_micro_diff": (ps_micro - ref).abs().max().item(),
                      "schedule_matters": (ref_scheduled - ref).abs().max().item(),
                      "ps_staleness_max": ps_strategy.stats["staleness_max"],
                      "ps_updates": ps_strategy.stats["updates"], "size": world.size,
                      "bn_spread": (stats - stats[0]).abs().max().item(),
                      "bn_moved": (stats[0] - torch.cat([torch.zeros(16), torch.ones(16)])).abs().max().item()}))  # fmt: skip
