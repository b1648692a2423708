"""What the asynchronous strategies (async-shared, async-ps) share: the run as numbered work items, the model as
one flat vector, and the weights they recorded turned into the trainer's history and run directory.

Asynchronous workers have no common step and no common epoch end, so these strategies drive their own loop (the
trainer hands them the whole run through ``strategy.fit(trainer, train_set, val_set)``). While training they
copy the weights every ``record_every`` updates (default: once per epoch of data) with a timestamp; validation
of those snapshots runs after training, on the main rank, off the clock.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from caldera.comm.buckets import unflatten
from caldera.data.sampler import ShardedBatches, epoch_permutation
from caldera.errors import ConfigError
from caldera.names import LOOP_STRATEGIES as LOOP_STRATEGIES
from caldera.names import unsupported
from caldera.world import World


class WorkItems:
    """The training run as a numbered list of work items: one per worker-sized slice of each global batch.

    Item ``n`` is slice ``part`` of global batch ``step`` of ``epoch``: exactly the samples that rank ``part``
    of ``workers`` ranks takes at that step under synchronous data parallel (same seeded permutation, same
    split). Handing items out in order to whichever worker asks next is dynamic load balancing: a fast worker
    takes more slices, a straggler fewer, and every epoch still sees each sample exactly once.
    """

    def __init__(self, dataset: Dataset, global_batch: int, workers: int, epochs: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, device: torch.device | None = None) -> None:  # fmt: skip
        self.dataset, self.global_batch, self.workers = dataset, global_batch, workers
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

    def batch(self, item: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Return (inputs, targets, samples in this slice, samples in its global batch) for ``item``."""
        from caldera.train.trainer import as_xy  # here, not at the top: the trainer imports the strategies

        epoch, step, part = self.locate(item)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch, self.shuffle))
        chunk = self._perm[1][step * self.global_batch : (step + 1) * self.global_batch]
        idx = torch.tensor_split(chunk, self.workers)[part]
        if isinstance(self.dataset, TensorDataset):
            samples = tuple(t[idx] for t in self.dataset.tensors)
        else:
            samples = default_collate([self.dataset[i] for i in idx.tolist()])
        x, y = as_xy([t.to(self.device) for t in samples])
        return x, y, len(idx), len(chunk)


@dataclass
class Snapshot:
    """The weights as they were after ``items`` updates, ``time_s`` seconds into training."""

    items: int
    time_s: float
    weights: torch.Tensor  # the trainable parameters, flattened
    loss_sum: float = 0.0  # sum over the samples of the items since the previous snapshot of their loss
    samples: int = 0


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the asynchronous strategies update, in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]


def config_error(message: str) -> ValueError:
    """A ConfigError: the CLI prints it as one line with exit code 2."""
    return ConfigError(message)


