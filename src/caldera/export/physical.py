"""The physical-units module: a run's model with its input normalisation and target de-normalisation inside.

Training on scientific files normalises every variable with the training records' mean and standard deviation
(caldera.data.normalize) and the model learns in those units. A simulation calling the exported model passes its
own fields, so the graph does what the data pipeline did: ``(x - mean) / std`` per input channel before the model,
``y * std + mean`` per target channel after it. Sources that do not normalise (the built-in ``heat`` simulation)
get the model alone: no extra operations in the graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class PhysicalModel(nn.Module):
    """``model`` with per-channel input normalisation and target de-normalisation as buffers (None: none)."""

    def __init__(self, model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
                 targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        # Registered only when there is a normalisation, so an identity adds nothing to the exported graph and the
        # state_dict (model.safetensors) holds the buffers exactly when the card lists a normalisation.
        self.normalizes_inputs, self.denormalizes_targets = inputs is not None, targets is not None
        if inputs is not None:
            self.register_buffer("input_mean", inputs[0].float())
            self.register_buffer("input_std", inputs[1].float())
        if targets is not None:
            self.register_buffer("target_mean", targets[0].float())
            self.register_buffer("target_std", targets[1].float())

    def forward(self, x: torch.Tensor) -> Any:
        """Physical inputs (batch, *input_shape) -> the model's outputs in physical units."""
        if self.normalizes_inputs:
            x = (x - self.input_mean) / self.input_std
        y = self.model(x)
        if self.denormalizes_targets:
            y = y * self.target_std + self.target_mean
        return y


def data_parts(dataset: Dataset) -> list[Dataset]:
    """The parts of a (possibly concatenated) dataset; they share one set of statistics."""
    return list(getattr(dataset, "datasets", [dataset]))


def normalization(dataset: Dataset) -> dict[str, Any] | None:
    """What the data pipeline does to inputs and targets, per variable (the card's ``normalization``), or None."""
    first = data_parts(dataset)[0]
    stats = getattr(first, "stats", None)
    if not stats or not hasattr(first, "input_layout"):
        return None

    def describe(layout: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
        out = []
        for name, channels, kind in layout:
            st = stats.get(name)
            out.append({"variable": name, "channels": channels, "kind": kind,
                        "mean": None if st is None else st.mean,
                        "std": None if st is None else (st.std if st.std > 0 else 1.0)})  # fmt: skip
        return out

    return {"inputs": describe(first.input_layout()), "targets": describe(first.target_layout()),
            "formula": "model((x - input mean) / input std) * target std + target mean, per channel"}  # fmt: skip


def _per_channel(entries: list[dict[str, Any]], ndim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mean and std per channel (axis 1 of a batch of ``ndim`` axes), shaped to broadcast; None if all identity."""
    if not any(e["mean"] is not None for e in entries):
        return None
    mean = np.concatenate([np.full(e["channels"], e["mean"] or 0.0) for e in entries])
    std = np.concatenate([np.full(e["channels"], e["std"] or 1.0) for e in entries])
    shape = (
        (-1, *([1] * max(0, ndim - 2))) if ndim >= 2 else ()
    )  # (C, 1, 1) for fields; () for a scalar target
    return torch.tensor(mean, dtype=torch.float32).reshape(shape), torch.tensor(
        std, dtype=torch.float32
    ).reshape(shape)


def physical_model(model: nn.Module, dataset: Dataset, example: torch.Tensor) -> PhysicalModel:
    """Wrap ``model`` (in eval mode) with the normalisation ``dataset`` applies; ``example``: a normalised input
    batch, used to learn the rank of the model's output."""
    norm = normalization(dataset)
    if norm is None:
        return PhysicalModel(model).eval()
    with torch.no_grad():
        out = model(example)
    out_ndim = out.dim() if torch.is_tensor(out) else 0
    targets = _per_channel(norm["targets"], out_ndim) if torch.is_tensor(out) else None
    return PhysicalModel(model, _per_channel(norm["inputs"], example.dim()), targets).eval()
