"""Numerical precision of training: autocast policy, loss scaling and master weights.

The trainer talks to precision through five calls, so every parallel strategy works with every mode:
``setup_model(model)`` before the strategy sees it, ``wrap_optimizer(optimizer)`` (the wrapper unscales,
skips overflowed steps, keeps fp32 master weights), ``autocast()`` around forward and loss, ``scale_loss(loss)``
before backward, and ``state_dict()`` / ``load_state_dict()`` for checkpoints.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch

MODES = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")


class Precision(Protocol):
    """How forward, backward and the optimizer step handle reduced precision."""

    mode: str
    tolerates_overflow: bool  # True when a non-finite loss is an expected overflow (fp16), not a failure

    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Convert the model's storage if the mode needs it; return it."""
        ...

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Return the optimizer the strategy should step."""
        ...

    def autocast(self) -> AbstractContextManager:
        """Context for forward and loss."""
        ...

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return the loss to backpropagate."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Return the state to checkpoint (e.g. the loss scale)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        ...


class FP32:
    """Full single precision: every call is the identity."""

    mode = "fp32"
    tolerates_overflow = False

    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Keep fp32 storage."""
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Use the optimizer as it is."""
        return optimizer

    def autocast(self) -> AbstractContextManager:
        """No autocast."""
        return nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """No scaling."""
        return loss

    def state_dict(self) -> dict[str, Any]:
        """No state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state."""


def make_precision(mode: str | Precision = "fp32", device: torch.device | None = None) -> Precision:
    """Return the precision policy for ``mode`` on ``device``."""
    if not isinstance(mode, str):
        return mode
    if mode not in MODES:
        raise ValueError(f"unknown precision mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "fp32":
        return FP32()
    raise NotImplementedError(f"precision mode {mode!r} is not available in this version; use 'fp32'")
