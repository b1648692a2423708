"""Built-in small datasets that need no download: scikit-learn's bundled digits, the heat simulation."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def digits(normalize: bool = True) -> TensorDataset:
    """Return scikit-learn's bundled 8x8 handwritten digits (1 797 images) as (1, 8, 8) float images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the 'digits' data source needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    if normalize:
        x = x / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return TensorDataset(x, y)
