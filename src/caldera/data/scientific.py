"""Scientific files as a training source: variables of an HDF5/NetCDF/Zarr/.npy file become (input, target) batches.

A run file says::

    [data]
    source = "caldera.data.scientific:dataset"
    num_workers = 2
    args = { path = "fields.h5", inputs = ["T0", "k"], targets = ["T"], normalize = true }

Fields (records of shape ``(H, W)`` or ``(C, H, W)``) are stacked as channels; ``window`` stacks consecutive
records (time steps) as channels too, and the target is the record ``lead`` steps after the window's last one;
``patch`` cuts every record into tiles. Batches are read whole (sorted, one span per chunk), normalised with
statistics computed once in parallel and kept in the run directory, transformed in background workers, and fed
to the device while the model computes on the previous batch.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.comm.base import Communicator
from caldera.data.formats import ArrayReader, DataError, open_reader
from caldera.data.normalize import STATS_FILE, VarStats, load_or_compute
from caldera.data.prefetch import BACKENDS, InputMeter, InputStats, Prefetcher, input_advice, to_device
from caldera.data.shuffle import ChunkShuffleSampler
from caldera.refs import resolve

Transform = Callable[..., tuple[Any, Any]]


class BatchReads(torch.utils.data.Dataset):
    """A dataset whose ``read_batch(indices)`` returns whole (inputs, targets) arrays; single items and DataLoader
    batches are cut from it."""

    def read_batch(self, indices: Any) -> tuple[Any, Any]:
        """Inputs and targets of the samples ``indices``."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.read_batch([i])
        return torch.as_tensor(x[0]), torch.as_tensor(y[0])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Read a DataLoader batch in one go (torch calls this instead of one ``__getitem__`` per sample)."""
        x, y = (torch.as_tensor(a) for a in self.read_batch(indices))
        return list(zip(x, y))


class ScientificDataset(BatchReads):
    """Samples (windows x patches) over a range of records of one file; reads whole batches at once."""

    def __init__(
        self,
        reader: ArrayReader,
        inputs: Sequence[str],
        targets: Sequence[str] = (),
        records: tuple[int, int] | None = None,
        window: int = 1,
        lead: int = 0,
        stride: int = 1,
        patch: Sequence[int] | None = None,
        patch_stride: Sequence[int] | None = None,
        stats: dict[str, VarStats] | None = None,
        transform: Transform | None = None,
        spatial_dims: int = 2,
        backend: str = "thread",
        buffer: int | None = None,
        missing: str | float = "error",
    ) -> None:
        if not inputs:
            raise DataError(
                f"no input variables chosen for {reader.path}; available: {', '.join(reader.variables)}"
            )
        if window < 1 or stride < 1 or lead < 0:
            raise DataError(
                f"window={window}, stride={stride}, lead={lead}: window and stride must be >= 1, lead >= 0"
            )
        if backend not in BACKENDS:
            raise DataError(f"backend = {backend!r}: use 'thread' or 'process'")
        self.reader, self.inputs, self.targets = reader, list(inputs), list(targets)
        self.window, self.lead, self.stride, self.spatial_dims = window, lead, stride, spatial_dims
        self.stats = stats or {}
        self.transform, self.backend, self.buffer = transform, backend, buffer
        self.missing = _missing_policy(missing)
        self._wants_rng = transform is not None and "rng" in inspect.signature(transform).parameters
        start, stop = records or (0, len(reader))
        self.records = (start, stop)
        self.starts = np.arange(start, stop - window - lead + 1, stride)
        if self.starts.size == 0:
            raise DataError(
                f"records {start}..{stop} of {reader.path} are too few for window={window} and lead={lead}; "
                "use a shorter window or more records"
            )
        self.kinds = {v: _kind(reader, v, spatial_dims) for v in dict.fromkeys(self.inputs + self.targets)}
        self.corners = self._patch_grid(patch, patch_stride)
        self.patch = tuple(patch) if patch else None
        self._cache: dict[tuple, ScientificBatches] = {}

    # -- geometry -------------------------------------------------------------------------------------------------
    def _patch_grid(
        self, patch: Sequence[int] | None, patch_stride: Sequence[int] | None
    ) -> list[tuple[int, ...]]:
        fields = {
            v: self.reader.shape(v)[-self.spatial_dims :] for v, k in self.kinds.items() if k != "value"
        }
        if len(set(fields.values())) > 1:
            listing = ", ".join(f"{v!r} {s}" for v, s in fields.items())
            raise DataError(
                f"the fields of {self.reader.path} differ in their grid: {listing}; choose fields on one grid"
            )
        if not patch:
            return [()]
        if not fields:
            raise DataError(
                f"patch={list(patch)} needs field variables; the chosen variables of {self.reader.path} are not fields"
            )
        grid = next(iter(fields.values()))
        patch_stride = patch_stride or patch
        if len(patch) != self.spatial_dims or any(p > g for p, g in zip(patch, grid)):
            raise DataError(
                f"patch={list(patch)} does not fit the {self.spatial_dims}-D grid {grid} of {self.reader.path}"
            )
        return list(
            itertools.product(*(range(0, g - p + 1, s) for g, p, s in zip(grid, patch, patch_stride)))
        )

    def __len__(self) -> int:
        return len(self.starts) * len(self.corners)

    @property
    def chunk_samples(self) -> int:
        """Return how many consecutive samples one storage chunk serves (the shuffle's unit)."""
        return max(1, self.reader.chunk_records // self.stride) * len(self.corners)

    # -- reading --------------------------------------------------------------------------------------------------
    def read_batch(self, indices: Any, rng: np.random.Generator | None = None) -> tuple[Any, Any]:
        """Return inputs and targets of the samples ``indices``, normalised and transformed."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        first = self.starts[idx // len(self.corners)]
        in_recs = first[:, None] + np.arange(self.window)
        out_recs = first + self.window - 1 + self.lead
        recs = np.unique(np.concatenate([in_recs.reshape(-1), out_recs]))
        data = self.reader.read(recs, list(self.kinds))
        corner = idx % len(self.corners)
        x = self._assemble(self.inputs, data, np.searchsorted(recs, in_recs), corner, recs=recs)
        if self.targets:
            y = self._assemble(
                self.targets, data, np.searchsorted(recs, out_recs)[:, None], corner, target=True, recs=recs
            )
        else:
            y = x  # no targets: an autoencoder learns its input
        if self.transform is None:
            return x, y
        if self._wants_rng:
            x, y = self.transform(x, y, rng=rng if rng is not None else np.random.default_rng())
        else:
            x, y = self.transform(x, y)
        # A transform may fill or mask missing values: what it hands on must be finite (checked when asked to).
        for name, out in (("inputs", x), ("targets", y)) if self.missing == "error" else ():
            if isinstance(out, np.ndarray) and out.dtype.kind == "f" and len(out) == len(first):
                bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
                self._check_finite(out, f"the transform's {name}", first[bad], transformed=True)
        return x, y

    def _assemble(
        self,
        names: list[str],
        data: dict[str, np.ndarray],
        rows: np.ndarray,
        corner: np.ndarray,
        target: bool = False,
        recs: np.ndarray | None = None,
    ) -> np.ndarray:
        parts = []
        for v in names:
            a = data[v][rows]  # (batch, window, *record)
            if v in self.stats:
                a = self.stats[v].apply(a)
            elif not (target and a.dtype.kind in "iub"):
                a = a.astype(np.float32, copy=False)
            # Filling, or naming missing values here (with a transform, its output is checked instead).
            fill, check = isinstance(self.missing, float), self.transform is None and recs is not None
            if a.dtype.kind == "f" and self.missing != "keep" and (fill or check):
                finite = np.isfinite(a)  # one pass over the batch, next to the normalisation's
                if isinstance(self.missing, float) and not finite.all():
                    a = np.where(finite, a, a.dtype.type(self.missing))
                elif self.transform is None and recs is not None:
                    bad = ~finite.reshape(*rows.shape, -1).all(axis=-1)  # per (sample, window record)
                    self._check_finite(a, f"variable {v!r}", recs[rows[bad]])
            # Values flatten to features; fields keep their grid and fold window and channels together.
            grid = () if self.kinds[v] == "value" else a.shape[a.ndim - self.spatial_dims :]
            parts.append(a.reshape(len(a), -1, *grid) if grid else a.reshape(len(a), -1))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        if target and all(self.kinds[v] == "value" for v in names) and out.shape[1] == 1:
            out = out[:, 0]  # one scalar target: labels (batch,) as losses expect
        if self.patch and out.ndim > 2:
            out = self._crop(out, corner)
        if target and out.dtype.kind in "iub":
            out = out.astype(np.int64)
        return np.ascontiguousarray(out)

    def _check_finite(
        self, a: np.ndarray, what: str, bad_records: np.ndarray, transformed: bool = False
    ) -> None:
        """Raise a DataError naming ``what`` and the records when ``a`` holds NaN or Inf (missing = 'error')."""
        if self.missing != "error" or bad_records.size == 0:
            return
        count = int(a.size - np.isfinite(a).sum())
        where = np.unique(bad_records)
        shown = ", ".join(str(r) for r in where[:5]) + (" ..." if where.size > 5 else "")
        if transformed:
            raise DataError(
                f"{what} for {self.reader.path} hold {count} NaN/Inf values (samples starting at records "
                f"{shown}); fill or mask them in the transform"
            )
        raise DataError(
            f"{what} in {self.reader.path} holds {count} NaN/Inf values in records {shown}; {_MISSING_FIX}"
        )

    def denormalize(self, y: np.ndarray) -> np.ndarray:
        """Targets, or a model's predictions of them, back in physical units (the inverse of the normalisation)."""
        if not any(v in self.stats for v in self.targets):
            return y
        sizes = [self._channels(v) for v in self.targets]
        flat = y[:, None] if y.ndim == 1 else y
        if flat.shape[1] != sum(sizes):
            raise DataError(
                f"predictions with {flat.shape[1]} channels cannot be mapped back onto the targets {self.targets} "
                f"({sum(sizes)} channels)"
            )
        out = flat.astype(np.float32, copy=True)
        start = 0
        for v, k in zip(self.targets, sizes):
            if v in self.stats:
                st = self.stats[v]
                out[:, start : start + k] = (
                    out[:, start : start + k] * (st.std if st.std > 0 else 1.0) + st.mean
                )
            start += k
        return out[:, 0] if y.ndim == 1 else out

    def target_records(self) -> np.ndarray:
        """For each sample, the record (index along the file's first axis) its target comes from."""
        first = self.starts[np.arange(len(self)) // len(self.corners)]
        return first + self.window - 1 + self.lead

    def target_layout(self) -> list[tuple[str, int, str]]:
        """Each target variable with its channel count and kind ('field', 'channels' or 'value'), in the order
        they are stacked along axis 1 of a target batch."""
        return [(v, self._channels(v), self.kinds[v]) for v in self.targets]

    def input_layout(self) -> list[tuple[str, int, str]]:
        """Each input variable with its channel count (its window of records stacked) and kind, in the order they
        are stacked along axis 1 of an input batch."""
        return [(v, self.window * self._channels(v), self.kinds[v]) for v in self.inputs]

    def physical(self) -> ScientificDataset:
        """The same samples without the normalisation: inputs and targets in the file's units (an exported model
        takes and returns those)."""
        twin = copy.copy(self)
        twin.stats, twin._cache = {}, {}  # its own batch pipelines: the original's read normalised values
        return twin

    def _channels(self, v: str) -> int:
        """How many channels (axis 1 of a target batch) variable ``v`` takes."""
        shape = self.reader.shape(v)
        if self.kinds[v] == "field":
            return 1
        return shape[0] if self.kinds[v] == "channels" else int(np.prod(shape, dtype=np.int64))

    def _crop(self, fields: np.ndarray, corner: np.ndarray) -> np.ndarray:
        out = np.empty((*fields.shape[:2], *self.patch), dtype=fields.dtype)
        for c in np.unique(corner):
            sel = corner == c
            window = tuple(slice(o, o + p) for o, p in zip(self.corners[c], self.patch))
            out[sel] = fields[sel][(Ellipsis, *window)]
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}  # worker processes get the data description, not the running pipelines
        return state

    def close(self) -> None:
        """Stop the background workers of every batch pipeline made from this dataset."""
        for batches in self._cache.values():
            batches.close()

    # -- batches --------------------------------------------------------------------------------------------------
    def batches(
        self,
        global_batch: int,
        rank: int = 0,
        size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        device: torch.device | None = None,
        evaluation: bool = False,
    ) -> ScientificBatches:
        """Return this rank's batch iterator (same arguments as ``ShardedBatches``; reused while unchanged)."""
        key = (
            global_batch,
            rank,
            size,
            shuffle,
            seed,
            drop_last and not evaluation,
            num_workers,
            str(device),
        )
        if key not in self._cache:
            sampler = ChunkShuffleSampler(len(self), global_batch, rank, size, chunk=self.chunk_samples,
                                          buffer=self.buffer, shuffle=shuffle, seed=seed,
                                          drop_last=drop_last and not evaluation)  # fmt: skip
            self._cache[key] = ScientificBatches(self, sampler, num_workers, device or torch.device("cpu"))
        return self._cache[key]


_MISSING_FIX = (
    "fix the file, or set [data] args.missing = 0.0 (replaces them by 0, the mean when normalised) or 'keep' "
    "(a transform handles them)"
)


def _missing_policy(missing: str | float) -> str | float:
    """Check ``missing``: 'error', 'keep' or a finite fill value (returned as a float)."""
    if isinstance(missing, str) and missing in ("error", "keep"):
        return missing
    if isinstance(missing, (int, float)) and not isinstance(missing, bool) and np.isfinite(missing):
        return float(missing)
    raise DataError(f"missing = {missing!r}: use 'error', 'keep' or a finite number to put in their place")


def _kind(reader: ArrayReader, var: str, spatial_dims: int) -> str:
    """Classify a variable by its record shape: a field (grid), a field with channels, or a value (scalar/vector)."""
    ndim = len(reader.shape(var))
    if ndim == spatial_dims:
        return "field"
    if ndim == spatial_dims + 1:
        return "channels"
    if ndim < spatial_dims:
        return "value"
    raise DataError(
        f"variable {var!r} in {reader.path} has records of shape {reader.shape(var)}: more axes than channels + "
        f"{spatial_dims}-D grid; set spatial_dims or select fewer axes"
    )


def _load_job(dataset: ScientificDataset, seed: int, rank: int, job: tuple[int, int, np.ndarray]) -> tuple:
    epoch, step, idx = job
    # Random transforms draw from a generator fixed by (seed, epoch, step, rank): reruns repeat bit for bit.
    return dataset.read_batch(idx, np.random.default_rng([seed, epoch, step, rank]))


class ScientificBatches:
    """Yield this rank's ``(batch, n_local, n_global)`` per step, prefetched; resumable; timed."""

    def __init__(
        self, dataset: ScientificDataset, sampler: ChunkShuffleSampler, num_workers: int, device: torch.device
    ) -> None:
        self.dataset, self.sampler, self.num_workers, self.device = dataset, sampler, num_workers, device
        load = functools.partial(_load_job, dataset, sampler.seed, sampler.rank)
        self.prefetcher = Prefetcher(load, num_workers, dataset.backend, pin_memory=device.type == "cuda")
        self.meter = InputMeter()

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch and the step to start from (as ``ShardedBatches.set_epoch``; resume passes a step)."""
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.sampler)

    def plan(self) -> list[tuple[torch.Tensor, int]]:
        """Return this rank's indices and the global sample count of every step (as ``ShardedBatches.plan``)."""
        return [(torch.from_numpy(idx), n) for _, idx, n in self.sampler.plan()]

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], int, int]]:
        sampler = self.sampler
        steps = sampler.plan(sampler.position)
        jobs = [(sampler.epoch, k, idx) for k, idx, _ in steps]
        loaded = to_device(self.prefetcher(jobs), self.device)
        for (k, idx, n_global), batch in zip(steps, self.meter.wrap(loaded)):
            sampler.position = k + 1  # handed out: a checkpoint from here on resumes after this step
            yield tuple(batch), len(idx), n_global
        sampler.finish_epoch()

    @property
    def stats(self) -> InputStats:
        """Return the input-wait statistics of the latest epoch."""
        return self.meter.stats

    def input_hints(self) -> dict[str, Any]:
        """Return the settings ``input_advice`` bases its suggestions on."""
        return {"num_workers": self.num_workers, "backend": self.dataset.backend,
                "chunk_records": self.dataset.reader.chunk_records}  # fmt: skip

    def advice(self, threshold: float = 0.05) -> str | None:
        """Return what to change if the latest epoch was input-bound, else None."""
        return input_advice(self.stats, threshold, **self.input_hints())

    def state_dict(self) -> dict[str, Any]:
        """Return the position in the data (see ``ChunkShuffleSampler.state_dict``)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position returned by ``state_dict``."""
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Stop the background workers."""
        self.prefetcher.close()


def dataset(
    path: str,
    inputs: Sequence[str],
    targets: Sequence[str] = (),
    format: str = "auto",
    window: int = 1,
    lead: int = 0,
    stride: int = 1,
    patch: Sequence[int] | None = None,
    patch_stride: Sequence[int] | None = None,
    normalize: bool | Sequence[str] = True,
    transform: str | Transform | None = None,
    val_fraction: float = 0.1,
    spatial_dims: int = 2,
    backend: str = "thread",
    buffer: int | None = None,
    run_dir: str | os.PathLike | None = None,
    stats_file: str | os.PathLike | None = None,
    frozen_stats: bool = False,
    options: dict[str, Any] | None = None,
    missing: str | float = "error",
    comm: Communicator | None = None,
) -> dict[str, ScientificDataset | None]:
    """Open a scientific file as ``{"train": ..., "val": ...}``; validation is the last ``val_fraction`` of records.

    ``missing``: what NaN/Inf in the data does: 'error' (a DataError naming the variable, the default), a number
    put in their place after normalisation, or 'keep' (for a transform that fills or masks them). ``comm``: the
    ranks that compute the normalisation statistics together (default this process alone; ``caldera train``
    passes the run's ranks). ``frozen_stats``: normalise with the run's saved statistics whatever file is read
    (predict and export apply a trained model to new files)."""

    inputs, targets = _names(inputs), _names(targets)
    reader = open_reader(path, format, list(dict.fromkeys([*inputs, *targets])), **(options or {}))
    n = len(reader)
    n_train = n - int(n * val_fraction)
    names = _normalized(reader, normalize)
    if stats_file is None and run_dir is not None:
        stats_file = Path(run_dir) / STATS_FILE
    # Statistics come from the training records only, so validation stays unseen.
    stats = load_or_compute(reader, names, stats_file, comm, (0, n_train), frozen_stats) if names else {}
    missing = _missing_policy(missing)
    if missing == "error" and transform is None and not frozen_stats:
        # The statistics pass counted the finite values of the training records: the rest are NaN/Inf, known
        # now at no extra read instead of as a NaN loss steps later. Other values are checked as batches are read.
        for v in names:
            bad = n_train * int(np.prod(reader.shape(v), dtype=np.int64)) - stats[v].count
            if bad:
                raise DataError(
                    f"variable {v!r} in {reader.path} holds {bad} NaN/Inf values in its training records "
                    f"0..{n_train}; {_MISSING_FIX}"
                )
    common = dict(window=window, lead=lead, stride=stride, patch=patch, patch_stride=patch_stride, stats=stats,
                  transform=_transform(transform), spatial_dims=spatial_dims, backend=backend, buffer=buffer,
                  missing=missing)  # fmt: skip
    train = ScientificDataset(reader, inputs, targets, records=(0, n_train), **common)
    val = ScientificDataset(reader, inputs, targets, records=(n_train, n), **common) if n_train < n else None
    return {"train": train, "val": val}


def _names(names: str | Sequence[str]) -> list[str]:
    """Accept one variable name as well as a list (``inputs = "T"`` must not become ["T"] letter by letter)."""
    return [names] if isinstance(names, str) else list(names)


def _normalized(reader: ArrayReader, normalize: bool | Sequence[str]) -> list[str]:
    """Return the variables to normalise: all floating-point ones for True, or the ones named."""
    if normalize is True:
        return [v for v in reader.variables if reader.dtype(v).kind == "f"]
    if not normalize:
        return []
    unknown = [v for v in normalize if v not in reader.variables]
    if unknown:
        raise DataError(
            f"normalize names {unknown}, which are not among the chosen variables {reader.variables}"
        )
    return list(normalize)


def _transform(transform: str | Transform | None) -> Transform | None:
    if transform is None or callable(transform):
        return transform
    return resolve(transform, {}, "[data] args.transform")
