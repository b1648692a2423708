"""Checkpoint and restart: complete, atomic, verified, asynchronous; survives kills, wall-time limits, dead ranks.

Layout of one checkpoint (a directory that appears under its final name only once it is complete)::

    checkpoints/step-000001200/
        shared.pt        rank 0: model, optimizer, scheduler, precision, trainer position, config
        rank-00000.pt    every rank: its RNG states and any per-rank strategy state (and, in a sharded checkpoint,
                         its shard of the optimizer state under "sharded")
        manifest.json    rank 0, last: step, epoch, size of every file (records carry CRC-32s), run id, config (and its
                         hash), versions; "sharded": the layout of a sharded optimizer state, if any

Sharded (``sharded=True``, the default, where the strategy shards the optimizer state): rank 0's ``shared.pt``
holds no optimizer state but the layout (``sharded_layout``, copied into the manifest); each shard is in the rank
file the layout names. Loading such a checkpoint reads every shard file on every rank (``shared["sharded_parts"]``,
in shard order); a missing or damaged one makes the whole checkpoint unusable, like any other file.

Writing: the state is snapshotted to CPU memory on the training thread (fast), then serialised, hashed, written
and fsynced by a background thread while training goes on. Each rank writes into a hidden temporary directory;
when every rank has finished (agreed through one small all-reduce at a step boundary), rank 0 writes the manifest
and renames the directory into place. A crash at any moment leaves either a complete checkpoint or none.

Loading: the newest checkpoint whose manifest and checksums verify and whose files load; a partial, corrupt or
unloadable one is reported and the previous one used. Files load with ``weights_only=True``: a checkpoint holds
tensors and plain Python values only, so loading one never runs code from it. The files are plain ``torch.save``
dicts: ``torch.load(".../shared.pt")["model"]`` is an ordinary ``state_dict``.

Identity: every checkpoint records the id of the run that wrote it. A fresh run in a directory that holds another
run's checkpoints moves them aside (``previous-<run id>/``) so step numbers never mix, and retention deletes only
the running run's own checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import platform
import random
import re
import shutil
import signal
import threading
import time
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.config import flatten
from caldera.durations import job_time_left
from caldera.durations import parse_duration as parse_duration
from caldera.durations import parse_interval as parse_interval
from caldera.errors import CheckpointError as CheckpointError
from caldera.io import atomic_write_text
from caldera.log import get_logger
from caldera.version import __version__
from caldera.world import World

_log = get_logger(__name__)

REQUEUE_EXIT_CODE = 85  # a job script tests for this to requeue (see docs/checkpoint.md)
# every = "auto": checkpoint at the first epoch end at least this many seconds after the last checkpoint.
AUTO_INTERVAL = 600.0
_NAME = re.compile(r"^step-(\d{9})$")


class Preempted(SystemExit):
    """Training stopped at a step boundary after SIGTERM/SIGUSR1 or the time limit; a checkpoint was written."""

    def __init__(self, reason: str, path: Path | None) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
        self.reason, self.path = reason, path

    def __str__(self) -> str:
        return f"stopped ({self.reason}); checkpoint {self.path}; exit code {REQUEUE_EXIT_CODE} asks for a requeue"


# -- state capture --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain values (what ``weights_only=True`` loads)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(obj: Any) -> Any:
    """Deep-copy a state tree with every tensor cloned to CPU, so training may go on mutating the originals."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def versions() -> dict[str, str]:
    """Library versions recorded with every checkpoint."""
    return {"caldera": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}  # fmt: skip


# -- the checkpointer ---------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    step: int
    tmp: Path
    thread: threading.Thread
    files: dict[str, dict[str, Any]]
    meta: dict[str, Any]
    error: BaseException | None = None


