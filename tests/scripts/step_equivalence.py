"""Run on N ranks: a user's training step computing mse(model(x), y) trains the same weights as [train] loss = "mse".

Usage: [mpiexec -n N] python step_equivalence.py RUN_DIR STRATEGY ACCUMULATE [PARALLEL_OPTIONS_JSON]
Prints one JSON line on rank 0: whether the two runs' weights and histories are identical, and the histories.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import caldera
from caldera.config import load_config
from caldera.train.run import train


def data(n: int = 100) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x @ torch.randn(6, 3, generator=g))


def mse_step(model, batch):
    x, y = batch
    pred = model(x)
    return F.mse_loss(pred, y), {"mae": (pred - y).abs().mean()}


def main() -> None:
    run_dir, strategy, accumulate = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    world = caldera.init()
    torch.set_num_threads(1)
    runs = {}
    for name, train_ in (("loss", {"metrics": ["mae"]}), ("step", {"step": "__main__:mse_step"})):
        cfg = load_config({
            "run": {"dir": str(run_dir / name)}, "model": {"name": "mlp", "args": {"sizes": [6, 16, 3]}},
            "data": {"source": "__main__:data", "batch_size": 24, "val_fraction": 0.2},
            "optim": {"epochs": 2, "lr": 0.01}, "parallel": {"strategy": strategy, **options},
            "train": {"progress": False, "plot": False, "accumulate": accumulate, **train_},
        })  # fmt: skip
        runs[name] = train(cfg, world=world)
    if world.is_main:
        a, b = (torch.load(run_dir / name / "model.pt") for name in ("loss", "step"))
        same = all(torch.equal(a[k], b[k]) for k in a)
        keys = ("train_loss", "val_loss", "val_mae")
        print(json.dumps({"same_weights": same, "loss": [[h[k] for k in keys] for h in runs["loss"]],
                          "step": [[h[k] for k in keys] for h in runs["step"]],
                          "step_train_mae": [h.get("train_mae", float("nan")) for h in runs["step"]]}))  # fmt: skip


if __name__ == "__main__":  # async-shared's worker processes import this file
    main()
