"""What a loop strategy (``runs_own_loop``: async-shared, async-ps) may ask of the run that hands it the loop.

``Trainer.fit`` calls ``strategy.fit(ctx, train_set, val_set)`` with itself as ``ctx``; the strategy sees only the
``RunContext`` below -- settings to read, and five actions -- never the trainer's own workings, and parallel/
imports nothing from train/. What it trains it hands back as ``Snapshot``s (the weights after so many updates,
with a timestamp); ``ctx.report`` turns them into the run's history and run directory, as the trainer's own
loop turns epochs into them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from caldera.checkpoint import Checkpointer
    from caldera.precision import Precision
    from caldera.world import World


@dataclass
class Snapshot:
    """The weights as they were after ``items`` updates, ``time_s`` seconds into training."""

    items: int
    time_s: float
    weights: torch.Tensor  # the trainable parameters (``trainable(model)``), flattened
    loss_sum: float = 0.0  # sum over the samples of the items since the previous snapshot of their loss
    samples: int = 0


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the asynchronous strategies update and snapshot, in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]


class UpdateBar(Protocol):
    """Rank 0's progress bar over a loop strategy's updates."""

    def show(self, done: int, per_epoch: int, loss: float | None) -> None:
        """Set the bar to ``done`` updates of the run (``per_epoch`` per epoch), showing ``loss`` (None/NaN: keep)."""


class RunContext(Protocol):
    """The run as a loop strategy sees it (``caldera.train.Trainer`` implements it).

    Settings, read on every rank: the model (its weights are the run's: a loop strategy trains them and leaves
    the final ones there on every rank), the optimizer and loss, precision, the learning-rate schedule (None or
    a LambdaLR), the world, the data settings and the checkpointer (None: no checkpoints; the strategy calls
    its ``poll``, ``install_signal_handlers``/``restore_signal_handlers`` and reads ``stop_reason``).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None
    step: Any  # None, or the user's training step (``base.StepFn``) taking the model and the whole batch
    precision: Precision
    scheduler: Any
    world: World
    batch_size: int  # the global batch
    max_epochs: int
    seed: int
    shuffle: bool
    drop_last: bool
    accumulate: int  # micro-batches per work item
    checkpointer: Checkpointer | None
    resume: bool | str | Path  # truthy: ``restore`` before training
    # One dict of metrics per epoch: ``report`` fills it on the main rank; ranks that did not evaluate set it to
    # the main rank's (every rank's ``fit`` returns the same history).
    history: list[dict[str, float]]

    def log(self, message: str) -> None:
        """Print ``message`` (rank 0 only; any rank may call it)."""

    def progress_bar(self, total: int) -> AbstractContextManager[UpdateBar | None]:
        """Rank 0's progress bar over ``total`` updates (None on other ranks or with progress off)."""

    def restore(self) -> dict[str, Any] | None:
        """Load the newest checkpoint (or the one ``resume`` names) into the model, the optimizer and the
        strategy (its ``load_state_dict``); return this rank's own part of it (None: none, or a fresh start).
        Every rank calls it, before training."""

    def save(self, step: int, epoch: int, step_in_epoch: int, local: dict[str, Any] | None = None) -> Path:
        """Checkpoint the run as it is after ``step`` updates, at (``epoch``, ``step_in_epoch``) of a synchronous
        run; ``local`` adds to this rank's own file. Collective over ``world``, blocking: the strategy has
        paused its workers at a consistent cut. Return the checkpoint's path."""

    def report(self, snapshots: Sequence[Snapshot], val_set: Any, per_epoch: int, stats: dict[str, Any],
               lr: Callable[[int], float] | None = None) -> list[dict[str, float]]:  # fmt: skip
        """Main rank only, alone (no collective): evaluate each snapshot on ``val_set``, log it as an epoch
        (``per_epoch`` updates make one; ``lr(item)`` the rate at a work item, else the optimizer's), write
        the run directory (metrics, plots, ``strategy.json`` = ``stats``; final weights = the last snapshot,
        left in ``model``) and return the history."""
