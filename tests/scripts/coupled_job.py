"""One MPMD job: simulation ranks stream samples to trainer ranks, trainers publish weights back.

    mpiexec -n 3 python coupled_job.py simulation : -n 2 python coupled_job.py trainer

Every sample carries (simulation rank, batch, index) so the trainers can check that each arrived exactly once."""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from caldera.coupling import OnlineTrainer, connect

BATCHES, PER_BATCH = 6, 5
role = sys.argv[1]
link = connect(role)


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


if role == "simulation":
    rank = link.comm.Get_rank()  # among the simulation ranks only
    model, start = net(), flat(net())
    x = np.zeros((PER_BATCH, 3))
    for batch in range(BATCHES):
        x[:, 0], x[:, 1], x[:, 2] = rank, batch, np.arange(PER_BATCH)
        link.send(x, x.sum(axis=1, keepdims=True))  # copied: overwriting x next round is safe
        if batch == 2 and rank == 1 and "--die" in sys.argv:
            raise RuntimeError("simulation rank 1 blew up on purpose")
    while not link.refresh(model):  # the trainer publishes after every round: wait for one copy
        time.sleep(0.005)
    total = link.comm.allreduce(link.sent)  # the simulation's own communicator works alongside
    link.close()
    # After both sides closed, the whole job compares: the weights this rank holds must be, bit for bit, one
    # of the versions the trainers published (and not the initial ones): they arrived intact.
    published = [v for part in MPI.COMM_WORLD.allgather(flat(model)) if isinstance(part, list) for v in part]
    exact = any(torch.equal(flat(model), v) for v in published)
    print(f"SIM {rank}/{link.comm.Get_size()} sent {link.sent} of {total} versions>=1 {link.version >= 1} "
          f"trained-weights {not torch.equal(start, flat(model))} a-published-version {exact} "
          f"of {len(published)}", flush=True)  # fmt: skip
else:
    world = link.world  # the trainer ranks only
    model = net()
    online = OnlineTrainer(model, torch.optim.SGD(model.parameters(), lr=0.05), torch.nn.MSELoss(), capacity=100,
                           batch_size=4, world=world,
                           strategy="allreduce" if world.size > 1 else "single", verbose=False)  # fmt: skip
    keys, published = [], []
    while link.active():
        got = link.receive()
        if got is not None:
            online.add(*got)
            keys += [tuple(int(v) for v in row) for row in got[0]]
        online.train(2)
        if link.publish(online.model):
            published.append(flat(online.model))
    link.close()
    everyone = [k for part in world.comm.allgather(keys) for k in part]
    sims = len({k[0] for k in everyone})
    expected = {(s, b, i) for s in range(sims) for b in range(BATCHES) for i in range(PER_BATCH)}
    assert len(everyone) == len(expected) and set(everyone) == expected, (len(everyone), sorted(everyone)[:5])
    final = flat(online.model)
    assert all(torch.equal(final, w) for w in world.comm.allgather(final)), "trainer ranks disagree"
    MPI.COMM_WORLD.allgather(published)  # collective with the simulation ranks' check
    if world.is_main:
        print(f"TRAINERS {world.size} received {len(everyone)} samples from {sims} simulation ranks, each once",
              flush=True)  # fmt: skip
