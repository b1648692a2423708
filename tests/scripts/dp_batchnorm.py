"""Run on N ranks: a BatchNorm model trained with allreduce; the ranks' running statistics, each from its own
shard, are averaged and identical after ``synchronize()`` (which the trainer calls before validation and checkpoints). Prints one JSON line per rank."""

import json

import torch
from torch import nn

import caldera

world = caldera.init(seed=0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
x = torch.randn(96, 4) * torch.linspace(0.5, 3.0, 96)[:, None]  # rank shards differ in scale
y = x.sum(1, keepdim=True)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
strategy = caldera.parallel.make_strategy("allreduce")
net = strategy.setup(model, opt, world)
for i in range(0, 96, 32):
    part = slice(i + world.rank * 32 // world.size, i + (world.rank + 1) * 32 // world.size)
    strategy.backward(nn.functional.mse_loss(net(x[part]), y[part]))
    strategy.step()
own = model[1].running_var.clone()
everyone = torch.stack(world.comm.allgather(own))
strategy.synchronize()
print(json.dumps({"rank": world.rank, "own_spread": (everyone - everyone[0]).abs().max().item(),
                  "error": (model[1].running_var - everyone.mean(0)).abs().max().item()}))  # fmt: skip
strategy.close()
