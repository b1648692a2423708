"""Pipeline stages on real ranks train exactly like one process on the whole batch.

Usage: mpiexec -n N python pipeline_equivalence.py RUN_DIR [1f1b|gpipe [STAGES]]; prints a JSON line on rank 0."""

import json
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.world import World


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 3))  # fmt: skip


SCHEDULE = sys.argv[2] if len(sys.argv) > 2 else "1f1b"
STAGES = int(sys.argv[3]) if len(sys.argv) > 3 else None  # fewer than the ranks: replicas, data parallel


def fit(model: nn.Module, world: World, strategy: str, run_dir) -> caldera.Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = caldera.Trainer(model, opt, nn.MSELoss(), max_epochs=2, batch_size=24, strategy=strategy,
                              strategy_options={"micro_batches": 3, "grad_clip": 0.5, "schedule": SCHEDULE, "stages": STAGES}, world=world, seed=3,
                              progress=False, plot=False, run_dir=run_dir)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100, 8, generator=g)  # 100 samples, batch 24: the last batch (4) has one 2-sample piece
    data = TensorDataset(x, torch.sin(x[:, :3]) + 0.1 * torch.randn(100, 3, generator=g))
    trainer.fit(data, data)
    return trainer


world = caldera.init(seed=0)
pipe = fit(build(), world, "pipeline", sys.argv[1])
flat = torch.cat([p.detach().flatten() for p in pipe.model.parameters()])
spread = max(float((flat - f).abs().max()) for f in world.comm.allgather(flat))
momentum = [pipe.optimizer.state[p].get("momentum_buffer") is not None for p in pipe.model.parameters()]
peaks = world.comm.allgather(pipe.strategy.peak_in_flight)  # micro-batches whose activations a stage held
if world.is_main:
    ref = fit(build(), World(), "single", None)  # one process, whole batches
    ref_flat = torch.cat([p.detach().flatten() for p in ref.model.parameters()])
    saved = torch.load(f"{sys.argv[1]}/model.pt")
    print(json.dumps({
        "size": world.size, "max_diff": float((flat - ref_flat).abs().max()), "spread": spread,
        "val_loss": pipe.history[-1]["val_loss"], "ref_val_loss": ref.history[-1]["val_loss"],
        "train_loss": pipe.history[-1]["train_loss"], "ref_train_loss": ref.history[-1]["train_loss"],
        "momentum_everywhere": all(momentum), "saved_whole": len(saved) == len(ref.model.state_dict()),
        "peaks": peaks,
    }))  # fmt: skip
