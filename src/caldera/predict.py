"""Batch inference: apply a finished run's model to a dataset on every rank; write the predictions and scores.

``caldera predict RUN_DIR [--split val|train|all] [--set data.args.path=2025.nc] [--out pred.nc|.h5|.npy]`` rebuilds
the run's data pipeline from its resolved config (any key can be overridden: another file, whole images instead
of patches), gives each rank a contiguous block of the samples, runs the model in evaluation mode and reduces the
loss and metrics over the ranks. Predictions keep the dataset's sample order whatever the number of ranks; targets
that training normalised come back in physical units. Several models (``caldera predict RUN_A NAME@2 ...``) are an
ensemble: each batch is read once and fed to every member; the mean is scored and written with the spread (std).
Every rank streams its rows batch by batch into one preallocated file (memory stays a few batches whatever the
data's size); ``.h5`` and ``.nc`` outputs are then copied from it by rank 0 in bounded chunks (no parallel HDF5
build needed); NetCDF keeps the input's time axis, grid coordinates and units. Each appears under its final name
only when complete.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from caldera.config import Config, flatten, load_config
from caldera.data.normalize import STATS_FILE, load_stats
from caldera.data.sampler import as_xy
from caldera.durations import parse_duration
from caldera.errors import ConfigError
from caldera.io import atomic_write_text
from caldera.names import METRICS
from caldera.parallel_infer import GroupModel, load_shard, receive, split_group
from caldera.refs import resolve
from caldera.registry import resolve as resolve_run
from caldera.train.evaluate import Scores
from caldera.train.progress import progress_bar
from caldera.train.rundir import RunDir
from caldera.watchdog import Watchdog, hang_timeout_for
from caldera.world import World, init

SPLITS = ("val", "train", "all")


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    trust_code: bool = False) -> Config:  # fmt: skip
    """The resolved config of a finished run, pointed at ``run_dir`` (its statistics files), with overrides; code
    it names by import path is refused unless ``trust_code`` or given in ``overrides`` (docs/security.md)."""
    return load_config(RunDir(run_dir).read_config([f"run.dir={run_dir}", *overrides], trust_code))


def predict(run_dir: str | Path | Sequence[str | Path], split: str = "val",
            overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None,
            batch_size: int | None = None, score: bool = True, world: World | None = None, progress: bool = True,
            trust_code: bool = False, tp: int | None = None) -> dict[str, float]:  # fmt: skip
    """Predict ``split`` of the run's data on every rank (collective); write ``out``; return the scores.
    ``run_dir`` may be a registry model, ``NAME@VERSION`` (its hashes are checked first), or a list of them: an
    ensemble, whose mean is written and scored and whose spread (standard deviation) is written beside it.
    ``tp``: groups of ``tp`` ranks each hold one model's tensor shards (``caldera.parallel_infer``); each group's
    rank 0 reads the batches, broadcasts them to its group and writes the rows; the groups share the samples."""
    from caldera.precision import make_precision
    from caldera.train.run import build_data, build_loss, load_run_model

    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    suffix = Path(out).suffix if out is not None else ".npy"
    if suffix not in WRITERS:
        raise ConfigError(f"--out {out}: write .npy, .h5 or .nc (got {suffix!r})")
    sources = [str(run_dir)] if isinstance(run_dir, (str, os.PathLike)) else [str(r) for r in run_dir]
    if not sources:
        raise ConfigError("no model to predict with: give a run directory or NAME@VERSION")
    dirs = [resolve_run(s) for s in sources]
    cfgs = [load_run_config(d, overrides, trust_code) for d in dirs]
    same_data_pipeline(sources, dirs, cfgs)
    cfg = cfgs[
        0
    ]  # the members agree on the data: it is read once, with the first member's batch size and loss
    world = world or init(device=cfg.run.device, seed=cfg.run.seed)
    group = watchdog = None
    shard, shards = world.rank, world.size  # this rank's block of the samples, of how many
    if tp is not None:
        if len(dirs) > 1:
            raise ConfigError(
                "--tp: model-parallel prediction takes one model; predict an ensemble without --tp"
            )
        group, shard, shards = split_group(world, tp)
    dataset = _choose(build_data(cfg, world.comm, frozen_stats=True), split)
    for part in getattr(dataset, "datasets", [dataset]):
        if getattr(part, "transform", None) is not None:
            part.transform = None  # augmentation is for training: predictions keep the stored orientation
    if group is None:
        members = [(load_run_model(RunDir(d), c).to(world.device).eval(),
                    make_precision(c.precision.mode, world.device)) for d, c in zip(dirs, cfgs)]  # fmt: skip
    else:
        sharded, shapes, _ = load_shard(dirs[0], cfg, group, world.device)
        timeout = hang_timeout_for(world, parse_duration(cfg.run.hang_timeout))
        watchdog = Watchdog(world, timeout).start() if timeout > 0 else None
        shard_precision = make_precision(cfg.precision.mode, world.device)
        leader = GroupModel(sharded, shapes, group, watchdog, shard_precision.autocast)
        members = [(leader, make_precision("fp32", world.device))]  # autocast: inside, on every rank alike
    leading = group is None or group.rank == 0  # reads the batches, scores and writes them
    score = score and _has_targets(dataset)
    loss_fn = build_loss(cfg) if score else None
    metrics = {m: resolve(m, METRICS, "[train] metrics") for m in cfg.train.metrics} if score else {}
    n = len(dataset)
    lo, hi = n * shard // shards, n * (shard + 1) // shards
    loader = DataLoader(
        Subset(dataset, range(lo, hi) if leading else []), batch_size=batch_size or cfg.data.batch_size
    )
    sums = Scores(loss_fn, metrics)
    ensemble = len(members) > 1

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Each batch read once and fed to every member: the mean and spread in physical units."""
        if not leading:  # a follower: the leader's batches, through this rank's shard
            for pred in receive(sharded, group, watchdog, shard_precision.autocast):
                if pred is not None:
                    yield _physical(dataset, pred.float().cpu().numpy()), None
            return
        for batch in loader:
            # The model takes the sample without its last element (one tensor, or a tuple of several inputs).
            x, y = (_to(t, world.device) for t in as_xy(batch))
            preds = []
            for model, precision in members:
                with precision.autocast():
                    preds.append(model(x).float())
            mean = torch.stack(preds).mean(0) if ensemble else preds[0]
            sums.add(mean, y, len(y))  # the scores are the ensemble mean's
            # Denormalisation is affine per channel: undone member by member, the spread comes out in physical
            # units too.
            phys = np.stack([_physical(dataset, p.cpu().numpy()) for p in preds])
            yield (phys.mean(0), phys.std(0)) if ensemble else (phys[0], None)
        if group is not None:
            leader.stop()

    attrs = {"run_dir": sources[0] if not ensemble else ", ".join(sources), "split": split}
    writer = (
        WRITERS[suffix](Path(out), n, lo, world, ensemble, _describe(dataset)) if out is not None else None
    )
    # Rank 0's block times the ranks: an estimate of all.
    bar = progress_bar(progress and world.is_main, "predicting", transient=True, terminal_only=True)
    start = time.perf_counter()
    with torch.no_grad(), bar:
        stream = batches()
        first = next(stream, None)  # its shape sizes the output file, agreed by all ranks (collective)
        if writer is not None:
            writer.open(first[0].shape[1:] if first is not None else None)
        done = 0
        for mean, std in itertools.chain([first] if first is not None else [], stream):
            if writer is not None and leading:
                writer.write(
                    lo + done, mean, std
                )  # each batch as it comes: a rank holds a few batches at most
            done += len(mean)
            bar.update(advance=len(mean) * shards, total=n)
    seconds = time.perf_counter() - start
    scores = {**sums.reduce(world.comm, f"{split}_"), "samples": n}
    rates = _throughput(world, hi - lo, seconds, counted=leading)
    if watchdog is not None:
        watchdog.stop()
    if group is not None and group is not world.comm:
        group.Free()
    if writer is not None:
        writer.close({**attrs, **scores, **({"models": len(members)} if ensemble else {})})
    if world.is_main:
        print("  ".join(f"{k} {v:.6g}" for k, v in scores.items()), flush=True)
        # On stderr: stdout keeps only the scores, the same from one run to the next.
        print(f"{rates['samples_per_s_per_rank']:.1f} samples/s per rank, {rates['samples_per_s']:.1f} samples/s "
              f"on {world.size} rank{'s' if world.size > 1 else ''}"
              + (f" ({len(members)} models)" if ensemble else ""), file=sys.stderr, flush=True)  # fmt: skip
        if out is not None:
            report = {**scores, **rates, **({"models": len(members)} if ensemble else {})}
            atomic_write_text(Path(out).with_suffix(".json"), json.dumps(report, indent=2))
    if hasattr(dataset, "close"):
        dataset.close()
    return scores


