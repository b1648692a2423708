"""A config becomes a run: build data, model, optimizer, schedule, strategy and trainer from a ``Config``."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from caldera.checkpoint import Checkpointer
from caldera.comm.base import Communicator
from caldera.comm.local import LocalComm
from caldera.config import Config, load_config
from caldera.data import split_dataset
from caldera.data.sampler import ShardedBatches
from caldera.durations import parse_duration
from caldera.errors import ConfigError
from caldera.names import LOOP_STRATEGIES, LOSSES, METRICS, MODELS, OPTIMIZERS, SCHEDULERS, SOURCES
from caldera.parallel import Strategy, make_strategy
from caldera.refs import resolve
from caldera.train.callbacks import Callback, EarlyStopping
from caldera.train.metrics import mode as metric_mode
from caldera.train.rundir import RunDir, load_weights
from caldera.train.tracking import Tracker
from caldera.train.trainer import Trainer
from caldera.world import World, init, seed_everything


def build_data(cfg: Config, comm: Communicator | None = None,
               frozen_stats: bool = False) -> tuple[Dataset, Dataset | None]:  # fmt: skip
    """Call the data source; split off validation data unless the source returned its own.

    ``comm``: the ranks that build this data together (default this process alone), handed to a source that
    takes a ``comm`` argument, as ``run_dir`` is: rank 0 of it writes shared files (a generated data set,
    normalisation statistics) while the others wait, so it must be exactly the ranks that call this.
    ``frozen_stats``: a trained model is applied (predict, export): normalise with the run's saved statistics."""
    source = resolve(cfg.data.source, SOURCES, "[data] source")
    if "comm" in cfg.data.args:
        raise ConfigError(
            "[data] args.comm: the ranks a source works with are the run's own, not a run-file setting; remove it"
        )
    # Sources that keep files with the run (normalisation statistics), share work over the ranks or split by
    # themselves get what they take.
    wanted = {"run_dir": cfg.run_dir, "val_fraction": cfg.data.val_fraction, "comm": comm or LocalComm(),
              "frozen_stats": frozen_stats}  # fmt: skip
    takes = _parameters(source)
    out = _call(source, {**{k: v for k, v in wanted.items() if k in takes}, **cfg.data.args}, "[data] args")
    if isinstance(out, dict):
        if "train" not in out:
            raise ConfigError(f"[data] source {cfg.data.source!r} returned a dict without a 'train' entry")
        return out["train"], out.get("val")
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(d, Dataset) for d in out):
        return out[0], out[1]
    return split_dataset(out, cfg.data.val_fraction, cfg.run.seed)


def build_model(cfg: Config, weights: bool = True, meta: bool = False) -> torch.nn.Module:
    """Instantiate the model the config names; load ``[model] weights`` into it unless ``weights`` is False.
    ``meta``: build it on the meta device (shapes, no storage) for a strategy that materialises its own part."""
    if meta:
        if weights and cfg.model.weights:
            raise ConfigError(f"[model] weights: strategy {cfg.parallel.strategy!r} with these [parallel] options "
                              "builds the model without storage and cannot start from a weights file yet; remove "
                              "[model] weights or the sharding option")  # fmt: skip
        with torch.device("meta"):
            return _call(resolve(cfg.model.name, MODELS, "[model] name"), cfg.model.args, "[model] args")
    model = _call(resolve(cfg.model.name, MODELS, "[model] name"), cfg.model.args, "[model] args")
    if weights and cfg.model.weights:
        _load_weights(model, Path(cfg.model.weights))
    return model


def load_run_model(run_dir: RunDir, cfg: Config) -> torch.nn.Module:
    """The model of a finished run, built from its config and loaded with its model.pt (tensors only)."""
    return run_dir.load_weights(build_model(cfg, weights=False))


def load_runs(
    run_dirs: Sequence[str | Path], same: Callable[[Config], Any]
) -> tuple[list[torch.nn.Module], list[Config]]:
    """The trained models and configs of finished runs meant to differ only in their training seed (scored side by
    side): ``same(cfg)``, e.g. the data settings, must agree for all of them, else one ConfigError names the run."""
    models: list[torch.nn.Module] = []
    cfgs: list[Config] = []
    for run_dir in map(Path, run_dirs):
        files = RunDir(run_dir)
        if files.missing():
            raise ConfigError(
                f"{run_dir}: missing {', '.join(files.missing())}: give finished run directories"
            )
        cfg = load_config(files.read_config())  # refuses code the run directory names (docs/security.md)
        if cfgs and same(cfg) != same(cfgs[0]):
            raise ConfigError(f"{run_dir}: {same(cfg)} differ from {run_dirs[0]}'s {same(cfgs[0])}; compare runs "
                              "that differ only in their seed")  # fmt: skip
        models.append(load_run_model(files, cfg))
        cfgs.append(cfg)
    return models, cfgs


