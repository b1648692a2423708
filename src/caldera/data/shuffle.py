"""I/O-friendly shuffling and rank sharding: shuffle chunk order, then shuffle inside a bounded window.

Reading random single records from HDF5 or Zarr costs one chunk decode per sample. Here the epoch order is built
from the storage layout instead: the chunks are visited in a random order (seeded by seed and epoch, so every
rank computes the same order without talking), and each record is then moved at most ``buffer`` positions from
where that stream would read it, like a shuffle buffer of ``buffer`` samples. At any time only about
``(buffer + global_batch) / chunk`` chunks are being read.

Sharding keeps the contract of ``ShardedBatches``: step k takes the next ``global_batch`` positions of the order
and rank r takes the r-th slice of them, so N ranks see exactly the batches one process sees, and every rank runs
the same number of steps. A tail smaller than the number of ranks joins the last step instead of being dropped,
so every sample is seen exactly once per epoch. The position inside the epoch is the number of steps handed out:
``set_epoch(epoch, start_step)`` (what the trainer calls on resume) or ``state_dict()`` / ``load_state_dict()``
continue the same order from there, on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def chunk_shuffled_order(n: int, chunk: int, buffer: int, seed: int, epoch: int) -> np.ndarray:
    """Return the epoch's order of ``n`` samples: chunks of ``chunk`` in random order, shuffled within ``buffer``."""
    rng = np.random.default_rng([seed, epoch])
    chunk = max(1, chunk)
    starts = rng.permutation(-(-n // chunk)) * chunk
    lengths = np.minimum(starts + chunk, n) - starts
    offsets = np.cumsum(lengths) - lengths
    stream = np.repeat(starts - offsets, lengths) + np.arange(n)
    if buffer <= 1:
        return stream
    # Sorting by position + U(0, buffer) moves each sample fewer than ``buffer`` places: a vectorised buffer.
    keys = np.arange(n) + rng.uniform(0, buffer, size=n)
    return stream[np.argsort(keys, kind="stable")]


class ChunkShuffleSampler:
    """This rank's sample indices for each step of an epoch, chunk-aware, resumable mid-epoch."""

    def __init__(
        self,
        n: int,
        global_batch: int,
        rank: int = 0,
        size: int = 1,
        chunk: int = 1,
        buffer: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if global_batch < size:
            raise ValueError(
                f"global batch {global_batch} is smaller than the number of ranks {size}; "
                f"set [data] batch_size to at least {size}"
            )
        if n < size:
            raise ValueError(f"{n} samples cannot be shared by {size} ranks; use more data or fewer ranks")
        self.n, self.global_batch, self.rank, self.size = n, global_batch, rank, size
        self.chunk = max(1, chunk)
        self.buffer = buffer if buffer is not None else max(4 * self.chunk, global_batch)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.position = 0  # steps of ``epoch`` already handed to the consumer

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch the next iteration uses and the step it starts from (a resumed run's position)."""
        self.epoch, self.position = epoch, start_step

    def __len__(self) -> int:
        full, tail = divmod(self.n, self.global_batch)
        if self.drop_last:
            return full
        return full + (1 if tail >= self.size else 0)  # a tail too small for every rank joins the last step

    def order(self) -> np.ndarray:
        """Return the global sample order of the current epoch (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.n)
        return chunk_shuffled_order(self.n, self.chunk, self.buffer, self.seed, self.epoch)

    def bounds(self, step: int) -> tuple[int, int]:
        """Return the [start, stop) positions of the order that ``step`` covers."""
        start = step * self.global_batch
        last = step == len(self) - 1
        stop = self.n if last and not self.drop_last else min(self.n, start + self.global_batch)
        return start, stop

    def plan(self, start: int = 0) -> list[tuple[int, np.ndarray, int]]:
        """Return ``(step, this rank's indices, global sample count)`` for steps ``start`` onward."""
        order = self.order()
        steps = []
        for k in range(start, len(self)):
            lo, hi = self.bounds(k)
            steps.append((k, np.array_split(order[lo:hi], self.size)[self.rank], hi - lo))
        return steps

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        """Yield ``(indices, global count)`` from the current position; the position follows the consumer."""
        for k, idx, n_global in self.plan(self.position):
            self.position = k + 1
            yield idx, n_global
        self.finish_epoch()

    def finish_epoch(self) -> None:
        """Mark the epoch done: the state now points at the start of the next one."""
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Return the position in the data: epoch, steps done, and samples done (rank-count independent)."""
        done = self.bounds(self.position - 1)[1] if self.position else 0
        return {"epoch": self.epoch, "position": self.position, "samples_done": done, "seed": self.seed,
                "n": self.n, "global_batch": self.global_batch, "chunk": self.chunk, "buffer": self.buffer,
                "shuffle": self.shuffle}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the same order from the same sample, whatever the number of ranks now."""
        if state["n"] != self.n:
            raise ValueError(
                f"cannot resume: the checkpoint's data had {state['n']} samples, this data has {self.n}; "
                "resume with the same data (or start a new run)"
            )
        for key in ("seed", "chunk", "buffer", "shuffle"):
            setattr(self, key, state[key])
        # The order depends on seed, chunk and buffer only; the batch size only cuts it into steps.
        self.epoch, self.position = state["epoch"], state["samples_done"] // self.global_batch
