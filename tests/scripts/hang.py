"""A training job in which rank 1 (rank 0 alone) stops: the hang watchdog must end it and name that rank (test_watchdog.py).

    python tests/scripts/hang.py MODE TIMEOUT      MODE: python (Trainer.fit; blocked in Python code while
                                                     loading a batch), native (OnlineTrainer; its simulation
                                                     blocked in C code that holds Python's lock)

Before it stops, rank 1 is slow for a few steps (each shorter than TIMEOUT, together longer): no false alarm.
"""

import ctypes
import sys
import time

import torch
from torch.utils.data import Dataset

import caldera
from caldera.train.callbacks import Callback

MODE, TIMEOUT = sys.argv[1], float(sys.argv[2])
STALL_AT = 4  # global step at which rank 1 stops
world = caldera.init(seed=0)
STALLER = 1 if world.size > 1 else 0  # the rank that stops


def stuck_in_python() -> None:
    time.sleep(600)


def stuck_in_native() -> None:
    ctypes.PyDLL(None).sleep(600)  # PyDLL keeps Python's lock during the call, like a misbehaving extension


class Data(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(96, 4, generator=g), torch.randn(96, 1, generator=g)
        self.stall = False

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if self.stall:
            stuck_in_python()
        return self.x[i], self.y[i]


class SlowThenStuck(Callback):
    def __init__(self, data: Data) -> None:
        self.data = data

    def on_step_end(self, trainer) -> None:
        if world.rank != STALLER:
            return
        if trainer.global_step < STALL_AT:
            time.sleep(0.5 * TIMEOUT)  # slow, but each step moves within the timeout
        else:
            self.data.stall = True  # the next batch never comes


def online() -> None:
    from caldera.coupling import OnlineTrainer

    model = torch.nn.Linear(4, 1)
    trainer = OnlineTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), torch.nn.MSELoss(), batch_size=8,
                            strategy="allreduce", world=world, verbose=False, hang_timeout=TIMEOUT)  # fmt: skip
    for round_ in range(50):
        if world.rank == STALLER and round_ < STALL_AT:
            time.sleep(0.5 * TIMEOUT)  # a slow simulation, but every round moves within the timeout
        elif world.rank == STALLER:
            stuck_in_native()
        trainer.add(torch.randn(16, 4), torch.randn(16, 1))
        trainer.train(2)
    trainer.finish()


if MODE == "native":
    online()
    print("finished without a hang", flush=True)
    sys.exit(0)
data = Data()
model = torch.nn.Linear(4, 1)
trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), torch.nn.MSELoss(), max_epochs=50,
                          batch_size=12, strategy="allreduce" if world.size > 1 else "single", world=world,
                          callbacks=[SlowThenStuck(data)], progress=False, plot=False, hang_timeout=TIMEOUT)  # fmt: skip
trainer.fit(data)
print("finished without a hang", flush=True)
