"""One MPI job on the virtual cluster (2 nodes x 2 ranks) that runs several checks, since starting ranks costs
more than any of them: the nodes COMM_TYPE_SHARED sees, then the existing equivalence scripts unchanged —
data parallel through the shm reducer (node-shared memory inside a node, MPI over TCP between the nodes) in fp32
and with the bf16 wire, then async-ps (max_staleness = 0, so it must equal one process) with its server on node 0 and\nworkers on both nodes.

Usage: vcluster.sh mpiexec -n 4 python tests/cluster/cluster_job.py
Rank 0 prints one JSON line per check, in that order, each tagged with "check".
"""

import json
import runpy
import socket
import sys
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
