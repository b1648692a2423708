"""Numerical precision of training: autocast policy, loss scaling and master weights.

The trainer talks to precision through five calls, so every parallel strategy works with every mode:
``setup_model(model)`` before the strategy sees it, ``wrap_optimizer(optimizer)`` (the wrapper unscales,
skips overflowed steps, keeps fp32 master weights), ``autocast()`` around forward and loss, ``scale_loss(loss)``
before backward, and ``state_dict()`` / ``load_state_dict()`` for checkpoints.

On CUDA, bf16/fp16 autocast runs matmuls and convolutions on Tensor Cores (the fast path these modes exist
for). On a CPU they work, but are rarely faster than fp32: see docs/precision.md.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch

from caldera.world import SetupWarning

MODES = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
log = logging.getLogger(__name__)


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


class _Autocast(FP32):
    """Autocast forward and loss to ``dtype`` on the model's device; otherwise like fp32."""

    dtype = torch.bfloat16

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self._autocast_dtype: torch.dtype | None = None

    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Keep fp32 storage; take the autocast device from the model when none was given."""
        if self.device is None:
            self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return model

    def autocast(self) -> AbstractContextManager:
        """Autocast to this mode's dtype on the model's device."""
        device_type = (self.device or torch.device("cpu")).type
        if self._autocast_dtype is None:
            self._autocast_dtype = _autocast_dtype(device_type, self.dtype)
        return torch.autocast(device_type, dtype=self._autocast_dtype)


class BF16Mixed(_Autocast):
    """fp32 weights, bf16 autocast for forward and loss; bf16 has fp32's range, so no loss scaling."""

    mode = "bf16-mixed"


class FP16Mixed(_Autocast):
    """fp32 weights, fp16 autocast, and a dynamic loss scale so small gradients survive fp16's range."""

    mode = "fp16-mixed"
    dtype = torch.float16
    tolerates_overflow = True  # an inf loss or gradient only skips the step and lowers the scale

    def __init__(self, device: torch.device | str | None = None, **scaler_options: Any) -> None:
        super().__init__(device)
        self.scaler = DynamicLossScaler(**scaler_options)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Unscale each gradient as autograd produces it; skip the steps whose gradients overflowed."""
        # Unscaling at the leaves (before any bucket all-reduce or clipping) means strategies clip and reduce
        # true gradients; the overflow check itself runs after the all-reduce, so every rank decides alike.
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    # Unserializable: async-shared's worker processes get the model without it and unscale
                    # themselves (caldera.parallel._async.compute_item).
                    p.register_hook(
                        torch.utils.hooks.unserializable_hook(lambda g: g * (1.0 / self.scaler.scale))
                    )
        return LossScaledOptimizer(optimizer, self.scaler)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Multiply by the current loss scale."""
        return loss * self.scaler.scale

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss scaler's state."""
        self.scaler.load_state_dict(state)


class BF16True(_Autocast):
    """Weights, activations and gradients in bf16; the optimizer steps fp32 master copies of the weights."""

    mode = "bf16-true"

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__(device)
        self.masters: dict[torch.Tensor, torch.Tensor] = {}  # bf16 parameter -> its fp32 master

    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Keep fp32 masters of the weights, cast the model to bf16, and make its inputs bf16, outputs fp32."""
        super().setup_model(model)
        # Masters are taken before the cast, so they start from the exact fp32 initialization.
        for p in model.parameters():
            if p.is_floating_point():
                self.masters.setdefault(p, p.detach().float().clone())
        model.to(torch.bfloat16)
        # fp32 in, fp32 out: the loss, metrics, plots and the user's own code never meet a bf16 tensor.
        model.register_forward_pre_hook(lambda _, args: _cast(args, torch.bfloat16))
        model.register_forward_hook(lambda _, __, out: _cast(out, torch.float32))
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Point the optimizer at the fp32 masters; the wrapper copies gradients in and weights out."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p not in self.masters:  # a parameter the model given to setup_model did not have
                    self.masters[p] = p.detach().float().clone()
        return MasterWeightOptimizer(optimizer, self.masters)

    def state_dict(self) -> dict[str, Any]:
        """The fp32 master weights (the bf16 model weights are a rounded copy of them)."""
        return {"masters": list(self.masters.values())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the masters and round them into the bf16 weights."""
        with torch.no_grad():
            for (p, m), saved in zip(self.masters.items(), state["masters"], strict=True):
                m.copy_(saved)
                p.copy_(m)


