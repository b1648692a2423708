"""Chunk-aware shuffling and rank sharding: complete, disjoint, deterministic, resumable; checked on real ranks."""

import json

import numpy as np
import pytest
import torch

from caldera.data.shuffle import ChunkShuffleSampler, chunk_shuffled_order
from tests.conftest import run_ranks


def shards(n, batch, size, epoch=0, **kw):
    """Return each rank's list of per-step index lists for one epoch."""
    out = []
    for rank in range(size):
        s = ChunkShuffleSampler(n, batch, rank, size, seed=5, **kw)
        s.set_epoch(epoch)
        out.append([idx.tolist() for idx, _ in s])
    return out


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("n", [96, 103, 98])  # even, tail >= ranks, tail (2) < 3 ranks
def test_every_sample_once_per_epoch_disjoint_equal_steps(size, n):
    per_rank = shards(n, 12, size, chunk=8)
    flat = [i for r in per_rank for step in r for i in step]
    assert sorted(flat) == list(range(n))  # complete and disjoint: no sample twice, none dropped
    assert len({len(r) for r in per_rank}) == 1  # every rank runs the same number of steps
    assert all(len(step) > 0 for r in per_rank for step in r)  # no rank ever gets an empty batch


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_together_see_the_single_process_batches(size):
    single = shards(103, 12, 1, chunk=8)[0]
    multi = shards(103, 12, size, chunk=8)
    for step, batch in enumerate(single):
        assert [i for r in multi for i in r[step]] == batch


