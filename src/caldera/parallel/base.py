"""The strategy protocol: the only thing the trainer knows about parallelism.

Who calls what, in which order (on every rank):
``setup(model, optimizer, world)`` once, before training -> returns the model to run forward on;
then per step ``backward(loss)`` and ``step()`` (which also clears the gradients for the next step);
``state_dict()`` / ``load_state_dict()`` for checkpoints; ``close()`` at the end, even after an error.
A strategy registers its config name with ``@register("name")``.

Optional methods: ``fit(trainer, train_set, val_set)`` -- a strategy that drives its own loop (worker
processes, parameter servers) takes the whole run over from ``Trainer.fit``; ``synchronize()`` -- called
before validation and checkpoints, so that strategies whose ranks drift apart (local SGD) agree first;
``train_batch(x, y, loss_fn, scale, precision)`` -- a strategy that runs a batch's forward and backward itself
(pipeline micro-batches) instead of ``backward(loss)``; ``data_shards(world)`` -- (shard, shards) when groups of
ranks share a slice of the data (the stages of a pipeline), instead of one slice per rank;
``forward_batch(x)`` -- validation through the strategy's own forward (pipeline stages): the output where it is
scored, ``None`` on the other ranks; such a strategy is synchronized before checkpoints and at the end only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from caldera.names import STRATEGIES
from caldera.world import World


@runtime_checkable
class Strategy(Protocol):
    """How one training step's gradients become the same update on every rank."""

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Prepare the model (e.g. broadcast weights, install hooks) and return the module to call."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Compute this rank's gradients (and start communicating them)."""
        ...

    def step(self) -> None:
        """Finish communication, update the weights, and zero the gradients."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's own state for a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state from ``state_dict()``."""
        ...

    def close(self) -> None:
        """Release hooks, buffers and background work."""
        ...


_REGISTRY: dict[str, Callable[..., Strategy]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a strategy selectable as ``[parallel] strategy = name``."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        STRATEGIES[name] = cls  # the config checks names against the registry, not this module
        return cls

    return deco


def available_strategies() -> list[str]:
    """Return the registered strategy names."""
    return sorted(_REGISTRY)


def make_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy registered as ``name`` with its options."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}")
    return _REGISTRY[name](**options)
