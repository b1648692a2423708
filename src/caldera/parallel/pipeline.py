"""Pipeline parallelism: the layers of an ``nn.Sequential`` split into one stage per rank, micro-batches flowing
through the stages: 1F1B (one forward, one backward once the pipeline is full: activations of at most as many
micro-batches as there are stages) or GPipe (every forward, then every backward).

Rank s computes only stage s and, while training, holds only its weights, the activations it keeps for backward,
its gradients and its optimizer state. Activations travel forward and their gradients backward point to point over
MPI. Every rank of a pipeline sees the same batch (the first stage reads the inputs, the last the targets); the
update equals one process taking the same step on the whole batch. Before validation and checkpoints the stages' weights (and optimizer state) are
shared with every rank, so evaluation, ``model.pt`` and checkpoints are those of the whole model; the next step
releases them again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from caldera.comm.base import wait_yielding
from caldera.config import StrategyOptions
from caldera.errors import ConfigError
from caldera.names import NOT_COMPILED
from caldera.parallel.base import Purpose, Strategy, register
from caldera.world import World

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 10  # dtype code, ndim, up to 8 dimensions


class PipelineOptions(StrategyOptions):
    """``[parallel]`` keys of strategy ``pipeline``."""

    # [optim] schedule is the learning-rate schedule; the order of micro-batches has its own name.
    renamed: ClassVar[dict[str, str]] = {"schedule": "pipeline_schedule"}

    micro_batches: int = Field(4, ge=1, description="micro-batches per batch (more: stages idle less)")
    balance: list[int] | None = Field(
        None, description="layers per stage, e.g. [3, 2] (default: balanced by parameter count)"
    )
    pipeline_schedule: Literal["1f1b", "gpipe"] = Field(
        "1f1b", description="1f1b holds activations of <= stages micro-batches, gpipe of all"
    )
    stages: int | None = Field(
        None, ge=1, description="ranks per pipeline (none: all); ranks / stages replicas train data parallel"
    )


@register("pipeline")
class Pipeline(Strategy):
    """Stage s (contiguous layers of an ``nn.Sequential``) on rank s of each pipeline; with ``stages`` fewer
    than the ranks, several pipelines (replicas) train data parallel, each on its share of the batch."""

    Options = PipelineOptions
    supports_step = False  # a training step calls the whole model; here each rank holds one stage of it
    not_compiled = NOT_COMPILED["pipeline"]

    def __init__(self, *, micro_batches: int = 4, balance: list[int] | None = None, pipeline_schedule: str = "1f1b",
                 stages: int | None = None, grad_clip: float | None = None) -> None:  # fmt: skip
        if micro_batches < 1:
            raise ConfigError(f"[parallel] micro_batches must be >= 1 (got {micro_batches})")
        if pipeline_schedule not in SCHEDULES:
            raise ConfigError(f"[parallel] pipeline_schedule = {pipeline_schedule!r}; use one of "
                              f"{', '.join(SCHEDULES)}")  # fmt: skip
        self.micro_batches, self.schedule = micro_batches, pipeline_schedule
        self.balance, self.grad_clip = balance, grad_clip
        self.stages = stages  # ranks per pipeline (None: all of them, one pipeline)
        self.peak_in_flight = 0  # most micro-batches whose activations this rank held at once so far (memory)
        self.dp: Any = None  # the same stage of every replica (None with one replica)

    def data_shards(self, world: World) -> tuple[int, int]:
        """(this rank's share of each batch, number of shares): one per replica; a pipeline's stages share one."""
        stages = self._stages(world)
        return world.rank // stages, world.size // stages

    def _stages(self, world: World) -> int:
        stages = self.stages or world.size
        if stages < 1 or world.size % stages:
            raise ConfigError(f"[parallel] stages = {stages} must divide the {world.size} ranks "
                              "(ranks = replicas x stages)")  # fmt: skip
        return stages

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> nn.Module:
        """Split ``model`` into stages, keep this rank's, and start every rank from rank 0's weights."""
        if not isinstance(model, nn.Sequential):
            raise ConfigError(
                f"[parallel] strategy = 'pipeline' splits an nn.Sequential into stages; {type(model).__name__} is "
                "not one (write the model as nn.Sequential(...) of its blocks, or use another strategy)"
            )
        self.model, self.optimizer, self.world = model, optimizer, world
        stages = self._stages(world)
        replica, self.replicas = world.rank // stages, world.size // stages
        self.rank, self.size = world.rank % stages, stages  # this rank's stage, and the pipeline's length
        # The stages of one replica exchange activations; the same stage of every replica averages gradients.
        self.pipe = world.comm if self.replicas == 1 else world.comm.split(replica, self.rank)
        self.dp = None if self.replicas == 1 else world.comm.split(self.rank, replica)
        bounds = stage_bounds(model, stages, self.balance)
        self.owner = [s for s, (a, b) in enumerate(bounds) for _ in range(a, b)]  # layer index -> stage
        start, stop = bounds[self.rank]
        self.stage = nn.Sequential(*list(model)[start:stop])  # the same layer objects, not copies
        self.params = list(self.stage.parameters())
        for p in model.parameters():  # one starting point, whatever each rank's initialisation drew
            world.comm.Bcast(p.data, root=0)
        mine = {id(q) for q in self.params}
        # Other stages' weights: shapes kept, storage released by the first training step (a resume loads the
        # whole model's checkpoint between setup and that step) and after every synchronize.
        self.others = {p: p.shape for p in model.parameters() if id(p) not in mine}
        self._whole = True
        return self.stage

    def _release(self) -> None:
        """Drop the other stages' weights and optimizer state: while training, a rank holds its own stage only."""
        for p in self.others:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self.optimizer.state.pop(p, None)
        self._whole = False

    # -- one optimizer step over a batch ------------------------------------------------------------------------
    def train_batch(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, scale: float, precision: Any,
        accumulate: int = 1, offload: bool = False, non_finite: Callable[[torch.Tensor], Exception] | None = None,
    ) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """Forward and backward of the whole batch in micro-batches through this rank's stage (``net``); return the
        batch's mean loss (on every rank) and whether it was finite (``non_finite(loss)`` is raised when it is not,
        unless the precision skips overflowing steps)."""
        if accumulate > 1:
            raise ValueError("[train] accumulate does not apply to the pipeline strategy: set [parallel] "
                             "micro_batches instead")  # fmt: skip
        if self._whole:  # weights of the whole model were handed out for validation or a checkpoint
            self._release()
        if precision.mode not in ("fp32", "bf16-mixed", "fp16-mixed"):
            raise ConfigError(
                f"the pipeline strategy runs [precision] mode fp32, bf16-mixed or fp16-mixed, not {precision.mode!r} "
                "(bf16-true keeps fp32 master copies of every stage's weights on every rank)"
            )
        xs, ys = x.tensor_split(self.micro_batches), y.tensor_split(self.micro_batches)
        pieces = [(a, b) for a, b in zip(xs, ys) if len(b)]
        first, last = self.rank == 0, self.rank == self.size - 1
        comm = self.pipe
        kept: dict[
            int, tuple[torch.Tensor, torch.Tensor]
        ] = {}  # micro-batch -> (input, output) held for backward
        losses: dict[int, torch.Tensor] = {}
        grads: dict[int, tuple[torch.Tensor, Any]] = {}  # gradient buffers, their receives posted ahead
        sends: list[Any] = []  # sends in flight: the stage goes on computing while MPI moves the bytes

        def forward(i: int) -> None:
            xi, yi = pieces[i]
            inp = xi if first else self._receive(self.rank - 1).requires_grad_()
            with precision.autocast():
                out = self.stage(inp)
                if last:
                    losses[i] = loss_fn(out, yi) * (scale * len(yi) / len(y))
            if not last:
                sends.extend(self._send(out.detach(), self.rank + 1))
                buf = torch.empty_like(out)  # its gradient will land here, whenever the next stage sends it
                grads[i] = (buf, comm.Irecv(buf, self.rank + 1, tag=1 + i))
            kept[i] = (inp, out)
            self.peak_in_flight = max(self.peak_in_flight, len(kept))

        def backward(i: int) -> None:
            inp, out = kept.pop(i)
            if last:  # fp16-mixed: the scaled loss, so small gradients survive the fp16 activations' range
                precision.scale_loss(losses[i]).backward()
            else:
                buf, arriving = grads.pop(i)
                wait_yielding(arriving)
                out.backward(buf)
            if not first:
                sends.append(comm.Isend(inp.grad.contiguous(), self.rank - 1, tag=1 + i))

        for kind, i in schedule_order(self.schedule, self.rank, self.size, len(pieces)):
            forward(i) if kind == "F" else backward(i)
        for handle in sends:
            wait_yielding(handle)
        # The last stage's loss to every stage: a sum over zeros elsewhere, non-blocking, so that the first stage
        # (done long before) yields its core to the last one instead of spinning in a broadcast.
        total = torch.zeros(1, dtype=torch.float64)
        if last:
            total[0] = float(sum(loss.detach().double() for loss in losses.values())) / scale
        wait_yielding(self.pipe.Iallreduce(total))
        loss = total[0]
        finite = bool(torch.isfinite(loss))
        if not finite and not precision.tolerates_overflow and non_finite is not None:
            raise non_finite(loss)
        return loss, finite

    @torch.no_grad()
    def forward_batch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Forward only (validation), in micro-batches through the stages: the output on the last stage, None on
        the others. Each rank keeps to its own stage, so validation needs no whole model."""
        first, last = self.rank == 0, self.rank == self.size - 1
        outs: list[torch.Tensor] = []
        sends: list[Any] = []
        for xi in x.tensor_split(self.micro_batches):
            if len(xi):
                out = self.stage(xi if first else self._receive(self.rank - 1))
                if last:
                    outs.append(out)
                else:
                    sends.extend(self._send(out, self.rank + 1))
        for handle in sends:
            wait_yielding(handle)
        return torch.cat(outs) if last else None

    def _send(self, t: torch.Tensor, dest: int) -> list[Any]:
        """Start sending an activation (its dtype and shape first); return the handles to wait on."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
        header[2 : 2 + t.dim()] = torch.tensor(t.shape)
        return [self.pipe.Isend(header, dest), self.pipe.Isend(t.contiguous(), dest)]

    def _receive(self, source: int) -> torch.Tensor:
        """Receive an activation (its dtype and shape first), yielding the core while it has not arrived (the
        previous stage is computing it, possibly on this very core)."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        wait_yielding(self.pipe.Irecv(header, source))
        shape = header[2 : 2 + int(header[1])].tolist()
        t = torch.empty(shape, dtype=_DTYPES[int(header[0])], device=self.world.device)
        wait_yielding(self.pipe.Irecv(t, source))
        return t

    def backward(self, loss: torch.Tensor) -> None:
        """Not used: ``train_batch`` runs forward and backward together."""
        raise RuntimeError("the pipeline strategy trains through train_batch(); Trainer calls it")

    def step(self) -> None:
        """Average the replicas' gradients, clip by the norm over every stage (if asked), step this stage, zero."""
        if self.dp is not None:
            for p in self.params:  # a parameter unused this step still takes part, with zeros
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            wait_yielding(self.dp.Iallreduce(flat))
            flat /= self.replicas
            at = 0
            for p in self.params:
                p.grad.copy_(flat[at : at + p.numel()].view_as(p))
                at += p.numel()
        if self.grad_clip:
            local = sum(float(p.grad.double().pow(2).sum()) for p in self.params if p.grad is not None)
            norm = self.pipe.allreduce(local) ** 0.5
            if norm > self.grad_clip:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(self.grad_clip / (norm + 1e-6))
        self._step_optimizer()
        self.optimizer.zero_grad(set_to_none=True)

    def _step_optimizer(self) -> None:
        scaler = getattr(self.optimizer, "scaler", None)  # fp16-mixed's LossScaledOptimizer
        if scaler is None:
            self.optimizer.step()
            return
        # A stage sees only its own gradients: the stages first agree on an overflow anywhere, then all skip the step
        # and lower the loss scale together (or none does), so the pipeline keeps one scale and one model.
        mine = all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None)
        finite = self.world.comm.allreduce(int(mine), op="min") == 1
        if scaler.record(finite):
            self.optimizer.optimizer.step()

    def consolidate(self, purpose: Purpose) -> None:
        """Validation runs stage by stage (``forward_batch``): the whole model is gathered only for checkpoints and
        for rank 0's outputs at the end."""
        if purpose != "validation":
            self.synchronize()

    def synchronize(self) -> None:
        """Give every rank the whole model: each stage's weights and optimizer state from the rank that owns it
        (until the next training step releases them again)."""
        if self._whole:  # nothing trained since the last time (or since setup's broadcast)
            return
        for p, shape in self.others.items():
            p.data = torch.empty(shape, dtype=p.dtype, device=p.device)
        self._whole = True
        for i, layer in enumerate(self.model):
            for t in list(layer.parameters()) + list(layer.buffers()):
                self.pipe.Bcast(t.data, root=self.owner[i])
        every = list(self.model.parameters())
        owned = {p: k for k, p in enumerate(every) if any(p is q for q in self.params)}
        mine = {owned[p]: s for p, s in self.optimizer.state.items() if p in owned}
        for states in self.pipe.allgather(mine):
            for k, s in states.items():
                self.optimizer.state[every[k]] = s

    def state_dict(self) -> dict[str, Any]:
        """The stage layout, for the record: checkpoints hold the whole model, so a resume may split it anew."""
        return {"stages": self.size, "replicas": self.replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the weights and optimizer state come whole with the trainer's state."""

    def close(self) -> None:
        """Release the pipeline and replica communicators."""
        if self.dp is not None:
            self.pipe.Free()
            self.dp.Free()
            self.dp = None


SCHEDULES = ("1f1b", "gpipe")


def schedule_order(schedule: str, stage: int, stages: int, m: int) -> list[tuple[str, int]]:
    """The order in which ``stage`` runs the forward ("F", i) and backward ("B", i) of ``m`` micro-batches.

    GPipe: every forward, then every backward (m activations held). 1F1B: after ``stages - stage - 1`` warm-up
    forwards, one forward then one backward, so at most ``stages - stage`` are held; the same arithmetic."""
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]
    warmup = min(stages - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]


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
        # +1 per layer so that parameter-free layers still weigh something.
        counts = _min_max_split([1 + sum(p.numel() for p in layer.parameters()) for layer in model], stages)
    bounds, at = [], 0
    for c in counts:
        bounds.append((at, at + c))
        at += c
    return bounds


def _min_max_split(weights: list[int], stages: int) -> list[int]:
    """Layers per stage, contiguous, each >= 1, so that the heaviest stage is as light as possible (exact: a small
    dynamic programme over split points; models have tens to hundreds of layers)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[k][i]: first i layers in k stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                load = max(best[k - 1][j], prefix[i] - prefix[j])
                if load < best[k][i]:
                    best[k][i], cut[k][i] = load, j
    counts, i = [], n
    for k in range(stages, 0, -1):
        counts.append(i - cut[k][i])
        i = cut[k][i]
    return counts[::-1]
