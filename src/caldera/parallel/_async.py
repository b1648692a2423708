"""What the asynchronous strategies (async-shared, async-ps) share: the run as numbered work items, the model as
one flat vector, one work item's forward and backward, and their checkpoints as seen through the ``RunContext``.

Asynchronous workers have no common step and no common epoch end, so these strategies drive their own loop (the
trainer hands them the whole run through ``strategy.fit(ctx, train_set, val_set)``). While training they copy
the weights every ``record_every`` updates (default: once per epoch of data) with a timestamp (a ``Snapshot``);
after training the main rank hands them to ``ctx.report``, which validates them off the clock and writes the run
directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from caldera.data.sampler import ShardedBatches, as_xy, batch_len, batch_to, epoch_permutation
from caldera.errors import ConfigError, NonFiniteLossError
from caldera.names import unsupported
from caldera.parallel.base import micro_batches
from caldera.parallel.context import RunContext, Snapshot, trainable

__all__ = ["Snapshot", "WorkItems", "trainable"]  # Snapshot and trainable: re-exported from context


class WorkItems:
    """The training run as a numbered list of work items: one per worker-sized slice of each global batch.

    Item ``n`` is slice ``part`` of global batch ``step`` of ``epoch``: exactly the samples that rank ``part``
    of ``workers`` ranks takes at that step under synchronous data parallel (same seeded permutation, same
    split). Handing items out in order to whichever worker asks next is dynamic load balancing: a fast worker
    takes more slices, a straggler fewer, and every epoch still sees each sample exactly once.
    """

    def __init__(self, dataset: Dataset, global_batch: int, workers: int, epochs: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, device: torch.device | None = None,
                 whole: bool = False) -> None:  # fmt: skip
        self.dataset, self.global_batch, self.workers = dataset, global_batch, workers
        self.whole = whole  # batches as the data gives them, for a user's training step (targets None)
        self.seed, self.shuffle = seed, shuffle
        self.device = device or torch.device("cpu")
        self.steps_per_epoch = len(ShardedBatches(dataset, global_batch, 0, workers, drop_last=drop_last))
        self.per_epoch = self.steps_per_epoch * workers
        self.total = self.per_epoch * epochs
        self.n = len(dataset)  # type: ignore[arg-type]
        self._perm: tuple[int, torch.Tensor] | None = None  # the current epoch's permutation, computed once

    def locate(self, item: int) -> tuple[int, int, int]:
        """Return (epoch, step, part) of work item ``item``."""
        epoch, rest = divmod(item, self.per_epoch)
        step, part = divmod(rest, self.workers)
        return epoch, step, part

    def batch(self, item: int) -> tuple[Any, torch.Tensor | None, int, int]:
        """Return (inputs, targets, samples in this slice, samples in its global batch) for ``item``; with
        ``whole``, (the batch, None, ...)."""
        epoch, step, part = self.locate(item)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch, self.shuffle))
        chunk = self._perm[1][step * self.global_batch : (step + 1) * self.global_batch]
        idx = torch.tensor_split(chunk, self.workers)[part]
        if isinstance(self.dataset, TensorDataset):
            samples = tuple(t[idx] for t in self.dataset.tensors)
        else:
            samples = default_collate([self.dataset[i] for i in idx.tolist()])
        if self.whole:
            return batch_to(samples, self.device), None, len(idx), len(chunk)
        x, y = as_xy([t.to(self.device) for t in samples])
        return x, y, len(idx), len(chunk)


def config_error(message: str) -> ValueError:
    """A ConfigError: the CLI prints it as one line with exit code 2."""
    return ConfigError(message)


def check_run(ctx: RunContext, name: str) -> None:
    """Refuse, with the fix, what the asynchronous loops do not support yet."""
    problem = unsupported(name, ctx.precision.mode)
    if problem:
        raise config_error(problem)
    if ctx.scheduler is not None and not hasattr(ctx.scheduler, "lr_lambdas"):
        raise config_error(f"{name} follows a learning-rate schedule given as a function of the step "
                             "(torch.optim.lr_scheduler.LambdaLR, what [optim] schedule builds); "
                             f"{type(ctx.scheduler).__name__} keeps its own step count, which asynchronous "
                             "workers do not share")  # fmt: skip


@dataclass
class Schedule:
    """The learning rate of each parameter group for a work item: asynchronous workers share no step count, but
    every item belongs to one global batch, whose index is the step a synchronous run would be at."""

    base_lrs: list[float]
    factors: list  # per group: global step -> factor (LambdaLR's functions)
    workers: int

    def lr(self, group: int, item: int) -> float:
        return self.base_lrs[group] * self.factors[group](item // self.workers)


def schedule_of(ctx: RunContext, workers: int) -> Schedule | None:
    """The run's LambdaLR as a ``Schedule`` (None for a constant learning rate)."""
    scheduler = ctx.scheduler
    if scheduler is None:
        return None
    return Schedule(list(scheduler.base_lrs), list(scheduler.lr_lambdas), workers)


