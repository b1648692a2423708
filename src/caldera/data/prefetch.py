"""Background prefetch and input-stall statistics: the model should never wait for data.

``Prefetcher`` runs a batch-loading function (read + decode + transform) in background threads or processes and
yields the results in order, several batches ahead of the model. Processes start with ``forkserver`` once MPI is
up (forking an MPI process breaks MPI in the child). On CUDA, batches come back in pinned memory and
``to_device`` copies the next batch on a side stream while the model computes on the current one.

``InputMeter`` measures how long the training loop waits for each batch; ``input_advice`` turns an input-bound
run into one sentence naming the setting to change.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from caldera.data.formats import DataError

BACKENDS = ("thread", "process")


def available_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_context() -> str | None:
    """Return the multiprocessing start method for workers: forkserver once MPI is loaded, else the default."""
    return "forkserver" if "mpi4py.MPI" in sys.modules else None


def to_tensors(batch: Any, pin: bool = False) -> Any:
    """Turn the NumPy arrays in a (nested) batch into torch tensors, pinned when ``pin``."""
    if isinstance(batch, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(batch))
        return t.pin_memory() if pin else t
    if torch.is_tensor(batch):
        return batch.pin_memory() if pin and not batch.is_pinned() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_tensors(b, pin) for b in batch)
    if isinstance(batch, dict):
        return {k: to_tensors(v, pin) for k, v in batch.items()}
    return batch


class _Apply(torch.utils.data.Dataset):
    """A map-style dataset whose "index" is a job: worker processes call ``load(job)``."""

    def __init__(self, load: Callable[[Any], Any]) -> None:
        self.load = load

    def __getitem__(self, job: Any) -> Any:
        try:
            return to_tensors(self.load(job))
        except DataError as exc:
            # Raised here, it would reach the trainer re-built by torch around the worker's whole traceback
            # ("Caught DataError in DataLoader worker ..."): pass the one-line message back as a value instead.
            return _Failed(str(exc))


@dataclass
class _Failed:
    """A worker process's DataError, carried back as a batch so the consumer re-raises it with its own words."""

    message: str


class _Jobs(torch.utils.data.Sampler):
    """The jobs of the current epoch; replaced per epoch while persistent workers stay up."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


def _one_thread(_: int) -> None:
    # Each worker is one of many processes on the node: intra-op threads would oversubscribe the cores.
    torch.set_num_threads(1)


class Prefetcher:
    """Yield ``load(job)`` for each job, in order, computed ahead by ``workers`` threads or processes."""

    def __init__(
        self,
        load: Callable[[Any], Any],
        workers: int = 2,
        backend: str = "thread",
        depth: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown prefetch backend {backend!r}; use 'thread' or 'process'")
        self.load, self.workers, self.backend = load, workers, backend
        self.depth = depth or max(2, 2 * workers)
        self.pin_memory = pin_memory
        self._pool: ThreadPoolExecutor | None = None
        self._loader: torch.utils.data.DataLoader | None = None
        self._jobs = _Jobs()

    def __call__(self, jobs: Sequence[Any]) -> Iterator[Any]:
        """Return an iterator over the loaded batches of ``jobs``."""
        if self.workers == 0:
            return (to_tensors(self.load(job), self.pin_memory) for job in jobs)
        if self.backend == "thread":
            return self._threaded(jobs)
        return self._processes(jobs)

    def _load_pinned(self, job: Any) -> Any:
        return to_tensors(self.load(job), self.pin_memory)

    def _threaded(self, jobs: Sequence[Any]) -> Iterator[Any]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="caldera-prefetch")
        todo = iter(jobs)
        pending: deque[Future] = deque(
            self._pool.submit(self._load_pinned, j) for _, j in zip(range(self.depth), todo)
        )
        try:
            while pending:
                future = pending.popleft()
                job = next(todo, _END)
                if job is not _END:  # keep ``depth`` batches in flight while the consumer works
                    pending.append(self._pool.submit(self._load_pinned, job))
                yield future.result()
        finally:
            for future in pending:
                future.cancel()

    def _processes(self, jobs: Sequence[Any]) -> Iterator[Any]:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _Apply(self.load), batch_size=None, sampler=self._jobs, num_workers=self.workers,
                multiprocessing_context=worker_context(), pin_memory=self.pin_memory,
                prefetch_factor=max(1, -(-self.depth // self.workers)), persistent_workers=True,
                worker_init_fn=_one_thread,
            )  # fmt: skip
        self._jobs.jobs = list(jobs)
        try:
            for batch in self._loader:
                if isinstance(batch, _Failed):
                    raise DataError(batch.message)
                yield batch
        except GeneratorExit:
            raise
        except BaseException:
            # A failed worker leaves the pool unusable; left to the garbage collector, each worker process
            # would take seconds to time out.
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers (a later call starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._loader is not None:
            iterator = getattr(self._loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            self._loader = None


_END = object()


def _move(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_move(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: _move(v, device, non_blocking) for k, v in batch.items()}
    return batch


def _tensors(batch: Any) -> list[torch.Tensor]:
    if torch.is_tensor(batch):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [t for b in batch for t in _tensors(b)]
    if isinstance(batch, dict):
        return [t for b in batch.values() for t in _tensors(b)]
    return []


def to_device(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Move batches to ``device``; on CUDA, copy the next batch on a side stream while this one is used."""
    if device.type != "cuda":
        for batch in batches:
            yield _move(batch, device, non_blocking=False)
        return
    stream = torch.cuda.Stream(device)
    ahead: tuple[Any, torch.cuda.Event] | None = None
    for batch in batches:
        with torch.cuda.stream(stream):
            moved = _move(batch, device, non_blocking=True)  # asynchronous from pinned memory
            copied = torch.cuda.Event()
            copied.record(stream)
        if ahead is not None:
            yield _ready(*ahead)
        ahead = (moved, copied)
    if ahead is not None:
        yield _ready(*ahead)


