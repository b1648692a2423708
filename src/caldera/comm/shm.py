"""Intra-node gradient reduction through one MPI-3 shared-memory window.

Ranks on the same node can read each other's memory. Each rank's gradient buckets live in its own *slot* of a
window allocated with ``MPI.Win.Allocate_shared``; to reduce a bucket, every local rank sums its 1/L share of
the bucket across all L slots into a shared *result* row (a reduce-scatter with no message at all), and the
result is then read by everyone. Across nodes, each rank all-reduces its share with the ranks holding the same
share on the other nodes (MPI over the network), so the scheme is the usual hierarchical all-reduce.
Compared with a message-passing all-reduce on one node this touches each byte fewer times: no copy into and
out of MPI's transport buffers. Synchronisation is two MPI barriers on the node communicator per bucket.
"""

from __future__ import annotations

import numpy as np
import torch

_CHUNK = 1 << 18  # floats: 1 MiB per slot, so a chunk of two slots and the result stays in L2


class NodeReducer:
    """Sum flat float32 gradient buffers over all ranks, through node-shared memory plus MPI between nodes."""

    def __init__(self, comm, total: int) -> None:
        from mpi4py import MPI

        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        self.local_size, self.local_rank = self.node.Get_size(), self.node.Get_rank()
        # Ranks with the same local rank on every node reduce the same shares between nodes.
        self.cross = comm.Split(self.local_rank, comm.Get_rank())
        self.total = total
        nbytes = (self.local_size + 1) * total * 4 if self.local_rank == 0 else 0
        self.win = MPI.Win.Allocate_shared(nbytes, 4, comm=self.node)
        buf, _ = self.win.Shared_query(0)
        table = torch.from_numpy(np.ndarray(buffer=buf, dtype=np.float32, shape=(self.local_size + 1, total)))
        self.slots, self.result = table[: self.local_size], table[self.local_size]
        self.slot = self.slots[self.local_rank]

    @staticmethod
    def usable(comm) -> bool:
        """True when every node holds the same number (>1) of ranks, the layout this scheme needs."""
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        sizes = comm.allgather(node.Get_size())
        node.Free()
        return len(set(sizes)) == 1 and sizes[0] > 1

    def reduce(self, start: int, stop: int) -> None:
        """Sum ``[start, stop)`` of every local slot into the result row (this rank's share), then across nodes,
        and zero that share of every slot. Collective over all ranks; the result is complete on this node only
        after ``finish()``.
        """
        self.node.Barrier()  # every local rank has written this bucket into its slot
        lo, hi = self._share(start, stop)
        # In cache-sized chunks: sum the share, then zero it in every slot while it is still in cache, which
        # leaves every slot ready for the next backward pass without a separate memset.
        for a in range(lo, hi, _CHUNK):
            b = min(a + _CHUNK, hi)
            out = self.result[a:b]
            torch.add(self.slots[0, a:b], self.slots[1, a:b], out=out)
            for k in range(2, self.local_size):
                out.add_(self.slots[k, a:b])
            self.slots[:, a:b].zero_()
        if self.cross.Get_size() > 1:
            from mpi4py import MPI

            self.cross.Allreduce(MPI.IN_PLACE, self.result[lo:hi].numpy())

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
        """Wait until every local rank has written its shares of the result."""
        self.node.Barrier()

    def close(self) -> None:
        """Free the window and the communicators."""
        self.win.Free()
        self.cross.Free()
        self.node.Free()