def test_same_seed_same_order_other_epoch_other_order():
    a = ChunkShuffleSampler(500, 10, chunk=16, seed=3)
    b = ChunkShuffleSampler(500, 10, chunk=16, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert np.array_equal(a.order(), b.order())
    b.set_epoch(3)
    assert not np.array_equal(a.order(), b.order())
    assert sorted(b.order().tolist()) == list(range(500))


def test_order_is_io_friendly_chunks_then_a_bounded_buffer():
    n, chunk, buffer = 4000, 50, 200
    order = chunk_shuffled_order(n, chunk, buffer, seed=1, epoch=0)
    chunk_visits = order // chunk
    # Chunks are visited in a random order, not 0, 1, 2, ...
    first_seen = list(dict.fromkeys(chunk_visits.tolist()))
    assert first_seen != sorted(first_seen)
    # Any 64 consecutive samples touch only the chunks a buffer of 200 can span (~(64 + 200) / 50 + 1).
    widest = max(len(set(chunk_visits[i : i + 64].tolist())) for i in range(0, n - 64, 16))
    assert widest <= (64 + buffer) // chunk + 2
    # ...yet inside that window samples are mixed, not read in file order.
    assert np.mean(np.diff(order) == 1) < 0.2


def test_no_buffer_and_no_shuffle_keep_the_file_order_inside_chunks():
    order = chunk_shuffled_order(100, 10, 1, seed=0, epoch=0)
    assert all(
        np.array_equal(order[i : i + 10], np.arange(order[i], order[i] + 10)) for i in range(0, 100, 10)
    )
    s = ChunkShuffleSampler(100, 10, shuffle=False)
    assert np.array_equal(s.order(), np.arange(100))


@pytest.mark.parametrize("resume_size", [1, 2, 3])
def test_resume_mid_epoch_continues_the_same_order_on_any_rank_count(resume_size):
    straight = [idx.tolist() for idx, _ in _epoch(ChunkShuffleSampler(103, 12, chunk=8, seed=9), 4)]
    first = ChunkShuffleSampler(103, 12, chunk=8, seed=9)
    first.set_epoch(4)
    head = []
    for idx, _ in first:
        head.append(idx.tolist())
        if len(head) == 3:
            break
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint goes through a file
    assert state["epoch"] == 4 and state["position"] == 3 and state["samples_done"] == 36
    tails, trainer_tails = [], []
    for rank in range(resume_size):
        s = ChunkShuffleSampler(103, 12, rank, resume_size, chunk=8, seed=0)  # seed comes from the state
        s.load_state_dict(state)
        tails.append([idx.tolist() for idx, _ in s])
        # The trainer keeps its own step count and passes it back: the same continuation.
        t = ChunkShuffleSampler(103, 12, rank, resume_size, chunk=8, seed=9)
        t.set_epoch(4, start_step=3)
        trainer_tails.append([idx.tolist() for idx, _ in t])
    for per_rank in (tails, trainer_tails):
        merged = [sum((t[k] for t in per_rank), []) for k in range(len(per_rank[0]))]
        assert head + merged == straight


def test_after_a_full_epoch_the_state_points_at_the_next_one():
    s = ChunkShuffleSampler(50, 10)
    s.set_epoch(0)
    assert len(list(s)) == 5
    assert (s.state_dict()["epoch"], s.state_dict()["position"]) == (1, 0)


def test_resume_on_other_data_is_a_clear_error():
    state = ChunkShuffleSampler(50, 10).state_dict()
    with pytest.raises(ValueError, match="50 samples, this data has 60"):
        ChunkShuffleSampler(60, 10).load_state_dict(state)


def test_drop_last_and_batch_checks():
    per_rank = shards(103, 12, 2, chunk=8, drop_last=True)
    assert all(len(r) == 8 for r in per_rank) and sum(len(s) for r in per_rank for s in r) == 96
    with pytest.raises(ValueError, match="batch_size to at least 4"):
        ChunkShuffleSampler(100, 3, 0, 4)


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


# -- real MPI ranks ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def field_file(tmp_path_factory):
    h5py = pytest.importorskip("h5py")
    path = tmp_path_factory.mktemp("data") / "fields.h5"
    rng = np.random.default_rng(0)
    u = rng.normal(3.0, 2.0, size=(103, 2, 4, 4)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("u", data=u, chunks=(8, 2, 4, 4))
        f.create_dataset("id", data=np.arange(103), chunks=(8,))
    return path, u


@pytest.mark.mpi
@pytest.mark.parametrize(
    "size, backend", [(1, "thread"), (2, "process"), (3, "thread")]
)  # process: forkserver
def test_ranks_read_disjoint_complete_shards_of_a_file(field_file, tmp_path, size, backend):
    path, u = field_file
    args = ["tests/scripts/data_sharding.py", str(path), str(tmp_path / "run"), "12", backend, "3"]
    proc = run_ranks(size, args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ranks = out["ranks"]
    assert out["size"] == size and len(ranks) == size

    # Normalisation: one parallel pass gives the statistics of the whole variable.
    mean, std = u.astype(np.float64).mean(), u.astype(np.float64).std()
    assert out["stats"]["u"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert out["stats"]["u"]["std"] == pytest.approx(std, rel=1e-12)

    # Every sample exactly once per epoch, shards disjoint, same number of steps everywhere.
    for key in ("ids0", "ids1"):
        flat = [i for r in ranks for step in r[key] for i in step]
        assert sorted(flat) == list(range(103))
    assert len({len(r["ids0"]) for r in ranks}) == 1 and ranks[0]["steps"] == len(ranks[0]["ids0"])

    # The ranks' step batches together are the single-process order of the same seed and epoch.
    ref = ChunkShuffleSampler(103, 12, chunk=8, seed=7)
    for epoch, key in ((0, "ids0"), (1, "ids1")):
        ref.set_epoch(epoch)
        expected = [idx.tolist() for idx, _ in ref]
        assert [sum((r[key][k] for r in ranks), []) for k in range(len(expected))] == expected

    # A pipeline stopped after 3 steps and resumed from its state continues the same order.
    assert all(r["resumed1"] == r["ids1"] for r in ranks)

    # The values delivered are the file's values, normalised.
    for r in ranks:
        ids = np.array(sum(r["ids0"], []))
        got = np.array(sum(r["firsts0"], []))
        np.testing.assert_allclose(got, (u[ids, 0, 0, 0] - mean) / std, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "run" / "normalization.json").exists()


def test_the_trainer_sees_every_training_record_once_per_epoch(field_file, tmp_path):
    from torch import nn

    import caldera
    from caldera.data.scientific import dataset

    path, _ = field_file
    data = dataset(
        str(path), inputs=["u"], targets=["id"], normalize=["u"], val_fraction=0.2, run_dir=tmp_path
    )
    seen: list[list[int]] = [[]]

    def loss_fn(out, y):
        seen[-1].extend(y.long().tolist())
        return nn.functional.mse_loss(out.squeeze(1), y.float())

    class Epochs(caldera.Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            seen.append([])

    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 1))
    trainer = caldera.Trainer(model, torch.optim.SGD(model.parameters(), lr=1e-3), loss_fn, max_epochs=2,
                              batch_size=16, num_workers=1, progress=False, plot=False, callbacks=[Epochs()])  # fmt: skip
    trainer.fit(data["train"], data["val"])
    n_train = 103 - int(103 * 0.2)
    # Each epoch: the training ids once (training steps), then the validation ids once (evaluation).
    for epoch in seen[:2]:
        assert sorted(epoch[:n_train]) == list(range(n_train))
        assert sorted(epoch[n_train:]) == list(range(n_train, 103))


def comm_probe(comm, run_dir, n=8):
    """A user's source that shares work over ranks: it says which communicator it was given."""
    comm_probe.seen = comm
    return torch.utils.data.TensorDataset(torch.zeros(n, 2), torch.zeros(n))


def test_a_source_gets_the_ranks_of_its_caller_and_not_from_the_run_file(tmp_path):
    from caldera.comm.local import LocalComm
    from caldera.config import ConfigError, load_config
    from caldera.train.run import build_data

    values = {"data.source": "tests.test_data_sharding:comm_probe", "data.args": {}, "run.dir": str(tmp_path)}
    cfg = load_config("examples/digits_tune.toml", values=values)
    ranks = LocalComm()
    train, val = build_data(cfg, ranks)
    assert comm_probe.seen is ranks and len(train) + len(val) == 8
    build_data(cfg)  # a caller that names no ranks builds the data alone
    assert isinstance(comm_probe.seen, LocalComm) and comm_probe.seen is not ranks
    # A communicator is not a run-file value: one line naming the key, before the source runs.
    with pytest.raises(ConfigError, match=r"^\[data\] args.comm: .*remove it$"):
        build_data(
            load_config("examples/digits_tune.toml", values={**values, "data.args": {"comm": "world"}})
        )
