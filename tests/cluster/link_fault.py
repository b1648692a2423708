"""A data-parallel job on the virtual cluster whose link to the last node goes down mid-training.

Usage: vcluster.sh mpiexec -n N python tests/cluster/link_fault.py HANG_TIMEOUT
Rank 0 takes the last node's link down (in the hub: `vcluster.sh link`) after step 3 and prints when (Unix time).
The hang watchdog must then end the job within about HANG_TIMEOUT with a report naming the ranks (and their
node) the others wait for, and the launcher must give up on the lost node soon after (tests/test_cluster.py).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import caldera
from caldera.train.callbacks import Callback

TIMEOUT, DOWN_AT = float(sys.argv[1]), 3
VCLUSTER = Path(__file__).resolve().parent / "vcluster.sh"
world = caldera.init(seed=0)


class CutTheLink(Callback):
    def on_step_end(self, trainer) -> None:
        if world.rank == 0 and trainer.global_step == DOWN_AT:
            nodes = int(Path(os.environ.get("VCLUSTER_STATE", "/run/caldera-vcluster"), "nodes").read_text())
            subprocess.run(["bash", str(VCLUSTER), "link", str(nodes - 1), "down"], check=True)
            print(
                f"link to node {nodes - 1} down after step {DOWN_AT} (link down at {time.time():.3f})",
                flush=True,
            )


g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(96, 4, generator=g), torch.randn(96, 1, generator=g))
model = torch.nn.Linear(4, 1)
trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), torch.nn.MSELoss(), max_epochs=4,
                          batch_size=12, strategy="allreduce", world=world, callbacks=[CutTheLink()],
                          progress=False, plot=False, hang_timeout=TIMEOUT)  # fmt: skip
trainer.fit(data)
print(f"finished at step {trainer.global_step}", flush=True)
