"""Data: built-in sources, rank sharding and loaders (scientific formats arrive in later modules)."""

from caldera.data.builtin import digits
from caldera.data.sampler import ShardedBatches as ShardedBatches
from caldera.data.sampler import epoch_permutation as epoch_permutation
from caldera.data.sampler import split_dataset as split_dataset
from caldera.sims.heat import dataset as heat

SOURCES = {"digits": digits, "heat": heat}

__all__ = ["SOURCES", "ShardedBatches", "epoch_permutation", "split_dataset"]
