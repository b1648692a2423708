"""Run on N ranks: allreduce with the optimizer state sharded over the ranks (ZeRO-1) must train like one process,
hold 1/N of the state per rank, and checkpoint the whole state so that a run resumes on any number of ranks.

Usage: mpiexec -n N python zero_equivalence.py RUN_DIR REDUCER(auto|mpi)
Prints one JSON line on rank 0.
"""

import json
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera
from caldera.checkpoint import Checkpointer
from caldera.comm.local import LocalComm
from caldera.models import MLP
from caldera.world import World

run_dir, reducer = sys.argv[1], sys.argv[2]
world = caldera.init()
torch.set_num_threads(1)
g = torch.Generator().manual_seed(7)
data = TensorDataset(torch.randn(96, 20, generator=g), torch.randint(0, 5, (96,), generator=g))


def fit(w, strategy, shard, epochs, ckpt=None, resume=False, precision="fp32"):
    torch.manual_seed(0)
    model = MLP([20, 33, 17, 5])  # odd sizes: the ranks' ranges cut through parameters
    *body, head = list(model.parameters())
    # Two groups with their own rates and decay, and a schedule: the shards must follow the base optimizer.
    opt = torch.optim.AdamW([{"params": body, "weight_decay": 0.1}, {"params": [head], "lr": 3e-3}], lr=1e-2,
                            weight_decay=0.0)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    checkpointer = Checkpointer(ckpt, w, keep=3, async_write=False) if ckpt else None
    options = {
        "grad_clip": 1.0,
        **({"shard_optimizer": shard, "reducer": reducer} if strategy == "allreduce" else {}),
    }
    trainer = caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=epochs, batch_size=24, world=w,
                              strategy=strategy, strategy_options=options, scheduler=sched, progress=False, seed=3,
                              checkpointer=checkpointer, resume=resume, precision=precision)  # fmt: skip
    if precision == "fp16-mixed":  # a scale that overflows at first: steps are skipped, then it settles
        trainer.precision.scaler.scale = 2.0**24
    trainer.fit(data)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    shards = getattr(trainer.strategy, "shards", None)
    state = (
        shards.state_bytes()
        if shards is not None
        else sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        )
    )
    if precision == "fp16-mixed":
        return weights, trainer.precision.scaler.state_dict()
    return weights, state


sharded, sharded_state = fit(world, "allreduce", True, 3)
plain, plain_state = fit(world, "allreduce", False, 3)
everyone = torch.stack(world.comm.allgather(sharded))
fp16_sharded, fp16_scaler = fit(world, "allreduce", True, 2, precision="fp16-mixed")
fp16_plain, fp16_plain_scaler = fit(world, "allreduce", False, 2, precision="fp16-mixed")
# Stopped after 2 epochs with a checkpoint, then resumed for the third, on the same ranks.
fit(world, "allreduce", True, 2, ckpt=f"{run_dir}/ckpt")
resumed, _ = fit(world, "allreduce", True, 3, ckpt=f"{run_dir}/ckpt", resume=True)
if world.rank == 0:
    alone = World(comm=LocalComm())
    reference, _ = fit(alone, "single", False, 3)
    # The sharded checkpoint, resumed by one process without sharding.
    one, _ = fit(alone, "single", False, 3, ckpt=f"{run_dir}/ckpt", resume=f"{run_dir}/ckpt/step-000000008")
    out = {
        "size": world.size,
        "vs_reference": (sharded - reference).abs().max().item(),
        "vs_unsharded": (sharded - plain).abs().max().item(),
        "spread": (everyone - everyone[0]).abs().max().item(),
        "resumed_vs_whole": (resumed - sharded).abs().max().item(),
        "one_process_resume_vs_whole": (one - sharded).abs().max().item(),
        "fp16_vs_unsharded": (fp16_sharded - fp16_plain).abs().max().item(),
        "fp16_scalers": [fp16_scaler, fp16_plain_scaler],
        "state_bytes": sharded_state,
        "unsharded_state_bytes": plain_state,
    }
    print(json.dumps(out), flush=True)
