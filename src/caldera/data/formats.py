"""Readers for scientific array files: HDF5, NetCDF, Zarr and NumPy ``.npy``, behind one small protocol.

A reader holds a selection of variables that share a leading *record* axis (time steps, simulation runs,
samples). ``read(indices)`` returns ``{variable: array}`` with those records in the order asked for; it sorts
them first and reads each storage chunk once, as one contiguous span, so a shuffled batch costs a few large reads
instead of one small read per sample. Files are opened lazily, once per process, so a reader can be pickled into
worker processes. Every failure names the file and the variable.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from caldera.errors import DataError as DataError

FORMATS = ("hdf5", "netcdf", "zarr", "npy")
_SUFFIXES = {".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".he5": "hdf5", ".nc": "netcdf", ".nc4": "netcdf",
             ".netcdf": "netcdf", ".zarr": "zarr", ".npy": "npy"}  # fmt: skip
_SPAN_TARGET_BYTES = 1 << 20  # unchunked files: treat ~1 MiB of records as one "chunk" for locality
# One lock for the process, not one per reader: the HDF5 and netCDF-C libraries keep global state, so threads
# reading two files (or train and validation views of one) can crash each other too. Re-entrant: reads ask shapes.
_LIBRARY_LOCK = threading.RLock()


def _fresh_lock_in_child() -> None:
    """A forked worker starts with the lock free: a parent thread may have held it at the fork."""
    global _LIBRARY_LOCK
    _LIBRARY_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


class MissingDependency(DataError, ImportError):
    """A file format's library is not installed; the message gives the pip command."""


@runtime_checkable
class ArrayReader(Protocol):
    """Records of selected variables in one file, read in batches."""

    path: Path
    variables: list[str]

    def __len__(self) -> int:
        """Return the number of records along the leading axis."""
        ...

    def shape(self, variable: str) -> tuple[int, ...]:
        """Return the shape of one record of ``variable``."""
        ...

    def dtype(self, variable: str) -> np.dtype:
        """Return the dtype ``read`` gives for ``variable``."""
        ...

    @property
    def chunk_records(self) -> int:
        """Return how many records one storage chunk holds (the unit of I/O-friendly shuffling)."""
        ...

    def read(self, indices: Any, variables: list[str] | None = None) -> dict[str, np.ndarray]:
        """Return the records ``indices`` (any order, repeats allowed) of each variable."""
        ...


