"""Model-parallel inference on real ranks: a tp = 2 training writes its weights shard-wise, then ``caldera predict
--tp 2`` and ``caldera serve --tp 2`` read them, each rank its own file, in one job.

Usage: mpiexec -n 2 python tensor_serve.py RUN_DIR OUT.npy. Every rank prints {"rank", "pid", "held"} (the parameter
elements its shard holds); then predict writes OUT.npy and the job serves the run on a free port until SIGTERM."""

import json
import os
import sys

import torch

import caldera
from caldera.cli import main
from caldera.config import load_config
from caldera.parallel_infer import load_shard
from caldera.predict import load_run_config, predict
from caldera.train.run import train

run, out = sys.argv[1], sys.argv[2]
world = caldera.init()
torch.set_num_threads(1)
RUN_FILE = "examples/digits_tensor.toml"
small = {"run.dir": run, "model.args.dim": 32, "optim.epochs": 1, "data.batch_size": 256, "train.progress": False,
         "train.plot": False, "checkpoint.every": None}  # fmt: skip
train(load_config(RUN_FILE, values=small), world=world)
shard, _, strategy = load_shard(run, load_run_config(run), world.comm)
held = sum(p.numel() for p in shard.parameters())
strategy.close()
print(json.dumps({"rank": world.rank, "pid": os.getpid(), "held": held}), flush=True)
predict(run, out=out, tp=2, world=world, progress=False)
sys.exit(main(["serve", run, "--tp", "2", "--port", "0", "--max-wait-ms", "1"]))
