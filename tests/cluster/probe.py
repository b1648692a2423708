"""Check a virtual cluster from inside an MPI job: one COMM_TYPE_SHARED communicator per node, and the bandwidth
and latency of a ping-pong between rank 0 and the first rank on another node. Prints one JSON line (rank 0)."""

import json
import socket
import sys
import time

import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD
node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
hosts = world.allgather(socket.gethostname())
node_sizes = world.allgather(node.Get_size())
# Ranks on one node share a hostname and a node communicator; its size counts the ranks with that hostname.
leaders = world.allgather(node.bcast(world.Get_rank(), root=0))
other = next((r for r, h in enumerate(hosts) if h != hosts[0]), None)
mib = int(sys.argv[1]) if len(sys.argv) > 1 else 16


def pingpong(nbytes: int, repeats: int) -> float:
    """Seconds for one round trip of ``nbytes`` between rank 0 and ``other`` (best of ``repeats``)."""
    buf = np.zeros(max(nbytes, 1), dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        world.Barrier()
        t = time.perf_counter()
        if world.Get_rank() == 0:
            world.Send(buf, dest=other)
            world.Recv(buf, source=other)
        elif world.Get_rank() == other:
            world.Recv(buf, source=0)
            world.Send(buf, dest=0)
        best = min(best, time.perf_counter() - t)
    return best


result = {"hosts": hosts, "node_sizes": node_sizes, "leaders": leaders, "nodes": len(set(leaders))}
if other is not None:
    latency = pingpong(8, 20) / 2
    round_trip = pingpong(mib << 20, 3)
    result |= {"latency_us": round(latency * 1e6, 1), "gbit_s": round(2 * (mib << 23) / round_trip / 1e9, 3)}
if world.Get_rank() == 0:
    print(json.dumps(result), flush=True)
