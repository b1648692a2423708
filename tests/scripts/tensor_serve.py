"""Model-parallel inference on real ranks: ``caldera predict --tp`` then ``caldera serve --tp`` in one job.

Usage: mpiexec -n 2 python tensor_serve.py RUN_DIR OUT.npy. Every rank prints {"rank", "pid", "held"} (the parameter
elements its shard holds); then predict writes OUT.npy and the job serves the run on a free port until SIGTERM."""

import json
import os
import sys

import torch

import caldera
from caldera.cli import main
from caldera.parallel_infer import load_shard
from caldera.predict import load_run_config, predict

run, out = sys.argv[1], sys.argv[2]
world = caldera.init()
torch.set_num_threads(1)
shard, _, strategy = load_shard(run, load_run_config(run), world.comm)
held = sum(p.numel() for p in shard.parameters())
strategy.close()
print(json.dumps({"rank": world.rank, "pid": os.getpid(), "held": held}), flush=True)
predict(run, out=out, tp=2, world=world, progress=False)
sys.exit(main(["serve", run, "--tp", "2", "--port", "0", "--max-wait-ms", "1"]))
