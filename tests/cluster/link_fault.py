"""A data-parallel job on the virtual cluster whose link to the last node goes down mid-training.

Usage: vcluster.sh mpiexec -n N python tests/cluster/link_fault.py HANG_TIMEOUT RUN_DIR
       CALDERA_MPIEXEC=tests/cluster/mpiexec caldera launch -n N --max-restarts 1 -- python ... (the same)
On the first launch rank 0 takes the last node's link down (in the hub: `vcluster.sh link`) after step 3 and
prints when (Unix time), and brings it back once rank 0 has ended (a repaired switch port). The hang
watchdog must end the job within about HANG_TIMEOUT with a report naming the ranks (and their node) the others
wait for, and the launcher must give up on the lost node soon after; a relaunch by `caldera launch --max-restarts`
resumes from its last checkpoint (every step) and finishes (tests/test_cluster.py).
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

TIMEOUT, RUN_DIR, DOWN_AT = float(sys.argv[1]), sys.argv[2], 3
FIRST_LAUNCH = os.environ.get("CALDERA_RESTART", "0") == "0"
VCLUSTER = Path(__file__).resolve().parent / "vcluster.sh"
world = caldera.init(seed=0)


class CutTheLink(Callback):
    def on_step_end(self, trainer) -> None:
        if world.rank == 0 and trainer.global_step == DOWN_AT and FIRST_LAUNCH:
            nodes = int(Path(os.environ.get("VCLUSTER_STATE", "/run/caldera-vcluster"), "nodes").read_text())
            subprocess.run(["bash", str(VCLUSTER), "link", str(nodes - 1), "down"], check=True)
            # Repaired by a process of its own once this rank has ended (the watchdog's abort), so that the relaunch
            # finds the node reachable: waiting for the launcher instead races the relaunch's first connection.
            repair = f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 0.1; done; bash {VCLUSTER} link {nodes - 1} up"
            subprocess.Popen(["bash", "-c", repair], start_new_session=True, stdout=subprocess.DEVNULL)
            print(
                f"link to node {nodes - 1} down after step {DOWN_AT} (link down at {time.time():.3f})",
                flush=True,
            )


if world.rank == 0 and not FIRST_LAUNCH:
    print(f"relaunched at {time.time():.3f}", flush=True)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(96, 4, generator=g), torch.randn(96, 1, generator=g))
model = torch.nn.Linear(4, 1)
trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), torch.nn.MSELoss(), max_epochs=4,
                          batch_size=12, strategy="allreduce", world=world, callbacks=[CutTheLink()],
                          progress=False, plot=False, hang_timeout=TIMEOUT, run_dir=RUN_DIR,
                          checkpointer=Checkpointer(os.path.join(RUN_DIR, "checkpoints"), world, every=1, keep=2),
                          resume=os.environ.get("CALDERA_RESUME") == "1")  # fmt: skip
trainer.fit(data)
if world.rank == 0:
    print(f"finished at step {trainer.global_step}", flush=True)
