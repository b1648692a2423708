"""Low-precision gradient sums (``[parallel] grad_comm``): values travel as bf16 or fp16, sums are taken in fp32.

MPI has no bf16 type, and no collective that sums 16-bit values in fp32, so the sum is built from collectives
that only move bits:
1. an all-to-all gives every rank the 16-bit copies of its 1/N share of the buffer from all N ranks (a
   reduce-scatter without the reduce);
2. each rank sums its share in fp32, in rank order, and rounds the sum once to 16 bits;
3. an all-gather hands every share to every rank, which widens them back into the fp32 buffer.
Each rank receives (N-1)/N of the buffer twice at 2 bytes a value: half of what a ring all-reduce moves in fp32,
at any N. (An all-gather of whole buffers and a local sum would receive N-1 16-bit buffers per rank, more than
the 2(N-1)/N fp32 buffers of a ring all-reduce once N > 4.) Each share is summed by one rank and then only
copied, so every rank ends with the same bits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from caldera.comm.base import Communicator, Handle

WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CHUNK = 1 << 18  # values: a chunk of every row and of the fp32 sum stays in L2 while it is summed


def wire_dtype(grad_comm: str) -> torch.dtype | None:
    """The dtype gradients travel in for ``grad_comm`` (None: the parameters' own); raise on an unknown name."""
    if grad_comm not in WIRE_DTYPES:
        raise ValueError(f"unknown grad_comm {grad_comm!r}; use one of {', '.join(map(repr, WIRE_DTYPES))}")
    return WIRE_DTYPES[grad_comm]


def round_into_(dst: torch.Tensor, src: torch.Tensor, scale: float = 1.0) -> None:
    """Write ``src * scale`` into ``dst``, rounded once to ``dst``'s dtype (the product is taken in fp32)."""
    if scale == 1.0:
        dst.copy_(src)
    else:
        torch.mul(src, scale, out=dst)


def sum_rows_(out: torch.Tensor, rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Set fp32 ``out`` to the sum of ``rows`` accumulated in fp32 in the order given; return ``out``."""
    # In-place adds into the fp32 ``out`` compute in fp32 (``torch.add`` of two bf16 rows would sum in bf16).
    for a in range(0, out.numel(), _CHUNK):
        b = min(a + _CHUNK, out.numel())
        acc = out[a:b]
        acc.copy_(rows[0][a:b])
        for row in rows[1:]:
            acc.add_(row[a:b])
    return out


class SumJob:
    """The 16-bit staging buffers for summing one flat buffer; allocated once, reused every step."""

    def __init__(self, flat: torch.Tensor, size: int, dtype: torch.dtype) -> None:
        self.flat, self.n = flat, flat.numel()
        shard = -(-self.n // size)
        self.send = torch.zeros(size * shard, dtype=dtype, device=flat.device)  # the tail past n stays zero
        self.recv = torch.empty_like(self.send)
        self.rows = list(self.recv.view(size, shard))  # row k: rank k's copy of this rank's share
        self.acc = torch.empty(shard, dtype=torch.float32, device=flat.device)
        self.mine = torch.empty(shard, dtype=dtype, device=flat.device)
        self.request: Handle | None = None
        self.phase = 0  # 0: idle, 1: all-to-all in flight, 2: all-gather in flight
        self.scale = 1.0


class LowPrecisionSum:
    """Sums flat buffers over ``comm`` in place with 16-bit messages and fp32 accumulation, without blocking.

    Who calls what: ``job(flat)`` once per buffer at setup; then, each step and in the same order on every rank,
    ``start(job)``, and ``test()`` / ``wait()`` on the handle it returns. MPI matches non-blocking collectives
    by the order in which each rank starts them on a communicator; a rank starts a job's all-gather whenever it
    notices that job's all-to-all done, which differs between ranks, so the all-gathers run on a communicator of
    their own and are started strictly in the order the jobs were.
    """

    def __init__(self, comm: Communicator, dtype: torch.dtype) -> None:
        self.comm, self.dtype = comm, dtype
        self.gather_comm = comm.split(0, comm.rank)  # collective: every rank builds this at the same point
        self.queue: deque[SumJob] = deque()  # started and unfinished, in start order

    def job(self, flat: torch.Tensor) -> SumJob:
        """Allocate the staging buffers to sum ``flat`` (any float dtype; the sum is written back into it)."""
        return SumJob(flat, self.comm.size, self.dtype)

    def start(self, job: SumJob, scale: float = 1.0) -> Handle:
        """Round ``job.flat * scale`` to 16 bits and start the sum; after ``wait()`` ``flat`` holds sum / scale."""
        job.scale = scale
        round_into_(job.send[: job.n], job.flat, scale)
        job.request, job.phase = self.comm.Ialltoall(job.send, job.recv), 1
        self.queue.append(job)
        handle = _SumHandle(self, job)
        if job.request.stream_ordered:
            # NCCL: queue every phase on the device now; the host does not block and the order is fixed.
            handle.wait()
        return handle

    def progress(self) -> None:
        """Advance every started job that can advance without blocking."""
        in_order = True  # an all-gather may start only once every earlier job's has
        for job in list(self.queue):
            if job.phase == 1 and in_order:
                if job.request.test():
                    self._gather(job)
                else:
                    in_order = False
            if job.phase == 2 and job.request.test():
                self._finish(job)

    def wait(self, job: SumJob) -> None:
        """Block until ``job`` is done, starting (in order) the all-gathers of the jobs before it."""
        if job.phase == 0:
            return
        for earlier in list(self.queue):
            if earlier.phase == 1:
                earlier.request.wait()
                self._gather(earlier)
            if earlier is job:
                break
        job.request.wait()
        self._finish(job)

    def close(self) -> None:
        """Free the all-gathers' communicator (collective)."""
        self.gather_comm.Free()

    def _gather(self, job: SumJob) -> None:
        sum_rows_(job.acc, job.rows)
        job.mine.copy_(job.acc)  # the sum's one rounding, for the trip back
        job.request, job.phase = self.gather_comm.Iallgather(job.mine, job.send), 2

    def _finish(self, job: SumJob) -> None:
        job.flat.copy_(job.send[: job.n])
        if job.scale != 1.0:
            job.flat.mul_(1.0 / job.scale)  # in the fp32 buffer: dividing in fp16 would underflow
        job.request, job.phase = None, 0
        self.queue.remove(job)


class _SumHandle:
    """The handle ``LowPrecisionSum.start`` returns; testing it advances every job in flight."""

    def __init__(self, owner: LowPrecisionSum, job: SumJob) -> None:
        self.owner, self.job = owner, job
        self.stream_ordered = job.request.stream_ordered  # NCCL: start() already queued every phase

    def wait(self) -> None:
        """Block until the sum is in the buffer."""
        self.owner.wait(self.job)

    def test(self) -> bool:
        """Advance what can advance; return True once the sum is in the buffer."""
        self.owner.progress()
        return self.job.phase == 0