def _ready(batch: Any, copied: torch.cuda.Event) -> Any:
    current = torch.cuda.current_stream()
    current.wait_event(copied)
    for t in _tensors(batch):
        t.record_stream(current)  # the copy stream's allocation is now used by the compute stream
    return batch


@dataclass
class InputStats:
    """How long the training loop waited for data: the first batch (pipeline start) apart from the rest."""

    steps: int = 0
    first_wait_s: float = 0.0
    wait_s: float = 0.0
    total_s: float = 0.0

    @property
    def wait_fraction(self) -> float:
        """Return the fraction of step time after the first batch spent waiting for the next batch."""
        return self.wait_s / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        """Return the numbers and the wait fraction, for a run log."""
        return {**asdict(self), "wait_fraction": self.wait_fraction}


class InputMeter:
    """Wrap a batch iterator and time every wait for the next batch."""

    def __init__(self) -> None:
        self.stats = InputStats()

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches of ``batches``, timing each ``next``; ``stats`` is complete when it ends."""
        self.stats = stats = InputStats()
        source = iter(batches)
        started = None
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(source)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                if started is None:
                    started, stats.first_wait_s = t1, t1 - t0
                else:
                    stats.wait_s += t1 - t0
                stats.steps += 1
                yield batch
        finally:
            if started is not None:
                stats.total_s = time.perf_counter() - started if stats.steps else 0.0


def input_advice(
    stats: InputStats,
    threshold: float = 0.05,
    num_workers: int | None = None,
    backend: str | None = None,
    chunk_records: int | None = None,
    cpu_count: int | None = None,
    ranks_per_node: int = 1,
) -> str | None:
    """Return a warning naming what to change when more than ``threshold`` of step time waited for data."""
    if stats.steps < 2 or stats.wait_fraction <= threshold:
        return None
    cores = max(1, (cpu_count or available_cores()) // max(1, ranks_per_node))  # this rank's share
    fixes = [] if num_workers is None else [_workers_fix(num_workers, cores)]
    if backend == "thread" and num_workers:
        fixes.append(
            'set [data] args.backend = "process" if the transform is Python-heavy (threads share a GIL)'
        )
    if chunk_records is not None and chunk_records < 8:
        fixes.append(f"the file stores {chunk_records} record(s) per chunk along the sample axis: rewrite it "
                     "with chunks of 16-64 records (h5repack -l VAR:CHUNK=..., or rechunk the Zarr store) so "
                     "one read serves many samples")  # fmt: skip
    fixes.append("a larger [data] batch_size amortises the per-batch cost")
    per_step = 1e3 * stats.wait_s / (stats.steps - 1)
    return (
        f"input-bound: {100 * stats.wait_fraction:.0f} % of step time was spent waiting for data "
        f"({per_step:.1f} ms a step over {stats.steps} steps). To fix: " + "; ".join(fixes) + "."
    )


def _workers_fix(num_workers: int, cores: int) -> str:
    if num_workers == 0:
        return "set [data] num_workers to 2 or more so batches are read and transformed in the background"
    if num_workers < cores - 1:
        return f"raise [data] num_workers (now {num_workers}; each rank has {cores} cores of this node)"
    return (
        f"[data] num_workers = {num_workers} already fills this rank's {cores} core(s): make the transform "
        "cheaper, move it onto the device, or spread the run over more nodes"
    )