class DynamicLossScaler:
    """The fp16 loss scale: on inf/NaN gradients skip the step and halve it; double it after clean steps."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        min_scale: float = 2.0**-14,
    ) -> None:
        self.scale, self.growth_interval, self.min_scale = float(init_scale), growth_interval, min_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_tracker = 0  # clean steps since the scale last changed
        self.skipped = 0  # optimizer steps skipped for inf/NaN gradients, in total

    def update(self, grads: list[torch.Tensor]) -> bool:
        """Return True when every gradient is finite (take the step); otherwise lower the scale, return False."""
        # One fused max-|g| per tensor and one host sync: an inf or NaN anywhere makes the maximum non-finite.
        return self.record(
            not grads or bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all())
        )

    def record(self, finite: bool) -> bool:
        """Count a step whose gradients were (or were not) all finite, e.g. as decided by several ranks together;
        return ``finite`` (take the step)."""
        if finite:
            self.growth_tracker += 1
            if self.growth_tracker >= self.growth_interval:
                self.scale, self.growth_tracker = self.scale * self.growth_factor, 0
            return True
        old, self.scale, self.growth_tracker = self.scale, self.scale * self.backoff_factor, 0
        self.skipped += 1
        log.info("fp16 gradients overflowed: step skipped (%d so far), loss scale %g -> %g", self.skipped, old,
                 self.scale)  # fmt: skip
        if self.scale < self.min_scale:
            raise FloatingPointError(
                f"fp16-mixed: gradients are inf/NaN even at loss scale {self.scale:g} (floor {self.min_scale:g}) "
                f"after {self.skipped} skipped steps, so this is not an fp16 overflow: the loss or the gradients "
                "are NaN/inf at any scale. Check the data for NaN/inf, lower [optim] lr, set [optim] grad_clip, "
                "or train in bf16-mixed or fp32 to find the first bad step."
            )
        return False

    def state_dict(self) -> dict[str, Any]:
        """Scale, clean-step count and skipped-step count."""
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        self.scale, self.growth_tracker, self.skipped = (
            state[k] for k in ("scale", "growth_tracker", "skipped")
        )


class _OptimizerWrapper:
    """Acts as the wrapped optimizer (``param_groups``, ``state``, ``defaults``...) except where overridden."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":  # not set yet (e.g. during unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)


class LossScaledOptimizer(_OptimizerWrapper):
    """Steps the optimizer only when the (already unscaled) gradients are finite; updates the loss scale."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: DynamicLossScaler) -> None:
        super().__init__(optimizer)
        self.scaler = scaler

    def step(self, closure: Any = None) -> None:
        """Skip the step on inf/NaN gradients (the weights stay as they are); otherwise step."""
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.scaler.update(grads):
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and the loss scaler's."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


class MasterWeightOptimizer(_OptimizerWrapper):
    """The user's optimizer, re-pointed at fp32 masters of the low-precision parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, masters: dict[torch.Tensor, torch.Tensor]) -> None:
        super().__init__(optimizer)
        # Re-pointing (not rebuilding) keeps the same param_groups, so an LR scheduler built on the user's
        # optimizer still drives this one; any state it already had moves to the masters.
        self.pairs = [(p, masters[p]) for g in optimizer.param_groups for p in g["params"]]
        for group in optimizer.param_groups:
            group["params"] = [masters[p] for p in group["params"]]
        for p, m in self.pairs:
            if p in optimizer.state:
                optimizer.state[m] = optimizer.state.pop(p)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Step the masters with fp32 copies of the gradients, then round the masters into the parameters."""
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, m in self.pairs:
            p.copy_(m)
            m.grad = None  # the fp32 gradient copy is rebuilt every step: do not keep it alive

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients (the masters keep none between steps)."""
        for p, _ in self.pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and the fp32 masters."""
        return {"optimizer": self.optimizer.state_dict(), "masters": [m for _, m in self.pairs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` and round the masters into the parameters."""
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for (p, m), saved in zip(self.pairs, state["masters"], strict=True):
                m.copy_(saved)
                p.copy_(m)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors in ``obj`` (a tensor, tuple, list or dict of them) to ``dtype``."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _autocast_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """Return the dtype autocast will use for ``dtype`` on ``device_type``; fail clearly if it cannot."""
    if device_type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        warnings.warn("this GPU has no bf16 Tensor Cores (compute capability < 8.0): bf16 runs emulated and slowly; "
                      "use precision mode fp16-mixed", SetupWarning, stacklevel=3)  # fmt: skip
    if device_type == "cpu":
        warnings.warn(f"{dtype} autocast on CPU works but is rarely faster than fp32; the fast path is a GPU "
                      "with Tensor Cores (see docs/precision.md)", SetupWarning, stacklevel=3)  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # older torch only warns, then silently disables autocast
            torch.autocast(device_type, dtype=dtype)
        return dtype
    except (UserWarning, RuntimeError) as exc:
        if device_type == "cpu" and dtype == torch.float16:  # torch < 2.4 has no fp16 autocast on CPU
            warnings.warn("this torch has no fp16 autocast on CPU: fp16-mixed autocasts to bf16 here (the loss "
                          "scaler still runs)", SetupWarning, stacklevel=3)  # fmt: skip
            return torch.bfloat16
        raise RuntimeError(f"{dtype} autocast is not available on {device_type}: {exc}") from None


def make_precision(mode: str | Precision = "fp32", device: torch.device | None = None) -> Precision:
    """Return the precision policy for ``mode`` on ``device``."""
    if not isinstance(mode, str):
        return mode
    if mode not in MODES:
        raise ValueError(f"unknown precision mode {mode!r}; use one of {', '.join(MODES)}")
    policies = {"fp32": FP32, "bf16-mixed": BF16Mixed, "fp16-mixed": FP16Mixed, "bf16-true": BF16True}
    return FP32() if mode == "fp32" else policies[mode](device)