DATA_KEYS = ("source", "args", "val_fraction")  # what decides the samples and their values (not batch size)


def same_data_pipeline(sources: list[str], dirs: list[Path], cfgs: list[Config]) -> None:
    """Refuse an ensemble whose members disagree on the data (resolved [data] or normalisation statistics): one
    ConfigError naming the first difference."""
    first = flatten({k: cfgs[0].data.model_dump()[k] for k in DATA_KEYS}, "data")
    first_stats = _stats(dirs[0])
    for source, d, c in zip(sources[1:], dirs[1:], cfgs[1:]):
        other = flatten({k: c.data.model_dump()[k] for k in DATA_KEYS}, "data")
        for key in sorted(set(first) | set(other)):
            if first.get(key, "(unset)") != other.get(key, "(unset)"):
                raise ConfigError(
                    f"ensemble members read different data: {key} = {first.get(key, '(unset)')!r} in {sources[0]} "
                    f"but {other.get(key, '(unset)')!r} in {source}; an ensemble reads each batch once for every "
                    "member: use members trained on the same data pipeline (or --set it the same for all)"
                )
        stats = _stats(d)
        if stats != first_stats:
            name = next(
                v for v in sorted(set(first_stats) | set(stats)) if first_stats.get(v) != stats.get(v)
            )
            raise ConfigError(
                f"ensemble members normalise differently: {STATS_FILE} of {sources[0]} and {source} differ at "
                f"variable {name!r}; use members trained on the same file and records"
            )


