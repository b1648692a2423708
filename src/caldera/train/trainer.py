"""The training loop: read top to bottom. Parallelism lives in the strategy, files in the run directory."""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from caldera.checkpoint import Checkpointer, CheckpointError, rng_state, set_rng_state
from caldera.comm.buckets import unflatten
from caldera.data.prefetch import InputMeter, input_advice
from caldera.data.sampler import ShardedBatches
from caldera.data.sampler import as_xy as as_xy  # re-exported: callers import it from here
from caldera.errors import ConfigError
from caldera.errors import NonFiniteLossError as NonFiniteLossError  # re-exported: caldera.NonFiniteLossError
from caldera.io import atomic_write_text
from caldera.models.materialize import on_meta
from caldera.parallel import Strategy, make_strategy
from caldera.parallel.base import StepFn, check_launcher
from caldera.parallel.base import micro_batches as micro_batches  # re-exported: callers import it from here
from caldera.parallel.context import Snapshot, trainable
from caldera.parallel.tensor import merge_tensor_shards
from caldera.parallel.zero import merge_shards
from caldera.precision import Precision, make_precision
from caldera.train.callbacks import Callback
from caldera.train.evaluate import Scores
from caldera.train.metrics import Metric
from caldera.train.output import plot_learning_curve, plot_predictions
from caldera.train.progress import Bar, make_console, progress_interval
from caldera.train.recompute import checkpoint_activations
from caldera.train.rundir import MetricsLog, RunDir, git_commit, mismatch
from caldera.watchdog import Watchdog, hang_timeout_for
from caldera.world import SetupWarning, World, init

DataLike = Dataset | DataLoader | tuple | list


