"""Give a model built on the meta device its storage one module at a time, so that no process ever holds it whole.

A model constructed under ``torch.device("meta")`` has shapes but no numbers (and its construction draws nothing
from the random generators). ``materialize`` walks it children-first, in registration order, which is the order
in which an ordinary construction draws its initial weights (a module initialises its own parameters at the end of
its constructor, after its children were built): each module gets storage for its own parameters and buffers and
is initialised by its ``reset_parameters()``, as its constructor would, and is handed at once to ``keep``, which
may cut it down (keep this rank's part) before the next module is materialised. With the same seed the weights
equal an ordinary construction's, and peak memory is the largest single module, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

Keep = Callable[[str, nn.Module], None]


def on_meta(model: nn.Module) -> bool:
    """True when any parameter or buffer of ``model`` is on the meta device (it was built without storage)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def materialize(model: nn.Module, keep: Keep | None = None, device: torch.device | str = "cpu",
                optimizer: torch.optim.Optimizer | None = None) -> nn.Module:  # fmt: skip
    """Give each module of ``model`` whose own parameters or buffers are on the meta device storage on ``device``,
    initialised by its ``reset_parameters()``, one module at a time and children first; call ``keep(name, module)``
    right after each. Parameters are new objects after this (torch cannot move a meta parameter in place):
    ``optimizer``, built over the meta ones, is pointed at the new ones. Return ``model``."""
    renamed: dict[int, nn.Parameter] = {}
    for name, module in _children_first(model):
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not any(t.is_meta for t in own):
            continue
        reset = getattr(module, "reset_parameters", None)
        if not callable(reset):
            raise TypeError(
                f"module {name or '(the model)'!r} ({type(module).__name__}) has parameters on the meta device but no "
                "reset_parameters() to initialise them: give it one that sets every parameter it owns (and call it "
                "at the end of its __init__), or build the model without shard_params"
            )
        before = {key: p for key, p in module.named_parameters(recurse=False)}
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            reset()
        for key, old in before.items():
            renamed[id(old)] = module._parameters[key]  # type: ignore[assignment]
        if keep is not None:
            keep(name, module)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [renamed.get(id(p), p) for p in group["params"]]
    return model


def _children_first(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every module of ``model`` after its children, the children in registration order (post-order)."""
    for key, child in model.named_children():
        yield from _children_first(child, f"{prefix}{key}.")
    yield prefix.rstrip("."), model