def compute_item(precision, model: torch.nn.Module, loss_fn, params: list[torch.nn.Parameter], x: Any,
                 y: torch.Tensor | None, weight: float, backward, accumulate: int = 1, where: str = "") -> torch.Tensor:  # fmt: skip
    """Forward, loss and ``backward`` of one work item under the run's precision, in ``accumulate`` micro-batches
    whose gradients add up to the item's; return the item's mean loss.

    fp16-mixed scales the loss and unscales the gradients (the trainer's hooks do it where they exist: they do not
    travel to worker processes). An overflow lowers the scale and computes the item again: an asynchronous update
    cannot be skipped the way a synchronous step is, or the item's share of its global batch would be lost.
    Otherwise a NaN/inf loss stops the run (``where`` names the item), before it reaches the shared weights."""
    pieces = micro_batches(x, y, accumulate)
    n = len(y) if y is not None else batch_len(x)  # y None: x is a whole batch for a user's step (a StepFn)
    while True:
        scale = precision.scaler.scale if precision.tolerates_overflow else 1.0
        loss = torch.zeros(())
        for xi, yi in pieces:
            with precision.autocast():
                part = loss_fn(model(xi), yi) if yi is not None else loss_fn(model, xi)
            if not precision.tolerates_overflow and not bool(torch.isfinite(part)):
                raise NonFiniteLossError(
                    f"loss is {part.item()} in {where or 'a work item'}; lower [optim] lr, set [optim] grad_clip, or "
                    "check the data for NaN/inf. Checkpoints and files already written are kept."
                )
            share = (len(yi) if yi is not None else batch_len(xi)) / n
            backward(part * (weight * scale * share))
            loss = loss + part.detach().float() * share
        if not precision.tolerates_overflow:
            return loss
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not params[0]._backward_hooks:  # no unscaling hook in this process: unscale here
            torch._foreach_mul_(grads, 1.0 / scale)
        if precision.scaler.update(grads):
            return loss
        for p in params:
            p.grad = None


# -- checkpoints: the loops pause at a consistent cut, then save through the run's checkpointer ----------------------
def restore(ctx: RunContext, resumed: Any, name: str) -> tuple[dict, dict | None]:
    """Load the newest checkpoint when the run asks to resume: return the strategy's saved state (empty when
    starting fresh; ``resumed()`` reads it from the strategy once ``ctx.restore`` gave it back through
    ``load_state_dict``) and this rank's own part. Every rank calls this; the weights land in ``ctx.model``."""
    if not ctx.resume:
        return {}, None
    local = ctx.restore()  # weights, optimizer, RNG; calls strategy.load_state_dict, which keeps the state
    state = dict(resumed() or {})
    if state and state.get("strategy") != name:
        raise config_error(f"the checkpoint was written by strategy {state.get('strategy')!r}, not {name!r}; "
                             "resume with the strategy that wrote it, or start a new run directory")  # fmt: skip
    ctx.history = []  # the asynchronous loops rebuild the history from the recorded snapshots
    return state, local


def save(ctx: RunContext, updates: int, items: WorkItems, local: dict | None = None) -> Path:
    """Write a checkpoint after ``updates`` updates (collective over the run's world, blocking: the loops pause
    for it anyway), positioned where a synchronous run would be; ``local`` adds to this rank's own file."""
    epoch, step_in_epoch, _ = items.locate(updates)
    return ctx.save(updates, epoch, step_in_epoch, local)


def saved_records(snapshots: list[Snapshot]) -> dict:
    """The recorded snapshots as checkpoint state (restored by ``records_from``)."""
    return {"snapshot_items": [s.items for s in snapshots], "snapshot_times": [s.time_s for s in snapshots],
            "snapshot_losses": [(s.loss_sum, s.samples) for s in snapshots],
            "snapshot_weights": torch.stack([s.weights for s in snapshots]) if snapshots else None}  # fmt: skip


def records_from(state: dict) -> list[Snapshot]:
    """The snapshots a checkpoint recorded (see ``saved_records``)."""
    if not state.get("snapshot_items"):
        return []
    return [Snapshot(items, time_s, weights.clone(), loss, samples)
            for items, time_s, weights, (loss, samples) in zip(
                state["snapshot_items"], state["snapshot_times"], state["snapshot_weights"],
                state["snapshot_losses"])]  # fmt: skip
