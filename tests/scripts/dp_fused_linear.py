"""Run on N ranks: fused linear weight gradients (``fused_linear_grads``) and the cache-line-aligned gradient layout.

Usage: mpiexec -n N python dp_fused_linear.py REDUCER(shm|mpi)
For fused on and off: every parameter's gradient view starts on a 64-byte boundary; the linear layers' backward
calls ``Tensor.addmm_`` (counted by a wrapper) once per layer and step when fused, never when not; three
steps with accumulation (two micro-batches, the first under ``no_sync``) give the same weights either way.
Prints one JSON line on rank 0.
"""

import contextlib
import json
import sys

import torch
from torch import nn

import caldera

reducer = sys.argv[1]
world = caldera.init()
torch.set_num_threads(1)


class CountAddmm:
    """Counts ``Tensor.addmm_`` calls from Python while active (autograd's own accumulation is C++: not counted)."""

    def __enter__(self):
        self.calls, self.original = 0, torch.Tensor.addmm_

        def counted(t, *args, **kwargs):
            self.calls += 1
            return self.original(t, *args, **kwargs)

        torch.Tensor.addmm_ = counted
        return self

    def __exit__(self, *exc):
        torch.Tensor.addmm_ = self.original


def run(fused: bool) -> tuple[torch.Tensor, bool, int, int]:
    torch.manual_seed(0)
    # Odd sizes, so that packed back to back most gradients would start off a cache line; a 3-d input for one
    # layer (a sequence model's shape); one layer without bias.
    model = nn.Sequential(
        nn.Linear(13, 29), nn.Tanh(), nn.Linear(29, 7, bias=False), nn.Tanh(), nn.Linear(7, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = caldera.parallel.make_strategy(
        "allreduce", reducer=reducer, fused_linear_grads=fused, bucket_mb=1e-3
    )
    net = strategy.setup(model, opt, world)
    aligned = all(p.grad.data_ptr() % 64 == 0 for p in model.parameters())
    g = torch.Generator().manual_seed(100 + world.rank)
    with CountAddmm() as counter:
        for _ in range(3):
            for last in (False, True):
                x = torch.randn(4, 5, 13, generator=g)
                with strategy.no_sync() if not last else contextlib.nullcontext():
                    strategy.backward(net(x).pow(2).mean())
            strategy.step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    strategy.close()
    layers = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules()), (
        "close() must give the layers their forward"
    )
    return weights, aligned, counter.calls, layers


fused_w, fused_aligned, fused_calls, layers = run(True)
plain_w, plain_aligned, plain_calls, _ = run(False)
everyone = torch.stack(world.comm.allgather(fused_w))
if world.rank == 0:
    print(
        json.dumps(
            {
                "max_diff": (fused_w - plain_w).abs().max().item(),
                "spread": (everyone - everyone[0]).abs().max().item(),
                "aligned": fused_aligned and plain_aligned,
                "fused_calls": fused_calls,
                "plain_calls": plain_calls,
                "expected_calls": 3 * 2 * layers,
            }
        )
    )
