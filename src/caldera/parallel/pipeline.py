"""Pipeline parallelism: the layers of an ``nn.Sequential`` split into one stage per rank, micro-batches flowing
through the stages (the GPipe schedule: every micro-batch forward, then every micro-batch backward).

Rank s computes only stage s: its forward, the activations it keeps for backward, its gradients and its
optimizer state. Activations travel forward and their gradients backward point to point over MPI. Every rank sees
the whole batch (the first stage reads the inputs, the last the targets); the update equals one process taking
the same step on the whole batch. Before validation and checkpoints the stages' weights (and optimizer state) are
shared with every rank, so evaluation, ``model.pt`` and checkpoints are those of the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from caldera.config import ConfigError
from caldera.parallel.base import register
from caldera.world import World

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 10  # dtype code, ndim, up to 8 dimensions


@register("pipeline")
class Pipeline:
    """GPipe over MPI ranks: stage s (contiguous layers of an ``nn.Sequential``) on rank s."""

    shards_data = False  # every stage sees the whole batch, not a slice of it

    def __init__(self, micro_batches: int = 4, balance: list[int] | None = None,
                 grad_clip: float | None = None, **_: Any) -> None:  # fmt: skip
        if micro_batches < 1:
            raise ValueError(f"[parallel] micro_batches must be >= 1 (got {micro_batches})")
        self.micro_batches, self.balance, self.grad_clip = micro_batches, balance, grad_clip

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> nn.Module:
        """Split ``model`` into stages, keep this rank's, and start every rank from rank 0's weights."""
        if not isinstance(model, nn.Sequential):
            raise ConfigError(
                f"[parallel] strategy = 'pipeline' splits an nn.Sequential into stages; {type(model).__name__} is "
                "not one (write the model as nn.Sequential(...) of its blocks, or use another strategy)"
            )
        self.model, self.optimizer, self.world = model, optimizer, world
        self.rank, self.size = world.rank, world.size
        bounds = stage_bounds(model, world.size, self.balance)
        self.owner = [s for s, (a, b) in enumerate(bounds) for _ in range(a, b)]  # layer index -> stage
        start, stop = bounds[self.rank]
        self.stage = nn.Sequential(*list(model)[start:stop])  # the same layer objects, not copies
        self.params = list(self.stage.parameters())
        for p in model.parameters():  # one starting point, whatever each rank's initialisation drew
            world.comm.Bcast(p.data, root=0)
        return self.stage

    # -- one optimizer step over a batch ------------------------------------------------------------------------
    def train_batch(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, scale: float,
                    precision: Any) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """Forward and backward of the whole batch in micro-batches through the stages; return the batch's mean
        loss (on every rank) and whether it was finite."""
        if precision.mode not in ("fp32", "bf16-mixed"):
            raise ConfigError(
                f"the pipeline strategy runs [precision] mode fp32 or bf16-mixed, not {precision.mode!r}"
            )
        xs, ys = x.tensor_split(self.micro_batches), y.tensor_split(self.micro_batches)
        pieces = [(a, b) for a, b in zip(xs, ys) if len(b)]
        first, last = self.rank == 0, self.rank == self.size - 1
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        losses: list[torch.Tensor] = []
        sends: list[Any] = []  # sends in flight: the stage goes on computing while MPI moves the bytes
        for xi, yi in pieces:
            inp = xi if first else self._receive(self.rank - 1).requires_grad_()
            with precision.autocast():
                out = self.stage(inp)
                if last:
                    losses.append(loss_fn(out, yi) * (scale * len(yi) / len(y)))
            if not last:
                sends += self._send(out.detach(), self.rank + 1)
            kept.append((inp, out))
        # Every gradient this stage will get, posted at once: they land while it computes the previous ones.
        grads = [torch.empty_like(out) for _, out in kept] if not last else []
        arriving = [self.world.comm.Irecv(g, self.rank + 1, tag=1 + i) for i, g in enumerate(grads)]
        for i in reversed(range(len(pieces))):  # the last micro-batch's gradients come back first
            inp, out = kept[i]
            if last:
                losses[i].backward()
            else:
                arriving[i].wait()
                out.backward(grads[i])
            if not first:
                sends.append(self.world.comm.Isend(inp.grad.contiguous(), self.rank - 1, tag=1 + i))
        for handle in sends:
            handle.wait()
        total = torch.zeros(1, dtype=torch.float64)
        if last:
            total[0] = float(sum(loss.detach().double() for loss in losses)) / scale
        self.world.comm.Bcast(total, root=self.size - 1)
        loss = total[0]
        return loss, bool(torch.isfinite(loss))

    def _send(self, t: torch.Tensor, dest: int) -> list[Any]:
        """Start sending an activation (its dtype and shape first); return the handles to wait on."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
        header[2 : 2 + t.dim()] = torch.tensor(t.shape)
        comm = self.world.comm
        return [comm.Isend(header, dest), comm.Isend(t.contiguous(), dest)]

    def _receive(self, source: int) -> torch.Tensor:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        self.world.comm.Recv(header, source)
        shape = header[2 : 2 + int(header[1])].tolist()
        t = torch.empty(shape, dtype=_DTYPES[int(header[0])], device=self.world.device)
        self.world.comm.Recv(t, source)
        return t

    def backward(self, loss: torch.Tensor) -> None:
        """Not used: ``train_batch`` runs forward and backward together."""
        raise RuntimeError("the pipeline strategy trains through train_batch(); Trainer calls it")

    def step(self) -> None:
        """Clip by the norm over every stage's gradients (if asked), step this stage, zero its gradients."""
        if self.grad_clip:
            local = sum(float(p.grad.double().pow(2).sum()) for p in self.params if p.grad is not None)
            norm = self.world.comm.allreduce(local) ** 0.5
            if norm > self.grad_clip:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(self.grad_clip / (norm + 1e-6))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Give every rank the whole model: each stage's weights and optimizer state from the rank that owns it."""
        for i, layer in enumerate(self.model):
            for t in list(layer.parameters()) + list(layer.buffers()):
                self.world.comm.Bcast(t.data, root=self.owner[i])
        every = list(self.model.parameters())
        owned = {p: k for k, p in enumerate(every) if any(p is q for q in self.params)}
        mine = {owned[p]: s for p, s in self.optimizer.state.items() if p in owned}
        for states in self.world.comm.allgather(mine):
            for k, s in states.items():
                self.optimizer.state[every[k]] = s

    def state_dict(self) -> dict[str, Any]:
        """The stage layout (a resume must split the model the same way)."""
        return {"stages": self.size, "balance": self.balance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the layout matches; the weights come with the model's state."""

    def close(self) -> None:
        """Nothing to release."""


def stage_bounds(
    model: nn.Sequential, stages: int, balance: list[int] | None = None
) -> list[tuple[int, int]]:
    """Split the layers into ``stages`` contiguous ranges: ``balance`` layers each, or balanced by parameters."""
    n = len(model)
    if stages > n:
        raise ConfigError(f"{stages} pipeline stages for a model of {n} layers: use at most {n} ranks")
    if balance is not None:
        if len(balance) != stages or sum(balance) != n or min(balance) < 1:
            raise ConfigError(f"[parallel] balance = {balance} must give each of the {stages} stages >= 1 layer, "
                             f"{n} layers in all")  # fmt: skip
        counts = balance
    else:
        # Greedy on cumulative parameter counts (+1 per layer so parameter-free layers still weigh something).
        weights = [1 + sum(p.numel() for p in layer.parameters()) for layer in model]
        total, counts, at = sum(weights), [], 0
        for s in range(stages):
            target = total * (s + 1) / stages
            stop, acc = at + 1, sum(weights[: at + 1])
            while stop < n - (stages - s - 1) and acc + weights[stop] / 2 <= target:
                acc += weights[stop]
                stop += 1
            counts.append(stop - at)
            at = stop
        counts[-1] += n - at
    bounds, at = [], 0
    for c in counts:
        bounds.append((at, at + c))
        at += c
    return bounds