def check_trainer(trainer, name: str) -> None:
    """Refuse, with the fix, what the asynchronous loops do not support yet."""
    problem = unsupported(name, trainer.precision.mode)
    if problem:
        raise config_error(problem)
    if trainer.scheduler is not None and not hasattr(trainer.scheduler, "lr_lambdas"):
        raise config_error(f"{name} follows a learning-rate schedule given as a function of the step "
                             "(torch.optim.lr_scheduler.LambdaLR, what [optim] schedule builds); "
                             f"{type(trainer.scheduler).__name__} keeps its own step count, which asynchronous "
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


def schedule_of(trainer, workers: int) -> Schedule | None:
    """The trainer's LambdaLR as a ``Schedule`` (None for a constant learning rate)."""
    scheduler = trainer.scheduler
    if scheduler is None:
        return None
    return Schedule(list(scheduler.base_lrs), list(scheduler.lr_lambdas), workers)


def compute_item(precision, model: torch.nn.Module, loss_fn, params: list[torch.nn.Parameter], x: torch.Tensor,
                 y: torch.Tensor, weight: float, backward, accumulate: int = 1, where: str = "") -> torch.Tensor:  # fmt: skip
    """Forward, loss and ``backward`` of one work item under the run's precision, in ``accumulate`` micro-batches
    whose gradients add up to the item's; return the item's mean loss.

    fp16-mixed scales the loss and unscales the gradients (the trainer's hooks do it where they exist: they do not
    travel to worker processes). An overflow lowers the scale and computes the item again: an asynchronous update
    cannot be skipped the way a synchronous step is, or the item's share of its global batch would be lost.
    Otherwise a NaN/inf loss stops the run (``where`` names the item), before it reaches the shared weights."""
    from caldera.train.trainer import NonFiniteLossError, micro_batches  # late: the trainer imports us

    pieces = micro_batches(x, y, accumulate)
    while True:
        scale = precision.scaler.scale if precision.tolerates_overflow else 1.0
        loss = torch.zeros(())
        for xi, yi in pieces:
            with precision.autocast():
                part = loss_fn(model(xi), yi)
            if not precision.tolerates_overflow and not bool(torch.isfinite(part)):
                raise NonFiniteLossError(
                    f"loss is {part.item()} in {where or 'a work item'}; lower [optim] lr, set [optim] grad_clip, or "
                    "check the data for NaN/inf. Checkpoints and files already written are kept."
                )
            backward(part * (weight * scale * (len(yi) / len(y))))
            loss = loss + part.detach().float() * (len(yi) / len(y))
        if not precision.tolerates_overflow:
            return loss
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not params[0]._backward_hooks:  # no unscaling hook in this process: unscale here
            torch._foreach_mul_(grads, 1.0 / scale)
        if precision.scaler.update(grads):
            return loss
        for p in params:
            p.grad = None


# -- checkpoints: the loops pause at a consistent cut, then save through the trainer's checkpointer ------------------
def restore(trainer, name: str) -> dict:
    """Load the newest checkpoint into the trainer when it asks to resume; return the strategy's saved state
    (empty when starting fresh). Every rank calls this; the weights land in ``trainer.model``."""
    if not trainer.resume:
        return {}
    trainer._restore()  # weights, optimizer, RNG; calls strategy.load_state_dict, which keeps the state
    state = dict(getattr(trainer.strategy, "resumed", {}) or {})
    if state and state.get("strategy") != name:
        raise config_error(f"the checkpoint was written by strategy {state.get('strategy')!r}, not {name!r}; "
                             "resume with the strategy that wrote it, or start a new run directory")  # fmt: skip
    trainer.history = []  # the asynchronous loops rebuild the history from the recorded snapshots
    return state


def save(trainer, updates: int, items: WorkItems, local: dict | None = None):
    """Write a checkpoint after ``updates`` updates (collective over the trainer's world, blocking: the loops
    pause for it anyway); ``local`` adds to this rank's own file. Return the checkpoint's path."""
    trainer.global_step = updates
    trainer.epoch, trainer.step_in_epoch, _ = items.locate(updates)  # where a synchronous run would be
    shared, mine = trainer._capture()
    return trainer.checkpointer.save(updates, shared, {**mine, **(local or {})}, block=True)


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


@contextlib.contextmanager
def alone(trainer) -> Iterator[None]:
    """Let the trainer evaluate on this process alone (rank 0 of 1), whatever the other ranks are doing."""
    world = trainer.world
    trainer.world = World(device=world.device)
    try:
        yield
    finally:
        trainer.world = world


def finish_run(trainer, snapshots: list[Snapshot], val_set: Dataset | None, per_epoch: int,
               stats: dict, schedule: Schedule | None = None) -> list[dict[str, float]]:  # fmt: skip
    """On the main rank: evaluate each snapshot, log it as the trainer would log an epoch, write the run
    directory (metrics, plots, final weights = the last snapshot, ``strategy.json`` with ``stats``)."""
    from caldera.train.trainer import _format

    params = trainable(trainer.model)
    with alone(trainer):
        log = trainer._open_run_dir()
        previous = 0.0
        for snap in snapshots:
            unflatten(snap.weights, params)
            logs = {"epoch": round(snap.items / per_epoch, 4),
                    "train_loss": snap.loss_sum / snap.samples if snap.samples else math.nan}  # fmt: skip
            if val_set is not None:
                logs.update(trainer.evaluate(val_set, prefix="val_"))
            last_item = max(0, snap.items - 1)
            logs["lr"] = schedule.lr(0, last_item) if schedule else trainer.optimizer.param_groups[0]["lr"]
            logs["time_s"], previous = snap.time_s - previous, snap.time_s
            trainer.history.append(logs)
            if log is not None:
                log.append(logs)
            trainer.log(_format(logs))
        trainer.global_step = snapshots[-1].items if snapshots else 0
        trainer.epoch = trainer.max_epochs
        trainer._write_outputs(val_set)
        if trainer.run_dir is not None:
            (trainer.run_dir / "strategy.json").write_text(json.dumps(stats, indent=2, default=str))
    return trainer.history
