"""Run on N ranks: rank FAIL_RANK raises (or is SIGKILLed) at step 3; every rank must stop promptly.

Usage: mpiexec -n N python failing_rank.py MODE   (MODE: raise | kill)
"""

import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import caldera

mode = sys.argv[1]
world = caldera.init(seed=0)


class Sabotage(caldera.Callback):
    pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if world.rank == world.size - 1 and self.calls == 3:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("sabotaged input on purpose")
        return self.lin(x)


data = TensorDataset(torch.randn(4000, 8), torch.randint(0, 2, (4000,)))
model = Net()
trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=50,
                          batch_size=8, strategy="allreduce", progress=False)  # fmt: skip
trainer.fit(data)
