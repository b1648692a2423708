"""The single-process strategy: plain ``loss.backward()`` and ``optimizer.step()``."""

from __future__ import annotations

import torch

from caldera.parallel.base import Strategy, clip_and_measure, register
from caldera.world import World


@register("single")
class Single(Strategy):
    """Train on this process alone; with several ranks, each trains its own independent copy."""

    def __init__(self, *, grad_clip: float | None = None) -> None:
        self.grad_clip = grad_clip

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Keep the model as it is."""
        self.model, self.optimizer = model, optimizer
        return model

    def backward(self, loss: torch.Tensor) -> None:
        """Run autograd."""
        loss.backward()

    def step(self) -> None:
        """Clip (if asked), step and zero the gradients."""
        params = list(self.model.parameters())
        self._grad_norm = clip_and_measure(params, self.grad_clip, self.measure_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
