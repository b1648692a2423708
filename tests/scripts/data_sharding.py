"""Run on N ranks: one epoch of a scientific dataset, sharded, then a resumed epoch, then the statistics.

Usage: mpiexec -n N python data_sharding.py FILE.h5 RUN_DIR GLOBAL_BATCH BACKEND STOP_AFTER
Each rank reads its shard of epoch 0 in full, and epoch 1 twice: once straight through, once stopping after
STOP_AFTER steps, saving ``state_dict()`` and continuing in a fresh pipeline. Rank 0 prints one JSON line with
every rank's per-step sample ids and inputs, the normalisation statistics and the input-wait statistics.
The ``__main__`` guard matters: worker processes started by forkserver import this file.
"""

import json
import sys

import caldera
from caldera.data.scientific import dataset


def open_train(path, run_dir, backend, comm):
    # The ranks compute the statistics together only when told whom they share them with (default: alone).
    return dataset(
        path, inputs=["u"], targets=["id"], run_dir=run_dir, val_fraction=0.0, backend=backend, comm=comm
    )


def epoch(batches, n_steps=None):
    ids, firsts = [], []
    for step, ((x, y), n_local, n_global) in enumerate(batches):
        assert len(y) == n_local and n_global >= n_local
        ids.append(y.tolist())
        firsts.append(x[:, 0, 0, 0].tolist())  # one normalised value per sample, to compare with the file
        if n_steps is not None and step + 1 == n_steps:
            break
    return ids, firsts


def main():
    path, run_dir, batch, backend, stop_after = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        sys.argv[4],
        int(sys.argv[5]),
    )
    world = caldera.init()

    def pipeline():
        train = open_train(path, run_dir, backend, world.comm)["train"]
        return train, train.batches(batch, world.rank, world.size, seed=7, num_workers=1)

    train, batches = pipeline()
    batches.set_epoch(0)
    ids0, firsts0 = epoch(batches)
    batches.set_epoch(1)
    ids1, _ = epoch(batches)

    _, fresh = pipeline()
    fresh.set_epoch(1)
    head, _ = epoch(fresh, stop_after)
    state = fresh.state_dict()
    fresh.close()
    _, resumed = pipeline()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint goes through a file
    tail, _ = epoch(resumed)
    batches.close()
    resumed.close()

    report = {"ids0": ids0, "firsts0": firsts0, "ids1": ids1, "resumed1": head + tail, "state": state,
              "steps": len(batches), "wait": batches.stats.as_dict()}  # fmt: skip
    everyone = world.comm.allgather(report)
    if world.rank == 0:
        stats = {v: s.__dict__ for v, s in train.stats.items()}
        print(json.dumps({"size": world.size, "ranks": everyone, "stats": stats}))


if __name__ == "__main__":
    main()
