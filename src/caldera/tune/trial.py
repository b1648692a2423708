"""One trial: an ordinary training run in its own directory, on its group's ranks, reporting every epoch."""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable
from typing import Any

from caldera.config import Config, load_config
from caldera.io import atomic_write_text
from caldera.train.callbacks import Callback
from caldera.train.run import train
from caldera.world import World


class Report(Callback):
    """Each epoch's score to the study's pruner (on the group's rank 0, which holds the Optuna trial); a pruned
    trial stops its trainer. The decision is broadcast, so every rank of a data-parallel trial stops together."""

    def __init__(self, trial: Any, metric: str, prune: bool, stop_reason: Callable[[], str | None]) -> None:
        self.trial, self.metric, self.prune, self.stop_reason = trial, metric, prune, stop_reason
        self.pruned_at: int | None = None
        self.params = 0
        self.checkpointer: Any = (
            None  # the trial's: holds a stop request that came after its last step boundary
        )

    def on_fit_start(self, trainer) -> None:
        """Count the model's parameters (the 'params' objective); pass on a stop request that came while the
        trial was still building its data and model (the trainer's own signal handlers were not in place yet)."""
        self.params = sum(p.numel() for p in trainer.model.parameters())
        self.checkpointer = trainer.checkpointer
        reason = self.stop_reason()
        if reason and trainer.checkpointer is not None and trainer.checkpointer.stop_reason is None:
            trainer.checkpointer.stop_reason = (
                reason  # the first step boundary stops the trial (all its ranks)
            )

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        """Report the epoch's score; stop the trainer when the pruner says so."""
        if not self.prune:
            return
        stop = False
        value = logs.get(self.metric, math.nan)
        if self.trial is not None and math.isfinite(value):
            self.trial.report(value, step=epoch + 1)  # step = epochs trained: the pruners' resource
            # After the last epoch there is nothing left to save: the trial completes, whatever its rank.
            stop = epoch + 1 < trainer.max_epochs and self.trial.should_prune()
        if trainer.world.size > 1:
            stop = trainer.world.comm.bcast(stop)
        if stop:
            self.pruned_at = epoch + 1
            trainer.should_stop = True
            trainer.log(f"pruned after epoch {epoch + 1}: {self.metric} {value:.4g}")


def run_trial(config, overrides, params: dict[str, Any], base: Config, number: int, world: World,
              group: World, trial: Any, time_limit: float | None,
              stop_reason: Callable[[], str | None]) -> dict[str, Any]:  # fmt: skip
    """Train trial ``number`` on ``group`` (this rank alone, or its trial group); return its outcome.

    ``trial``: the Optuna trial on the group's rank 0 (None elsewhere). Whatever the run raises fails this trial
    only; ``Preempted`` (a stop request, the time limit) goes through."""
    spec = base.tune
    trial_dir = base.run_dir / "trials" / f"trial-{number:04d}"
    fixed = {"run.dir": str(trial_dir), "train.progress": False, "train.plot": False}
    start = time.perf_counter()
    trial_dir.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    report = Report(trial, spec.metrics[0], spec.pruner != "none", stop_reason)
    history: list[dict[str, float]] = []
    try:
        cfg = load_config(config, overrides, {**params, **fixed})
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            history = train(cfg, config, world=group, time_limit=time_limit, callbacks=[report])
        values, error = score(history, spec, report.params), None
    except Exception as exc:  # noqa: BLE001 -- whatever a trial raises fails that trial, not the search
        values, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        if group.is_main:
            atomic_write_text(trial_dir / "trial.log", log.getvalue())
    state = "pruned" if report.pruned_at else "complete" if values is not None else "failed"
    if values is None and error is None:
        error = f"no finite {', '.join(spec.metrics)} in any epoch"
    # A signal that reached the trial's own handler after its last step boundary (validation, the final save) let
    # the trial finish; the search must still stop: it is passed on with the outcome.
    late_stop = report.checkpointer.stop_reason if report.checkpointer is not None else None
    return {"number": number, "rank": world.rank, "params": params, "values": values, "state": state,
            "error": error or "", "metrics": sorted(history[-1]) if history else None,
            "seconds": round(time.perf_counter() - start, 2), "stop": late_stop}  # fmt: skip


def score(history: list[dict[str, float]], spec, n_params: int) -> list[float] | None:
    """The trial's scores: every metric at the epoch best in the first (the model's size for 'params')."""
    first, sign = spec.metrics[0], 1 if spec.directions[0] == "minimize" else -1
    rows = (
        [r for r in history if math.isfinite(r.get(first, math.nan))] if first != "params" else history[-1:]
    )
    if not rows:
        return None
    best = min(rows, key=lambda r: sign * r[first]) if first != "params" else rows[0]
    values = [float(n_params) if m == "params" else best.get(m, math.nan) for m in spec.metrics]
    return values if all(math.isfinite(v) for v in values) else None
