"""Per-variable normalisation statistics: one parallel pass over the records, reduced across ranks, kept in JSON.

Each rank reads a contiguous block of the records (whole chunks, so every byte is read once by one rank) and
summarises each variable as (count, mean, M2) of its finite values. The ranks' summaries are gathered and merged
in rank order with Chan's formula, which is exact in float64 and gives every rank identical numbers. Rank 0
writes them to ``normalization.json`` in the run directory; a resumed run reads them back instead of recomputing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caldera.comm.base import Communicator
from caldera.comm.local import LocalComm
from caldera.data.formats import ArrayReader, DataError

STATS_FILE = "normalization.json"


@dataclass(frozen=True)
class VarStats:
    """Mean and standard deviation of one variable's finite values, and how many there were."""

    mean: float
    std: float
    count: int

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Return ``(values - mean) / std`` as float32 (a constant variable is only centred)."""
        scale = self.std if self.std > 0 else 1.0
        return ((values - self.mean) / scale).astype(np.float32, copy=False)


def _summary(values: np.ndarray) -> tuple[int, float, float]:
    """Return (count, mean, M2) of the finite entries of ``values``, in float64."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(v)
    if not finite.all():
        v = v[finite]
    if v.size == 0:
        return 0, 0.0, 0.0
    mean = float(v.mean())
    return int(v.size), mean, float(np.square(v - mean).sum())


def _merge(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Combine two (count, mean, M2) summaries (Chan et al.)."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    if n == 0:
        return 0, 0.0, 0.0
    delta = mb - ma
    return n, ma + delta * nb / n, sa + sb + delta * delta * na * nb / n


def rank_block(start: int, stop: int, rank: int, size: int, chunk: int) -> tuple[int, int]:
    """Return this rank's contiguous block of records [start, stop), cut on chunk boundaries when possible."""
    n_chunks = math.ceil((stop - start) / chunk)
    lo, hi = rank * n_chunks // size, (rank + 1) * n_chunks // size
    return min(stop, start + lo * chunk), min(stop, start + hi * chunk)


def compute_stats(
    reader: ArrayReader,
    variables: list[str] | None = None,
    comm: Communicator | None = None,
    records: tuple[int, int] | None = None,
    batch_bytes: int = 64 << 20,
) -> dict[str, VarStats]:
    """Return mean/std of each variable over ``records`` (default all), read once in parallel over ``comm``."""
    comm = comm or LocalComm()
    variables = list(variables or reader.variables)
    start, stop = records or (0, len(reader))
    chunk = reader.chunk_records
    lo, hi = rank_block(start, stop, comm.rank, comm.size, chunk)
    record_bytes = max(int(np.prod(reader.shape(v))) * reader.dtype(v).itemsize for v in variables) or 1
    step = max(
        chunk, (batch_bytes // record_bytes) // chunk * chunk
    )  # whole chunks, about batch_bytes a read
    local = {v: (0, 0.0, 0.0) for v in variables}
    for s in range(lo, hi, step):
        batch = reader.read(np.arange(s, min(hi, s + step)), variables)
        for v in variables:
            local[v] = _merge(local[v], _summary(batch[v]))
    merged = {v: (0, 0.0, 0.0) for v in variables}
    for summaries in comm.allgather(local):  # rank order: every rank merges identically
        for v in variables:
            merged[v] = _merge(merged[v], summaries[v])
    out = {}
    for v, (n, mean, m2) in merged.items():
        if n == 0:
            raise DataError(
                f"variable {v!r} in {reader.path} has no finite values in records {start}..{stop}"
            )
        out[v] = VarStats(mean=mean, std=math.sqrt(m2 / n), count=n)
    return out


def save_stats(
    stats: dict[str, VarStats], path: str | os.PathLike, source: dict[str, Any] | None = None
) -> None:
    """Write ``stats`` (and where they came from) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"source": source or {}, "variables": {v: asdict(s) for v, s in stats.items()}}
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> tuple[dict[str, VarStats], dict[str, Any]]:
    """Read statistics written by ``save_stats``; return them and their source description."""
    try:
        body = json.loads(Path(path).read_text())
        return {v: VarStats(**s) for v, s in body["variables"].items()}, body.get("source", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"cannot read normalisation statistics from {path}: {exc}; delete the file to recompute"
        ) from exc


def load_or_compute(
    reader: ArrayReader,
    variables: list[str],
    path: str | os.PathLike | None,
    comm: Communicator | None = None,
    records: tuple[int, int] | None = None,
    frozen: bool = False,
) -> dict[str, VarStats]:
    """Reuse the statistics at ``path`` when they match this source, else compute them; rank 0 writes them.

    ``frozen``: a trained model's statistics, applied to whatever file is read now (predict, export): read from
    ``path`` whatever file they came from, never recomputed, never written."""
    comm = comm or LocalComm()
    if frozen:
        # A model learned in the training file's units: another file's own mean/std would shift every input,
        # and overwriting the run's file would change what later loads (and a published version's hash).
        if path is None or not Path(path).exists():
            raise DataError(f"this run has no {STATS_FILE} to normalise with (looked for {path}); predict with "
                            "the run directory it was trained in")  # fmt: skip
        stats, _ = load_stats(path)
        absent = [v for v in variables if v not in stats]
        if absent:
            raise DataError(
                f"{path} has no statistics for {absent}: the model was not trained on these variables"
            )
        return {v: stats[v] for v in variables}
    source = {"path": str(Path(reader.path).resolve()), "records": list(records or (0, len(reader)))}
    found = None
    if comm.rank == 0 and path is not None and Path(path).exists():
        stats, saved_source = load_stats(path)
        if saved_source == source and all(v in stats for v in variables):
            found = {v: stats[v] for v in variables}
    found = comm.bcast(found)  # decide together: a rank that computed alone would wait forever in allgather
    if found is not None:
        return found
    stats = compute_stats(reader, variables, comm, records)
    if comm.rank == 0 and path is not None:
        save_stats(stats, path, source)
    return stats
