"""The strategy base class: the only thing the trainer knows about parallelism.

A strategy subclasses ``Strategy``, implements ``setup``, ``backward`` and ``step``, and registers its config name
with ``@register("name")`` -- one file plus its import line in ``caldera/parallel/__init__.py``. Every other hook
has a default that is the single-process behaviour, so the trainer calls each one unconditionally.

Who calls what, in which order (``Trainer``, on every rank unless said otherwise):

1. ``runs_own_loop``: read once by ``fit``; a strategy that drives its own loop (worker processes, parameter
   servers) sets it and takes the whole run over in ``fit(ctx, train_set, val_set)`` on every rank, where
   ``ctx`` is the trainer seen as a ``RunContext`` (``parallel/context.py``: settings, ``log``,
   ``progress_bar``, ``restore``/``save`` for checkpoints, ``report`` of its recorded snapshots on the main
   rank); nothing below runs, except what the strategy itself calls (``setup``, ``state_dict`` through
   ``ctx.save``, ``load_state_dict`` through ``ctx.restore``, ``close``).
2. ``data_shards(world)`` -> (shard, shards): how the data is cut; default one shard per rank.
3. ``setup(model, optimizer, world)`` once, before training (and before a resume loads its checkpoint) ->
   the module to run forward on.
4. Per optimizer step: ``train_batch(net, x, y, loss_fn, scale, precision, ...)`` (default: forward and
   ``backward(loss)`` per micro-batch, all but the last inside ``no_sync()``), then ``step()`` (finish the
   communication, update, zero the gradients). Under a user's training step ``y`` is None, ``x`` the whole
   batch (a tuple or dict of tensors) and ``loss_fn`` a ``StepFn``: the loss is ``loss_fn(net, x)``; a strategy
   that overrides ``train_batch`` and cannot do that sets ``supports_step = False``.
5. ``consolidate(purpose)`` (collective) where the ranks must agree: ``"validation"`` after each epoch,
   ``"checkpoint"`` before rank 0 captures the whole state (``"sharded-checkpoint"`` instead where
   ``sharded_state()`` gave this rank's part to write: agree on the replicated state, gather nothing),
   ``"outputs"`` once at the end before rank 0 writes the model; then ``forward_batch(model, x)`` for each
   validation batch (None where a batch is not scored).
6. ``state_dict()`` / ``load_state_dict()`` for checkpoints (rank 0 saves, every rank loads); before each
   checkpoint ``sharded_state()`` (collective, when ``[checkpoint] sharded``); ``close()`` at the end, even after
   an error.
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from caldera.config import StrategyOptions
from caldera.data.sampler import batch_len, split_batch
from caldera.errors import ConfigError
from caldera.names import STRATEGIES
from caldera.parallel.context import RunContext
from caldera.world import World

Purpose = Literal["validation", "checkpoint", "sharded-checkpoint", "outputs"]


class Strategy(ABC):
    """How one training step's gradients become the same update on every rank (defaults: one process)."""

    # True: ``fit`` drives the whole run and the trainer's loop is not used (worker processes, parameter servers).
    runs_own_loop: ClassVar[bool] = False
    # True: the strategy calls MPI itself (mpi4py communicators, windows, requests) beyond the ``Communicator``
    # protocol, so it cannot run where the ranks talk through torch.distributed (torchrun); see ``check_launcher``.
    needs_mpi: ClassVar[bool] = False
    # The strategy's ``[parallel]`` keys (beside ``strategy``), validated when a run file is loaded; each is a
    # keyword of the constructor. The default has none.
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    # Set by the trainer before a step whose gradient norm it logs; a strategy that measures it keeps the norm
    # of that step in ``_grad_norm`` (a tensor: reading it is a device sync, left to whoever asks).
    measure_grad_norm: bool = False
    _grad_norm: torch.Tensor | float | None = None
    # False: a user's training step ([train] step) is refused (the strategy calls the model in pieces).
    supports_step: ClassVar[bool] = True
    # Why ``[train] compile`` does not apply to this strategy, with the fix (None: the module ``setup`` returns is
    # compiled); the trainer sets ``compiled`` before ``setup`` when it will compile that module.
    not_compiled: ClassVar[str | None] = None
    compiled: bool = False
    # True: ``setup()`` receives a model built on the meta device (no storage) and materialises only this rank's
    # part of it (``caldera.models.materialize``); the whole model never exists in one process. An instance may
    # set it from its options (allreduce with ``shard_params``).
    builds_on_meta: bool = False
    # True: a forward of the model is collective (ZeRO-3 gathers each block from every rank), so the ranks run
    # their validation forwards together; a rank out of batches calls ``join_forward()`` while others still have one.
    collective_forward: bool = False
    # The ``[parallel] strategy`` name ``make_strategy`` built it under (messages name it; None: built directly).
    config_name: str | None = None

    @abstractmethod
    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
    ) -> torch.nn.Module:
        """Prepare the model (e.g. broadcast weights, install hooks) and return the module to call."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Compute this rank's gradients (and start communicating them)."""

    @abstractmethod
    def step(self) -> None:
        """Finish communication, update the weights, and zero the gradients."""

    def fit(self, ctx: RunContext, train_set: Any, val_set: Any) -> list[dict[str, float]]:
        """Run the whole training through ``ctx`` and return its history (only strategies with ``runs_own_loop``)."""
        raise NotImplementedError(f"{type(self).__name__} does not run its own loop (runs_own_loop is False)")

    def data_shards(self, world: World) -> tuple[int, int]:
        """(this rank's data shard, number of shards): one shard per rank."""
        return world.rank, world.size

    def no_sync(self) -> AbstractContextManager[None]:
        """Backward passes inside only accumulate gradients locally (all micro-batches but the last)."""
        return nullcontext()

    def train_batch(
        self, net: torch.nn.Module, x: Any, y: torch.Tensor, loss_fn: Callable, scale: float, precision: Any,
        accumulate: int = 1, offload: bool = False, non_finite: Callable[[torch.Tensor], Exception] | None = None,
    ) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """Forward and ``backward`` of this rank's batch in ``accumulate`` micro-batches whose gradients add up to
        the whole batch's; only the last one communicates. Return the batch's mean loss and whether it is finite
        (a NaN/inf loss raises ``non_finite(loss)`` unless the precision skips overflowing steps)."""
        pieces = micro_batches(x, y, accumulate)
        n = len(y) if y is not None else batch_len(x)
        total, finite = torch.zeros((), dtype=torch.float64), True
        for i, (xi, yi) in enumerate(pieces):
            with precision.autocast(), activations_offloaded(offload):
                loss = loss_fn(net(xi), yi) if yi is not None else loss_fn(net, xi)
            if not bool(torch.isfinite(loss)):
                finite = False
                if not precision.tolerates_overflow and non_finite is not None:
                    raise non_finite(loss)
            ni = len(yi) if yi is not None else batch_len(xi)
            weight = scale * (ni / n)
            # Gradients of all but the last micro-batch just accumulate, locally.
            with self.no_sync() if i < len(pieces) - 1 else nullcontext():
                self.backward(precision.scale_loss(loss * weight if weight != 1 else loss))
            total += loss.detach().double().cpu() * ni
        return total / n, finite

    def grad_norm(self) -> float | None:
        """The global 2-norm of the gradients the last measured step applied, before clipping (see
        ``measure_grad_norm``); None where the strategy does not measure it (the default) or no step was measured."""
        norm, self._grad_norm = self._grad_norm, None
        return None if norm is None else float(norm)

    def forward_batch(self, model: torch.nn.Module, x: Any) -> torch.Tensor | None:
        """Validation forward of ``model`` (the whole model the trainer holds): the output where the batch is
        scored, None on ranks that do not score it."""
        return model(x)

    def join_forward(self) -> None:
        """Take part in one forward that other ranks run while this rank has no batch (``collective_forward``)."""
        return None  # a default: forwards are local unless collective_forward

    def consolidate(self, purpose: Purpose) -> None:
        """Make the ranks agree before ``purpose`` (collective): nothing to do for one process."""
        return None  # a default, not an abstract method: one process has nothing to agree on

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's own state for a checkpoint."""
        return {}

    def sharded_state(self) -> dict[str, Any] | None:
        """Optimizer state sharded over the ranks, for a checkpoint in which each rank writes its own part
        (collective): ``{"layout": ..., "state": ...}``, the layout (JSON, the same on every rank: the manifest
        records it; ``files`` names the rank file holding each shard) and this rank's shard (None where another
        rank writes it), in ``parallel/zero.py``'s format; None (the default): the whole state is rank 0's after
        ``consolidate("checkpoint")``."""
        return None

    def local_state(self, shared: dict[str, Any]) -> dict[str, Any]:
        """A whole checkpoint state (``Trainer.state_dict``'s: model, optimizer...) reduced to what this rank's
        model and optimizer hold after ``setup`` (a strategy that keeps only its part); default: all of it."""
        return shared

    def write_sharded_weights(self, directory: Path) -> bool:
        """Write the final weights shard-wise into ``directory`` (collective), each rank its own part, instead of
        rank 0 writing ``model.pt`` after ``consolidate("outputs")``; False (the default): not done."""
        return False

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state from ``state_dict()``."""
        return None  # no state of its own by default

    def close(self) -> None:
        """Release hooks, buffers and background work."""
        return None  # nothing held by default


def check_launcher(strategy: Strategy, world: World, name: str | None = None) -> None:
    """Refuse, in one line naming the launch to use, a strategy that needs MPI on ranks that torchrun started."""
    if strategy.needs_mpi and world.launcher == "torchrun":
        label = name or strategy.config_name or type(strategy).__name__
        raise ConfigError(
            f"strategy {label!r} needs MPI (it calls MPI itself, beyond collectives), but torchrun started these "
            f"{world.size} processes: start them with `caldera launch -n {world.size} -- ...` or "
            f"`mpiexec -n {world.size} ...` instead, or use strategy 'allreduce', 'local-sgd' or 'pipeline'"
        )


def micro_batches(x: Any, y: torch.Tensor | None, k: int) -> list[tuple[Any, torch.Tensor | None]]:
    """Cut a batch (input: a tensor or a tuple of tensors) into at most ``k`` non-empty (input, target) pieces
    along the first dimension (a batch smaller than ``k`` gives fewer); ``y`` None: ``x`` is a whole batch for a
    training step (a tuple, list or dict of tensors), each of its tensors cut alike."""
    if k == 1:
        return [(x, y)]
    if y is None:
        return [(piece, None) for piece in split_batch(x, k)]
    xs = list(zip(*(t.tensor_split(k) for t in x))) if isinstance(x, tuple) else list(x.tensor_split(k))
    return [(a, b) for a, b in zip(xs, y.tensor_split(k)) if len(b)] or [(x, y)]


def clip_and_measure(params: Any, clip: float | None, measure: bool) -> torch.Tensor | None:
    """Clip the gradients of ``params`` to the 2-norm ``clip`` (if set); return their norm before clipping when
    ``measure`` (a tensor, not read: no device sync here), else None."""
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)  # computes the norm anyway
        return norm if measure else None
    if not measure:
        return None
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


class StepFn:
    """A user's training step ``fn(model, batch) -> loss`` or ``-> (loss, {name: value})``, called by the strategies
    where the loss would be ``loss_fn(net(x), y)``. The metrics it returns are added, weighted by the batch's
    samples, to ``sums`` ({name: [sum, samples]}) for the trainer to average; ``sums`` is swapped for validation."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.sums: dict[str, list[float]] = {}

    def __call__(self, net: torch.nn.Module, batch: Any) -> torch.Tensor:
        out = self.fn(net, batch)
        loss, metrics = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if not (torch.is_tensor(loss) and loss.numel() == 1):
            raise TypeError(f"the training step {getattr(self.fn, '__name__', self.fn)} returned "
                            f"{type(out).__name__}; return the loss (a one-element tensor) or (loss, "
                            "{name: value, ...})")  # fmt: skip
        if metrics:
            n = batch_len(batch)
            for name, value in metrics.items():
                value = float(value.detach().double()) if torch.is_tensor(value) else float(value)
                entry = self.sums.setdefault(name, [0.0, 0])
                entry[0] += value * n
                entry[1] += n
        return loss.reshape(())


