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

import torch
from torch.utils.data import Dataset

from caldera.checkpoint import Checkpointer
from caldera.comm.base import Communicator
from caldera.comm.local import LocalComm
from caldera.config import Config
from caldera.data import split_dataset
from caldera.durations import parse_duration
from caldera.errors import ConfigError
from caldera.names import LOSSES, METRICS, MODELS, SOURCES
from caldera.refs import resolve
from caldera.train.callbacks import Callback, EarlyStopping, TensorBoard
from caldera.train.metrics import mode as metric_mode
from caldera.train.rundir import RunDir, load_weights
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


def build_model(cfg: Config, weights: bool = True) -> torch.nn.Module:
    """Instantiate the model the config names; load ``[model] weights`` into it unless ``weights`` is False."""
    model = _call(resolve(cfg.model.name, MODELS, "[model] name"), cfg.model.args, "[model] args")
    if weights and cfg.model.weights:
        _load_weights(model, Path(cfg.model.weights))
    return model


def load_run_model(run_dir: RunDir, cfg: Config) -> torch.nn.Module:
    """The model of a finished run, built from its config and loaded with its model.pt (tensors only)."""
    return run_dir.load_weights(build_model(cfg, weights=False))


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """Start from an earlier run's weights; a file that does not fit the model names what differs."""
    if not path.is_file():
        raise ConfigError(f"[model] weights = '{path}': no such file (give an earlier run's model.pt)")
    load_weights(model, path, f"[model] weights = '{path}'")


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build SGD (with momentum), Adam or AdamW."""
    o = cfg.optim
    params = model.parameters()
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warm-up, then constant or cosine decay, stepped once per optimizer step (None if constant)."""
    o = cfg.optim
    if o.schedule == "constant" and o.warmup_steps == 0:
        return None
    return Schedule(optimizer, LRFactor(o.schedule, o.warmup_steps, total_steps))


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
                     "parallel.overlap", "parallel.reducer", "parallel.fused_linear_grads", "tune.")  # fmt: skip


def build_checkpointer(cfg: Config, world: World, time_limit: str | float | None = None,
                       force: bool = False) -> Checkpointer:  # fmt: skip
    """The run's checkpointer, writing to <run dir>/checkpoints; a resume under a changed config (beyond
    ``RESUME_MAY_CHANGE``) is refused unless ``force``."""
    c = cfg.checkpoint
    return Checkpointer(cfg.run_dir / "checkpoints", world, every=c.every, keep=c.keep, keep_best=c.keep_best,
                        best_mode=metric_mode(c.keep_best or ""),
                        async_write=c.async_write, time_limit=time_limit or c.time_limit,
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


def build_trainer(cfg: Config, model: torch.nn.Module, steps_per_epoch: int, world: World,
                  resume: bool | str = False, time_limit: str | float | None = None,
                  force: bool = False, callbacks: Sequence[Callback] = ()) -> Trainer:  # fmt: skip
    """Assemble the Trainer for ``model`` from the config's loss, metrics, optimizer, schedule and strategy
    (and ``callbacks`` besides the config's own)."""
    optimizer = build_optimizer(cfg, model)
    loss_fn = build_loss(cfg)
    callbacks = list(callbacks)
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStopping(cfg.train.monitor, cfg.train.early_stopping_patience,
                                       mode=metric_mode(cfg.train.monitor)))  # fmt: skip
    if cfg.train.tensorboard:
        callbacks.append(TensorBoard())
    return Trainer(
        model, optimizer, loss_fn,
        metrics={name: resolve(name, METRICS, "[train] metrics") for name in cfg.train.metrics},
        max_epochs=cfg.optim.epochs, run_dir=cfg.run_dir, batch_size=cfg.data.batch_size,
        strategy=cfg.parallel.strategy,
        # [optim] grad_clip reaches the strategy only when set: a user's strategy need not take it otherwise.
        strategy_options={**({"grad_clip": cfg.optim.grad_clip} if cfg.optim.grad_clip else {}),
                          **cfg.parallel.options},  # fmt: skip
        scheduler=build_scheduler(cfg, optimizer, steps_per_epoch * cfg.optim.epochs),
        callbacks=callbacks, world=world, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
        drop_last=cfg.data.drop_last, num_workers=cfg.data.num_workers, progress=cfg.train.progress,
        plot=cfg.train.plot, precision=cfg.precision.mode,
        checkpointer=build_checkpointer(cfg, world, time_limit, force), resume=resume, accumulate=cfg.train.accumulate,
        activation_checkpointing=cfg.train.activation_checkpointing,
        offload_activations=cfg.train.offload_activations, hang_timeout=parse_duration(cfg.run.hang_timeout),
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
    model = build_model(cfg)
    _check_model_fits(cfg, model, train_set)
    steps = max(1, len(train_set) // cfg.data.batch_size)
    trainer = build_trainer(cfg, model, steps, world, resume, time_limit, force, callbacks)
    if world.is_main:
        RunDir(cfg.run_dir).save_config(cfg, config_path)
    return trainer.fit(train_set, val_set)


# How torch words a mismatch between a layer and its input ("mat1 and mat2 shapes cannot be multiplied",
# "expected input[1, 3, 8, 8] to have 1 channels", "must match the size of tensor b", "same dtype").
_SHAPE_ERROR = re.compile(r"shape|size|channel|dimension|dtype|must match")


def _check_model_fits(cfg: Config, model: torch.nn.Module, train_set: Dataset) -> None:
    """One sample through the model before training: a model whose input size does not fit the data is named
    with both shapes as a ConfigError, not a torch error from the first step."""
    if len(train_set) == 0:  # type: ignore[arg-type]
        return
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
