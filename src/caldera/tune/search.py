"""``caldera tune``: hyperparameter search over the whole allocation, with Optuna as the sampler.

Asynchronous: no rounds. Every trial group (one rank, or ``ranks_per_trial`` ranks split off the job's
communicator) runs its own loop: its rank 0 asks the shared study (a journal file in the run directory, see
``caldera.tune.study``) for the next trial as soon as the group is free, broadcasts the parameters to the group,
the group trains it, and rank 0 tells the outcome back and rewrites ``tune/trials.csv``. Nothing is handed out
over MPI, so a slow trial holds up only its own group. Stop requests (SIGTERM, SIGUSR1, ``--time-limit``) end
every group at its next step boundary, like training: the interrupted trials are queued again, the study stays
in its journal, and the job exits 85; ``caldera tune --resume`` continues it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from caldera.checkpoint import Preempted
from caldera.comm.local import LocalComm
from caldera.comm.mpi import MPIComm
from caldera.config import ConfigError, load_config
from caldera.durations import parse_duration
from caldera.train.progress import progress_bar
from caldera.tune import study as studies
from caldera.tune.report import TuneFailed, finish, write_table
from caldera.tune.space import grid
from caldera.tune.trial import run_trial
from caldera.world import World, init

# Like the checkpointer's margin: a trial is not started, or is stopped, this long before the time limit.
TIME_MARGIN_S = 60.0


def tune(config: str | Path, overrides: list[str] | None = None, trials: int | None = None,
         resume: bool = False, time_limit: str | float | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the search the run file's ``[tune]`` section describes; return the outcome (on every rank).

    ``resume`` continues the study in the run directory; ``time_limit`` stops before that wall time (exit 85)."""
    world = init()
    base = load_config(config, overrides)
    spec = base.tune
    if spec is None or not spec.space:
        raise ConfigError(f"{config}: no [tune] section with a space; add e.g. [tune.space] with "
                          '"optim.lr" = { low = 1e-4, high = 1e-1, log = true } (see docs/tune.md)')  # fmt: skip
    if world.size % spec.ranks_per_trial:
        raise ConfigError(f"tune.ranks_per_trial = {spec.ranks_per_trial} does not divide the job's {world.size} "
                          f"ranks; start a multiple of {spec.ranks_per_trial} ranks")  # fmt: skip
    n_trials = trials or spec.trials
    if spec.sampler == "grid":
        n_trials = min(n_trials, len(grid(spec)))
    for key, dims in spec.space.items():  # a mistyped key fails now, not after hours of trials
        load_config(config, overrides, {key: dims[0] if isinstance(dims, list) else dims.low})
    studies.pruner(spec, base.optim.epochs)  # a bad pruner argument too
    out = base.run_dir / "tune"
    stop = StopRequest(parse_duration(time_limit))
    # One rank creates (or reopens and repairs) the study before any other opens it.
    problem, requeued = None, 0
    if world.is_main:
        try:
            requeued = studies.prepare(out, spec, resume)
        except ConfigError as exc:
            problem = str(exc)
    problem, requeued = world.comm.bcast((problem, requeued))
    if problem:
        raise ConfigError(problem)
    group = trial_group(world, spec.ranks_per_trial)
    study = None
    if group.is_main:  # its own sampler seed per group and per resume, so that groups do not draw alike
        seed = base.run.seed + 1000 * world.rank + len(studies.load(out).trials)
        study = studies.open_study(out, spec, seed, base.optim.epochs)
    if world.is_main and requeued:
        print(f"resuming the study in {out}: {requeued} interrupted trial(s) queued again")
    # Bound to the real stdout now: trials redirect sys.stdout into their own logs while the bar refreshes.
    bar = progress_bar(world.is_main, "trials", {"best": "-"}, file=sys.stdout, clock="elapsed").start()
    try:
        stop.install()
        while True:
            trial = None
            if group.is_main and stop.reason is None and stop.remaining() > 0:
                trial = studies.next_trial(study, out, spec, n_trials)
            params = group.comm.bcast(None if trial is None else (trial.number, trial.params))
            if params is None:
                break
            number, values = params
            try:
                result = run_trial(config, overrides, values, base, number, world, group, trial,
                                   stop.remaining() + TIME_MARGIN_S if stop.deadline else None,
                                   lambda: stop.reason)  # fmt: skip
            except Preempted as exc:
                stop.reason = stop.reason or exc.reason
                if group.is_main:
                    studies.retry(study, number, values, f"stopped: {exc.reason}")
                break
            stop.reason = stop.reason or result["stop"]
            if group.is_main:
                studies.tell(study, trial, result)
            # After the tell, so that the journal holds no trial left running.
            _stop_if_metric_unknown(result, spec.metrics)
            if group.is_main:
                rows = studies.rows(study, spec)
                write_table(out / "trials.csv", rows)
                done = [r for r in rows if r["state"] == "complete" and "value" in r]
                top = min if spec.directions[0] == "minimize" else max
                shown = f"{top(r['value'] for r in done):.4g}" if done else "-"
                bar.update(completed=sum(r["state"] != "retried" for r in rows), total=n_trials, best=shown)
    finally:
        stop.restore()
        bar.close()
    reasons = world.comm.allgather(stop.reason)
    if any(reasons):
        if world.is_main:
            write_table(out / "trials.csv", studies.rows(studies.load(out), spec))
        why = ", ".join(f"{r} on rank {i}" for i, r in enumerate(reasons) if r)
        raise Preempted(why, out / studies.JOURNAL)
    outcome = None
    if world.is_main:
        rows = studies.rows(studies.load(out), spec)
        write_table(out / "trials.csv", rows)
        outcome = finish(out, rows, spec, config)
    outcome = world.comm.bcast(outcome)
    if "error" in outcome:  # raised on every rank alike, so that all of them exit the same way
        raise TuneFailed(outcome["error"])
    return outcome


def trial_group(world: World, k: int) -> World:
    """This rank's trial group: itself alone (k = 1), or the k consecutive ranks it trains each trial with."""
    if k == 1 or world.size == 1:
        return World(device=world.device, comm=LocalComm())
    sub = world.comm.comm.Split(world.rank // k, world.rank)
    return World(rank=sub.Get_rank(), size=k, local_rank=world.local_rank, local_size=world.local_size,
                 device=world.device, comm=MPIComm(sub))  # fmt: skip


def _stop_if_metric_unknown(result: dict[str, Any], metrics: list[str]) -> None:
    have = result["metrics"]
    for metric in metrics:
        if have and metric != "params" and metric not in have:
            raise ConfigError(f"tune.metric = {metric!r} is not a metric of this run; it has: "
                              f"{', '.join(m for m in have if m not in ('epoch', 'lr', 'time_s'))}")  # fmt: skip


class StopRequest:
    """SIGTERM/SIGUSR1 between trials and the time limit: no new trial starts (a running one stops itself)."""

    def __init__(self, time_limit: float | None) -> None:
        self.deadline = None if time_limit is None else time.monotonic() + time_limit - TIME_MARGIN_S
        self.reason: str | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """Turn the signals into a request (only in the main thread, as the checkpointer does)."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def remaining(self) -> float:
        """Seconds left before no trial may start (infinite without a time limit); sets the reason at 0."""
        if self.deadline is None:
            return float("inf")
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.reason = self.reason or "time limit"
        return max(0.0, left)


def resume_requested(flag: bool) -> bool:
    """``--resume``, or a relaunch by ``caldera launch --max-restarts`` (it sets CALDERA_RESUME=1)."""
    return flag or os.environ.get("CALDERA_RESUME") == "1"