def activations_offloaded(offload: bool) -> AbstractContextManager[Any]:
    """Keep the activations saved for backward in pinned host memory instead of on the GPU (when asked)."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else nullcontext()


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a strategy selectable as ``[parallel] strategy = name``."""

    def deco(cls: type) -> type:
        STRATEGIES[name] = cls  # one table of names, built-in and registered, that the config checks too
        return cls

    return deco


def available_strategies() -> list[str]:
    """Return the strategy names: the built-in ones and those registered with ``@register``."""
    return sorted(STRATEGIES)


def make_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy registered as ``name`` with its options; a keyword it does not take is a TypeError
    naming the ones it does."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}")
    factory = STRATEGIES[name]  # a built-in's module is imported here, at its first use
    allowed = keywords(factory)
    unknown = [key for key in options if allowed is not None and key not in allowed]
    if unknown:
        renamed = getattr(getattr(factory, "Options", None), "renamed", {})
        new = renamed.get(unknown[0])
        close = [new] if new else difflib.get_close_matches(unknown[0], allowed or [], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TypeError(f"strategy {name!r} has no option {unknown[0]!r}; {hint}its options: "
                        f"{', '.join(allowed or []) or 'none'}")  # fmt: skip
    strategy = factory(**options)
    strategy.config_name = name
    return strategy


def keywords(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments ``factory`` takes (None: any, it has ``**kwargs``)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
