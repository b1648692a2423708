"""Model-parallel inference on real ranks: a tp = 2 training (its model built on the meta device) writes its weights
shard-wise, then ``caldera predict --tp 2`` and ``caldera serve --tp 2`` read them, each rank its own file, in one job.

Usage: mpiexec -n 2 python tensor_serve.py RUN_DIR OUT.npy. Every rank prints {"rank", "pid", "held", "meta_diff"}
(the parameter elements its shard holds; how far the slices of a model built on meta are from those cut from an
ordinary construction, same seed); then predict writes OUT.npy and the job serves the run until SIGTERM."""

import json
import os
import sys

import torch

import caldera
from caldera.cli import main
from caldera.config import load_config
from caldera.parallel.tensor import TensorParallel
from caldera.parallel_infer import load_shard
from caldera.predict import load_run_config, predict
from caldera.train.run import build_model, train
from caldera.world import seed_everything

run, out = sys.argv[1], sys.argv[2]
world = caldera.init()
torch.set_num_threads(1)
RUN_FILE = "examples/digits_tensor.toml"
small = {"run.dir": run, "model.args.dim": 32, "optim.epochs": 1, "data.batch_size": 256, "train.progress": False,
         "train.plot": False, "checkpoint.every": None}  # fmt: skip
cfg = load_config(RUN_FILE, values=small)
slices = []
for meta in (
    False,
    True,
):  # the tensor strategy's initial slices, from an ordinary and from a meta construction
    seed_everything(0)
    model = build_model(cfg, meta=meta)
    strategy = TensorParallel()
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), world)
    if not meta:
        strategy._cut()  # (the ordinary construction is cut at the first training step)
    slices.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    strategy.close()
meta_diff = float((slices[0] - slices[1]).abs().max()) if slices[0].shape == slices[1].shape else -1.0
train(cfg, world=world)
shard, _, strategy = load_shard(run, load_run_config(run), world.comm)
held = sum(p.numel() for p in shard.parameters())
strategy.close()
print(json.dumps({"rank": world.rank, "pid": os.getpid(), "held": held, "meta_diff": meta_diff}), flush=True)
predict(run, out=out, tp=2, world=world, progress=False)
sys.exit(main(["serve", run, "--tp", "2", "--port", "0", "--max-wait-ms", "1"]))