class _Reader:
    """Shared logic: variable selection and checks, lazy per-process open, chunk-grouped reads."""

    format = ""
    dense_chunks = False  # True: a chunk is decoded whole anyway, so read the needed span of it in one call

    def __init__(self, path: str | os.PathLike, variables: list[str] | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(
                f"{self.format} file {str(self.path)!r} does not exist (working directory {os.getcwd()})"
            )
        self._handle: Any = None
        self._pid = -1
        with self._reading("opening it"):
            names = self._names()
            self.variables = list(variables) if variables else self._default_variables(names)
            for var in self.variables:
                if var not in names:
                    raise DataError(_missing(var, names, self.path))
            self._check_lengths()

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn the library's error on a damaged file (truncated, overwritten, another format) into a DataError."""
        try:
            yield
        except DataError:
            raise
        # What HDF5 and netCDF-C raise on a damaged file depends on where the damage is: OSError for most, but a
        # flipped byte in a header or B-tree also surfaces as RuntimeError, KeyError, ValueError or IndexError.
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            gist = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise DataError(
                f"{self.format} file {str(self.path)!r} cannot be read ({what}: {gist}); it is truncated, "
                f"damaged or not a valid {self.format} file: copy it again or regenerate it"
            ) from exc

    # -- per-format hooks -----------------------------------------------------------------------------------------
    def _open(self) -> Any:
        raise NotImplementedError

    def _names(self) -> list[str]:
        raise NotImplementedError

    def _default_variables(self, names: list[str]) -> list[str]:
        return names

    def _array(self, variable: str) -> Any:
        """Return an object with ``shape``, ``dtype`` and slicing along axis 0."""
        raise NotImplementedError

    def _chunk(self, variable: str) -> int | None:
        """Return the records per storage chunk of ``variable``, or None for contiguous storage."""
        return None

    # -- common ---------------------------------------------------------------------------------------------------
    @property
    def handle(self) -> Any:
        """Return this process's open file (opened on first use, reopened after a fork)."""
        with _LIBRARY_LOCK:
            if self._handle is None or self._pid != os.getpid():
                self._handle, self._pid = self._open(), os.getpid()
            return self._handle

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, -1  # each process opens its own
        return state

    def close(self) -> None:
        """Close the file in this process (it reopens on the next read)."""
        with _LIBRARY_LOCK:
            if self._handle is not None and self._pid == os.getpid() and hasattr(self._handle, "close"):
                self._handle.close()
            self._handle = None

    def __len__(self) -> int:
        return self._length

    def shape(self, variable: str) -> tuple[int, ...]:
        """Return the shape of one record of ``variable``."""
        with _LIBRARY_LOCK:
            return tuple(self._array(variable).shape[1:])

    def dtype(self, variable: str) -> np.dtype:
        """Return the dtype ``read`` gives for ``variable``."""
        with _LIBRARY_LOCK:
            return np.dtype(self._array(variable).dtype)

    def units(self, variable: str) -> str | None:
        """The ``units`` attribute the file records for ``variable`` (NetCDF, HDF5, Zarr), or None."""
        with _LIBRARY_LOCK, self._reading("reading attributes"):
            array = self._array(variable)
            attrs = getattr(array, "attrs", None)  # h5py, zarr, h5netcdf; netCDF4 has them as attributes
            value = attrs.get("units") if attrs is not None else getattr(array, "units", None)
        value = value.decode() if isinstance(value, bytes) else value
        return value if isinstance(value, str) else None

    @property
    def chunk_records(self) -> int:
        """Return the records per chunk of the variable with the largest records (it dominates the I/O)."""
        if not self.variables:
            return 1
        biggest = max(self.variables, key=lambda v: (self._record_bytes(v), self._effective_chunk(v)))
        return self._effective_chunk(biggest)

    def _record_bytes(self, variable: str) -> int:
        return max(1, int(np.prod(self.shape(variable))) * self.dtype(variable).itemsize)

    def _effective_chunk(self, variable: str) -> int:
        """Return the records per chunk; contiguous storage counts ~1 MiB of records as one chunk."""
        chunk = self._chunk(variable) or _SPAN_TARGET_BYTES // self._record_bytes(variable)
        return int(max(1, min(chunk, self._length or 1)))

    def read(self, indices: Any, variables: list[str] | None = None) -> dict[str, np.ndarray]:
        """Return the records ``indices`` (any order, repeats allowed) of each selected variable."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._length):
            bad = idx[(idx < 0) | (idx >= self._length)][0]
            raise DataError(f"record {bad} is out of range for {self.path} ({self._length} records)")
        uniq, inverse = np.unique(idx, return_inverse=True)
        in_order = uniq.size == idx.size and bool(np.all(uniq == idx))
        out = {}
        for var in variables or self.variables:
            if var not in self.variables:
                raise DataError(_missing(var, self.variables, self.path, "selected "))
            rows = self._read_sorted(var, uniq)
            out[var] = rows if in_order else rows[inverse]
        return out

    def _read_sorted(self, var: str, uniq: np.ndarray) -> np.ndarray:
        if uniq.size == 0:
            return np.empty((0, *self.shape(var)), dtype=self.dtype(var))
        # HDF5 and netCDF-C are not thread-safe, not even for metadata or for two files: every call into them takes
        # turns with every other in this process, while the transforms run in parallel.
        with _LIBRARY_LOCK, self._reading(f"variable {var!r}, records {uniq[0]}..{uniq[-1]}"):
            arr, chunk = self._array(var), self._effective_chunk(var)
            groups = np.split(uniq, np.flatnonzero(np.diff(uniq // chunk)) + 1)  # the records of each chunk
            pieces = [piece for group in groups for piece in _read_group(arr, group, self.dense_chunks)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _check_lengths(self) -> None:
        lengths = {}
        for var in self.variables:
            shape = self._array(var).shape
            if len(shape) == 0:
                raise DataError(
                    f"variable {var!r} in {self.path} is a scalar; it needs a leading record axis"
                )
            lengths[var] = shape[0]
        if len(set(lengths.values())) > 1:
            listing = ", ".join(f"{v!r} has {n}" for v, n in lengths.items())
            raise DataError(
                f"the selected variables in {self.path} differ in their number of records (leading axis): "
                f"{listing}; select variables that share the record axis"
            )
        self._length = next(iter(lengths.values()), 0)


def _read_group(arr: Any, group: np.ndarray, dense: bool) -> list[np.ndarray]:
    """Read the sorted records ``group`` (all inside one chunk) as one span or as contiguous runs."""
    lo, hi = int(group[0]), int(group[-1]) + 1
    # Read the whole span when the chunk is decoded whole anyway, or when it costs at most twice the bytes.
    if dense or hi - lo <= 2 * group.size:
        span = np.asarray(arr[lo:hi])
        return [span if hi - lo == group.size else span[group - lo]]
    breaks = np.flatnonzero(np.diff(group) != 1) + 1
    return [np.asarray(arr[int(run[0]) : int(run[-1]) + 1]) for run in np.split(group, breaks)]


def _missing(var: str, names: list[str], path: Path, what: str = "") -> str:
    close = difflib.get_close_matches(var, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"variable {var!r} is not among the {what}variables of {path}: {', '.join(names) or '(none)'}.{hint}"
    )


class HDF5Reader(_Reader):
    """Datasets of an HDF5 file (h5py); ``variables`` may be paths inside groups, such as ``"fields/T"``."""

    format = "hdf5"

    def __init__(
        self, path: str | os.PathLike, variables: list[str] | None = None, cache_mb: float = 64
    ) -> None:
        self.cache_mb = cache_mb
        super().__init__(path, variables)
        with self._reading("opening it"):
            self.dense_chunks = any(self.handle[v].compression is not None for v in self.variables)

    def _open(self) -> Any:
        h5py = require("h5py", "hdf5")
        # A chunk cache that holds the chunks of a shuffle window avoids decompressing a chunk twice.
        return h5py.File(self.path, "r", rdcc_nbytes=int(self.cache_mb * 2**20), rdcc_nslots=100_003)

    def _names(self) -> list[str]:
        h5py = require("h5py", "hdf5")
        names: list[str] = []
        self.handle.visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        return names

    def _array(self, variable: str) -> Any:
        return self.handle[variable]

    def _chunk(self, variable: str) -> int | None:
        chunks = self.handle[variable].chunks
        return chunks[0] if chunks else None


class NetCDFReader(_Reader):
    """Variables of a NetCDF file (netCDF4, else h5netcdf); packed and masked values are decoded as xarray does."""

    format = "netcdf"

    def __init__(self, path: str | os.PathLike, variables: list[str] | None = None) -> None:
        super().__init__(path, variables)
        with self._reading("opening it"):
            dims = {v: self._array(v).dimensions[0] for v in self.variables}
        if len(set(dims.values())) > 1:
            listing = ", ".join(f"{v!r} starts with {d!r}" for v, d in dims.items())
            raise DataError(
                f"the selected variables in {self.path} do not share a record dimension: {listing}"
            )

    def _open(self) -> Any:
        try:
            import netCDF4

            return netCDF4.Dataset(self.path, "r")
        except ImportError:
            h5netcdf = require("h5netcdf", "netcdf", "netCDF4 or h5netcdf")
            return h5netcdf.File(self.path, "r", decode_vlen_strings=True)

    def _names(self) -> list[str]:
        return list(self.handle.variables)

    def _default_variables(self, names: list[str]) -> list[str]:
        # Coordinate variables (named like their dimension) describe axes, not data; static fields such as a
        # land mask lack the record dimension of the first data variable: neither is selected unless named.
        data = [v for v in names if v not in self.handle.dimensions and self.handle.variables[v].dimensions]
        record_dim = self.handle.variables[data[0]].dimensions[0] if data else None
        return [v for v in data if self.handle.variables[v].dimensions[0] == record_dim]

    def _array(self, variable: str) -> Any:
        return _Decoded(self.handle.variables[variable])

    def _chunk(self, variable: str) -> int | None:
        var = self.handle.variables[variable]
        chunking = (
            var.chunking() if callable(getattr(var, "chunking", None)) else getattr(var, "chunks", None)
        )
        return chunking[0] if isinstance(chunking, (list, tuple)) and chunking else None


class _Decoded:
    """A netCDF variable whose slices come back decoded: scale_factor/add_offset applied, fill values as NaN."""

    def __init__(self, var: Any) -> None:
        self.var = var
        self.shape = tuple(var.shape)
        self.dimensions = tuple(var.dimensions)
        attrs = {k: var.getncattr(k) for k in var.ncattrs()} if hasattr(var, "ncattrs") else dict(var.attrs)
        self.attrs = attrs
        packed = "scale_factor" in attrs or "add_offset" in attrs
        masked = "_FillValue" in attrs or "missing_value" in attrs
        base = np.dtype(var.dtype)
        self.dtype = np.result_type(base, np.float32) if (packed or masked) and base.kind in "iu" else base
        if packed:
            self.dtype = np.result_type(np.asarray(attrs.get("scale_factor", 1.0)).dtype, self.dtype)
        self._native = hasattr(var, "set_auto_maskandscale")
        if self._native:
            var.set_auto_maskandscale(True)

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._native:  # netCDF4 decodes; turn its masked array into NaN like xarray
            raw = self.var[key]
            if np.ma.isMaskedArray(raw):
                return np.ma.filled(raw.astype(self.dtype), np.nan)
            return np.asarray(raw, dtype=self.dtype)
        return self._decode(np.asarray(self.var[key]))

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        out = raw.astype(self.dtype)
        for key in ("_FillValue", "missing_value"):
            if key in self.attrs:
                out[raw == np.asarray(self.attrs[key]).astype(raw.dtype)] = np.nan
        if "scale_factor" in self.attrs:
            out *= self.attrs["scale_factor"]
        if "add_offset" in self.attrs:
            out += self.attrs["add_offset"]
        return out


class ZarrReader(_Reader):
    """Arrays of a Zarr group (or one Zarr array, named after its directory)."""

    format = "zarr"
    dense_chunks = True  # Zarr decodes whole chunks and keeps no cache: read each needed chunk once per batch

    def _open(self) -> Any:
        zarr = require("zarr", "zarr")
        # A store's metadata may name the pickle codec, which unpickles (runs) whatever its chunks hold when read
        # with an older numcodecs (GHSA-jqc8-qjfv-5m6r): a data file must never run code, so refuse it before zarr
        # opens it. The metadata of the store and of its top-level arrays (the ones this reader reads).
        places = [self.path, *(p for p in self.path.iterdir() if p.is_dir())] if self.path.is_dir() else []
        for place in places:
            for file in (place / ".zarray", place / "zarr.json", place / ".zmetadata"):
                if file.is_file() and _names_pickle(json.loads(file.read_text())):
                    raise DataError(
                        f"{file}: the Zarr store asks for the 'pickle' codec, which runs code from the file when "
                        "read; refused. Rewrite the array with a numeric dtype and a compressor such as zstd"
                    )
        return zarr.open(str(self.path), mode="r")

    def _names(self) -> list[str]:
        if hasattr(self.handle, "array_keys"):
            return sorted(self.handle.array_keys())
        return [self.path.stem]

    def _array(self, variable: str) -> Any:
        return self.handle[variable] if hasattr(self.handle, "array_keys") else self.handle

    def _chunk(self, variable: str) -> int | None:
        return self._array(variable).chunks[0]


def _names_pickle(meta: Any) -> bool:
    """Whether Zarr metadata (v2 or v3, consolidated or not) names the pickle codec anywhere."""
    if isinstance(meta, dict):
        if meta.get("id") == "pickle" or meta.get("name") in ("pickle", "numcodecs.pickle"):
            return True
        return any(_names_pickle(v) for v in meta.values())
    return isinstance(meta, list) and any(_names_pickle(v) for v in meta)


class NpyReader(_Reader):
    """NumPy ``.npy`` files memory-mapped: one file (variable = its stem) or a directory of ``VAR.npy``."""

    format = "npy"

    def _open(self) -> dict[str, Path]:
        if self.path.is_dir():
            return {p.stem: p for p in sorted(self.path.glob("*.npy"))}
        return {self.path.stem: self.path}

    def _names(self) -> list[str]:
        return list(self.handle)

    def _array(self, variable: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_maps", {})
        key = (variable, os.getpid())
        if key not in cache:
            try:
                cache[key] = np.load(self.handle[variable], mmap_mode="r")
            except ValueError as exc:
                raise DataError(f"{self.handle[variable]} is not a readable .npy file: {exc}") from exc
        return cache[key]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_maps"] = {}
        return state

    def _read_sorted(self, var: str, uniq: np.ndarray) -> np.ndarray:
        return np.asarray(self._array(var)[uniq])  # a memmap gathers rows without per-run calls


_READERS = {"hdf5": HDF5Reader, "netcdf": NetCDFReader, "zarr": ZarrReader, "npy": NpyReader}


def detect_format(path: str | os.PathLike) -> str:
    """Return the format a path's suffix names (a directory of .npy files is "npy")."""
    p = Path(path)
    if p.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[p.suffix.lower()]
    if p.is_dir() and ((p / ".zgroup").exists() or (p / "zarr.json").exists() or (p / ".zarray").exists()):
        return "zarr"
    if p.is_dir() and any(p.glob("*.npy")):
        return "npy"
    raise DataError(
        f"cannot tell the format of {str(p)!r} from its name; set format to one of {', '.join(FORMATS)}"
    )


def open_reader(
    path: str | os.PathLike, format: str = "auto", variables: list[str] | None = None, **options: Any
) -> ArrayReader:
    """Open ``path`` with the reader for ``format`` ("auto": from the suffix), selecting ``variables``."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in _READERS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"unknown data format {fmt!r}; {hint}use one of {', '.join(FORMATS)} or 'auto'")
    return _READERS[fmt](path, variables, **options)


def require(module: str, fmt: str, package: str | None = None) -> Any:
    """Import the library of a file format, or raise MissingDependency with the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{fmt} files need {package or module}: pip install {package or module} (or pip install 'caldera[data]')"
        ) from exc
