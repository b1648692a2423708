"""Online training on real ranks: equals one process on the union of the ranks' batches; restores exactly.

Run by tests/test_coupling.py under mpiexec; prints OK lines on rank 0 and exits non-zero on a mismatch."""

import sys

import numpy as np
import torch

import caldera
from caldera.coupling import OnlineTrainer

run_dir = sys.argv[1]
world = caldera.init(seed=0)
rank, size = world.rank, world.size


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def online(model: torch.nn.Module) -> OnlineTrainer:
    return OnlineTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(), capacity=50,
                         batch_size=4 * size, strategy="allreduce", world=world, run_dir=run_dir, verbose=False)  # fmt: skip


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# 1. A rank with an empty buffer: every rank gets the same error naming it (no rank left waiting).
first = online(net())
if rank == 0:
    first.add(np.ones((3, 6)), np.ones((3, 2)))
try:
    first.train(1)
    raise SystemExit(f"rank {rank}: train() with an empty buffer on rank 1 did not raise")
except ValueError as exc:
    assert "rank(s) [1]" in str(exc), exc

# 2. Each rank streams its own samples; record what each rank trained on.
model = net()
trainer = online(model)
rng = np.random.default_rng([3, rank])
drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
sample = trainer.buffer.sample
trainer.buffer.sample = lambda n: drawn.append(sample(n)) or drawn[-1]
for _ in range(3):
    x = rng.normal(size=(20, 6))
    trainer.add(x, np.stack([x[:, :3].sum(1), np.sin(x[:, 3])], axis=1))  # float64 in, stored as float32
    trainer.train(4)
everyone = world.comm.allgather(flat(model))
assert all(torch.equal(everyone[0], w) for w in everyone), "ranks hold different weights"

# One process, same start, each step on the concatenation of the ranks' batches of that step.
batches = world.comm.allgather(drawn)
reference = net()
opt = torch.optim.SGD(reference.parameters(), lr=0.1)
for step in range(len(drawn)):
    x = torch.cat([batches[r][step][0] for r in range(size)])
    y = torch.cat([batches[r][step][1] for r in range(size)])
    opt.zero_grad()
    torch.nn.functional.mse_loss(reference(x), y).backward()
    opt.step()
gap = float((flat(reference) - flat(model)).abs().max())
assert gap < 1e-5, f"online training on {size} ranks differs from one process by {gap}"
if rank == 0:
    print(f"OK equivalence: {len(drawn)} steps, max |difference| {gap:.2e}")

# 3. Checkpoint, train on; a new trainer restored from the checkpoint trains on identically.
trainer.buffer.sample = sample
trainer.checkpoint(extra={"rank": rank})
trainer.train(3)
expected = flat(model)
again = online(torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)))
extra = again.restore()
assert extra == {"rank": rank}, extra
assert len(again.buffer) == len(trainer.buffer) and again.rounds == 3, (len(again.buffer), again.rounds)
again.train(3)
assert torch.equal(flat(again.model), expected), "a restored online trainer did not continue identically"
if rank == 0:
    print("OK restore")
