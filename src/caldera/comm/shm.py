"""Intra-node gradient reduction through one MPI-3 shared-memory window.

Ranks on the same node can read each other's memory. Each rank's gradient buckets live in its own *slot* of a
window allocated with ``MPI.Win.Allocate_shared``; to reduce a bucket, every local rank sums its 1/L share of
the bucket across all L slots into a shared *result* row (a reduce-scatter with no message at all), and the
result is then read by everyone. Across nodes, each rank all-reduces its share with the ranks holding the same
share on the other nodes (MPI over the network), so the scheme is the usual hierarchical all-reduce.
Compared with a message-passing all-reduce on one node this touches each byte fewer times: no copy into and
out of MPI's transport buffers. Synchronisation is two MPI barriers on the node communicator per bucket.

With a 16-bit ``wire`` dtype (``grad_comm``) the slots hold bf16/fp16 copies of the gradients (each rank rounds
its own fp32 gradients into its slot as a bucket completes), the result row stays fp32 and every share is summed
in fp32; between nodes the shares travel in 16 bits too (``comm/lowp.py``).

Between nodes, a share's all-reduce is non-blocking: it starts as soon as the node has summed the share, and
``finish()`` waits for it, so the network carries one bucket while backward computes the next (as gloo's threads
do for DDP); ``progress()``, called from the gradient hooks, moves it along. Every rank starts the buckets in the
same order, so MPI matches them without tags. ``blocking=True`` keeps the earlier path (each share's all-reduce
ends before backward goes on), for comparison: across two nodes both give the same bits (a sum of two is one
addition, whatever MPI's algorithm).
"""

from __future__ import annotations

import numpy as np
import torch

from caldera.comm.buckets import padded
from caldera.comm.lowp import LowPrecisionSum, SumJob, round_into_, sum_rows_

_CHUNK = 1 << 18  # floats: 1 MiB per slot, so a chunk of two slots and the result stays in L2


