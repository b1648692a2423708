"""Run on N ranks: fp16-mixed data parallel with an overflow on one rank only; every rank must skip together.

Usage: mpiexec -n N python precision_dp.py [MODE]
Rank 1 multiplies its loss by 1e8 on its 5th training step, so only its fp16 backward overflows; after the
all-reduce every rank sees the inf and must skip that step. Prints one JSON line on rank 0.
"""

import json
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.models import MLP
from caldera.precision import FP16Mixed, make_precision

mode = sys.argv[1] if len(sys.argv) > 1 else "fp16-mixed"
world = caldera.init(seed=0)
torch.set_num_threads(1)
g = torch.Generator().manual_seed(123)
x = torch.randn(96, 6, generator=g)
data = TensorDataset(x, x[:, :2].sum(1, keepdim=True) * 0.5)
calls = 0


def loss_fn(out, y):
    global calls
    loss = nn.functional.mse_loss(out, y)
    if torch.is_grad_enabled():  # training steps only, not evaluate()
        calls += 1
        if world.rank == 1 and calls == 5:
            return loss * 1e8
    return loss


model = MLP([6, 16, 1])
# The dtype the first Linear computes in, recorded inside the strategy's forward passes: a mode that silently
# ran in fp32 (autocast lost) would still skip together and end identical.
dtypes = set()
next(m for m in model.modules() if isinstance(m, nn.Linear)).register_forward_hook(
    lambda _, __, out: dtypes.add(str(out.dtype))
)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
precision = FP16Mixed(growth_interval=4) if mode == "fp16-mixed" else make_precision(mode)
trainer = caldera.Trainer(model, opt, loss_fn, max_epochs=3, batch_size=16, world=world, strategy="allreduce",
                          strategy_options={"bucket_mb": 0.0005}, progress=False, precision=precision, seed=1)  # fmt: skip
before = trainer.evaluate(data)["loss"]
trainer.fit(data)
after = trainer.evaluate(data)["loss"]
flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
everyone = torch.stack(world.comm.allgather(flat))
states = world.comm.allgather(trainer.precision.state_dict() if mode == "fp16-mixed" else {})
dtypes = world.comm.allgather(sorted(dtypes))
if world.rank == 0:
    print(json.dumps({"spread": (everyone - everyone[0]).abs().max().item(), "states": states, "before": before,
                      "after": after, "finite": bool(flat.isfinite().all()), "size": world.size, "dtypes": dtypes}))  # fmt: skip
