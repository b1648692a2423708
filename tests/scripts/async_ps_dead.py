"""Run on 3 ranks (1 server + 2 workers, max_staleness = 0): worker rank 2 goes silent for HANG seconds after its
fifth item. With a strict synchronous bound, rank 1 would wait for it forever; instead the server declares it dead
after DEAD_TIMEOUT seconds and rank 1 trains on. If it comes back it is told to stop; if it does not, the run ends
with its outputs written and a message naming the silent rank.

Usage: mpiexec -n 3 python async_ps_dead.py HANG DEAD_TIMEOUT RUN_DIR
Prints one JSON line on rank 0 (when the job ends normally): the server's records and the strategy's stats.
"""

import json
import sys
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
import caldera.parallel.param_server  # noqa: F401  (importing a strategy module registers its name)
from caldera.models import MLP
from caldera.parallel import make_strategy

hang, dead_timeout, run_dir = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
world = caldera.init(seed=0)
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(2000, 20, generator=g), torch.randint(0, 5, (2000,), generator=g))


class HangingLoss(nn.Module):
    """Cross-entropy; on rank 2, the fifth call first goes silent for ``hang`` seconds (no message is sent)."""

    calls = 0

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        HangingLoss.calls += 1
        if world.rank == 2 and HangingLoss.calls == 5:
            time.sleep(hang)
        time.sleep(0.002)  # every item takes a little while, so the run lasts longer than the hang
        return nn.functional.cross_entropy(out, target)


model = MLP([20, 32, 5])
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
strategy = make_strategy("async-ps", servers=1, max_staleness=0, dead_timeout=dead_timeout)
trainer = caldera.Trainer(model, opt, HangingLoss(), max_epochs=6, batch_size=32, world=world, strategy=strategy,
                          progress=False, run_dir=run_dir)  # fmt: skip
history = trainer.fit(data)
assert all(torch.isfinite(p).all() for p in model.parameters())
if world.rank == 0:
    print(json.dumps({"stats": strategy.stats, "applied": strategy.applied_log, "epochs": len(history)}))
