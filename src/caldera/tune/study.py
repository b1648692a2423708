"""The study: Optuna's journal file in the run directory, shared by every rank that hands itself trials.

No database and no server: each trial group's rank 0 opens the same append-only journal
(``tune/study.journal``, Optuna's ``JournalFileBackend``, locked with a symlink, which NFS makes atomic) and asks
it for its next trial as soon as it is free. A second lock (``tune/handout.lock``) makes "count the trials, then
ask for one" a single step, so the search stops at exactly ``tune.trials`` however many ranks ask at once. A
trial cut short by a stop request (or left RUNNING by a killed job, found on resume) is failed, marked retried
and queued again with the same parameters; retried trials do not count towards the total.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import Trial, TrialState

from caldera.config import ConfigError
from caldera.tune.space import distributions, grid

NAME = "caldera"
JOURNAL = "study.journal"
# A lock left by a killed process is broken after this long (Optuna's own grace period for the journal).
LOCK_GRACE_S = 30
COUNTED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage(out: Path) -> JournalStorage:
    """The study's journal file storage in ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(out / JOURNAL)))


def prepare(out: Path, spec, resume: bool) -> int:
    """Create the study (fresh) or reopen it (resume) and queue again what a stopped job left running; called on
    one rank before any other opens the study. Returns how many trials were queued again."""
    exists = (out / JOURNAL).exists()
    if exists and not resume:
        raise ConfigError(f"{out / JOURNAL} holds a study already: continue it with `caldera tune --resume`, or "
                          "give another [run] dir (or delete the directory) to start over")  # fmt: skip
    store = storage(out)
    if exists and NAME in [s.study_name for s in store.get_all_studies()]:
        study = optuna.load_study(study_name=NAME, storage=store)
        saved = [d.name.lower() for d in study.directions]
        if saved != spec.directions:
            raise ConfigError(f"{out / JOURNAL} was a study with directions {saved}, the run file now asks for "
                              f"{spec.directions}; give another [run] dir for a different study")  # fmt: skip
        left = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        for frozen in left:
            retry(study, frozen.number, frozen.params, "the job stopped while it ran")
        return len(left)
    study = optuna.create_study(study_name=NAME, storage=store, directions=spec.directions)
    for point in grid(spec):  # the grid's points are queued; ask() hands them out in order
        study.enqueue_trial(point)
    return 0


def load(out: Path) -> optuna.Study:
    """The study as stored (for reading its trials)."""
    return optuna.load_study(study_name=NAME, storage=storage(out))


def open_study(out: Path, spec, seed: int, epochs: int) -> optuna.Study:
    """This process's handle on the shared study, with its own sampler (``seed``) and the pruner."""
    if (
        spec.sampler == "tpe"
    ):  # constant_liar: trials that run at the same time spread out instead of piling up
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    return optuna.load_study(
        study_name=NAME, storage=storage(out), sampler=sampler, pruner=pruner(spec, epochs)
    )


def pruner(spec, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner ``[tune] pruner`` names, with ``pruner_args``; a bad argument is a ConfigError naming it."""
    kinds = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
             "asha": optuna.pruners.SuccessiveHalvingPruner, "hyperband": optuna.pruners.HyperbandPruner}  # fmt: skip
    args = dict(spec.pruner_args)
    if spec.pruner == "hyperband":  # a trial's resource is its epochs: the longest one trains them all
        args.setdefault("max_resource", epochs)
    try:
        return kinds[spec.pruner](**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tune.pruner_args = {spec.pruner_args}: {exc}") from None


def spent(study: optuna.Study) -> int:
    """Trials that count towards ``tune.trials``: every trial handed out, less those queued again."""
    retried = {k for k in study.user_attrs if k.startswith("retried:")}
    return sum(
        t.state in COUNTED and f"retried:{t.number}" not in retried for t in study.get_trials(deepcopy=False)
    )


@contextlib.contextmanager
def handout(out: Path) -> Iterator[None]:
    """Hold the hand-out lock: one process at a time counts the trials and asks for the next."""
    lock = JournalFileSymlinkLock(str(out / "handout"), grace_period=LOCK_GRACE_S)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def next_trial(study: optuna.Study, out: Path, spec, n_trials: int) -> Trial | None:
    """The next trial of the study, or None once ``n_trials`` have been handed out."""
    with handout(out):
        if spent(study) >= n_trials:
            return None
        return study.ask(distributions(spec.space))


def retry(study: optuna.Study, number: int, params: dict[str, Any], why: str) -> None:
    """Fail trial ``number`` (cut short, not wrong), mark it retried and queue its parameters again."""
    study.set_user_attr(f"retried:{number}", why)  # one key per trial: ranks that retry at once never collide
    study.enqueue_trial(params, user_attrs={"retry_of": number})
    study.tell(number, state=TrialState.FAIL)


def tell(study: optuna.Study, trial: Trial, result: dict[str, Any]) -> None:
    """Record a trial's outcome (and its rank, seconds and error as user attributes)."""
    for key in ("rank", "seconds", "error"):
        trial.set_user_attr(key, result[key])
    if result["state"] == "complete":
        study.tell(trial, result["values"])
    elif result["state"] == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def rows(study: optuna.Study, spec) -> list[dict[str, Any]]:
    """One row per trial for trials.csv: number, rank, state, score(s), seconds, parameters, error."""
    retried = {int(k.split(":")[1]): v for k, v in study.user_attrs.items() if k.startswith("retried:")}
    names = spec.metrics
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        state = "retried" if t.number in retried else _STATES[t.state]
        values = t.values if t.values is not None else [None] * len(names)
        if t.state == TrialState.PRUNED and t.intermediate_values:  # its last report: what it reached
            values = [t.intermediate_values[max(t.intermediate_values)]]
        scores = dict(zip(["value"] if len(names) == 1 else names, values, strict=True))
        error = retried.get(t.number) or t.user_attrs.get("error") or ""
        out.append({"trial": t.number, "rank": t.user_attrs.get("rank", ""), "state": state, **scores,
                    "seconds": t.user_attrs.get("seconds", ""), **t.params, "error": error})  # fmt: skip
    return out


_STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
           TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}  # fmt: skip
