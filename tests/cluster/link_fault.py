"""A data-parallel job on the virtual cluster that loses its last node twice: first its link, then its processes.

Usage: CALDERA_MPIEXEC=tests/cluster/mpiexec caldera launch -n N --max-restarts 2 -- python link_fault.py HANG_TIMEOUT RUN_DIR
On the first launch rank 0 takes the last node's link down (in the hub: `vcluster.sh link`) after step 3 and prints
when (Unix time), and brings it back once rank 0 has ended (a repaired switch port): the hang watchdog must end the
job within about HANG_TIMEOUT with a report naming the ranks (and their node) the others wait for, and the launcher
must give up on the lost node soon after. On the second launch rank 0 kills every process on the last node
(`vcluster.sh kill`: its ranks and Open MPI's daemon, as when a node crashes) 3 steps after resuming: Open MPI
notices the lost daemon at once and ends the job naming the node. Each relaunch by `caldera launch --max-restarts`
resumes from its last checkpoint (every step); the third finishes (tests/test_cluster.py).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import caldera
from caldera.checkpoint import Checkpointer
from caldera.train.callbacks import Callback

TIMEOUT, RUN_DIR, AFTER = float(sys.argv[1]), sys.argv[2], 3
LAUNCH = int(os.environ.get("CALDERA_RESTART", "0"))
VCLUSTER = Path(__file__).resolve().parent / "vcluster.sh"
world = caldera.init(seed=0)


class Faults(Callback):
    def on_fit_start(self, trainer) -> None:
        self.first = trainer.global_step

    def on_step_end(self, trainer) -> None:
        if world.rank != 0 or LAUNCH > 1 or trainer.global_step != self.first + AFTER:
            return
        last = int(Path(os.environ.get("VCLUSTER_STATE", "/run/caldera-vcluster"), "nodes").read_text()) - 1
        if LAUNCH == 0:
            # Repaired once this rank has ended (the watchdog's abort); the relaunch's mpiexec waits for that.
            subprocess.run(["bash", str(VCLUSTER), "link", str(last), "down", "--until-exit", str(os.getpid())],
                           check=True)  # fmt: skip
            print(f"link to node {last} down after step {trainer.global_step} (link down at {time.time():.3f})",
                  flush=True)  # fmt: skip
        else:
            print(f"killing node {last}'s processes after step {trainer.global_step} (killed at {time.time():.3f})",
                  flush=True)  # fmt: skip
            subprocess.run(["bash", str(VCLUSTER), "kill", str(last)], check=True)


if world.rank == 0 and LAUNCH:
    print(f"relaunch {LAUNCH} at {time.time():.3f}", flush=True)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(96, 4, generator=g), torch.randn(96, 1, generator=g))
model = torch.nn.Linear(4, 1)
trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), torch.nn.MSELoss(), max_epochs=4,
                          batch_size=12, strategy="allreduce", world=world, callbacks=[Faults()],
                          progress=False, plot=False, hang_timeout=TIMEOUT, run_dir=RUN_DIR,
                          checkpointer=Checkpointer(os.path.join(RUN_DIR, "checkpoints"), world, every=1, keep=2),
                          resume=os.environ.get("CALDERA_RESUME") == "1")  # fmt: skip
trainer.fit(data)
if world.rank == 0:
    print(f"finished at step {trainer.global_step}", flush=True)
