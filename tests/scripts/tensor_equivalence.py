"""Tensor parallel runs of examples/digits_tensor.toml on real ranks equal one process's run of the same file.

Usage: mpiexec -n 4 python tensor_equivalence.py WORK_DIR; rank 0 prints one JSON line. In one job: ranks 0-1 train
2 epochs with tp = 2; all 4 train 1 epoch as tp = 2 x 2 replicas with a checkpoint (written shard-wise), which ranks
0-1 resume for epoch 2, and rank 0 alone resumes too; rank 0 alone trains 1 and 2 epochs with strategy 'single' (the
references). Tensor-parallel runs write their final weights shard-wise (model-shards/), read back joined."""

import json
import shutil
import sys
from pathlib import Path

import torch

import caldera
from caldera.config import load_config
from caldera.parallel.tensor import read_sharded_weights
from caldera.train.run import train
from caldera.world import World

WORK = Path(sys.argv[1])
RUN_FILE = Path(__file__).resolve().parents[2] / "examples/digits_tensor.toml"
SMALL = {"optim.name": "sgd", "optim.lr": 0.2, "optim.momentum": 0.9, "model.args.dim": 16, "model.args.heads": 2, "model.args.layers": 1, "data.batch_size": 256,
         "train.progress": False, "train.plot": False}  # fmt: skip


def config(run_dir: Path, epochs: int, strategy: str = "tensor", **parallel):
    """The example's run file with small sizes (6 steps an epoch) and these settings."""
    values = {**SMALL, "run.dir": str(run_dir), "optim.epochs": epochs, "parallel.strategy": strategy}
    return load_config(RUN_FILE, values={**values, **{f"parallel.{k}": v for k, v in parallel.items()}})


class Held(caldera.Callback):
    """After each step: the parameter elements this rank holds, and those of each split layer's weight."""

    def __init__(self) -> None:
        self.held: list[int] = []
        self.up: list[tuple[int, ...]] = []  # shapes of mlp.up's weight and of its momentum
        self.sums: list[int] = []  # all-reduces over the group in each step after an epoch's first
        self.last = 0

    def on_step_end(self, trainer: caldera.Trainer) -> None:
        self.held.append(trainer.strategy.held())
        if trainer.step_in_epoch > 1:  # (validation, between epochs, sums too)
            self.sums.append(trainer.strategy.group_sums - self.last)
        self.last = trainer.strategy.group_sums
        up = trainer.model.blocks[0].mlp.up.weight
        self.up.append((*up.shape, *trainer.optimizer.state[up]["momentum_buffer"].shape))


def state(run_dir: Path) -> dict:
    """The run's final weights: model.pt, or the shard-wise weights joined."""
    if (run_dir / "model.pt").is_file():
        return torch.load(run_dir / "model.pt", weights_only=True)
    return read_sharded_weights(run_dir / "model-shards")


def weights(run_dir: Path) -> torch.Tensor:
    saved = state(run_dir)
    return torch.cat([saved[k].flatten() for k in sorted(saved)])


world = caldera.init(seed=0)
torch.set_num_threads(1)
pair = world.comm.split(0 if world.rank < 2 else 1, world.rank)  # ranks 0-1 (and 2-3, unused)
two = World(rank=pair.rank, size=pair.size, comm=pair, launcher="mpi")
out: dict = {}
held = Held()
if world.rank < 2:  # 2 ranks, tp = 2: the whole model's heads and MLP cut in halves
    train(config(WORK / "tp2", 2), world=two, callbacks=[held])
world.barrier()
# 4 ranks = 2 replicas x tp 2, one epoch with a checkpoint at its end; then ranks 0-1 (tp 2) resume it for epoch 2.
train(config(WORK / "tp2dp2", 1, tp=2), world=world)
if world.is_main:  # the resumes below write their own run directories
    shutil.copytree(WORK / "tp2dp2", WORK / "tp2dp2-epoch1")
    shutil.copytree(WORK / "tp2dp2", WORK / "tp2dp2-one")
    ckpt = max((WORK / "tp2dp2/checkpoints").glob("step-*"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    out["ckpt_kind"], out["ckpt_files"] = manifest["sharded"]["kind"], manifest["sharded"]["files"]
    part = torch.load(ckpt / "rank-00001.pt", weights_only=True)["sharded"]
    out["ckpt_up"] = list(part["model"]["blocks.0.mlp.up.weight"].shape)
    out["shared_up"] = list(
        torch.load(ckpt / "shared.pt", weights_only=True)["model"]["blocks.0.mlp.up.weight"].shape
    )
    out["shards_written"] = sorted(p.name for p in (WORK / "tp2/model-shards").iterdir())
    out["model_pt"] = (WORK / "tp2/model.pt").exists()
world.barrier()
if world.rank < 2:
    history = train(config(WORK / "tp2dp2", 2), world=two, resume=True, force=True)
    out["resumed_epochs"] = [h["epoch"] for h in history]
world.barrier()
wholes = world.comm.allgather(
    {"held": sorted(set(held.held)), "up": sorted(set(held.up)), "sums": sorted(set(held.sums))}
)
if world.is_main:
    train(config(WORK / "single1", 1, "single"), world=World())
    train(config(WORK / "single2", 2, "single"), world=World())
    # The 4 ranks' shard-wise checkpoint, joined, goes on in one process.
    history = train(config(WORK / "tp2dp2-one", 2), world=World(), resume=True, force=True)
    out["one_epochs"] = [h["epoch"] for h in history]
    model = caldera.models.Transformer(**config(WORK / "x", 1).model.args)
    whole = sum(p.numel() for p in model.parameters())
    split = sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in ("attn.q", "attn.k", "attn.v",
                "mlp.up")) or (n.endswith("weight") and any(k in n for k in ("attn.out", "mlp.down"))))  # fmt: skip
    out.update({
        "tp2dp2_diff": float((weights(WORK / "tp2dp2-epoch1") - weights(WORK / "single1")).abs().max()),
        "one_diff": float((weights(WORK / "tp2dp2-one") - weights(WORK / "single2")).abs().max()),
        "tp2_diff": float((weights(WORK / "tp2") - weights(WORK / "single2")).abs().max()),
        "resumed_diff": float((weights(WORK / "tp2dp2") - weights(WORK / "single2")).abs().max()),
        "whole": whole, "split": split, "held": [w["held"] for w in wholes[:2]], "up": [w["up"] for w in wholes[:2]],
        "sums": [w["sums"] for w in wholes[:2]],
        "saved_whole": sum(t.numel() for t in state(WORK / "tp2").values()),
        "scale": float(weights(WORK / "single2").abs().max()),
    })  # fmt: skip
    print(json.dumps(out), flush=True)
pair.Free()
