"""Pipeline stages on real ranks train exactly like one process on the whole batch.

Usage: mpiexec -n N python pipeline_equivalence.py RUN_DIR [1f1b|gpipe [STAGES [fp32|fp16]]]; prints a JSON line on
rank 0. fp16: fp16-mixed with a loss scale so large that the first steps overflow (and must be skipped alike)."""

import json
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.precision import FP16Mixed
from caldera.world import World


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 3))  # fmt: skip


SCHEDULE = sys.argv[2] if len(sys.argv) > 2 else "1f1b"
STAGES = int(sys.argv[3]) if len(sys.argv) > 3 else None  # fewer than the ranks: replicas, data parallel
FP16 = len(sys.argv) > 4 and sys.argv[4] == "fp16"


def precision():
    return FP16Mixed(init_scale=2.0**22) if FP16 else "fp32"


class Probe(caldera.Callback):
    """After every step: the weights this rank holds, and whether its optimizer state is its own stage's only."""

    def __init__(self) -> None:
        self.released: list[bool] = []
        self.held = 0

    def on_step_end(self, trainer: caldera.Trainer) -> None:
        own = {id(p) for p in trainer.strategy.params}
        self.held = sum(p.numel() for p in trainer.model.parameters())
        only_own = all(id(p) in own for p, st in trainer.optimizer.state.items() if st)
        self.released.append(self.held == sum(p.numel() for p in trainer.strategy.params) and only_own)


probe = Probe()
at_validation: list[int] = []  # parameters a rank held whenever it scored a validation batch


def held_now(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A metric that records what the scoring rank holds: stages validate in place, without the whole model."""
    at_validation.append(sum(p.numel() for p in models[-1].parameters()))
    return torch.zeros(())


models: list[nn.Module] = []


def fit(model: nn.Module, world: World, strategy: str, run_dir) -> caldera.Trainer:
    models.append(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = caldera.Trainer(model, opt, nn.MSELoss(), max_epochs=2, metrics={"held": held_now}, precision=precision(), batch_size=24, strategy=strategy,
                              strategy_options={"grad_clip": 0.5, **({"micro_batches": 3, "pipeline_schedule": SCHEDULE, "stages": STAGES} if strategy == "pipeline" else {})}, world=world, seed=3,
                              progress=False, plot=False, run_dir=run_dir,
                              callbacks=[probe] if strategy == "pipeline" else [],
                              # fp16: whether a step overflows depends on the micro-batches' fp16 products, so the
                              # reference runs the same 3 pieces (accumulated), not whole batches.
                              accumulate=3 if FP16 and strategy == "single" else 1)  # fmt: skip
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
# While training, a rank held only its stage (Probe); after fit it holds the whole model again.
released = all(probe.released) and len(probe.released) > 0
restored = [tuple(p.shape) for p in pipe.model.parameters()] == [tuple(p.shape) for p in build().parameters()]
held = probe.held
checks = world.comm.allgather((released, restored, held, sorted(set(at_validation))))
scalers = world.comm.allgather(pipe.precision.state_dict())  # fp16: one loss scale for every stage
if world.is_main:
    ref = fit(build(), World(), "single", None)  # one process, whole batches
    ref_flat = torch.cat([p.detach().flatten() for p in ref.model.parameters()])
    saved = torch.load(f"{sys.argv[1]}/model.pt")
    print(json.dumps({
        "size": world.size, "max_diff": float((flat - ref_flat).abs().max()), "spread": spread,
        "val_loss": pipe.history[-1]["val_loss"], "ref_val_loss": ref.history[-1]["val_loss"],
        "train_loss": pipe.history[-1]["train_loss"], "ref_train_loss": ref.history[-1]["train_loss"],
        "momentum_everywhere": all(momentum), "saved_whole": len(saved) == len(ref.model.state_dict()),
        "peaks": peaks, "released": [c[0] for c in checks], "restored": [c[1] for c in checks],
        "held": [c[2] for c in checks], "held_at_validation": [c[3] for c in checks],
        "scaler": scalers if FP16 else None,
        "ref_scaler": ref.precision.state_dict() if FP16 else None,
    }))  # fmt: skip
