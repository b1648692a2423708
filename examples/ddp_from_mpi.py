"""Plain PyTorch DistributedDataParallel under mpiexec: Caldera only gives it the process group and a hang watchdog.

No MASTER_ADDR or MASTER_PORT to set: ``caldera.init_process_group()`` takes the ranks from MPI (rank 0 opens the
rendezvous on a free port and tells the others over MPI), on the GPU of each local rank when there are GPUs
(NCCL), else on the CPUs (gloo). Under torchrun the same script uses torchrun's group instead. The loop marks its
progress; a rank that stops (``--stall-rank``, to see it) ends the job with a report naming it, exit code 124.

Run:  caldera launch -n 2 -- python examples/ddp_from_mpi.py        (or: mpiexec -n 2 python ..., srun ...)
Smoke run (seconds): python examples/ddp_from_mpi.py --smoke
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import caldera


def main() -> None:
    """Fit a small regression with DDP; rank 0 prints the loss per epoch and the final one."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--smoke", action="store_true", help="seconds: a few small epochs (the test suite runs this)"
    )
    p.add_argument("--hang-timeout", default="5m", help="end the job when no rank progresses for this long")
    p.add_argument(
        "--stall-rank", type=int, default=None, help="this rank stops in the last epoch (to see the watchdog)"
    )
    args = p.parse_args()

    world = caldera.init_process_group()  # from here on, plain torch.distributed
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same data and initial weights on every rank
    x = torch.randn(2048 if args.smoke else 65536, 16)
    y = x @ torch.linspace(-1, 1, 16).unsqueeze(1) + 0.01 * torch.randn(len(x), 1)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(world.device)
    model = DistributedDataParallel(
        net, device_ids=[world.device.index] if world.device.type == "cuda" else None
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if rank == 0:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"  # set by init_process_group
        print(f"{size} rank(s), {dist.get_backend()} on {world.device}; rendezvous at {where}", flush=True)

    step = 0
    with caldera.Watchdog(timeout=args.hang_timeout) as dog:
        epochs = 3 if args.smoke else 20
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            total = torch.zeros(2, device=world.device)
            for xb, yb in loader:
                dog.mark("loading a batch", step, epoch)
                if epoch == epochs - 1 and rank == args.stall_rank:
                    time.sleep(3600)  # a rank that stops (a dead filesystem, a deadlock of its own)
                dog.mark("training step", step, epoch)
                xb, yb = xb.to(world.device), yb.to(world.device)
                loss = nn.functional.mse_loss(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()  # DDP averages the gradients over the ranks here
                optimizer.step()
                total += torch.stack(
                    [loss.detach() * len(xb), torch.tensor(float(len(xb)), device=world.device)]
                )
                step += 1
            dist.all_reduce(total)  # every rank's share of the epoch
            if rank == 0:
                print(f"epoch {epoch + 1}  train_loss {total[0].item() / total[1].item():.5f}", flush=True)
    if rank == 0:
        print(f"final train_loss {total[0].item() / total[1].item():.5f} after {step} steps", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