def _stats(run_dir: Path) -> dict[str, Any]:
    """The normalisation statistics a run saved (its variables' values; {} when it normalised nothing)."""
    path = run_dir / STATS_FILE
    return load_stats(path)[0] if path.is_file() else {}


def _throughput(world: World, samples: int, seconds: float, counted: bool = True) -> dict[str, float]:
    """Samples/s: the mean over ranks of each rank's own rate, and the whole job's (all samples / slowest rank);
    ``counted`` False: this rank's samples are its group leader's (model parallel), counted there."""
    per_rank = [(k, s) for k, s, c in world.comm.allgather((samples, seconds, counted)) if c]
    slowest = max(s for _, s in per_rank) or float("inf")
    return {
        "samples_per_s_per_rank": float(np.mean([k / s if s > 0 else 0.0 for k, s in per_rank])),
        "samples_per_s": sum(k for k, _ in per_rank) / slowest,
        "ranks": world.size,
    }


def _choose(data: tuple[Dataset, Dataset | None], split: str) -> Dataset:
    train, val = data
    if split == "train":
        return train
    if split == "val":
        if val is None:
            raise ConfigError(
                "this run has no validation data ([data] val_fraction = 0): use --split train or all"
            )
        return val
    return train if val is None else _Joined([train, val])


class _Joined(torch.utils.data.ConcatDataset):
    """Train then val, read a batch at a time where the parts can (scientific data reads whole batches)."""

    def __getitems__(self, indices: list[int]) -> list[Any]:
        out: list[Any] = [None] * len(indices)
        part = np.searchsorted(self.cumulative_sizes, indices, side="right")
        for p in np.unique(part):
            where = np.nonzero(part == p)[0]
            offset = self.cumulative_sizes[p - 1] if p > 0 else 0
            ds, local = self.datasets[p], [indices[i] - offset for i in where]
            items = ds.__getitems__(local) if hasattr(ds, "__getitems__") else [ds[i] for i in local]
            for i, item in zip(where, items):
                out[i] = item
        return out

    def close(self) -> None:
        """Stop the parts' background readers."""
        for part in self.datasets:
            if hasattr(part, "close"):
                part.close()


