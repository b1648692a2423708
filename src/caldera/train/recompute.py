"""Activation checkpointing: trade compute for memory by recomputing blocks' activations in backward.

Autograd keeps every intermediate activation of the forward pass until backward uses it; for deep models on big
fields that, not the weights, is what runs out of memory. A checkpointed block keeps only its input: backward
runs the block's forward once more to get the rest (``torch.utils.checkpoint``, non-reentrant, which restores
the RNG state so dropout draws the same masks). Memory falls to about one block's activations plus the blocks'
inputs; compute rises by about one forward pass.

The blocks are the model's direct children that hold parameters (a U-Net's encoder/decoder stages, a
transformer's layers). Children with BatchNorm are left alone: recomputing them in training mode would update
their running statistics twice.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


class _Recomputed:
    """Stands in for a module's ``forward``: the same call, checkpointed when gradients are being recorded.

    Holds the module, not its bound ``forward``, so that a pickled copy (async-shared's worker processes) cannot
    resolve ``forward`` to this wrapper itself."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = functools.partial(type(self.module).forward, self.module)
        if not torch.is_grad_enabled():  # evaluation: nothing is kept anyway
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(model: torch.nn.Module) -> list[str]:
    """Recompute the activations of each parameter-holding child of ``model`` in backward; return their names."""
    chosen = []
    for name, child in model.named_children():
        has_params = any(p.requires_grad for p in child.parameters())
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in child.modules())
        if has_params and not has_bn:
            child.forward = _Recomputed(child)  # an instance attribute: state_dict keys do not change
            chosen.append(name)
    return chosen


def saved_activation_bytes(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one forward pass of ``model`` (what checkpointing reduces)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return total