class Checkpointer:
    """Decides when to checkpoint, writes checkpoints in the background, finds and loads the newest good one."""

    def __init__(
        self,
        directory: str | Path,
        world: World,
        every: int | str | None = None,
        keep: int = 3,
        keep_best: str | None = None,
        best_mode: str = "min",
        async_write: bool = True,
        time_limit: float | str | None = None,
        time_margin: float = 60.0,
        config_hash: str | None = None,
        config: dict[str, Any] | None = None,
        may_change: tuple[str, ...] = (),
        force: bool = False,
        auto_interval: float = AUTO_INTERVAL,
        sharded: bool = True,
    ) -> None:
        self.dir, self.world = Path(directory), world
        self.every_steps, self.every_seconds = parse_interval(every)
        # "auto": a checkpoint at an epoch end once ``auto_interval`` has passed since the last one.
        self.epoch_seconds = auto_interval if isinstance(every, str) and every.strip() == "auto" else None
        self.keep, self.keep_best, self.best_mode = keep, keep_best, best_mode
        self.async_write = async_write
        self.sharded = sharded  # each rank writes its own shard of a sharded state (no gather on rank 0)
        self.time_margin = time_margin
        self.time_limit = self._job_limit() if time_limit == "auto" else parse_duration(time_limit)
        self.config_hash = config_hash
        # The run's config (JSON-normalised), compared with a checkpoint's at resume; keys (or "section." prefixes)
        # in ``may_change`` may differ without ``force``.
        self.config = json.loads(json.dumps(config, default=str)) if config is not None else None
        self.may_change, self.force = may_change, force
        self.run_id: str | None = None  # set by begin() or load(), else at the first save
        self._mine: set[str | None] = set()  # run ids whose checkpoints retention may delete (this run's)
        self.started = time.monotonic()
        self.last_save = time.monotonic()
        self.last_step = 0  # the step of the newest checkpoint written (or resumed from)
        self.pending: _Pending | None = None
        self.stop_reason: str | None = None
        self._old_handlers: dict[int, Any] = {}
        self.save_seconds: list[float] = []  # time the training thread spent per checkpoint (snapshot)

    def _job_limit(self) -> float | None:
        """``time_limit = "auto"``: the time left in the Slurm job, read once by rank 0 (collective); outside a job
        (or one without a limit) one line says so and the run trains without a limit."""
        left, source = self.world.comm.bcast(job_time_left() if self.world.is_main else None)
        if self.world.is_main:
            if left is None:
                print(f"caldera: time limit 'auto': no job time limit to read ({source}); training without one",
                      flush=True)  # fmt: skip
            else:
                print(f"caldera: time limit 'auto': {max(left, 0) / 60:.1f} min left in the job ({source}); "
                      f"stopping with a checkpoint {self.time_margin:g} s before it", flush=True)  # fmt: skip
        return None if left is None else max(left, 0.0)

    # -- identity -------------------------------------------------------------------------------------------------
    def begin(self, resume: bool) -> Path | None:
        """Start a run (collective): give it an id; a fresh run (not ``resume``) moves another run's checkpoints
        aside to ``previous-<run id>/`` so that step numbers never mix. Returns where they went, or None."""
        moved = None
        if self.world.is_main and not resume:
            moved = self._set_aside()
        self._adopt(self._new_id())
        return self.world.comm.bcast(moved)

    def _adopt(self, run_id: str) -> None:
        self.run_id, self._mine = run_id, {run_id}

    def _new_id(self) -> str:
        """A fresh run id, the same on every rank (collective)."""
        return self.world.comm.bcast(uuid.uuid4().hex[:12] if self.world.is_main else None)

    def _set_aside(self) -> Path | None:
        found = self.list()
        if not found:
            return None
        owner = _manifest(found[-1]).get("run_id") or time.strftime("%Y%m%d-%H%M%S")
        target = self.dir / f"previous-{owner}"
        n = 1
        # A folder of that run already holding none of these names (a set-aside cut short by a crash) takes the
        # rest; one holding any of them is never overwritten: the next free name instead.
        while target.exists() and any((target / p.name).exists() for p in found):
            target, n = self.dir / f"previous-{owner}-{n}", n + 1
        target.mkdir(exist_ok=True)
        for path in found:
            os.replace(path, target / path.name)
        _log.info(f"{len(found)} checkpoint(s) of an earlier run in {self.dir} moved to {target} (this is a fresh "
                  "run; --resume continues the earlier one)")  # fmt: skip
        return target

    # -- signals --------------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """Turn SIGTERM/SIGUSR1 (what Slurm sends before the wall-time limit) into a checkpoint-and-exit request."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_reason = signal.Signals(signum).name

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # -- the per-step decision ------------------------------------------------------------------------------------
    def at_step_boundary(self, step: int, capture) -> None:
        """Called after every optimizer step on every rank: save when due, finish background writes, and stop
        (raising ``Preempted``) when a signal or the time limit asks. ``capture()`` returns (shared, local) state.
        """
        now = time.monotonic()
        due = self.every_steps is not None and step % self.every_steps == 0
        if self.every_seconds is not None and self.world.is_main:
            due = due or now - self.last_save >= self.every_seconds
        stop = self.stop_reason is not None
        if self.time_limit is not None and now - self.started >= self.time_limit - self.time_margin:
            stop, self.stop_reason = True, self.stop_reason or "time limit"
        busy = self.pending is not None and self.pending.thread.is_alive()
        if self.world.size > 1:
            # One tiny all-reduce keeps every rank's decision identical: rank 0's clock, anyone's signal.
            flags = torch.tensor([float(due), float(stop), float(busy)])
            self.world.comm.Allreduce(flags, op="max")
            due, stop, busy = bool(flags[0]), bool(flags[1]), bool(flags[2])
        if self.pending is not None and not busy:
            self._commit()
        if stop:
            reason = self.stop_reason
            if self.world.size > 1:
                reasons = self.world.comm.allgather(self.stop_reason)
                reason = ", ".join(f"{r} on rank {i}" for i, r in enumerate(reasons) if r)
            path = self.save(step, *capture(), block=True)
            raise Preempted(reason or "stop requested", path)
        if due:
            self.save(step, *capture())

    def at_epoch_end(self, step: int, capture) -> None:
        """Called at the end of every epoch but the last, on every rank: under ``every = "auto"``, save when
        ``auto_interval`` has passed since the last checkpoint (rank 0's clock decides for all)."""
        if self.epoch_seconds is None:
            return
        due = torch.tensor([float(time.monotonic() - self.last_save >= self.epoch_seconds)])
        if self.world.size > 1:
            self.world.comm.Allreduce(due, op="max")
        if bool(due[0]):
            self.save(step, *capture())

    def poll(self, step: int) -> tuple[bool, str | None]:
        """For loops with no common step boundary (the asynchronous strategies): (is a checkpoint due after
        ``step`` updates, why to stop now or None). Not collective: the caller's coordinator asks alone."""
        now = time.monotonic()
        due = self.every_steps is not None and step - self.last_step >= self.every_steps
        due = due or (self.every_seconds is not None and now - self.last_save >= self.every_seconds)
        # No epoch ends here: "auto" checkpoints every auto_interval.
        due = due or (self.epoch_seconds is not None and now - self.last_save >= self.epoch_seconds)
        if self.time_limit is not None and now - self.started >= self.time_limit - self.time_margin:
            self.stop_reason = self.stop_reason or "time limit"
        return due, self.stop_reason

    # -- writing --------------------------------------------------------------------------------------------------
    def save(self, step: int, shared: dict[str, Any], local: dict[str, Any], block: bool = False,
             metrics: dict[str, float] | None = None) -> Path:  # fmt: skip
        """Write checkpoint ``step`` (collective). Asynchronous unless ``block``; returns its final path."""
        t0 = time.monotonic()
        if self.pending is not None:
            self.pending.thread.join()
            self._commit()
        tmp = self.dir / f".step-{step:09d}.tmp"
        if self.run_id is None:  # used without begin(): this object's saves are one run
            self._adopt(self._new_id())
        if self.world.is_main:
            # Any temporary directory here is a write that failed or was killed (the pending one was committed
            # above): its bytes would only fill the disk that may have made it fail.
            for stale in self.dir.glob(".step-*.tmp") if self.dir.exists() else ():
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.world.barrier()  # the directory exists before anyone writes into it
        synchronous = block or not self.async_write
        # Training waits for a synchronous write, so the live tensors cannot change under it: no copy needed.
        copy = (lambda x: x) if synchronous else snapshot
        payload = {f"rank-{self.world.rank:05d}.pt": copy(local)}
        if self.world.is_main:
            payload["shared.pt"] = copy(shared)
        meta = {
            "step": step,
            "epoch": shared.get("epoch"),
            "metrics": metrics or shared.get("last_metrics") or {},
        }
        if shared.get("sharded_layout") is not None:
            meta["sharded"] = shared["sharded_layout"]
        pending = _Pending(step, tmp, threading.Thread(target=lambda: None), {}, meta)
        pending.thread = threading.Thread(target=self._write_files, args=(pending, payload), daemon=True)
        pending.thread.start()
        self.pending = pending
        self.last_save, self.last_step = time.monotonic(), step
        self.save_seconds.append(self.last_save - t0)
        if synchronous:
            pending.thread.join()
            self.world.barrier()
            self._commit()
        return self.dir / f"step-{step:09d}"

    def _write_files(self, pending: _Pending, payload: dict[str, Any]) -> None:
        try:
            for name, obj in payload.items():
                pending.files[name] = _save_checksummed(obj, pending.tmp / name)
        except BaseException as exc:  # reported on the training thread at commit time
            pending.error = exc

    def _commit(self) -> None:
        """Gather every rank's file checksums; rank 0 writes the manifest and renames the directory into place."""
        pending, self.pending = self.pending, None
        assert pending is not None
        pending.thread.join()
        errors = self.world.comm.allgather(repr(pending.error) if pending.error else None)
        files = self.world.comm.allgather(pending.files)
        if any(errors):
            bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
            self._failed(pending, "; ".join(bad))
            return
        if not self.world.is_main:
            return
        manifest = {**pending.meta, "files": {k: v for f in files for k, v in f.items()}, "ranks": self.world.size,
                    "run_id": self.run_id, "config_hash": self.config_hash, "config": self.config,
                    "versions": versions(), "time": time.time()}  # fmt: skip
        final = self.dir / f"step-{pending.step:09d}"
        try:
            atomic_write_text(pending.tmp / "manifest.json", json.dumps(manifest, indent=2, default=float))
            if final.exists():
                shutil.rmtree(final)
            os.replace(pending.tmp, final)
        except OSError as exc:  # a full disk fails the manifest too: training goes on without this checkpoint
            self._failed(pending, f"rank 0: {exc!r}")
            return
        self._retain()

    def _failed(self, pending: _Pending, why: str) -> None:
        """A checkpoint that could not be written: say so, and free what it left on the disk."""
        if self.world.is_main:
            shutil.rmtree(pending.tmp, ignore_errors=True)
            warnings.warn(f"checkpoint at step {pending.step} was not written ({why}); the previous checkpoint is "
                          "still valid", stacklevel=3)  # fmt: skip

    def wait(self) -> None:
        """Finish and commit any background write (collective)."""
        if self.pending is not None:
            self._commit()

    def _retain(self) -> None:
        """Delete this run's old checkpoints beyond ``keep``, sparing the best one by ``keep_best``; never another
        run's (they were moved aside at the start, but a directory may be shared by mistake)."""
        found = [p for p in self.list() if _manifest(p).get("run_id") in self._mine]
        spare = {found[-1]} if found else set()
        spare.update(found[-self.keep :] if self.keep > 0 else [])
        if self.keep_best:
            scored = [
                (m.get("metrics", {}).get(self.keep_best), p) for p, m in ((p, _manifest(p)) for p in found)
            ]
            scored = [(v, p) for v, p in scored if isinstance(v, (int, float))]
            if scored:
                pick = min if self.best_mode == "min" else max
                spare.add(pick(scored, key=lambda vp: vp[0])[1])
        doomed = []
        for path in found:  # an instant rename takes a path out of list(); the slow unlinking goes on behind
            if path not in spare:
                trash = path.with_name(f".trash-{path.name}")
                os.replace(path, trash)
                doomed.append(trash)
        doomed += [p for p in self.dir.glob(".trash-*") if p not in doomed]  # left by a killed run
        if doomed:
            threading.Thread(target=_remove_all, args=(doomed,), daemon=True, name="caldera-retain").start()

    # -- reading --------------------------------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Committed checkpoint directories, oldest first."""
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and _NAME.match(p.name))

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; a corrupt one is reported with a warning and skipped."""
        for path in reversed(self.list()):
            problem = verify(path)
            if problem is None:
                return path
            self._warn_unusable(path, problem)
        return None

    def _warn_unusable(self, path: Path, problem: str) -> None:
        if self.world.is_main:
            warnings.warn(f"checkpoint {path} is unusable ({problem}); trying the previous one", stacklevel=3)

    def load(
        self, path: str | Path | None = None, validate=None
    ) -> tuple[dict[str, Any], dict[str, Any] | None, Path]:
        """Load (shared state, this rank's state or None if the rank count changed, path) of the newest checkpoint
        that verifies and loads on every rank (or of ``path``); collective. ``validate(shared, local)`` may name
        a problem (a string) that makes a checkpoint unusable, like a failed load. A checkpoint written under
        another config is refused (CheckpointError naming the keys) unless ``force``."""
        candidates = [Path(path)] if path is not None else list(reversed(self.list()))
        problems = []
        for where in candidates:
            problem, shared, local = self._try_load(where, validate)
            # Every rank must take the same checkpoint: one rank's unreadable file rules it out for all.
            everyone = self.world.comm.allgather(problem)
            problem = next((f"{p} (rank {r})" if self.world.size > 1 else p
                            for r, p in enumerate(everyone) if p), None)  # fmt: skip
            if problem is None:
                manifest = _manifest(where)
                self._check_config(where, manifest)
                own = manifest.get("run_id")
                if own is not None:
                    self._adopt(own)
                else:  # written before runs had ids: continued as this run, and retained as one of ours
                    self._adopt(self.run_id or self._new_id())
                    self._mine.add(None)
                self.last_step = int(manifest.get("step", 0))
                return shared, local, where
            problems.append(f"{where.name}: {problem}")
            if path is None:
                self._warn_unusable(where, problem)
        if path is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
        tried = f" ({'; '.join(problems)})" if problems else ""
        raise CheckpointError(f"no usable checkpoint in {self.dir}{tried}; start without --resume")

    def _try_load(self, where: Path, validate) -> tuple[str | None, Any, Any]:
        """(problem or None, shared, local) of one checkpoint on this rank; never raises."""
        problem = verify(where)
        if problem is not None:
            return problem, None, None
        try:
            shared = _load_file(where / "shared.pt")
            local_file = where / f"rank-{self.world.rank:05d}.pt"
            local = None
            if _manifest(where).get("ranks") == self.world.size and local_file.exists():
                local = _load_file(local_file)
            if not isinstance(shared, dict) or not (local is None or isinstance(local, dict)):
                return "its files do not hold a checkpoint's dictionaries", None, None
            layout = shared.get("sharded_layout")
            # Every rank reassembles the whole sharded state: it reads every shard's file.
            if layout is not None:
                parts = []
                for name in layout["files"]:
                    own = local is not None and where / name == local_file
                    # Memory-mapped: a strategy that keeps only its part reads just that part's pages (tensor).
                    part = local if own else _load_file(where / name, mmap=True)
                    if not isinstance(part, dict) or not isinstance(part.get("sharded"), dict):
                        return f"{name} holds no shard of the optimizer state", None, None
                    parts.append(part["sharded"])
                shared["sharded_parts"] = parts
            problem = validate(shared, local) if validate is not None else None
        except Exception as exc:  # any failure to read it makes it unusable, never the end of the run
            return _why(exc), None, None
        return problem, shared, local

    def _check_config(self, where: Path, manifest: dict[str, Any]) -> None:
        """Refuse a checkpoint written under another config (keys outside ``may_change``), unless ``force``."""
        if self.config is None or self.force:
            return
        theirs = manifest.get("config")
        if not isinstance(theirs, dict):
            if manifest.get("config_hash") in (None, self.config_hash):
                return
            differ = ["(not recorded: the checkpoint's config hash differs)"]
        else:
            mine, old = flatten(self.config), flatten(theirs)
            differ = sorted(k for k in mine.keys() | old.keys()
                            if mine.get(k) != old.get(k) and not _may_change(k, self.may_change))  # fmt: skip
            differ = [f"{k} ({old.get(k, 'unset')!r} -> {mine.get(k, 'unset')!r})" for k in differ]
        if differ:
            raise CheckpointError(
                f"checkpoint {where} was written under a different config: {', '.join(differ[:8])}"
                f"{' ...' if len(differ) > 8 else ''}; resume with the run file that wrote it, use a new run "
                "directory, or pass --resume --force to continue anyway"
            )


def _why(exc: BaseException) -> str:
    """One line for an exception that made a checkpoint unusable."""
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        return f"it holds something other than tensors and plain values{what}, refused unloaded"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"it does not load: {type(exc).__name__}: {text}"[:300]


def _numpy_globals() -> list[Any]:
    """What unpickling a NumPy array or scalar of a numeric dtype calls: constructors that only take a dtype,
    a shape and bytes, so allowing them lets strategies keep NumPy state without letting a file run code."""
    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed np.core
    kinds = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64, np.complex64, np.complex128]  # fmt: skip
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            *{type(np.dtype(k)) for k in kinds}]  # fmt: skip


_SAFE_NUMPY = _numpy_globals()


def _load_file(file: Path, mmap: bool = False) -> Any:
    """``torch.load`` that never runs code from the file (tensors, plain Python values, numeric NumPy arrays),
    checked against the archive's CRCs; a damaged file raises. ``mmap``: tensors stay in the file's pages."""
    with torch.serialization.safe_globals(_SAFE_NUMPY):
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    problem = _storages_problem(obj, file)
    if problem:
        raise CheckpointError(problem)
    return obj


def _may_change(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def _remove_all(paths: list[Path]) -> None:
    """Delete retired checkpoints (a background thread: unlinking gigabytes takes a while)."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _flushing(fd: int, every_s: float = 0.01) -> Iterator[None]:
    """Push written pages to the disk while the writer is still serialising.

    A single fsync at the end makes the disk wait for the serialiser and then the serialiser wait for the disk;
    flushing every few milliseconds from a helper thread overlaps the two (measured: 90 -> 69 ms per 100 MB,
    the speed of a kernel file copy)."""
    stop, sync = threading.Event(), getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync

    def flush() -> None:
        while not stop.wait(every_s):
            sync(fd)

    thread = threading.Thread(target=flush, daemon=True, name="caldera-flush")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _save_checksummed(obj: Any, path: Path) -> dict[str, int]:
    """``torch.save`` to ``path`` (temporary name, fsync, rename); return the file's size.

    torch's format is a zip archive whose every record already carries a CRC-32 computed while writing, so a
    second checksum pass would only slow the write: ``verify`` checks those CRCs instead. They catch the torn
    and flipped bytes of a crashed write or a failing disk; they are not meant to resist tampering.
    """
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        with _flushing(f.fileno()):
            torch.save(obj, f)
            f.flush()
        os.fsync(f.fileno())
    size = partial.stat().st_size
    os.replace(partial, path)
    return {"bytes": size}


def _zip_problem(file: Path) -> str | None:
    """Return what is wrong with a torch.save archive (unreadable, or a record failing its CRC), or None."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
            # torch writes plain stored records; torch's own zip reader (miniz) reads a record marked as a
            # directory or encrypted differently from Python's (a flipped attribute bit once gave uninitialised
            # memory as tensor data while every CRC passed here).
            odd = [i.filename for i in archive.infolist()
                   if i.is_dir() or i.external_attr & 0x10 or i.flag_bits & 0x1 or i.compress_type != 0]  # fmt: skip
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        return f"{file.name} is not a readable archive ({exc})"
    if bad:
        return f"{file.name} fails its checksum in record {bad} (corrupted on disk)"
    return f"{file.name} has damaged record headers ({odd[0]})" if odd else None


def _record_crcs(file: Path) -> set[tuple[int, int]]:
    """(size, CRC-32) of every tensor record of a torch.save archive, as its central directory records them."""
    with zipfile.ZipFile(file) as archive:
        return {(i.file_size, i.CRC) for i in archive.infolist() if "/data/" in i.filename}


def _storages_problem(obj: Any, file: Path) -> str | None:
    """Check that every tensor ``torch.load`` returned holds bytes the archive recorded (size and CRC-32): the
    last word on a damaged file is what torch actually read, whichever way its reader went."""
    recorded, seen = _record_crcs(file), set()
    for t in _tensors(obj):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.device.type != "cpu":
            continue
        seen.add(storage.data_ptr())
        raw = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        if (storage.nbytes(), zlib.crc32(raw)) not in recorded:
            return f"{file.name}: a tensor's bytes are not the recorded ones (damaged archive)"
    return None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def verify(path: str | Path) -> str | None:
    """Return None if the checkpoint at ``path`` is complete and intact, else what is wrong with it (never raises:
    a damaged file can make the zip reader fail in many ways, each of which means "unusable")."""
    try:
        return _verify(Path(path))
    except Exception as exc:
        return f"it cannot be checked: {type(exc).__name__}: {exc}"[:300]


def _verify(path: Path) -> str | None:
    manifest = _manifest(path)
    if not manifest:
        return "manifest.json missing or unreadable (the write was interrupted)"
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {info['bytes']}"
        problem = _zip_problem(file)
        if problem:
            return problem
    if "shared.pt" not in manifest.get("files", {}):
        return "shared.pt is not listed in the manifest"
    return None