def _has_targets(dataset: Dataset) -> bool:
    """False for scientific data opened without targets (a file to predict, with no truth to score against)."""
    parts = getattr(dataset, "datasets", [dataset])
    return getattr(parts[0], "targets", None) != []


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    return batch.to(device) if torch.is_tensor(batch) else batch


def _physical(dataset: Dataset, pred: np.ndarray) -> np.ndarray:
    """Undo the targets' normalisation where training applied one (scientific data)."""
    parts = getattr(dataset, "datasets", [dataset])  # ConcatDataset: the parts share one set of statistics
    undo = getattr(parts[0], "denormalize", None)
    return undo(pred) if undo is not None else pred


# -- writers: every rank streams its rows [lo, hi) of the n predictions, batch by batch ---------------------------
CHUNK_BYTES = 64 << 20  # rows copied at a time from the staged arrays into an .h5/.nc file


def _describe(dataset: Dataset) -> dict[str, Any]:
    """What the writers can say about the samples: target variables, their source records and file."""
    parts = getattr(dataset, "datasets", [dataset])
    first = parts[0]
    if not hasattr(first, "target_layout"):
        return {}
    return {
        "layout": first.target_layout(),
        "records": np.concatenate([p.target_records() for p in parts]),
        "source": first.reader.path if getattr(first.reader, "format", None) == "netcdf" else None,
        "patched": first.patch is not None,
        "spatial_dims": first.spatial_dims,
    }


