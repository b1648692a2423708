"""Online (in situ) training: the simulation and the trainer share the ranks of one job.

Each rank's simulation offers its fresh samples to its own replay buffer (``add``); ``train(steps)`` then takes a
few optimizer steps on batches drawn from the buffers of all ranks, gradients combined by the same parallel
strategies as ``caldera train``. No files, no database, no server between producer and trainer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from caldera.checkpoint import Checkpointer, CheckpointError, rng_state, set_rng_state
from caldera.coupling.replay import ReplayBuffer, as_batch
from caldera.train.metrics import Metric
from caldera.train.output import pyplot, save_figure
from caldera.train.rundir import RunDir
from caldera.train.trainer import Trainer
from caldera.watchdog import Watchdog, hang_timeout_for
from caldera.world import World, init


class OnlineTrainer:
    """Train ``model`` while a simulation runs: ``add`` its samples, ``train`` a few steps, repeat; ``finish``."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        capacity: int = 4096,
        policy: str = "reservoir",
        batch_size: int = 64,
        strategy: str = "single",
        strategy_options: Mapping[str, Any] | None = None,
        precision: str = "fp32",
        metrics: Mapping[str, Metric] | None = None,
        world: World | None = None,
        seed: int = 0,
        run_dir: str | Path | None = None,
        checkpoint_keep: int = 2,
        time_limit: str | float | None = None,
        verbose: bool = True,
        log_every: int = 10,
        hang_timeout: float | None = None,
    ) -> None:
        self.world = world or init()
        self.trainer = Trainer(model, optimizer, loss_fn, metrics=metrics, batch_size=batch_size, strategy=strategy,
                               strategy_options=strategy_options, world=self.world, seed=seed, precision=precision,
                               progress=False, plot=False, hang_timeout=0)  # fmt: skip
        if self.trainer.strategy.runs_own_loop:
            raise ValueError(
                f"strategy {strategy!r} runs its own training loop over a fixed dataset; online training steps "
                "with the simulation: use 'single', 'allreduce' or 'local-sgd'"
            )
        # Each rank draws its own batches: a different stream per rank, the same on every rerun.
        self.buffer = ReplayBuffer(
            capacity, policy, seed=seed * 1009 + self.world.rank, device=self.world.device
        )
        # The global batch is split over the ranks as in caldera train: this rank's share, and its loss weight.
        shares = [len(c) for c in torch.tensor_split(torch.arange(batch_size), self.world.size)]
        if min(shares) == 0:
            raise ValueError(f"batch_size {batch_size} is smaller than the {self.world.size} ranks: give each rank "
                             "at least one sample per step")  # fmt: skip
        self.local_batch = shares[self.world.rank]
        self.loss_weight = self.local_batch * self.world.size / batch_size
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.verbose, self.log_every = verbose, log_every  # a line on rank 0 every log_every rounds
        self.history: list[dict[str, float]] = []
        self.rounds = 0
        self._log = None
        self._checkpointer = None
        self.stop_reason: str | None = (
            None  # why the job should end now (SIGTERM, time limit), the same on every rank
        )
        if self.run_dir is not None:
            self._checkpointer = Checkpointer(self.run_dir / "checkpoints", self.world, keep=checkpoint_keep,
                                              async_write=False, time_limit=time_limit)  # fmt: skip
            # Slurm's warning before the wall time (SIGTERM/SIGUSR1) becomes should_stop, not a dead process.
            self._checkpointer.install_signal_handlers()
        # A rank whose simulation stops would leave the others waiting in train() forever: see caldera.watchdog.
        hang_timeout = hang_timeout_for(self.world, hang_timeout)
        self._watchdog = Watchdog(self.world, hang_timeout).start() if hang_timeout > 0 else None

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained (the same object that was passed in)."""
        return self.trainer.model

    def add(self, x: Any, y: Any) -> int:
        """Offer this rank's new samples (first dimension = samples) to its replay buffer; not collective."""
        self._mark("simulation")
        return self.buffer.add(x, y)

    def train(self, steps: int) -> float:
        """Take ``steps`` optimizer steps on batches drawn from every rank's buffer (collective: every rank calls
        it with the same ``steps``); return the mean training loss over them, averaged over ranks."""
        t0 = time.perf_counter()
        self._mark("training step")
        reason = self._checkpointer.poll(self.trainer.global_step)[1] if self._checkpointer else None
        held = self.world.comm.allgather((len(self.buffer), self.buffer.seen, reason))
        stops = [f"{why} on rank {r}" for r, (_, _, why) in enumerate(held) if why]
        self.stop_reason = ", ".join(stops) or None
        empty = [r for r, (n, _, _) in enumerate(held) if n == 0]
        if empty:
            raise ValueError(
                f"train(): the replay buffer of rank(s) {empty} is empty; call add() with simulation samples on "
                "every rank before train()"
            )
        sums = torch.zeros(2, dtype=torch.float64)  # loss sum, finite steps
        for _ in range(steps):
            x, y = self.buffer.sample(self.local_batch)
            loss, finite = self.trainer.train_step(x, y, self.loss_weight)
            self._mark("training step")
            if finite:  # an fp16 overflow step is skipped by the loss scaler: keep it out of the mean
                sums += torch.stack([loss.detach().double().cpu(), torch.ones((), dtype=torch.float64)])
        self.world.comm.Allreduce(sums)
        mean = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
        self.rounds += 1
        row = {"round": self.rounds, "step": self.trainer.global_step, "train_loss": mean,
               "seen": sum(s for _, s, _ in held), "buffered": sum(n for n, _, _ in held),
               "time_s": time.perf_counter() - t0}  # fmt: skip
        self._record(row)
        self._mark("simulation")
        return mean

    def _mark(self, phase: str) -> None:
        if self._watchdog is not None:
            self._watchdog.mark(phase, self.trainer.global_step)

    @property
    def should_stop(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGUSR1 or the ``time_limit`` is near (as of the last
        ``train``): checkpoint with the simulation's state and exit with ``caldera.checkpoint.REQUEUE_EXIT_CODE``."""
        return self.stop_reason is not None

    def evaluate(self, x: Any, y: Any, prefix: str = "val_") -> dict[str, float]:
        """Loss and metrics of the model on this rank's samples ``(x, y)``, averaged over all ranks' samples
        (collective); the values are added to the latest ``train`` row of the history."""
        self._mark("validation")
        device, n = self.world.device, len(y)
        xs, ys = as_batch(x, "evaluate(): x"), as_batch(y, "evaluate(): y")
        step = self.trainer.batch_size
        chunks = (((xs[i : i + step].to(device), ys[i : i + step].to(device)), len(ys[i : i + step]))
                  for i in range(0, n, step))  # fmt: skip
        out = self.trainer.evaluate_batches(chunks, prefix)
        self._print("  ".join(f"{k} {v:.4g}" for k, v in out.items()))
        if self.history:
            self.history[-1].update(out)
            if self._log is not None:
                self._log.update_last(out)
        return out

    def finish(self) -> None:
        """Write the final weights (``model.pt``), ``summary.json`` and ``online.png`` to the run directory
        (rank 0; collective only through the strategy's final synchronisation)."""
        # The ranks agree before the weights are saved, as before validation (local SGD averages its drifted
        # models, allreduce its BatchNorm statistics): online training has no final validation to do it.
        self.trainer.strategy.consolidate("validation")
        self.trainer.strategy.consolidate("outputs")  # and as at the end of a fit (pipeline: the whole model)
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._checkpointer is not None:
            self._checkpointer.restore_signal_handlers()
        if self.run_dir is None or not self.world.is_main:
            return
        files = RunDir(self.run_dir)
        files.save_weights(self.model)
        summary = {"rounds": self.rounds, "steps": self.trainer.global_step, "ranks": self.world.size,
                   "final": self.history[-1] if self.history else {}}  # fmt: skip
        files.write_summary(summary)
        if self.history:
            plot_online(self.history, files.plot("online"))
        self._print(f"run directory: {self.run_dir}")

    # -- checkpoint -----------------------------------------------------------------------------------------------
    def checkpoint(self, extra: Any = None) -> Path:
        """Save weights, optimizer, every rank's replay buffer and random state, and ``extra`` (e.g. the
        simulation's own state, per rank) to ``run_dir/checkpoints`` (collective, atomic); return its path."""
        checkpointer = self._require_checkpointer()
        self._mark("checkpoint")
        if checkpointer.run_id is None:  # neither restored nor saved yet: a fresh run sets an older one aside
            checkpointer.begin(resume=False)
        shared = self.trainer.shared_state()
        if self.world.is_main:
            shared.update(rounds=self.rounds, online_history=list(self.history))
        local = {"buffer": self.buffer.state_dict(), "rng": rng_state(), "extra": extra}
        return checkpointer.save(self.trainer.global_step, shared, local, block=True)

    def restore(self, path: str | Path | None = None) -> Any:
        """Load the newest checkpoint (or ``path``) on every rank; return this rank's ``extra``, or None when
        there is no checkpoint yet (a fresh start)."""
        checkpointer = self._require_checkpointer()
        if path is None and not checkpointer.list():
            return None
        shared, local, where = checkpointer.load(path)
        if local is None:
            raise CheckpointError(
                f"{where} was written by {shared['world_size']} rank(s); an online run keeps each rank's replay "
                f"buffer and simulation state, so it resumes on the same number of ranks (not {self.world.size})"
            )
        self.trainer.load_state_dict(shared)
        self.rounds, self.history = shared["rounds"], list(shared["online_history"])
        self.buffer.load_state_dict(local["buffer"])
        set_rng_state(local["rng"])
        if self.world.is_main and self.run_dir is not None:
            self._log = RunDir(self.run_dir).metrics(self.history)
        self._print(f"resumed from {where} (round {self.rounds}, step {self.trainer.global_step})")
        return local["extra"]

    def _require_checkpointer(self) -> Checkpointer:
        if self._checkpointer is None:
            raise CheckpointError(
                "checkpoint()/restore() need a run directory: OnlineTrainer(..., run_dir=...)"
            )
        return self._checkpointer

    # -- output ---------------------------------------------------------------------------------------------------
    def _record(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if not self.world.is_main:
            return
        if self.run_dir is not None:
            if self._log is None:
                self._log = RunDir(self.run_dir).metrics(self.history[:-1])
            self._log.append(row)
        if self.log_every and row["round"] % self.log_every == 0:
            self._print(f"round {row['round']}  step {row['step']}  train_loss {row['train_loss']:.4g}  "
                        f"seen {row['seen']}  buffered {row['buffered']}  {row['time_s']:.2f}s")  # fmt: skip

    def _print(self, message: str) -> None:
        if self.verbose and self.world.is_main:
            print(message, flush=True)


def plot_online(rows: list[dict[str, float]], path: Path) -> Path:
    """Plot the training (and validation, when evaluated) loss against the samples the simulation produced."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = [r["seen"] for r in rows]
    for key in [k for k in rows[-1] if k.endswith("loss")]:
        pts = [(s, r[key]) for s, r in zip(seen, rows) if key in r]
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker="o" if key != "train_loss" else None, label=key
        )
    ax.set(xlabel="samples produced by the simulation (all ranks)", ylabel="loss", yscale="log",
           title="online training")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
