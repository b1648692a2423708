"""Batch inference: apply a finished run's model to a dataset on every rank; write the predictions and scores.

``caldera predict RUN_DIR [--split val|train|all] [--set data.args.path=2025.nc] [--out pred.nc|.h5|.npy]`` rebuilds
the run's data pipeline from its resolved config (any key can be overridden: another file, whole images instead
of patches), gives each rank a contiguous block of the samples, runs the model in evaluation mode and reduces the
loss and metrics over the ranks. Predictions keep the dataset's sample order whatever the number of ranks; targets
that training normalised come back in physical units. ``.npy`` outputs are written by every rank at once into
one preallocated file; ``.h5`` and ``.nc`` outputs by the ranks in turn (no parallel HDF5 build needed); NetCDF
keeps the input's time axis, grid coordinates and units. Each appears under its final name only when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from caldera.config import Config, load_config
from caldera.errors import ConfigError
from caldera.io import atomic_write_text
from caldera.names import METRICS
from caldera.refs import resolve
from caldera.registry import resolve as resolve_run
from caldera.train.evaluate import Scores
from caldera.train.progress import progress_bar
from caldera.train.rundir import RunDir
from caldera.world import World, init

SPLITS = ("val", "train", "all")


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    trust_code: bool = False) -> Config:  # fmt: skip
    """The resolved config of a finished run, pointed at ``run_dir`` (its statistics files), with overrides; code
    it names by import path is refused unless ``trust_code`` or given in ``overrides`` (docs/security.md)."""
    return load_config(RunDir(run_dir).read_config([f"run.dir={run_dir}", *overrides], trust_code))


def predict(run_dir: str | Path, split: str = "val", overrides: list[str] | tuple[str, ...] = (),
            out: str | Path | None = None, batch_size: int | None = None, score: bool = True,
            world: World | None = None, progress: bool = True,
            trust_code: bool = False) -> dict[str, float]:  # fmt: skip
    """Predict ``split`` of the run's data on every rank (collective); write ``out``; return the scores.
    ``run_dir`` may be a registry model, ``NAME@VERSION`` (its hashes are checked first)."""
    from caldera.precision import make_precision
    from caldera.train.run import build_data, build_loss, load_run_model

    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    suffix = Path(out).suffix if out is not None else ".npy"
    if suffix not in WRITERS:
        raise ConfigError(f"--out {out}: write .npy, .h5 or .nc (got {suffix!r})")
    source, run_dir = str(run_dir), resolve_run(run_dir)
    cfg = load_run_config(run_dir, overrides, trust_code)
    world = world or init(device=cfg.run.device, seed=cfg.run.seed)
    dataset = _choose(build_data(cfg, world.comm), split)
    for part in getattr(dataset, "datasets", [dataset]):
        if getattr(part, "transform", None) is not None:
            part.transform = None  # augmentation is for training: predictions keep the stored orientation
    model = load_run_model(RunDir(run_dir), cfg).to(world.device).eval()
    precision = make_precision(cfg.precision.mode, world.device)
    score = score and _has_targets(dataset)
    loss_fn = build_loss(cfg) if score else None
    metrics = {m: resolve(m, METRICS, "[train] metrics") for m in cfg.train.metrics} if score else {}
    n = len(dataset)
    lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size or cfg.data.batch_size)
    sums = Scores(loss_fn, metrics)
    blocks: list[np.ndarray] = []
    # Rank 0's block times the ranks: an estimate of all.
    bar = progress_bar(progress and world.is_main, "predicting", transient=True, terminal_only=True)
    with torch.no_grad(), bar:
        for x, y in loader:
            x, y = _to(x, world.device), _to(y, world.device)
            with precision.autocast():
                pred = model(x)
                sums.add(pred, y, len(y))
            blocks.append(_physical(dataset, pred.float().cpu().numpy()))
            bar.update(advance=len(y) * world.size, total=n)
    scores = {**sums.reduce(world.comm, f"{split}_"), "samples": n}
    if out is not None:
        attrs = {"run_dir": source, "split": split, **scores}
        WRITERS[suffix](Path(out), blocks, lo, n, world, attrs, _describe(dataset))
    if world.is_main:
        print("  ".join(f"{k} {v:.6g}" for k, v in scores.items()), flush=True)
        if out is not None:
            atomic_write_text(Path(out).with_suffix(".json"), json.dumps(scores, indent=2))
    if hasattr(dataset, "close"):
        dataset.close()
    return scores


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


# -- writers: every rank holds its block [lo, lo + len) of the n predictions -------------------------------------
def _shape(blocks: list[np.ndarray], world: World) -> tuple[int, ...]:
    """The shape of one prediction, agreed by all ranks (a rank without samples has none to offer)."""
    shapes = [s for s in world.comm.allgather(blocks[0].shape[1:] if blocks else None) if s is not None]
    if not shapes:
        raise ConfigError("no samples to predict in this split")
    return tuple(shapes[0])


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


def _write_npy(path: Path, blocks: list[np.ndarray], lo: int, n: int, world: World, attrs: dict,
               meta: dict) -> None:  # fmt: skip
    shape = _shape(blocks, world)
    tmp = path.with_name(f".{path.name}.partial")
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *shape)).flush()
    world.barrier()  # the file exists at its full size: every rank writes its own rows at once
    if blocks:
        rows = np.lib.format.open_memmap(tmp, mode="r+")
        rows[lo : lo + sum(len(b) for b in blocks)] = np.concatenate(blocks)
        rows.flush()
        del rows
    world.barrier()
    if world.is_main:
        os.replace(tmp, path)


def _in_turns(path: Path, world: World, blocks: list[np.ndarray], create: Any, write: Any) -> None:
    """Rank 0 ``create(tmp)``s the file; then the ranks take turns to ``write(tmp, their rows)`` (no parallel
    HDF5/NetCDF build needed); rank 0 moves it to ``path`` once complete."""
    tmp = path.with_name(f".{path.name}.partial")
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        create(tmp)
    for turn in range(world.size):
        world.barrier()
        if turn == world.rank and blocks:
            write(tmp, np.concatenate(blocks))
    world.barrier()
    if world.is_main:
        os.replace(tmp, path)


def _write_h5(path: Path, blocks: list[np.ndarray], lo: int, n: int, world: World, attrs: dict,
              meta: dict) -> None:  # fmt: skip
    from caldera.data.formats import require

    h5py = require("h5py", "HDF5 output")
    shape = _shape(blocks, world)

    def create(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("prediction", shape=(n, *shape), dtype="f4", chunks=True)
            if meta.get("records") is not None:  # which record of the input file each target belongs to
                f["record"] = meta["records"]
            f.attrs.update({k: v for k, v in attrs.items() if v is not None})

    def write(tmp: Path, rows: np.ndarray) -> None:
        with h5py.File(tmp, "r+") as f:
            f["prediction"][lo : lo + len(rows)] = rows

    _in_turns(path, world, blocks, create, write)


def _write_nc(path: Path, blocks: list[np.ndarray], lo: int, n: int, world: World, attrs: dict,
              meta: dict) -> None:  # fmt: skip
    """NetCDF: one variable per target (T, u, v...) with the input file's units, grid coordinates and time axis
    where the data came from a NetCDF file; otherwise one ``prediction`` variable. The ranks write in turn."""
    from caldera.data.formats import require

    netCDF4 = require("netCDF4", "NetCDF output")
    plan = _nc_plan(_shape(blocks, world), meta)

    def create(tmp: Path) -> None:
        with netCDF4.Dataset(tmp, "w") as nc:
            _nc_define(nc, n, plan, meta, attrs)

    def write(tmp: Path, rows: np.ndarray) -> None:
        rows = rows[:, None] if rows.ndim == 1 else rows  # one scalar target: a channel axis to slice
        with netCDF4.Dataset(tmp, "a") as nc:
            for name, channels, *_ in plan:
                nc[name][lo : lo + len(rows)] = rows[:, channels].reshape(len(rows), *nc[name].shape[1:])

    _in_turns(path, world, blocks, create, write)


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


WRITERS = {".npy": _write_npy, ".h5": _write_h5, ".nc": _write_nc}
