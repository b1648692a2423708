"""Rank sharding: disjoint, complete, deterministic, and equal to the single-process batches."""

import pytest
import torch
from torch.utils.data import TensorDataset

from caldera.data.sampler import ShardedBatches


def shard_indices(n, batch, size, epoch=0, **kw):
    data = TensorDataset(torch.arange(n))
    per_rank = []
    for rank in range(size):
        s = ShardedBatches(data, batch, rank, size, seed=5, **kw)
        s.set_epoch(epoch)
        per_rank.append([b[0][0].tolist() for b in s])
    return per_rank


@pytest.mark.parametrize("size", [1, 2, 3])
def test_each_sample_once_per_epoch_and_disjoint(size):
    shards = shard_indices(103, 12, size)
    flat = [i for r in shards for step in r for i in step]
    assert sorted(flat) == list(range(103))
    assert len({len(r) for r in shards}) == 1  # every rank runs the same number of steps


def test_ranks_together_see_the_single_process_batch():
    single = shard_indices(96, 16, 1)[0]
    two = shard_indices(96, 16, 2)
    for step, batch in enumerate(single):
        assert two[0][step] + two[1][step] == batch


def test_same_seed_same_order_new_epoch_new_order():
    assert shard_indices(50, 10, 2, epoch=1) == shard_indices(50, 10, 2, epoch=1)
    assert shard_indices(50, 10, 2, epoch=1) != shard_indices(50, 10, 2, epoch=2)


def test_tail_smaller_than_ranks_is_dropped_for_training_kept_for_evaluation():
    train = shard_indices(26, 8, 3)  # tail of 2 samples < 3 ranks
    assert all(len(r) == 3 for r in train)
    evaluation = shard_indices(26, 8, 3, evaluation=True, shuffle=False)
    assert sorted(i for r in evaluation for s in r for i in s) == list(range(26))


def test_batch_smaller_than_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size to at least 4"):
        ShardedBatches(TensorDataset(torch.arange(10)), 3, 0, 4)


def test_in_memory_data_stays_on_the_cpu_without_a_gpu():
    data = TensorDataset(torch.arange(40.0).reshape(20, 2), torch.arange(20))
    batches = ShardedBatches(data, 8, seed=1)
    assert batches.resident_tensors() == ()
    assert all(x.device.type == "cpu" for (x, _), _, _ in batches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_in_memory_data_is_copied_to_the_gpu_once_and_gives_the_same_batches():
    data = TensorDataset(torch.arange(40.0).reshape(20, 2), torch.arange(20))
    on_gpu = ShardedBatches(data, 8, seed=1, device=torch.device("cuda"))
    on_cpu = ShardedBatches(data, 8, seed=1)
    resident = on_gpu.resident_tensors()
    assert len(resident) == 2 and all(t.is_cuda for t in resident)
    for ((xg, yg), _, _), ((xc, yc), _, _) in zip(on_gpu, on_cpu, strict=True):
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
    assert on_gpu.resident_tensors()[0] is resident[0]  # copied once, not per epoch
