"""Run on N ranks: data-parallel training must equal one process with the global batch.

Usage: mpiexec -n N python dp_equivalence.py MODEL(mlp|cnn|gated|potential) N_SAMPLES GLOBAL_BATCH EPOCHS BUCKET_MB OVERLAP [REDUCER [GRAD_CLIP
       [ACCUMULATE]]]   (the reference always takes whole batches; the data-parallel run ACCUMULATE micro-batches)
Prints one JSON line on rank 0: max |w_dp - w_ref|, max spread of weights across ranks, metrics.
"""

import json
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.comm.local import LocalComm
from caldera.models import MLP, NeuralPotential, SmallCNN
from caldera.models.potential import energy_force_loss
from caldera.sims.atoms import dataset
from caldera.world import World

kind, n, batch, epochs, bucket_mb, overlap = sys.argv[1:7]
n, batch, epochs, bucket_mb, overlap = int(n), int(batch), int(epochs), float(bucket_mb), overlap == "1"
reducer = sys.argv[7] if len(sys.argv) > 7 else "auto"
clip = float(sys.argv[8]) if len(sys.argv) > 8 and sys.argv[8] else None
accumulate = int(sys.argv[9]) if len(sys.argv) > 9 else 1

world = caldera.init()
torch.set_num_threads(1)
g = torch.Generator().manual_seed(123)
if kind == "mlp":
    data = TensorDataset(torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g))

    def model_fn():
        return MLP([20, 64, 64, 5])
elif kind == "gated":  # a layer that gets gradients on every other training step only
    data = TensorDataset(torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g))

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.extra, self.calls = MLP([20, 64, 5]), nn.Linear(20, 5), 0

        def forward(self, x):
            out = self.body(x)
            if self.training:
                self.calls += 1
                if self.calls % 2 == 0:
                    out = out + self.extra(x)
            return out

    def model_fn():
        return Gated()
elif kind == "potential":  # forces are -dE/dx inside forward: a loss on them is a double backward
    data = dataset(n_configs=n, replicas=5, val_fraction=0.0)["train"]

    def model_fn():
        return NeuralPotential(hidden=16, atom_energy=-3.0)
else:
    data = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))

    def model_fn():
        return SmallCNN(channels=8)


def train(strategy, w, accumulate=1):
    torch.manual_seed(0)
    model = model_fn()
    # Without momentum a zero gradient (data parallel) and no gradient (one process) leave a weight alike.
    opt = torch.optim.SGD(model.parameters(), lr=0.001 if kind == "potential" else 0.05,
                          momentum=0.0 if kind == "gated" else 0.9)  # fmt: skip
    loss = energy_force_loss if kind == "potential" else nn.CrossEntropyLoss()
    trainer = caldera.Trainer(model, opt, loss, max_epochs=epochs, batch_size=batch, world=w,
                              strategy=strategy, strategy_options={"grad_clip": clip, **({"bucket_mb": bucket_mb, "first_bucket_mb":
                              bucket_mb, "overlap": overlap, "reducer": reducer} if strategy == "allreduce" else {})},
                              progress=False, seed=3,
                              accumulate=accumulate)  # fmt: skip
    history = trainer.fit(data, data)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), history, trainer


flat, history, trainer = train("allreduce", world, accumulate)
n_buckets = getattr(trainer.strategy, "n_buckets", None)
everyone = torch.stack(world.comm.allgather(flat))
spread = (everyone - everyone[0]).abs().max().item()
if world.rank == 0:
    ref, ref_history, _ = train("single", World(comm=LocalComm()))  # same grad_clip through strategy_options
    print(
        json.dumps(
            {
                "max_diff": (flat - ref).abs().max().item(),
                "spread": spread,
                "loss": history[-1]["train_loss"],
                "ref_loss": ref_history[-1]["train_loss"],
                "val_loss": history[-1]["val_loss"],
                "ref_val_loss": ref_history[-1]["val_loss"],
                "size": world.size,
                "shm": trainer.strategy.reducer == "shm",
                "reductions": getattr(trainer.strategy, "reductions", None),
                "n_buckets": n_buckets,
                "steps": trainer.global_step,
            }
        )
    )
