"""Callbacks: small objects the trainer calls at fixed points (on every rank; write files on rank 0 only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caldera.train.trainer import Trainer


class Callback:
    """Override any of these; the trainer calls them on every rank in this order."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step (keep it cheap: it runs every step)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        """After each epoch's validation, with the epoch's reduced metrics."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After training ends (also after an early stop)."""


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(
        self, monitor: str = "val_loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', not {mode!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_epochs = 0

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        """Count epochs without improvement and ask the trainer to stop after ``patience``."""
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r} but the logs have {sorted(logs)}")
        value = logs[self.monitor]
        better = (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                trainer.should_stop = True
                trainer.log(f"early stopping: {self.monitor} has not improved for {self.patience} epochs")


class TensorBoard(Callback):
    """Write the epoch metrics as TensorBoard events under ``<run_dir>/tensorboard`` (rank 0)."""

    def __init__(self, log_dir: str | Path | None = None) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        """Open the event writer (needs the tensorboard package)."""
        if not trainer.world.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("TensorBoard logging needs `pip install tensorboard`") from exc
        self.writer = SummaryWriter(str(self.log_dir or Path(trainer.run_dir) / "tensorboard"))

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        """Log every scalar of the epoch."""
        if self.writer is not None:
            for key, value in logs.items():
                self.writer.add_scalar(key, value, epoch)

    def on_fit_end(self, trainer: Trainer) -> None:
        """Flush and close the writer."""
        if self.writer is not None:
            self.writer.close()