def spread(values: list[float]) -> dict[str, Any]:
    """One score over runs (seeds): its mean, sample standard deviation (0 for one value) and the values; NaN
    where a value is (a score a run could not give)."""
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "sd": sd, "values": values}


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """Start from an earlier run's weights; a file that does not fit the model names what differs."""
    if not path.is_file():
        raise ConfigError(f"[model] weights = '{path}': no such file (give an earlier run's model.pt)")
    load_weights(model, path, f"[model] weights = '{path}'")


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``[optim] name`` names (a built-in or a class by import path) over the model's parameters,
    with ``[optim] lr`` and ``weight_decay`` where it takes them (``momentum`` for sgd) and ``[optim] args``."""
    o = cfg.optim
    cls = resolve(o.name, OPTIMIZERS, "[optim] name")
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"[optim] name = {o.name!r} is not a torch.optim.Optimizer class; name one, such as "
                          "'torch.optim:RAdam'")  # fmt: skip
    own = [k for k in ("params", "lr", "weight_decay") if k in o.args]
    if own:
        raise ConfigError(f"[optim] args.{own[0]}: set it as [optim] {own[0]} (params: the model's, always)"
                          if own[0] != "params" else "[optim] args.params: the optimizer always gets the model's "
                          "parameters; remove it")  # fmt: skip
    _bind(cls, o.args, "[optim] args", partial=True)  # a misspelt argument is named now, with the valid ones
    takes = _parameters(cls)
    # Unchanged for the three original built-ins: SGD(lr, momentum, weight_decay), Adam/AdamW(lr, weight_decay).
    ours = {
        "lr": o.lr,
        "weight_decay": o.weight_decay,
        **({"momentum": o.momentum} if o.name == "sgd" else {}),
    }
    if o.weight_decay and "weight_decay" not in takes:
        raise ConfigError(
            f"[optim] weight_decay = {o.weight_decay}: {cls.__name__} takes no weight_decay; remove it"
        )
    return cls(model.parameters(), **{k: v for k, v in ours.items() if k in takes}, **o.args)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warm-up, then constant or cosine decay, stepped once per optimizer step (None if constant); or the
    ``[optim] scheduler`` class with its ``scheduler_args``."""
    o = cfg.optim
    if o.scheduler is not None:
        return _user_scheduler(cfg, optimizer, total_steps)
    if o.schedule == "constant" and o.warmup_steps == 0:
        return None
    return Schedule(optimizer, LRFactor(o.schedule, o.warmup_steps, total_steps))