class _Writer:
    """Stream predictions into preallocated ``.npy`` files that every rank writes its own rows of, a batch at a
    time, with plain positioned writes (no memory map: a rank's memory stays a few batches whatever the file's
    size). ``.npy`` outputs are these files renamed; ``.h5``/``.nc`` are copied from them by rank 0 in bounded
    chunks (no parallel HDF5/NetCDF build needed). Ensembles stage the spread beside the mean."""

    def __init__(self, path: Path, n: int, lo: int, world: World, ensemble: bool, meta: dict) -> None:
        self.path, self.n, self.lo, self.world, self.ensemble, self.meta = path, n, lo, world, ensemble, meta
        self.shape: tuple[int, ...] = ()
        self.files: list[Any] = []
        self.offset = 0

    def staged(self) -> list[Path]:
        """The hidden files the ranks write: the mean (or the single model's predictions), then the spread."""
        names = ["mean", "std"] if self.ensemble else ["mean"]
        return [self.path.with_name(f".{self.path.name}.{k}.partial.npy") for k in names]

    def open(self, shape: tuple[int, ...] | None) -> None:
        """Agree on the shape of one prediction (collective: a rank without samples offers none); rank 0 makes
        the files at full size; then every rank opens them to write its rows."""
        shapes = [s for s in self.world.comm.allgather(shape) if s is not None]
        if not shapes:
            raise ConfigError("no samples to predict in this split")
        self.shape = tuple(shapes[0])
        offset = None
        if self.world.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for tmp in self.staged():
                offset = _create_npy(tmp, (self.n, *self.shape))
        self.offset = self.world.comm.bcast(offset)
        self.world.barrier()  # the files exist at their full size: every rank writes its own rows at once
        # Open across batches (a with-block per batch would reopen the file for every write); close() shuts them.
        self.files = [open(tmp, "r+b") for tmp in self.staged()]  # noqa: SIM115

    def write(self, row: int, mean: np.ndarray, std: np.ndarray | None) -> None:
        """Rows ``row, row + 1, ...`` of the output (and of the spread), written now."""
        row_bytes = 4 * int(np.prod(self.shape, dtype=np.int64))
        for f, rows in zip(self.files, (mean, std)):
            f.seek(self.offset + row * row_bytes)
            f.write(np.ascontiguousarray(rows, dtype=np.float32).data)

    def close(self, attrs: dict) -> None:
        """Flush every rank's rows (collective); rank 0 makes the output from them and names it."""
        for f in self.files:
            f.close()
        self.world.barrier()
        if self.world.is_main:
            self.finish(attrs)
        self.world.barrier()

    def finish(self, attrs: dict) -> None:
        """``.npy``: the staged files are the output (the spread as ``NAME.std.npy``)."""
        targets = [self.path, self.path.with_suffix(".std.npy")]
        for tmp, final in zip(self.staged(), targets):
            os.replace(tmp, final)

    def chunks(self, tmp: Path) -> Iterator[tuple[int, np.ndarray]]:
        """The staged rows, at most CHUNK_BYTES at a time (read, not mapped: memory stays bounded)."""
        row_floats = int(np.prod(self.shape, dtype=np.int64))
        step = max(1, CHUNK_BYTES // (4 * max(row_floats, 1)))
        for start in range(0, self.n, step):
            k = min(step, self.n - start)
            rows = np.fromfile(tmp, np.float32, k * row_floats, offset=self.offset + 4 * start * row_floats)
            yield start, rows.reshape(k, *self.shape)


def _create_npy(path: Path, shape: tuple[int, ...]) -> int:
    """An ``.npy`` file of float32 zeros of ``shape`` (sparse where the filesystem allows); its data's offset."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False,
                "shape": shape,
            },
        )
        offset = f.tell()
        f.truncate(offset + 4 * int(np.prod(shape, dtype=np.int64)))
    return offset


class _H5Writer(_Writer):
    """``.h5``: dataset ``prediction`` (and ``prediction_std`` for ensembles), ``record``, the scores as attributes."""

    def finish(self, attrs: dict) -> None:
        from caldera.data.formats import require

        h5py = require("h5py", "HDF5 output")
        tmp = self.path.with_name(f".{self.path.name}.partial")
        with h5py.File(tmp, "w") as f:
            for name, staged in zip(("prediction", "prediction_std"), self.staged()):
                ds = f.create_dataset(name, shape=(self.n, *self.shape), dtype="f4", chunks=True)
                for start, rows in self.chunks(staged):
                    ds[start : start + len(rows)] = rows
            if self.meta.get("records") is not None:  # which record of the input file each target belongs to
                f["record"] = self.meta["records"]
            f.attrs.update({k: v for k, v in attrs.items() if v is not None})
        os.replace(tmp, self.path)
        for staged in self.staged():
            staged.unlink()


class _NcWriter(_Writer):
    """NetCDF: one variable per target (T, u, v...) with the input file's units, grid coordinates and time axis
    where the data came from a NetCDF file, otherwise one ``prediction`` variable; ensembles add ``T_std``..."""

    def finish(self, attrs: dict) -> None:
        from caldera.data.formats import require

        netCDF4 = require("netCDF4", "NetCDF output")
        plan = _nc_plan(self.shape, self.meta)
        spread = [(f"{name}_std", *rest) for name, *rest in plan] if self.ensemble else []
        tmp = self.path.with_name(f".{self.path.name}.partial")
        with netCDF4.Dataset(tmp, "w") as nc:
            _nc_define(nc, self.n, plan + spread, self.meta, attrs)
            for name, *_ in spread:
                nc[name].long_name = f"ensemble spread (standard deviation) of {name.removesuffix('_std')}"
            for variables, staged in zip((plan, spread), self.staged()):
                for start, rows in self.chunks(staged):
                    rows = (
                        rows[:, None] if rows.ndim == 1 else rows
                    )  # one scalar target: a channel axis to slice
                    for name, channels, *_ in variables:
                        var = nc[name]
                        var[start : start + len(rows)] = rows[:, channels].reshape(len(rows), *var.shape[1:])
        os.replace(tmp, self.path)
        for staged in self.staged():
            staged.unlink()


def _nc_plan(
    shape: tuple[int, ...], meta: dict
) -> list[tuple[str, slice, tuple[str, ...], tuple[int, ...], str | None]]:
    """Per output variable: its name, its channels in a prediction, its dimensions and their sizes (after
    ``sample``), and the input file's variable it predicts (for units and coordinates)."""
    layout, grid = meta.get("layout"), shape[1:]
    channels = shape[0] if shape else 1
    if not layout or sum(k for _, k, _ in layout) != channels:
        dims = ("sample", *(f"dim_{i + 1}" for i in range(len(shape))))
        return [("prediction", slice(None), dims, shape, None)]
    default_grid = (
        ("z", "y", "x")[3 - len(grid) :] if len(grid) <= 3 else tuple(f"dim_{i}" for i in range(len(grid)))
    )
    plan, start = [], 0
    for name, k, kind in layout:
        src_dims = _source_dims(meta, name)
        grid_dims = (
            src_dims[-len(grid) :] if src_dims and len(grid) and not meta.get("patched") else default_grid
        )
        safe = name.replace("/", "_")
        if kind == "field" and grid:
            dims, sizes = ("sample", *grid_dims), grid
        elif kind == "channels" and grid:
            dims, sizes = ("sample", src_dims[0] if src_dims else f"{safe}_channel", *grid_dims), (k, *grid)
        else:
            dims, sizes = (("sample",), ()) if k == 1 else (("sample", f"{safe}_value"), (k,))
        plan.append((safe, slice(start, start + k), dims, tuple(sizes), name))
        start += k
    return plan


def _source_dims(meta: dict, name: str) -> tuple[str, ...] | None:
    """The input NetCDF variable's dimensions after the record axis (None when the input was not NetCDF)."""
    if meta.get("source") is None:
        return None
    import netCDF4

    with netCDF4.Dataset(meta["source"]) as src:
        return tuple(src[name].dimensions[1:])


def _nc_define(nc: Any, n: int, plan: list, meta: dict, attrs: dict) -> None:
    """Create the dimensions, variables and coordinates (copied from the input file where there is one)."""
    import netCDF4

    src = netCDF4.Dataset(meta["source"]) if meta.get("source") else None
    try:
        record_dim = (
            next((src[p[4]].dimensions[0] for p in plan if p[4] in src.variables), None) if src else None
        )
        records = meta.get("records")
        # One sample per record of the input (no patches): the samples are that file's time axis, so they get its
        # name and coordinate, and xarray opens T(time, lat, lon).
        by_record = record_dim is not None and not meta.get("patched") and len(np.unique(records)) == n
        first = record_dim if by_record else "sample"
        nc.createDimension(first, n)
        sizes: dict[str, int] = {}
        for name, _, dims, shape, source_name in plan:
            for d, size in zip(dims[1:], shape):
                if d not in nc.dimensions:
                    nc.createDimension(d, size)
                    sizes[d] = size
            var = nc.createVariable(name, "f4", (first, *dims[1:]), zlib=True)
            if src is not None and source_name in src.variables:
                for key in ("units", "long_name", "standard_name"):
                    if key in src[source_name].ncattrs():
                        var.setncattr(key, src[source_name].getncattr(key))
        if records is not None:
            nc.createVariable("record", "i8", (first,))[:] = records
            nc["record"].long_name = "record of the input file the target comes from"
        if src is not None:
            _copy_coordinates(src, nc, sizes, records, record_dim, first)
        for key, value in attrs.items():
            if value is not None:
                nc.setncattr(key, value)
    finally:
        if src is not None:
            src.close()


def _copy_coordinates(src: Any, nc: Any, sizes: dict[str, int], records: np.ndarray | None, record_dim: str | None,
                      first: str) -> None:  # fmt: skip
    """Grid coordinates (lat, lon, level) of matching length, and the time of each sample's target record."""
    for d, size in sizes.items():
        if d in src.variables and src[d].ndim == 1 and len(src[d]) == size:
            var = nc.createVariable(d, src[d].dtype, (d,))
            var[:] = src[d][:]
            var.setncatts({k: src[d].getncattr(k) for k in src[d].ncattrs()})
    if records is not None and record_dim in src.variables and src[record_dim].ndim == 1:
        var = nc.createVariable(record_dim, src[record_dim].dtype, (first,))
        var[:] = src[record_dim][:][records]
        var.setncatts({k: src[record_dim].getncattr(k) for k in src[record_dim].ncattrs()})


WRITERS = {".npy": _Writer, ".h5": _H5Writer, ".nc": _NcWriter}
