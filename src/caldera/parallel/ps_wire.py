"""async-ps on the wire: message kinds and tags, the one-buffer packet, how the flat parameter vector is cut into
server shards, and waiting on MPI requests. Servers (``ps_server``) and workers (``ps_worker``) both speak it.

A push (worker -> server ``s``, tag PUSH): header ``kind`` = GRAD, worker clock, version of shard ``s`` it read,
work item, samples in it, loss (float64 in slots 12-13), then the gradient's slice ``s``; DONE and PARK send
the header only. A reply (server -> worker, tag REPLY): WEIGHTS, shard version, up to two work items (server 0
only, -1 = none), cut step (-1 = none), stop-after-cut flag, then the shard's weights; STOP the header only.
CUT (server 0 -> other servers): int64 (step, stop). FINAL and BUFFERS are pickled objects between our own ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from caldera.parallel._async import WorkItems

GRAD, DONE, WEIGHTS, STOP, PARK = 1, 2, 3, 4, 5  # message kinds
# Tags, on a communicator of our own, so they meet nobody else's.
PUSH, REPLY, FINAL, BUFFERS, CUT = 101, 102, 103, 104, 105


def shard_bounds(total: int, servers: int) -> list[tuple[int, int]]:
    """Cut ``total`` flattened parameters into ``servers`` contiguous [start, stop) ranges of almost equal size."""
    base, extra = divmod(total, servers)
    bounds, start = [], 0
    for s in range(servers):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_plan(params: list[torch.Tensor], servers: int) -> list[list[tuple[int, int, int]]]:
    """For each server, the pieces it owns as (parameter index, first element, end element) of each tensor."""
    plan: list[list[tuple[int, int, int]]] = []
    for start, stop in shard_bounds(sum(p.numel() for p in params), servers):
        pieces, offset = [], 0
        for i, p in enumerate(params):
            lo, hi = max(start, offset), min(stop, offset + p.numel())
            if lo < hi:
                pieces.append((i, lo - offset, hi - offset))
            offset += p.numel()
        plan.append(pieces)
    return plan


class Packet:
    """One message in one buffer: int64 header fields (the last one read as a float64 loss) followed by the
    float32 payload. Header-only messages ("done", "stop") send just the header."""

    # float32 slots read as int64 fields: kind, clock or version, version read or item, item, samples or cut
    # step, - or stop flag; then the loss as a float64.
    HEADER = 14

    def __init__(self, n: int) -> None:
        self.buf = torch.zeros(self.HEADER + n, dtype=torch.float32)
        self.array = self.buf.numpy()  # what MPI reads and writes: the same memory
        self.fields = self.array[: self.HEADER].view(np.int64)  # NumPy views: cheap to read and write
        self.loss = self.array[12:14].view(np.float64)
        self.payload = self.buf[self.HEADER :]

    @property
    def kind(self) -> int:
        return int(self.fields[0])

    def header(self) -> np.ndarray:
        return self.array[: self.HEADER]


def mpi():
    from mpi4py import MPI

    return MPI


def wait(requests: list, poll_s: float, spin_s: float = 2e-3) -> None:
    """Wait for MPI requests: spin first (a reply normally comes within a millisecond, and spinning drives MPI's
    progress fastest), then sleep between tests, so that a worker held back by the staleness bound leaves its
    core to the others (a parameter-server job often has more processes than cores)."""
    MPI, start = mpi(), time.monotonic()
    while not MPI.Request.Testall(requests):
        if time.monotonic() - start > spin_s:
            time.sleep(poll_s)


@dataclass
class Job:
    """What every rank of an async-ps run knows: its communicator and role, the shards, the work and the clock."""

    comm: Any  # a duplicate of the world's communicator: our tags meet nobody else's messages
    rank: int  # ranks 0 .. servers-1 serve, the others work
    servers: int
    n_workers: int
    bounds: list[tuple[int, int]]  # server s owns [start, stop) of the flattened trainable parameters
    items: WorkItems
    every: int  # updates per recorded snapshot
    t0: float  # monotonic time training began (a resumed run: earlier by the saved run's training time)
    poll_s: float  # the nap between tests of pending requests
    pipeline: bool  # workers compute the next item while their last push is in flight