def _user_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> Stepped:
    """Build ``[optim] scheduler``, filling in the run's length and peak rate where the class takes them."""
    o = cfg.optim
    cls = resolve(o.scheduler, SCHEDULERS, "[optim] scheduler")  # type: ignore[arg-type]
    step = getattr(cls, "step", None)
    if not inspect.isclass(cls) or not callable(step) or not hasattr(cls, "state_dict"):
        raise ConfigError(f"[optim] scheduler = {o.scheduler!r} is not a learning-rate scheduler class (one with "
                          "step and state_dict, such as 'torch.optim.lr_scheduler:OneCycleLR')")  # fmt: skip
    needs = [p.name for p in list(inspect.signature(step).parameters.values())[1:]
             if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    if needs:  # ReduceLROnPlateau: step(metrics)
        raise ConfigError(f"[optim] scheduler = {o.scheduler!r}: its step() needs {', '.join(needs)}, which the "
                          "trainer does not pass; use a scheduler driven by the step count")  # fmt: skip
    args = dict(o.scheduler_args)
    if "optimizer" in args:
        raise ConfigError(
            "[optim] scheduler_args.optimizer: the scheduler always gets the run's optimizer; remove it"
        )
    per_epoch = max(1, total_steps // o.epochs)
    length = total_steps if o.scheduler_interval == "step" else o.epochs
    takes = _parameters(cls)
    if "total_steps" in takes and not {"total_steps", "epochs", "steps_per_epoch"} & args.keys():
        args["total_steps"] = length
    elif {"epochs", "steps_per_epoch"} <= takes and not {"epochs", "steps_per_epoch"} & args.keys():
        args.update(epochs=o.epochs, steps_per_epoch=per_epoch if o.scheduler_interval == "step" else 1)
    if "T_max" in takes and "T_max" not in args:
        args["T_max"] = length
    if "max_lr" in takes and "max_lr" not in args:
        args["max_lr"] = o.lr
    # A misspelt argument is named with the valid ones; a missing one (StepLR's step_size) is named too.
    _bind(cls, o.scheduler_args, "[optim] scheduler_args", partial=True)
    params = list(inspect.signature(cls).parameters.values())[1:]  # after the optimizer
    missing = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD
               and p.kind is not p.VAR_POSITIONAL and p.name not in args]  # fmt: skip
    if missing:
        raise ConfigError(f"[optim] scheduler_args: {cls.__name__} needs {', '.join(missing)}; add it, e.g. "
                          f"scheduler_args = {{{missing[0]} = ...}}")  # fmt: skip
    filled = {k: v for k, v in args.items() if k not in o.scheduler_args and k != "max_lr"}
    return Stepped(cls(optimizer, **args), o.scheduler_interval, length, filled)


class Stepped:
    """A user's learning-rate scheduler, stepped after each optimizer step (``interval`` "step") or each epoch
    (``epoch_end``, called by ``EpochSteps``), never beyond the ``length`` it was built for: the last step of an
    epoch with a short tail would otherwise exceed OneCycleLR's total_steps and raise. Checkpoints hold the
    scheduler's own state_dict."""

    def __init__(
        self, scheduler: Any, interval: str, length: int, filled: dict[str, Any] | None = None
    ) -> None:
        self.scheduler, self.interval, self.length = scheduler, interval, length
        self.filled = dict(
            filled or {}
        )  # the run's length as given to the scheduler (total_steps, T_max, ...)

    def step(self) -> None:
        """After an optimizer step (the trainer calls it)."""
        if self.interval == "step":
            self._advance()

    def epoch_end(self) -> None:
        """After an epoch."""
        if self.interval == "epoch":
            self._advance()

    def _advance(self) -> None:
        if getattr(self.scheduler, "last_epoch", -1) < self.length:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's own state."""
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; a checkpoint built for another length (a resume that changed optim.epochs) is
        refused: the scheduler's state is its own, derived from that length, and it would step past its end."""
        changed = {k: (state[k], v) for k, v in self.filled.items() if k in state and state[k] != v}
        if changed:
            key, (then, now) = next(iter(changed.items()))
            raise ConfigError(f"[optim] scheduler: the checkpoint's {type(self.scheduler).__name__} was built with "
                              f"{key} = {then}, the run file now gives {now}; resume with the optim.epochs it was "
                              "started with (a scheduler keeps its length), or start a new run directory")  # fmt: skip
        self.scheduler.load_state_dict(state)


class EpochSteps(Callback):
    """Step an epoch-interval ``Stepped`` scheduler at each epoch's end (before that epoch's checkpoint)."""

    def __init__(self, scheduler: Stepped) -> None:
        self.scheduler = scheduler

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        """Advance the scheduler by one epoch."""
        self.scheduler.epoch_end()


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose factor always comes from the run file, never from a checkpoint.

    LambdaLR saves a callable object's fields and puts them back on load, so a resume that extends
    ``optim.epochs`` would keep the saved run's length and train its extra epochs at a decayed-to-zero rate; here the
    position (``last_epoch``) is restored and the decay is laid over the new length."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})


@dataclass(frozen=True)
class LRFactor:
    """The learning-rate factor at a global step: linear warm-up, then constant or cosine decay.

    A class, not a closure, so that it pickles: async-shared's worker processes apply it themselves."""

    schedule: str
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0


def config_hash(cfg: Config) -> str:
    """A short hash of the resolved config, stored with checkpoints to flag a resume under a changed config."""
    return hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys a resume may change without --resume --force: more epochs, where and how often to checkpoint, where the run
# lives, and settings that change speed or display but not the numbers. Anything else (model, data, optimizer,
# strategy, precision, seed) would silently mix two runs.
RESUME_MAY_CHANGE = ("optim.epochs", "checkpoint.", "run.name", "run.dir", "run.device", "run.hang_timeout",
                     "train.progress", "train.plot", "train.tensorboard", "data.num_workers", "parallel.bucket_mb",
                     "parallel.overlap", "parallel.reducer", "parallel.fused_linear_grads", "train.compile", "tune.",
                     "log.", "parallel.shard_optimizer", "parallel.shard_gradients",
                     "parallel.shard_params")  # fmt: skip


def build_checkpointer(cfg: Config, world: World, time_limit: str | float | None = None,
                       force: bool = False) -> Checkpointer:  # fmt: skip
    """The run's checkpointer, writing to <run dir>/checkpoints; a resume under a changed config (beyond
    ``RESUME_MAY_CHANGE``) is refused unless ``force``."""
    c = cfg.checkpoint
    return Checkpointer(cfg.run_dir / "checkpoints", world, every=c.every, keep=c.keep, keep_best=c.keep_best,
                        best_mode=metric_mode(c.keep_best or ""),
                        async_write=c.async_write, sharded=c.sharded, time_limit=time_limit or c.time_limit,
                        config_hash=config_hash(cfg), config=cfg.model_dump(), may_change=RESUME_MAY_CHANGE,
                        force=force)  # fmt: skip


def build_loss(cfg: Config) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """The loss of ``[train] loss``, with ``[train] loss_args`` (a class is built with them, a function bound)."""
    loss = resolve(cfg.train.loss, LOSSES, "[train] loss")
    args = cfg.train.loss_args
    if inspect.isclass(loss):
        return _call(loss, args, "[train] loss_args")
    if not args:
        return loss
    # A misspelt argument is named now, not at the first step.
    _bind(loss, args, "[train] loss_args", partial=True)
    return functools.partial(loss, **args)


def build_strategy(cfg: Config) -> Strategy:
    """The strategy ``[parallel]`` names, with its options (and ``[optim] grad_clip`` when set)."""
    # [optim] grad_clip reaches the strategy only when set: a user's strategy need not take it otherwise.
    return make_strategy(cfg.parallel.strategy, **({"grad_clip": cfg.optim.grad_clip} if cfg.optim.grad_clip else {}),
                         **cfg.parallel.options)  # fmt: skip


def build_trainer(cfg: Config, model: torch.nn.Module, steps_per_epoch: int, world: World,
                  resume: bool | str = False, time_limit: str | float | None = None,
                  force: bool = False, callbacks: Sequence[Callback] = (),
                  strategy: Strategy | None = None) -> Trainer:  # fmt: skip
    """Assemble the Trainer for ``model`` from the config's loss, metrics, optimizer, schedule and strategy
    (and ``callbacks`` besides the config's own); ``strategy``: one already built from the config."""
    optimizer = build_optimizer(cfg, model)
    step = resolve(cfg.train.step, {}, "[train] step") if cfg.train.step is not None else None
    loss_fn = build_loss(cfg) if step is None else None  # a step computes its own loss
    if cfg.optim.scheduler is not None and cfg.parallel.strategy in LOOP_STRATEGIES:
        raise ConfigError(f"[optim] scheduler: {cfg.parallel.strategy}'s workers share no step count for it to "
                          "follow; use [optim] schedule (cosine, warmup_steps), which they apply per work item, or "
                          "strategy = 'allreduce'")  # fmt: skip
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch * cfg.optim.epochs)
    callbacks = [*([EpochSteps(scheduler)] if isinstance(scheduler, Stepped) else []), *callbacks]
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStopping(cfg.train.monitor, cfg.train.early_stopping_patience,
                                       mode=metric_mode(cfg.train.monitor)))  # fmt: skip
    if cfg.log.every_steps or cfg.log.backends or cfg.train.tensorboard:
        alias = ("tensorboard",) if cfg.train.tensorboard else ()  # [train] tensorboard: the same backend
        callbacks.append(Tracker(cfg.log, cfg.run.name, cfg.model_dump(), alias))
    return Trainer(
        model, optimizer, loss_fn,
        metrics={name: resolve(name, METRICS, "[train] metrics") for name in cfg.train.metrics},
        max_epochs=cfg.optim.epochs, run_dir=cfg.run_dir, batch_size=cfg.data.batch_size,
        strategy=strategy or build_strategy(cfg),
        scheduler=scheduler,
        callbacks=callbacks, world=world, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
        drop_last=cfg.data.drop_last, num_workers=cfg.data.num_workers, progress=cfg.train.progress,
        plot=cfg.train.plot, precision=cfg.precision.mode,
        checkpointer=build_checkpointer(cfg, world, time_limit, force), resume=resume, accumulate=cfg.train.accumulate,
        activation_checkpointing=cfg.train.activation_checkpointing,
        offload_activations=cfg.train.offload_activations, hang_timeout=parse_duration(cfg.run.hang_timeout),
        step=step, compile=cfg.train.compile_mode if cfg.train.compile else False,
    )  # fmt: skip


