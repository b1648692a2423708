"""A small random classification set of 8x8 "images" (8 tokens of 8 numbers), as a run file's [data] source
(``source = "tiny_tokens:data"`` from a script in this folder)."""

import torch
from torch.utils.data import TensorDataset


def data(train: int = 48, val: int = 24, seed: int = 0) -> dict[str, TensorDataset]:
    """``train`` and ``val`` samples of (1, 8, 8) inputs with 10 classes."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(train + val, 1, 8, 8, generator=g), torch.randint(0, 10, (train + val,), generator=g)
    return {"train": TensorDataset(x[:train], y[:train]), "val": TensorDataset(x[train:], y[train:])}
