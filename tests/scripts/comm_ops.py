"""Run on N ranks (mpiexec or torchrun): every communicator call against what the math says; prints 'OK <rank>' per rank."""

import numpy as np
import torch

import caldera

world = caldera.init()
comm, r, n = world.comm, world.rank, world.size

t = torch.full((5,), float(r + 1))
ptr = t.data_ptr()
comm.Allreduce(t)
assert torch.equal(t, torch.full((5,), n * (n + 1) / 2)) and t.data_ptr() == ptr  # in place, no copy

m = torch.tensor([float(r)], dtype=torch.float64)
comm.Allreduce(m, op="max")
assert m.item() == n - 1

big = torch.arange(1_000_000, dtype=torch.float32) * (r + 1)
h = comm.Iallreduce(big)
h.wait()
assert torch.equal(big, torch.arange(1_000_000, dtype=torch.float32) * (n * (n + 1) / 2))

b = torch.full((3,), float(r))
comm.Bcast(b, root=n - 1)
assert torch.equal(b, torch.full((3,), float(n - 1)))

recv = torch.empty(2 * n, dtype=torch.int64)
comm.Allgather(torch.tensor([r, 10 * r]), recv)
assert recv.tolist() == [v for k in range(n) for v in (k, 10 * k)]

send = torch.arange(2 * n, dtype=torch.float32)
out = torch.empty(2)
comm.Reduce_scatter(send, out)
assert torch.equal(out, torch.tensor([2.0 * r, 2.0 * r + 1]) * n)

assert comm.bcast({"k": r}, root=0) == {"k": 0}
assert comm.allgather(r * r) == [k * k for k in range(n)]
assert comm.allreduce(r) == n * (n - 1) // 2
assert np.array_equal(comm.allreduce(np.ones(2)), np.full(2, n))

sub = comm.split(color=r % 2, key=r)
assert sub.size == len(range(r % 2, n, 2)) and sub.rank == r // 2
s = torch.ones(1)
sub.Allreduce(s)
assert s.item() == sub.size

h16 = torch.full((3,), 1.5, dtype=torch.bfloat16)
comm.Allreduce(h16)  # MPI has no bf16: reduced in fp32 and written back
assert h16.dtype == torch.bfloat16 and torch.equal(h16, torch.full((3,), 1.5 * n, dtype=torch.bfloat16))
h16 = torch.full((3,), float(r), dtype=torch.bfloat16)
comm.Iallreduce(h16).wait()
assert torch.equal(h16, torch.full((3,), n * (n - 1) / 2, dtype=torch.bfloat16))
b16 = torch.tensor([r + 0.1], dtype=torch.bfloat16)
comm.Bcast(b16, root=0)
assert torch.equal(b16, torch.tensor([0.1], dtype=torch.bfloat16))
if world.launcher == "mpi":  # MPI has no complex type to carry; gloo and NCCL have
    try:
        comm.Allreduce(torch.ones(2, dtype=torch.complex64))
    except TypeError as exc:
        assert "complex64" in str(exc) and "float32" in str(exc)
    else:
        raise AssertionError("a complex buffer should be refused with a clear message")

# The bit movers behind 16-bit gradient sums: bf16 (which MPI has no type for) arrives bit for bit.
blocks = torch.tensor([100.0 * r + k for k in range(n)], dtype=torch.bfloat16)  # block k goes to rank k
got = torch.empty(n, dtype=torch.bfloat16)
comm.Ialltoall(blocks, got).wait()
assert got.tolist() == [100.0 * k + r for k in range(n)]
g16 = torch.empty(2 * n, dtype=torch.float16)
h = comm.Iallgather(torch.tensor([r, -r], dtype=torch.float16), g16)
h.wait()
assert g16.tolist() == [v for k in range(n) for v in (k, -k)]
dup = comm.split(color=0, key=r)
dup.Free()

# Point to point around a ring (pipeline stages): blocking and non-blocking, fp32 and bf16 bit for bit.
right, left = (r + 1) % n, (r - 1) % n
incoming = torch.empty(4)
recv = comm.Irecv(incoming, left, tag=5)
send = comm.Isend(torch.arange(4.0) + 10 * r, right, tag=5)
recv.wait()
send.wait()
assert incoming.tolist() == [10.0 * left + k for k in range(4)]
if r % 2 == 0:  # blocking calls in an order that cannot deadlock
    comm.Send(torch.tensor([r + 0.5], dtype=torch.bfloat16), right, tag=6)
    b = torch.empty(1, dtype=torch.bfloat16)
    comm.Recv(b, left, tag=6)
else:
    b = torch.empty(1, dtype=torch.bfloat16)
    comm.Recv(b, left, tag=6)
    comm.Send(torch.tensor([r + 0.5], dtype=torch.bfloat16), right, tag=6)
assert b.item() == left + 0.5

comm.Barrier()
print(f"OK {r}", flush=True)
