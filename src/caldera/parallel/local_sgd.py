"""Local SGD: every rank steps alone on its shard, and the ranks average their models every H steps.

Synchronous data parallel pays one all-reduce of the gradients per step. Local SGD pays one all-reduce of the
*weights* every ``sync_every`` (H) steps instead: H times less communication, at the price of the ranks drifting
apart in between (each follows its own, noisier, per-rank gradient). It pays off where communication is the
bottleneck (slow network, many ranks, small per-rank batches). It does not cure a persistent straggler: every
averaging still waits for the slowest rank, so a rank that is always 2x slower still halves the pace; it does
absorb jitter, because a rank's bad step is hidden among H good ones.

Order of events on every rank:
1. ``backward(loss)``: plain local autograd, no communication.
2. ``step()``: local optimizer step; then, during the first ``warmup_steps`` steps and every H-th step after
   them, all-reduce the model (one flat buffer, reused) and divide by the number of ranks.

Why H = 1 is synchronous SGD: SGD's update is linear in the gradient (with momentum and weight decay too), so
the average of the ranks' updates is the update with the averaged gradient, and the average of the ranks'
momentum buffers follows the synchronous momentum buffer without being communicated. That is what the warm-up
uses (early training is where drift hurts most). Adam is not linear: with H = 1 it is close to synchronous
Adam, not equal.

Optimizer state: by default each rank keeps its own (momentum, Adam moments), the usual choice in the local-SGD
literature: averaging them costs as many bytes again as the weights (twice for Adam) and buys little when H is
small. ``average_state = True`` averages them together with the weights, which keeps long-H runs consistent.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from caldera.comm.buckets import average_over_ranks
from caldera.config import StrategyOptions
from caldera.parallel.base import Purpose, Strategy, register
from caldera.world import World


class LocalSGDOptions(StrategyOptions):
    """``[parallel]`` keys of strategy ``local-sgd``."""

    # [optim] warmup_steps is the learning-rate warm-up; this one is a different thing, so it has its own name.
    renamed: ClassVar[dict[str, str]] = {"warmup_steps": "sync_warmup_steps"}

    sync_every: int = Field(8, ge=1, description="average the models every this many steps")
    sync_warmup_steps: int = Field(
        0, ge=0, description="synchronous steps (averaging after each) before local ones"
    )
    average_state: bool = Field(False, description="also average the optimizer state")


@register("local-sgd")
class LocalSGD(Strategy):
    """Independent local steps; model averaging over the world communicator every ``sync_every`` steps."""

    Options = LocalSGDOptions

    def __init__(
        self,
        *,
        sync_every: int = 8,
        sync_warmup_steps: int = 0,
        average_state: bool = False,
        grad_clip: float | None = None,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1 (got {sync_every}); 1 averages after every step")
        if sync_warmup_steps < 0:
            raise ValueError(f"sync_warmup_steps must be >= 0 (got {sync_warmup_steps})")
        self.sync_every, self.warmup_steps = sync_every, sync_warmup_steps
        self.average_state, self.grad_clip = average_state, grad_clip
        self.steps = 0  # local steps taken (the same on every rank: the trainer runs every rank equally long)
        self.averages = 0  # model averagings done
        self.last_average_step = 0  # the step after which the ranks last held the same model
        self._flat: torch.Tensor | None = None  # the reused all-reduce buffer (resized when state appears)

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Start every rank from rank 0's weights and buffers."""
        self.model, self.optimizer, self.world, self.comm = model, optimizer, world, world.comm
        with torch.no_grad():
            for t in self._tensors():
                buf = t.data if t.is_contiguous() else t.data.contiguous()
                self.comm.Bcast(buf, root=0)
                if buf is not t.data:
                    t.data.copy_(buf)
        self._refresh_low_precision_params()
        return model

    def backward(self, loss: torch.Tensor) -> None:
        """Local autograd: nothing is communicated."""
        loss.backward()

    def step(self) -> None:
        """Step locally; average the models when the schedule says so."""
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        in_warmup = self.steps <= self.warmup_steps
        if in_warmup or (self.steps - self.warmup_steps) % self.sync_every == 0:
            self.synchronize()

    def consolidate(self, purpose: Purpose) -> None:
        """Before validation and checkpoints: average the drifted models (the end of a run follows validation)."""
        if purpose != "outputs":
            self.synchronize()

    def synchronize(self) -> None:
        """Average the models now (collective), unless they have not changed since the last averaging.

        The trainer calls this before validation and at the end, so that metrics and saved weights describe the
        averaged model rather than each rank's drifted copy.
        """
        if self.world.size == 1 or self.last_average_step == self.steps:
            self.last_average_step = self.steps
            return
        self._flat = average_over_ranks(self.comm, self.world.size, self._tensors(), self._flat)
        self._refresh_low_precision_params()
        self.averages += 1
        self.last_average_step = self.steps

    def _tensors(self) -> list[torch.Tensor]:
        """What is averaged, in the same order on every rank: the tensors the optimizer steps (fp32 masters
        under bf16-true), the model's floating buffers (BatchNorm statistics), and optionally optimizer state."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        state: list[torch.Tensor] = []
        if self.average_state:
            for p in params:
                for _, v in sorted(self.optimizer.state.get(p, {}).items(), key=lambda kv: kv[0]):
                    if torch.is_tensor(v) and v.is_floating_point() and v.numel() == p.numel():
                        state.append(v)  # momentum_buffer, exp_avg, exp_avg_sq (not the scalar step count)
        return params + buffers + state

    def _refresh_low_precision_params(self) -> None:
        # Under bf16-true the optimizer steps fp32 masters; the model's bf16 weights are rounded copies of them.
        for p, master in getattr(self.optimizer, "pairs", []):
            with torch.no_grad():
                p.copy_(master)

    def state_dict(self) -> dict[str, Any]:
        """The position in the averaging schedule (the models themselves are saved after an averaging)."""
        return {"steps": self.steps, "averages": self.averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the averaging schedule where the checkpoint left it."""
        self.steps, self.averages = int(state["steps"]), int(state.get("averages", 0))
        self.last_average_step = self.steps  # a resumed run starts from one (rank 0's) model on every rank

    def close(self) -> None:
        """Release the buffer."""
        self._flat = None