def train(cfg: Config, config_path: str | Path | None = None, world: World | None = None,
          resume: bool | str = False, time_limit: str | float | None = None,
          force: bool = False, callbacks: Sequence[Callback] = ()) -> list[dict[str, float]]:  # fmt: skip
    """Run the whole training a config describes; return the per-epoch metrics.

    ``resume=True`` continues from the newest good checkpoint in the run directory (or starts fresh if there
    is none); a path resumes from that checkpoint; ``force`` resumes even under a changed config. ``time_limit``
    stops with a checkpoint before the wall time. ``callbacks`` join the config's own (a tune trial's pruning).
    """
    try:
        world = world or init(device=cfg.run.device, seed=cfg.run.seed, deterministic=cfg.run.deterministic)
    except ConfigError:  # the launch itself (torchrun, a launcher/MPI mismatch): its own line
        raise
    except ValueError as exc:  # e.g. device = "cuda" without a GPU: one line naming the fix, no traceback
        raise ConfigError(f"run.device: {exc}") from exc
    train_set, val_set = build_data(cfg, world.comm)
    # Seed again after data generation so the model's initial weights do not depend on the data source.
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    strategy = build_strategy(cfg)
    # A strategy that shards the parameters gets the model without storage and materialises its own part.
    model = build_model(cfg, meta=strategy.builds_on_meta)
    if not strategy.builds_on_meta:  # (a model without storage cannot run a sample)
        _check_model_fits(cfg, model, train_set)
    steps = max(1, len(train_set) // cfg.data.batch_size)
    if cfg.optim.scheduler is not None and cfg.data.batch_size >= world.size:
        # A user's scheduler is built for the run's exact length (the built-in schedule keeps its old count).
        steps = len(
            ShardedBatches(train_set, cfg.data.batch_size, 0, world.size, drop_last=cfg.data.drop_last)
        )
    trainer = build_trainer(cfg, model, steps, world, resume, time_limit, force, callbacks, strategy)
    if world.is_main:
        RunDir(cfg.run_dir).save_config(cfg, config_path)
    return trainer.fit(train_set, val_set)


# How torch words a mismatch between a layer and its input ("mat1 and mat2 shapes cannot be multiplied",
# "expected input[1, 3, 8, 8] to have 1 channels", "must match the size of tensor b", "same dtype").
_SHAPE_ERROR = re.compile(r"shape|size|channel|dimension|dtype|must match")


def _check_model_fits(cfg: Config, model: torch.nn.Module, train_set: Dataset) -> None:
    """One sample through the model before training: a model whose input size does not fit the data is named
    with both shapes as a ConfigError, not a torch error from the first step."""
    if len(train_set) == 0 or cfg.train.step is not None:  # type: ignore[arg-type]
        return  # (a training step calls the model its own way)
    sample = train_set[0]
    x = sample[0] if isinstance(sample, (tuple, list)) and len(sample) == 2 else sample
    if not torch.is_tensor(x):
        return
    was_training = model.training
    model.eval()  # batch norm takes one sample in eval mode; dropout draws no random numbers
    try:
        with torch.no_grad():
            model(x.unsqueeze(0))
    except Exception as exc:  # a check ahead of the run, not a handler: see below
        gist = " ".join(str(exc).split())[:300]
        # Anything but a shape or dtype mismatch (a kernel that runs on the GPU only, a model bug) is left to the
        # first training step, which raises it where it always did.
        if not isinstance(exc, (RuntimeError, ValueError)) or not _SHAPE_ERROR.search(gist):
            return
        raise ConfigError(
            f"[model] {cfg.model.name!r} with args {cfg.model.args} does not take the data's samples of shape "
            f"{tuple(x.shape)} ({str(x.dtype).removeprefix('torch.')}): {gist}; make the model's input size "
            "(its [model] args) match the data, or choose other [data] variables"
        ) from None
    finally:
        model.train(was_training)


def _parameters(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _call(fn: Any, args: dict[str, Any], key: str) -> Any:
    """Call ``fn(**args)``; an argument it does not take becomes a ConfigError naming it and the valid ones."""
    bound = _bind(fn, args, key)
    return fn(**args) if bound is None else fn(*bound.args, **bound.kwargs)


def _bind(fn: Any, args: dict[str, Any], key: str, partial: bool = False) -> inspect.BoundArguments | None:
    """Bind ``args`` to ``fn``'s parameters (None when it has no signature); a ConfigError names a wrong one."""
    try:
        signature = inspect.signature(fn)
        return signature.bind_partial(**args) if partial else signature.bind(**args)
    except TypeError as exc:
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "args", "kwargs")]
        raise ConfigError(
            f"{key} = {args}: {exc}; {getattr(fn, '__name__', fn)} accepts: {', '.join(params)}"
        ) from None
    except ValueError:  # no signature (builtins)
        return None
