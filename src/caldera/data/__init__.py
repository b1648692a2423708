"""Data: built-in sources, scientific formats (HDF5, NetCDF, Zarr, .npy), rank sharding, shuffling, prefetch."""

from caldera.data import scientific as scientific
from caldera.data.builtin import digits as digits
from caldera.data.formats import DataError as DataError
from caldera.data.formats import open_reader as open_reader
from caldera.data.normalize import compute_stats as compute_stats
from caldera.data.prefetch import InputMeter as InputMeter
from caldera.data.prefetch import Prefetcher as Prefetcher
from caldera.data.sampler import ShardedBatches as ShardedBatches
from caldera.data.sampler import epoch_permutation as epoch_permutation
from caldera.data.sampler import split_dataset as split_dataset
from caldera.data.shuffle import ChunkShuffleSampler as ChunkShuffleSampler
from caldera.names import SOURCES as SOURCES

__all__ = [
    "SOURCES", "ChunkShuffleSampler", "DataError", "InputMeter", "Prefetcher", "ShardedBatches", "compute_stats",
    "epoch_permutation", "open_reader", "scientific", "split_dataset",
]  # fmt: skip