class NodeReducer:
    """Sum flat gradient buffers over all ranks, through node-shared memory plus MPI between nodes.

    The slots are fp32 (and are the gradients themselves) or, with ``wire``, 16-bit copies of them; the result
    row is always fp32. ``node`` (default: the ranks sharing this node's memory) groups the ranks that share a
    window (``close()`` frees it); a test can pass smaller groups to run the path between nodes on one machine.
    ``blocking``: each share's all-reduce between nodes ends before ``reduce`` returns (no overlap).
    """

    def __init__(
        self, comm, total: int, wire: torch.dtype | None = None, node=None, blocking: bool = False
    ) -> None:
        from mpi4py import MPI

        self.node = node if node is not None else comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        self.local_size, self.local_rank = self.node.Get_size(), self.node.Get_rank()
        # Ranks with the same local rank on every node reduce the same shares between nodes.
        self.cross = comm.Split(self.local_rank, comm.Get_rank())
        self.total, self.wire, self.blocking = total, wire, blocking
        # Shares in flight between nodes, in start order: (handle, lo, hi, scale); finish() waits for them.
        self._inflight: list[tuple[object, int, int, float]] = []
        # Rows padded to whole cache lines and the window's start rounded up to one (MPI's was 16 bytes off):
        # a GEMM writing gradients into misaligned memory is 15-30 % slower (comm/linear_grads.py).
        row = padded(total, 2)  # a whole number of cache lines for 16-bit slots too
        slot_bytes = _aligned(self.local_size * row * (2 if wire is not None else 4))
        nbytes = slot_bytes + row * 4 + 64 if self.local_rank == 0 else 0
        self.win = MPI.Win.Allocate_shared(nbytes, 4, comm=self.node)
        buf, _ = self.win.Shared_query(0)
        start = -np.frombuffer(buf, dtype=np.uint8).ctypes.data % 64  # equal on every rank: pages map whole
        # numpy has no bf16: 16-bit slots map the bits as int16 and view them
        dtype = np.float32 if wire is None else np.int16
        slots = torch.from_numpy(
            np.ndarray(buffer=buf, dtype=dtype, shape=(self.local_size, row), offset=start)
        )
        self.slots = (slots if wire is None else slots.view(wire))[:, :total]
        result = np.ndarray(buffer=buf, dtype=np.float32, shape=(total,), offset=start + slot_bytes)
        self.result = torch.from_numpy(result)
        self.slot = self.slots[self.local_rank]
        self._between: LowPrecisionSum | None = None
        self._jobs: dict[tuple[int, int], SumJob] = {}  # one per share summed between nodes
        if wire is not None and self.cross.Get_size() > 1:
            from caldera.comm.mpi import MPIComm

            self._between = LowPrecisionSum(MPIComm(self.cross), wire)

    @staticmethod
    def usable(comm) -> bool:
        """True when every node holds the same number (>1) of ranks, the layout this scheme needs."""
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        sizes = comm.allgather(node.Get_size())
        node.Free()
        return len(set(sizes)) == 1 and sizes[0] > 1

    def reduce(self, start: int, stop: int, source: torch.Tensor | None = None, scale: float = 1.0) -> None:
        """Sum ``[start, stop)`` of every local slot into the result row (this rank's share), then across nodes.

        fp32 slots: the share of every slot is zeroed as it is summed (the slots are the gradients). 16-bit slots:
        ``source`` (this rank's fp32 gradients for the range) is first rounded, times ``scale``, into this rank's
        slot and zeroed; the result is divided by ``scale``. Collective over all ranks; the result is complete on
        this node only after ``finish()``.
        """
        if self.wire is not None:
            self._stage(start, source, scale)
        self.node.Barrier()  # every local rank has written this bucket into its slot
        lo, hi = self._share(start, stop)
        if self.wire is None:
            self._sum_and_zero(lo, hi)
        else:
            sum_rows_(self.result[lo:hi], self.slots[:, lo:hi].unbind())
        if self.cross.Get_size() > 1 and hi > lo:
            self._inflight.append((self._between_nodes(lo, hi), lo, hi, scale))
            if self.blocking:
                self._complete()
        elif scale != 1.0:
            self.result[lo:hi].mul_(1.0 / scale)

    def progress(self) -> None:
        """Let MPI move the shares in flight between nodes (no progress thread: someone must call into MPI)."""
        if not self._inflight:
            return
        if self._between is not None:
            self._between.progress()
        else:
            self._inflight[0][0].Test()  # any test drives the whole progress engine

    def _complete(self) -> None:
        """Wait, in start order, for every share in flight between nodes; divide by the wire scale."""
        for handle, lo, hi, scale in self._inflight:
            if self._between is None:
                handle.Wait()
            else:
                handle.wait()
            if scale != 1.0:
                self.result[lo:hi].mul_(1.0 / scale)
        self._inflight.clear()

    def _sum_and_zero(self, lo: int, hi: int) -> None:
        # In cache-sized chunks: sum the share, then zero it in every slot while it is still in cache, which
        # leaves every slot ready for the next backward pass without a separate memset.
        for a in range(lo, hi, _CHUNK):
            b = min(a + _CHUNK, hi)
            out = self.result[a:b]
            torch.add(self.slots[0, a:b], self.slots[1, a:b], out=out)
            for k in range(2, self.local_size):
                out.add_(self.slots[k, a:b])
            self.slots[:, a:b].zero_()

    def _stage(self, start: int, source: torch.Tensor, scale: float) -> None:
        """Round this rank's gradients into its 16-bit slot, zeroing them chunk by chunk while in cache."""
        slot = self.slot[start : start + source.numel()]
        for a in range(0, source.numel(), _CHUNK):
            b = min(a + _CHUNK, source.numel())
            round_into_(slot[a:b], source[a:b], scale)
            source[a:b].zero_()

    def _between_nodes(self, lo: int, hi: int):
        """Start the all-reduce of the share ``[lo, hi)`` with the other nodes; return its request/handle."""
        if self._between is None:
            from mpi4py import MPI

            return self.cross.Iallreduce(MPI.IN_PLACE, self.result[lo:hi].numpy())
        # The node's fp32 sum is rounded to 16 bits for the wire; LowPrecisionSum keeps its phases in start order.
        job = self._jobs.get((lo, hi))
        if job is None:
            job = self._jobs[lo, hi] = self._between.job(self.result[lo:hi])
        return self._between.start(job)

    def _share(self, start: int, stop: int) -> tuple[int, int]:
        n = stop - start
        return start + self.local_rank * n // self.local_size, start + (
            self.local_rank + 1
        ) * n // self.local_size

    def clip_(self, max_norm: float, ranges: list[tuple[int, int]]) -> float:
        """Scale the shared result so its global 2-norm is at most ``max_norm``; return the norm before.

        Every rank reads the same result, so each scales only its own shares (then a barrier): scaling the
        whole shared buffer from every rank would multiply it several times.
        """
        shares = [self.result[lo:hi] for lo, hi in (self._share(a, b) for a, b in ranges)]
        local = float(sum(float(s.double().pow(2).sum()) for s in shares))
        norm = self.node.allreduce(local) ** 0.5
        factor = max_norm / (norm + 1e-6)
        if factor < 1:
            for s in shares:
                s.mul_(factor)
        self.node.Barrier()
        return norm

    def finish(self) -> None:
        """Wait for this rank's shares between nodes, then until every local rank has written its shares."""
        self._complete()
        self.node.Barrier()

    def close(self) -> None:
        """Free the window and the communicators."""
        if self._between is not None:
            self._between.close()
        self.win.Free()
        self.cross.Free()
        self.node.Free()


def _aligned(nbytes: int, to: int = 64) -> int:
    """``nbytes`` rounded up to a multiple of ``to`` (where the fp32 result row starts in the window)."""
    return -(-nbytes // to) * to