class Trainer:
    """Fit a model with a loss, an optimizer and a parallel strategy; log, plot and save on rank 0."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Mapping[str, Metric] | None = None,
        max_epochs: int = 10,
        run_dir: str | Path | None = None,
        batch_size: int = 64,
        strategy: str | Strategy = "single",
        strategy_options: Mapping[str, Any] | None = None,
        scheduler: Any = None,
        callbacks: Sequence[Callback] = (),
        world: World | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        progress: bool = True,
        plot: bool = True,
        precision: str | Precision = "fp32",
        checkpointer: Checkpointer | None = None,
        resume: bool | str | Path = False,
        input_warning: float = 0.05,
        accumulate: int = 1,
        activation_checkpointing: bool = False,
        offload_activations: bool = False,
        hang_timeout: float | None = None,
        step: Callable[[torch.nn.Module, Any], Any] | None = None,
        compile: bool | str = False,
    ) -> None:
        self.world = world or init()
        self.precision = make_precision(precision, self.world.device)
        # A model built on the meta device has no storage to move: its strategy materialises it in setup().
        self.model = self.precision.setup_model(model if on_meta(model) else model.to(self.world.device))
        self.optimizer, self.loss_fn = self.precision.wrap_optimizer(optimizer), loss_fn
        self.metrics = dict(metrics or {})
        self.max_epochs, self.batch_size = max_epochs, batch_size
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.strategy = (
            make_strategy(strategy, **(strategy_options or {})) if isinstance(strategy, str) else strategy
        )
        if not isinstance(self.strategy, Strategy):
            raise TypeError(f"strategy {type(self.strategy).__name__} is not a caldera.parallel.Strategy: subclass it "
                            "(its defaults are the single-process behaviour) or name a registered strategy")  # fmt: skip
        check_launcher(self.strategy, self.world, strategy if isinstance(strategy, str) else None)
        if on_meta(self.model) and not self.strategy.builds_on_meta:
            raise ValueError(f"the model is on the meta device (built without storage), but strategy "
                             f"{type(self.strategy).__name__} does not materialise one: build the model normally, "
                             "or use a strategy that shards parameters (allreduce with shard_params)")  # fmt: skip
        self.scheduler, self.callbacks = scheduler, list(callbacks)
        # A user's step(model, batch) -> loss or (loss, metrics) replaces loss_fn(model(x), y) (training and
        # validation); the batch is the data's own, whole (a tuple or dict of tensors).
        self.step = StepFn(step) if step is not None else None
        if step is None and loss_fn is None:
            raise TypeError("give the Trainer a loss_fn(output, target) or a step(model, batch) -> loss")
        if step is not None and not self.strategy.supports_step:
            raise ConfigError(f"[train] step: strategy {type(self.strategy).__name__} does not take a training step "
                              "(it runs the model in stages); use [train] loss, or another strategy")  # fmt: skip
        # torch.compile of the module the strategy runs forward on: True or a mode name ("default" on True).
        self.compile_mode = _compile_mode(compile)
        if self.compile_mode and self.strategy.not_compiled:
            raise ConfigError(f"[train] compile: {self.strategy.not_compiled}")
        self.strategy.compiled = self.compile_mode is not None
        self._compiling = False  # the first step after compiling is timed, compile included
        self.seed, self.shuffle, self.drop_last, self.num_workers = seed, shuffle, drop_last, num_workers
        self.progress, self.plot = progress, plot
        if progress:
            progress_interval()  # a wrong CALDERA_PROGRESS_INTERVAL stops here, before any data or step
        self.input_warning = input_warning  # warn when more than this fraction of step time waits for data
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1 micro-batches per step (got {accumulate})")
        self.accumulate = accumulate  # micro-batches per step: each rank's share is split this many ways
        # Blocks whose activations are recomputed in backward instead of kept (caldera.train.recompute).
        self.recomputed = checkpoint_activations(self.model) if activation_checkpointing else []
        self.offload_activations = offload_activations and self.world.device.type == "cuda"
        if offload_activations and not self.offload_activations:
            warnings.warn("offload_activations moves activations from GPU to host memory; on the CPU it does nothing",
                          SetupWarning, stacklevel=2)  # fmt: skip
        self._meter = InputMeter()
        self.net: torch.nn.Module | None = None  # the model as the strategy wraps it, once set up
        self.should_stop = False
        self.epoch = 0
        self.global_step = 0
        self.total_steps = 0
        self._step_now = 0  # the step being trained (named by a non-finite loss's message)
        self.steps_run = 0  # optimizer steps taken by this process (a resumed run: after the checkpoint)
        # The last step's (loss tensor, this rank's samples, all ranks' samples), for callbacks (tracking).
        self.last_step: tuple[torch.Tensor, int, int] = (torch.zeros(()), 0, 0)
        self.resumed_from: Path | None = None  # the checkpoint this process started from
        self.history: list[dict[str, float]] = []
        self.checkpointer, self.resume = checkpointer, resume
        self.step_in_epoch = 0
        self._partial = (0.0, 0)  # loss sum and samples of the current epoch so far (restored on resume)
        self._console: Any = None
        self.hang_timeout = hang_timeout_for(self.world, hang_timeout)
        self._watchdog: Watchdog | None = None

    # -- public ---------------------------------------------------------------------------------------------------
    def fit(self, train_data: DataLike, val_data: DataLike | None = None) -> list[dict[str, float]]:
        """Train for ``max_epochs`` (or until a callback stops it); return one dict of metrics per epoch."""
        train_set, val_set = as_dataset(train_data), as_dataset(val_data) if val_data is not None else None
        # The run's identity; a fresh run sets another run's checkpoints aside.
        if self.checkpointer is not None:
            self.checkpointer.begin(resume=bool(self.resume))
        if self.strategy.runs_own_loop:  # worker processes or parameter servers: the strategy runs the loop
            return self.strategy.fit(self, train_set, val_set)
        batches = self._batches(train_set, shuffle=self.shuffle)
        self.total_steps = len(batches) * self.max_epochs
        self._setup_net()
        if self.resume:
            self.restore()
        log = self._open_run_dir()
        self.log(self._describe(train_set, val_set))
        if self.checkpointer is not None:
            self.checkpointer.install_signal_handlers()
        self._watchdog = Watchdog(self.world, self.hang_timeout).start() if self.hang_timeout > 0 else None
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            with self.progress_bar(self.total_steps) as bar:
                for epoch in range(self.epoch, self.max_epochs):
                    self.epoch = epoch
                    t0 = time.perf_counter()
                    logs = {"epoch": self.epoch + 1, "train_loss": self._train_epoch(batches, bar)}
                    if self.step is not None:  # the step's own metrics, averaged over the epoch's samples
                        logs.update(self._step_means(self.step.sums, "train_"))
                    self.strategy.consolidate("validation")  # drifted ranks agree before validation
                    logs["data_wait"] = self._input_report(batches)
                    if val_set is not None:
                        logs.update(self.evaluate(val_set, prefix="val_"))
                    logs["lr"] = self.optimizer.param_groups[0]["lr"]
                    logs["time_s"] = time.perf_counter() - t0
                    self.history.append(logs)
                    if log is not None:
                        log.append(logs)
                    self.log(_format(logs))
                    self._mark("callbacks")
                    for cb in self.callbacks:
                        cb.on_epoch_end(self, self.epoch, logs)
                    self.epoch = epoch + 1  # a checkpoint taken from here on resumes at the next epoch
                    if self.should_stop:
                        break
                    if self.checkpointer is not None and self.epoch < self.max_epochs:
                        self._mark("checkpoint")
                        self.checkpointer.at_epoch_end(self.global_step, self._capture)
            self._mark("checkpoint")
            if self.checkpointer is not None:
                self.checkpointer.save(self.global_step, *self._capture(), block=True)
            self._mark("finishing")
            # Shard-wise where the strategy can (no rank gathers the whole model), else rank 0 writes model.pt.
            sharded = self.run_dir is not None and (self.checkpointer is None or self.checkpointer.sharded) \
                and self.strategy.write_sharded_weights(RunDir(self.run_dir).weight_shards)  # fmt: skip
            if not sharded:
                self.strategy.consolidate("outputs")  # rank 0 writes the whole model
            for cb in self.callbacks:
                cb.on_fit_end(self)
            self._write_outputs(val_set, weights=not sharded)
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None
            if self.checkpointer is not None:
                self.checkpointer.restore_signal_handlers()
            for data in (train_set, val_set):
                if hasattr(data, "close"):  # stop the background workers of a scientific data pipeline
                    data.close()
            self.strategy.close()
        return self.history

    @torch.no_grad()
    def evaluate(self, data: DataLike, prefix: str = "") -> dict[str, float]:
        """Return the loss and metrics over the whole ``data``, reduced over all ranks."""
        batches = self._batches(as_dataset(data), shuffle=False, evaluation=True)
        return self.evaluate_batches(((xy, n) for xy, n, _ in _xy(batches, self.step is not None)), prefix)

    @torch.no_grad()
    def evaluate_batches(self, batches: Iterable[tuple[tuple[Any, torch.Tensor], int]],
                         prefix: str = "") -> dict[str, float]:  # fmt: skip
        """Loss and metrics over this rank's ``((x, y), n)`` batches, averaged over all ranks' samples
        (collective: every rank calls it, with or without batches)."""
        was_training = self.model.training
        self.model.eval()
        if self.net is not None and self.strategy.collective_forward:
            batches = _lockstep(batches, self.world.comm, self.strategy.join_forward)
        if self.step is not None:
            result = self._evaluate_step(batches, prefix)
            self.model.train(was_training)
            return result
        # Once set up, the strategy runs the forward pass (it may score a batch on one rank only); before, the model.
        forward = self.strategy.forward_batch if self.net is not None else _plain_forward
        scores = Scores(self.loss_fn, self.metrics)
        for (x, y), n_local in batches:
            self._mark("validation")
            with self.precision.autocast():
                out = forward(self._forward_module(), x)
                if out is None:  # not the last stage: the batch is counted where it is scored
                    continue
                scores.add(out, y, n_local)
        self._mark("validation")
        result = scores.reduce(self.world.comm, prefix)
        self.model.train(was_training)
        return result

    def _evaluate_step(
        self, batches: Iterable[tuple[tuple[Any, None], int]], prefix: str
    ) -> dict[str, float]:
        """Validation through the user's step: its loss and metrics over this rank's ``((batch, None), n)``,
        averaged over all ranks' samples (collective)."""
        step = self.step
        assert step is not None
        train_sums, step.sums = step.sums, {}  # the epoch's training sums stay aside
        loss_sum, seen = 0.0, 0
        try:
            for (batch, _), n_local in batches:
                self._mark("validation")
                with self.precision.autocast():
                    loss = step(self._forward_module(), batch)
                loss_sum += float(loss.detach().double()) * n_local
                seen += n_local
            sums = {**step.sums, "loss": [loss_sum, seen]}
        finally:
            step.sums = train_sums
        self._mark("validation")
        return self._step_means(sums, prefix)

    def _step_means(self, sums: dict[str, list[float]], prefix: str) -> dict[str, float]:
        """Each of ``sums``'s {name: [sum, samples]} as its mean over every rank's samples, then cleared
        (collective: the ranks first agree on the names, since a rank may have had no batch)."""
        names = sorted({name for names in self.world.comm.allgather(sorted(sums)) for name in names})
        totals = torch.tensor([sums.get(k, [0.0, 0])[i] for k in names for i in (0, 1)], dtype=torch.float64)
        if len(totals):
            self.world.comm.Allreduce(totals)
        sums.clear()
        means = {prefix + k: float(totals[2 * i] / totals[2 * i + 1]) if totals[2 * i + 1] else math.nan
                 for i, k in enumerate(names)}  # fmt: skip
        return means

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.world.is_main:
            self._print(message)

    def _mark(self, phase: str) -> None:
        """Tell the hang watchdog (if any) where this rank is."""
        if self._watchdog is not None:
            self._watchdog.mark(phase, self.global_step, self.epoch)

    # -- the loop -------------------------------------------------------------------------------------------------
    def _train_epoch(self, batches: ShardedBatches, bar: Any) -> float:
        self.model.train()
        batches.set_epoch(self.epoch, start_step=self.step_in_epoch)
        loss_sum = torch.tensor(self._partial[0], dtype=torch.float64)
        seen = self._partial[1]
        self._mark("loading a batch")
        for step, ((x, y), n_local, n_global) in enumerate(
            _xy(self._meter.wrap(batches), self.step is not None), start=self.step_in_epoch
        ):
            self._mark("training step")
            # Ranks may hold unequal slices of the last batch: weight so the rank average is the global mean.
            loss, finite = self.train_step(x, y, n_local * self._data_ranks()[1] / n_global, step)
            self.last_step = (loss if finite else torch.tensor(math.nan), n_local, n_global)
            if finite:  # an fp16 overflow step is skipped by the loss scaler: keep it out of the mean too
                loss_sum += loss.detach().double().cpu() * n_local
                seen += n_local
            self.step_in_epoch, self._partial = step + 1, (float(loss_sum), seen)
            if bar is not None:
                bar.advance(loss)
            for cb in self.callbacks:
                cb.on_step_end(self)
            if self.checkpointer is not None:
                self.checkpointer.at_step_boundary(self.global_step, self._capture)
            self._mark("loading a batch")
        self._mark("end-of-epoch reduction")
        self.step_in_epoch, self._partial = 0, (0.0, 0)
        totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64)])
        self.world.comm.Allreduce(totals)
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")

    def train_step(self, x: Any, y: torch.Tensor, scale: float = 1.0, step: int | None = None
                   ) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """One optimizer step on this rank's batch (collective under a parallel strategy); return the batch's
        mean loss and whether it was finite. ``scale`` weights this rank's loss so the rank average is the
        global mean when ranks hold unequal batches. Used by ``fit`` and by loops that bring their own data."""
        if self.net is None:
            self._setup_net()
        self._step_now = self.global_step if step is None else step  # for the message of a non-finite loss
        # y None: x is the whole batch, for the user's step (see Strategy.train_batch).
        loss_fn = self.loss_fn if y is not None else self.step
        t0 = time.perf_counter()
        loss, finite = self.strategy.train_batch(self.net, x, y, loss_fn, scale, self.precision,
                                                 self.accumulate, self.offload_activations, self._non_finite)  # fmt: skip
        if self._compiling:  # torch.compile works at the first call: this step's forward and backward held it
            self._compiling = False
            self.log(f"compiling the model (torch.compile, mode {self.compile_mode}) took "
                     f"{time.perf_counter() - t0:.1f} s (the first step's forward and backward)")  # fmt: skip
        self.strategy.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        self.steps_run += 1
        return loss, finite

    def _setup_net(self) -> None:
        """Let the strategy prepare the model; compile the module it returns when asked. ``self.model`` stays the
        plain module: checkpoints and model.pt keep their keys (no ``_orig_mod.`` prefix)."""
        self.net = self.strategy.setup(self.model, self.optimizer, self.world)
        if self.compile_mode is not None:
            self.net = torch.compile(self.net, mode=self.compile_mode)
            self._compiling = True

    def _forward_module(self) -> torch.nn.Module:
        """The module validation calls: the compiled one once there is one, else the model."""
        return self.net if self.compile_mode is not None and self.net is not None else self.model

    def _non_finite(self, loss: torch.Tensor) -> NonFiniteLossError:
        step = self._step_now
        return NonFiniteLossError(
            f"loss is {loss.item()} at epoch {self.epoch + 1}, step {step} (global step {self.global_step}) on "
            f"rank {self.world.rank}; lower [optim] lr, set [optim] grad_clip, or check the data for NaN/inf. "
            "Files already written in the run directory are kept."
        )

    def _data_ranks(self) -> tuple[int, int]:
        """(this rank's data shard, number of shards): one per rank, unless the strategy groups ranks that see the
        same data."""
        return self.strategy.data_shards(self.world)

    def _batches(self, dataset: Dataset, shuffle: bool, evaluation: bool = False) -> ShardedBatches:
        # A source with its own I/O-aware pipeline (caldera.data.scientific) builds its batches itself.
        make = getattr(dataset, "batches", None) or functools.partial(ShardedBatches, dataset)
        return make(
            self.batch_size, *self._data_ranks(), shuffle=shuffle, seed=self.seed,
            drop_last=self.drop_last and not evaluation, num_workers=self.num_workers, device=self.world.device,
            evaluation=evaluation,
        )  # fmt: skip

    def _input_report(self, batches: Any) -> float:
        """Return the largest fraction of step time any rank waited for data; warn when it is input-bound."""
        stats = self._meter.stats
        hints = {"num_workers": self.num_workers, "ranks_per_node": self.world.local_size}
        hints.update(batches.input_hints() if hasattr(batches, "input_hints") else {})
        mine = (stats.wait_fraction, self.world.rank, input_advice(stats, self.input_warning, **hints))
        worst = max(self.world.comm.allgather(mine), key=lambda r: r[0])
        if worst[2] is not None:
            from rich.markup import escape  # the advice names "[data]" keys, which rich would take for markup

            self.log(f"[yellow]warning[/]: rank {worst[1]} is {escape(worst[2])}")
        return worst[0]

    # -- checkpoint state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything rank 0 saves: weights, optimizer, schedule, precision, strategy, position in the data."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": self.precision.state_dict(),
            "strategy": self.strategy.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "history": list(self.history),
            "last_metrics": self.history[-1] if self.history else {},
            "seed": self.seed,
            "world_size": self.world.size,
        }

    def load_state_dict(self, shared: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (on every rank)."""
        self.model.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        if self.scheduler is not None and shared["scheduler"] is not None:
            self.scheduler.load_state_dict(shared["scheduler"])
        self.precision.load_state_dict(shared["precision"])
        self.strategy.load_state_dict(shared["strategy"])
        self.epoch, self.step_in_epoch = shared["epoch"], shared["step_in_epoch"]
        self.global_step = shared["global_step"]
        self.history = list(shared["history"])

    def shared_state(self, sharded: bool = False) -> dict[str, Any]:
        """``state_dict()`` on rank 0 ({} elsewhere) after every rank's part was gathered (collective); ``sharded``:
        each rank writes its own shard of the optimizer state (``Strategy.sharded_state``), nothing is gathered."""
        # Rank 0 saves the model and the optimizer: they must be everyone's, whole (a sharded optimizer).
        self.strategy.consolidate("sharded-checkpoint" if sharded else "checkpoint")
        return self.state_dict() if self.world.is_main else {}

    def _capture(self) -> tuple[dict[str, Any], dict[str, Any]]:
        sharded = self.checkpointer is not None and self.checkpointer.sharded
        part = self.strategy.sharded_state() if sharded else None
        shared = self.shared_state(sharded=part is not None)
        # The running loss of the current epoch is this rank's own: it travels with the rank's file (so do the
        # running sums of a user step's metrics).
        mine = {"rng": rng_state(), "partial": self._partial}
        # The layout goes into the manifest, each shard into the file of the rank that holds it.
        if part is not None:
            shared = {**shared, "sharded_layout": part["layout"]} if self.world.is_main else shared
            mine["sharded"] = part["state"]
        if self.step is not None:
            mine["step_sums"] = {k: list(v) for k, v in self.step.sums.items()}
        return shared, mine

    def restore(self) -> dict[str, Any] | None:
        """Load the newest good checkpoint (or the one ``resume`` names) into this trainer, on every rank; return
        this rank's own part of it (None: no checkpoint yet, or one written on another number of ranks)."""
        if self.checkpointer is None:
            raise CheckpointError(
                "resume asked for, but the trainer has no checkpointer (give checkpointer=...)"
            )
        path = None if self.resume is True else self.resume
        if path is None and not self.checkpointer.list():
            self.log(f"no checkpoint in {self.checkpointer.dir} yet: starting from the beginning")
            return None
        shared, local, where = self.checkpointer.load(path, validate=_incomplete)
        # What this rank holds of it (a strategy that keeps its part may take it from the shards directly); the rest
        # of a sharded state is whole again here, and a sharded strategy cuts it anew in load_state_dict.
        shared = self.strategy.local_state(shared)
        layout = shared.get("sharded_layout")
        if "sharded_parts" in shared and layout.get("kind") == "tensor":  # weights too: before the fit check
            merge_tensor_shards(shared, layout, shared.pop("sharded_parts"))
        elif "sharded_parts" in shared:
            # A zero-3 layout's parameters too: they fill the model's state before the fit check.
            merge_shards(shared["optimizer"], layout, shared.pop("sharded_parts"), shared["model"])
        self._check_fits(shared["model"], where)
        self.load_state_dict(shared)
        self.resumed_from = where
        if local is not None:
            set_rng_state(local["rng"])
            self._partial = tuple(local["partial"])
            if self.step is not None:
                self.step.sums = {k: list(v) for k, v in local.get("step_sums", {}).items()}
        elif self.world.is_main:
            self.log(f"checkpoint written by {shared['world_size']} rank(s), resuming on {self.world.size}: the data "
                     "order continues, random streams are re-seeded (not bit-identical to an unbroken run)")  # fmt: skip
        self.log(f"resumed from {where} (epoch {self.epoch + 1}, step {self.step_in_epoch} of it, "
                 f"global step {self.global_step})")  # fmt: skip
        return local  # loop strategies that save per-rank state read theirs from it

    def save(self, step: int, epoch: int, step_in_epoch: int, local: dict[str, Any] | None = None) -> Path:
        """Checkpoint the run after ``step`` optimizer steps (or a loop strategy's updates), positioned at
        (``epoch``, ``step_in_epoch``); ``local`` adds to this rank's own file. Collective, blocking."""
        if self.checkpointer is None:
            raise CheckpointError(
                "save asked for, but the trainer has no checkpointer (give checkpointer=...)"
            )
        self.global_step, self.epoch, self.step_in_epoch = step, epoch, step_in_epoch
        shared, mine = self._capture()
        return self.checkpointer.save(step, shared, {**mine, **(local or {})}, block=True)

    def _check_fits(self, weights: Mapping[str, Any], where: Path) -> None:
        """A checkpoint of another model is one line naming the first parameter that differs, not a traceback."""
        own = self.model.state_dict()
        bad = mismatch(own, weights)
        if bad:
            name = bad[0]
            raise CheckpointError(
                f"checkpoint {where} does not fit this model: parameter {name!r} has {_shape(weights.get(name))} "
                f"there, {_shape(own.get(name))} here; the model and its args must match the run that wrote it (or "
                "start a new run directory)"
            )

    # -- output ---------------------------------------------------------------------------------------------------
    def _open_run_dir(self) -> MetricsLog | None:
        if self.run_dir is None or not self.world.is_main:
            return None
        files = RunDir(self.run_dir)
        log = files.metrics(self.history)
        if self.checkpointer is not None:  # who wrote this directory's checkpoints, where this process began
            files.write_identity({"run_id": self.checkpointer.run_id, "config_hash": self.checkpointer.config_hash,
                                  "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                                  "start_step": self.global_step,
                                  "git": git_commit(Path.cwd())})  # fmt: skip
        return log

    def _write_outputs(self, val_set: Dataset | None, weights: bool = True) -> None:
        """Rank 0: model.pt (unless the strategy wrote the weights shard-wise), summary, plots."""
        if self.run_dir is None or not self.world.is_main or not self.history:
            return
        files = RunDir(self.run_dir)
        if weights:
            files.save_weights(self.model)
        else:  # an earlier model.pt in this directory is not this run's
            files.weights.unlink(missing_ok=True)
        # steps_run: what this process trained (a resume that restored nothing would show every step here).
        summary = {"epochs": len(self.history), "steps": self.global_step, "ranks": self.world.size,
                   "steps_run": self.steps_run, "start_step": self.global_step - self.steps_run,
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "final": self.history[-1]}  # fmt: skip
        files.write_summary(summary)
        if self.plot:
            plot_learning_curve(self.history, files.plot("learning_curve"))
            # A step's data need not be (input, target); shard-wise weights: no rank holds the model to plot.
            if val_set is not None and self.step is None and weights:
                self._plot_predictions(val_set)
        self.log(f"run directory: {self.run_dir}")

    @torch.no_grad()
    def _plot_predictions(self, val_set: Dataset) -> None:
        x, y = (t.to(self.world.device) for t in as_xy(next(iter(DataLoader(val_set, batch_size=8)))))
        self.model.eval()
        pred = self.model(x)
        plot_predictions(x.cpu(), y.cpu(), pred.cpu(), RunDir(self.run_dir).plot("predictions"))

    def _describe(self, train_set: Dataset, val_set: Dataset | None) -> str:
        shards = self._data_ranks()[1]
        shares = [len(c) for c in torch.tensor_split(torch.arange(self.batch_size), shards)]
        per_rank = str(shares[0]) if len(set(shares)) == 1 else "/".join(map(str, shares))
        n_params = sum(p.numel() for p in self.model.parameters())
        batch = f"global batch {self.batch_size} = {shards} x {per_rank}"
        if shards < self.world.size:  # groups of ranks share each slice of the batch
            batch += f", each slice shared by {self.world.size // shards} ranks"
        return (
            f"{type(self.model).__name__} ({n_params:,} parameters) on {self.world.device}; "
            f"{self.world.size} rank(s), {batch}; "
            f"{len(train_set)} training / {len(val_set) if val_set is not None else 0} validation samples; "
            f"{self.max_epochs} epochs"
            + (
                f"; activations recomputed in backward for {', '.join(self.recomputed)}"
                if self.recomputed
                else ""
            )
            + (f"; {self.accumulate} micro-batches per step" if self.accumulate > 1 else "")
        )

    def _print(self, message: str) -> None:
        if self._console is None:
            self._console = make_console(highlight=False, soft_wrap=True)
        self._console.print(message)

    def progress_bar(self, total: int) -> Any:
        """Rank 0's progress bar over ``total`` steps (or a loop strategy's updates); None elsewhere or with
        progress off."""
        self.total_steps = total
        if not (self.progress and self.world.is_main):
            return nullcontext(None)
        return _Bar(self)

    def report(self, snapshots: Sequence[Snapshot], val_set: Any, per_epoch: int, stats: dict[str, Any],
               lr: Callable[[int], float] | None = None) -> list[dict[str, float]]:  # fmt: skip
        """Main rank, alone: a loop strategy's recorded weights become the history and the run directory, as
        epochs do in ``fit`` (each snapshot evaluated on ``val_set`` and logged; ``per_epoch`` updates make an
        epoch; ``lr(item)`` the learning rate at a work item; the last snapshot is the final model;
        ``strategy.json`` holds ``stats``). Return the history."""
        params = trainable(self.model)
        world = self.world
        # Evaluate on this process alone (rank 0 of 1), whatever the other ranks are doing.
        self.world = World(device=world.device)
        try:
            log = self._open_run_dir()
            previous = 0.0
            for snap in snapshots:
                unflatten(snap.weights, params)
                logs = {"epoch": round(snap.items / per_epoch, 4),
                        "train_loss": snap.loss_sum / snap.samples if snap.samples else math.nan}  # fmt: skip
                if val_set is not None:
                    logs.update(self.evaluate(val_set, prefix="val_"))
                last_item = max(0, snap.items - 1)
                logs["lr"] = lr(last_item) if lr else self.optimizer.param_groups[0]["lr"]
                logs["time_s"], previous = snap.time_s - previous, snap.time_s
                self.history.append(logs)
                if log is not None:
                    log.append(logs)
                self.log(_format(logs))
            self.global_step = snapshots[-1].items if snapshots else 0
            self.epoch = self.max_epochs
            self._write_outputs(val_set)
            if self.run_dir is not None:
                atomic_write_text(self.run_dir / "strategy.json", json.dumps(stats, indent=2, default=str))
        finally:
            self.world = world
        return self.history


class _Bar(Bar):
    """The progress bar over all steps of the run (rank 0), showing the epoch and the running loss."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        trainer._print("")  # create the console the bar shares with log lines
        super().__init__("epoch {task.fields[epoch]}", {"epoch": "-", "loss": "-"}, console=trainer._console)

    def advance(self, loss: torch.Tensor) -> None:
        """Move one step; refresh the displayed loss every 10 steps (reading it costs a device sync)."""
        t = self.trainer
        fields = {"epoch": f"{t.epoch + 1}/{t.max_epochs}"}
        if t.global_step % 10 == 1:
            fields["loss"] = f"{loss.item():.4g}"
        self.update(advance=1, total=t.total_steps, begin=t.global_step - 1, **fields)

    def show(self, done: int, per_epoch: int, loss: float | None) -> None:
        """Set the bar to ``done`` of ``trainer.total_steps`` (loops that count their own updates)."""
        t = self.trainer
        fields = {"epoch": f"{min(done // per_epoch + 1, t.max_epochs)}/{t.max_epochs}"}
        if loss is not None and loss == loss:  # NaN before the first update of a record
            fields["loss"] = f"{loss:.4g}"
        self.update(completed=done, total=t.total_steps, **fields)


# -- data adapters ------------------------------------------------------------------------------------------------


def as_dataset(data: DataLike) -> Dataset:
    """Accept a Dataset, a DataLoader (its dataset is re-sharded) or arrays ``(x, y)``."""
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(_is_array(a) for a in data):
        return TensorDataset(*(torch.as_tensor(np.asarray(a)) if not torch.is_tensor(a) else a for a in data))
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return data  # type: ignore[return-value]
    raise TypeError(
        f"cannot train on {type(data).__name__}; pass a torch Dataset, a DataLoader, or (x, y) arrays"
    )


_STATE_KEYS = ("model", "optimizer", "scheduler", "precision", "strategy", "epoch", "step_in_epoch", "global_step",
               "history")  # fmt: skip


def _shape(t: torch.Tensor | None) -> str:
    return "no entry" if t is None else f"shape {tuple(t.shape)}"


def _incomplete(shared: Mapping[str, Any], local: Mapping[str, Any] | None) -> str | None:
    """What a loaded checkpoint lacks for ``Trainer.load_state_dict`` (it is then unusable), or None."""
    missing = [k for k in _STATE_KEYS if k not in shared]
    missing += [f"rank file: {k}" for k in ("rng", "partial") if local is not None and k not in local]
    return f"its state lacks {', '.join(missing)}" if missing else None


def _is_array(a: Any) -> bool:
    return torch.is_tensor(a) or isinstance(a, np.ndarray)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_mode(compile: bool | str) -> str | None:
    """torch.compile's mode for the Trainer's ``compile`` argument (None: not compiled)."""
    if compile is False or compile is None:
        return None
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"compile = {compile!r}: give True, False or a torch.compile mode ({', '.join(COMPILE_MODES)})"
        )
    return mode


def _plain_forward(model: torch.nn.Module, x: Any) -> torch.Tensor:
    return model(x)


def _xy(batches: Iterable, whole: bool = False) -> Iterable:
    """Each ``(batch, n_local, n_global)`` with the batch as ``(input, target)``; ``whole``: as ``(batch, None)``,
    for a user's training step."""
    if whole:
        for batch, n_local, n_global in batches:
            yield (batch, None), n_local, n_global
        return
    for batch, n_local, n_global in batches:
        yield as_xy(batch), n_local, n_global


def _lockstep(batches: Iterable[Any], comm: Any, join: Callable[[], None]) -> Iterator[Any]:
    """``batches``, while the ranks agree before each one whether any rank still has one (collective): a rank out of
    batches calls ``join()`` for each forward the others still run (a strategy whose forward is collective)."""
    mine = iter(batches)
    while True:
        item = next(mine, None)
        flag = torch.tensor([0.0 if item is None else 1.0], dtype=torch.float64)
        comm.Allreduce(flag)
        if not flag[0]:
            return
        if item is None:
            join()
        else:
            yield item


def _format(logs: Mapping[str, float]) -> str:
    parts = [f"epoch {int(logs['epoch'])}"]
    for k, v in logs.items():
        if k != "epoch":
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}")
    return "  ".join(parts)
