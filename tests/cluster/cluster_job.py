"""One MPI job on the virtual cluster (2 nodes x 2 ranks) that runs several checks, since starting ranks costs
more than any of them: the nodes COMM_TYPE_SHARED sees, then the existing equivalence scripts unchanged —
data parallel through the shm reducer (node-shared memory inside a node, MPI over TCP between the nodes) in fp32
and with the bf16 wire; the hierarchical reducer's non-blocking step between nodes against its blocking one (the
same bits) and again under 5 % packet loss; a pipeline of 4 stages, 2 per node (activations cross the link between
stages 1 and 2), against one process; then async-ps (max_staleness = 0, so it must equal one process) with its
server on node 0 and workers on both nodes.

Usage: vcluster.sh mpiexec -n 4 python tests/cluster/cluster_job.py
Rank 0 prints one JSON line per check, in that order, each tagged with "check".
"""

import hashlib
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch
from mpi4py import MPI
from torch import nn
from torch.utils.data import TensorDataset

import caldera
import caldera.parallel.param_server  # noqa: F401  (importing a strategy module registers its name)
from caldera.comm.local import LocalComm
from caldera.comm.shm import NodeReducer
from caldera.models import MLP
from caldera.parallel import make_strategy
from caldera.world import World

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
world = caldera.init()
comm = MPI.COMM_WORLD
node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
nodes = {"check": "nodes", "hosts": comm.allgather(socket.gethostname()), "node_sizes": comm.allgather(node.Get_size()),
         "world_local": comm.allgather([world.local_rank, world.local_size])}  # fmt: skip
node.Free()


def run(check: str, script: str, *args: str) -> None:
    """Run one of tests/scripts/ on every rank as if launched alone; rank 0 prints its JSON lines tagged."""
    sys.argv = [script, *args]
    out = StringIO()
    with redirect_stdout(out):
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    comm.Barrier()
    for line in out.getvalue().splitlines():
        if line.startswith("{"):
            print(json.dumps({"check": check, **json.loads(line)}), flush=True)


if world.rank == 0:
    print(json.dumps(nodes), flush=True)
run("dp_fp32", "dp_equivalence.py", "mlp", "100", "24", "3", "0.001", "1", "shm")
run("dp_bf16", "dp_grad_comm.py", "shm:bf16")

VCLUSTER = Path(__file__).resolve().parent / "vcluster.sh"
# Four buckets (256 KiB, 1 MiB, 256 KiB and 1.5 MiB of fp32), summed in this order.
BUCKETS = [0, 1 << 16, 5 << 16, 6 << 16, 3 << 18]


def reduce_buckets(blocking: bool) -> torch.Tensor:
    """Every rank's seeded random 'gradients' summed over all ranks by the hierarchical reducer, bucket by bucket."""
    reducer = NodeReducer(comm, BUCKETS[-1], blocking=blocking)
    reducer.slot.copy_(torch.randn(BUCKETS[-1], generator=torch.Generator().manual_seed(world.rank)))
    for start, stop in zip(BUCKETS, BUCKETS[1:]):
        reducer.reduce(start, stop)
        reducer.progress()
    reducer.finish()
    got = reducer.result.clone()
    reducer.close()
    return got


def shape(link: str) -> str | None:
    """Reshape every link (rank 0 does it); None, or vcluster's one line saying why it cannot (loss needs netem or
    nftables)."""
    reason = None
    if world.rank == 0:
        proc = subprocess.run(["bash", str(VCLUSTER), "shape", link], capture_output=True, text=True)
        reason = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
    return comm.bcast(reason)


# The non-blocking step between nodes gives the blocking path's bits (two nodes: each sum is one addition), equal on
# every rank and equal to the exact sum rounded; with 5 % of the packets between the nodes dropped TCP retransmits
# and the bits are the same again.
section = time.perf_counter()
blocking, overlapped = reduce_buckets(True), reduce_buckets(False)
seeded = (torch.Generator().manual_seed(r) for r in range(world.size))
exact = sum(torch.randn(BUCKETS[-1], generator=g).double() for g in seeded)
link = Path(os.environ.get("VCLUSTER_STATE", "/run/caldera-vcluster"), "link").read_text().strip()
no_loss = shape(f"{link} loss 5%")
lossy = lossy_s = dropped = None
if no_loss is None:
    try:
        began = time.perf_counter()
        lossy = reduce_buckets(False)
        lossy_s = time.perf_counter() - began
        # Rank 0 is on node 0: the packets its node's nftables rule dropped (None: netem drops them, uncounted).
        nft = ["nft", "list", "table", "inet", "vcluster"]
        rule = subprocess.run(nft, capture_output=True, text=True).stdout if shutil.which("nft") else ""
        dropped = sum(int(n) for n in re.findall(r"counter packets (\d+)", rule)) if rule else None
    finally:
        shape(link)
digests = comm.allgather(hashlib.sha256(overlapped.numpy().tobytes()).hexdigest())
if world.rank == 0:
    print(json.dumps({"check": "between_nodes", "equal": torch.equal(blocking, overlapped),
                      "same_on_every_rank": len(set(digests)) == 1, "loss_unavailable": no_loss,
                      "lossy_equal": lossy is not None and torch.equal(lossy, overlapped),
                      "max_err": float((overlapped.double() - exact).abs().max()), "lossy_s": lossy_s,
                      "dropped": dropped, "seconds": time.perf_counter() - section}), flush=True)  # fmt: skip

# Four stages on four ranks, two per node: stage 1 (vnode0) sends its activations to stage 2 (vnode1) over TCP.
pipe_dir = comm.bcast(tempfile.mkdtemp(prefix="caldera-pipe-") if world.rank == 0 else None)
section = time.perf_counter()
run("pipeline", "pipeline_equivalence.py", pipe_dir, "1f1b", "4")
if world.rank == 0:
    shutil.rmtree(pipe_dir, ignore_errors=True)
    print(json.dumps({"check": "pipeline_seconds", "seconds": time.perf_counter() - section}), flush=True)


def train_ps(strategy, w):
    """async-ps with max_staleness = 0 steps like synchronous SGD: the same weights as one process."""
    torch.manual_seed(0)
    model = MLP([20, 64, 64, 5])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    trainer = caldera.Trainer(model, opt, nn.CrossEntropyLoss(), max_epochs=2, batch_size=24, world=w,
                              strategy=strategy, progress=False, seed=3)  # fmt: skip
    trainer.fit(data) if trainer.strategy.runs_own_loop else trainer.fit(data, None)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer.strategy


# The server is rank 0 (node 0); workers are ranks 1 (node 0), 2 and 3 (node 1): pushes and replies cross the link.
g = torch.Generator().manual_seed(123)
data = TensorDataset(torch.randn(100, 20, generator=g), torch.randint(0, 5, (100,), generator=g))
ps, strategy = train_ps(make_strategy("async-ps", servers=1, max_staleness=0), world)
if world.rank == 0:
    ref, _ = train_ps("single", World(comm=LocalComm()))
    print(
        json.dumps({"check": "async_ps", "diff": (ps - ref).abs().max().item(), **strategy.stats}), flush=True
    )
