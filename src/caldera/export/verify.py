"""Verification: each exported artefact, run on held-out samples in physical units, against the eager model.

The reference is the model as training applied it: normalised inputs in, its outputs de-normalised by the data
pipeline's own ``denormalize``; the artefact gets the same samples read without normalisation. So one comparison
checks the exporter and the normalisation put into the graph. Every sample goes through in one batch and the first
alone (batch 1), which checks the dynamic batch axis too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from caldera.export.physical import data_parts


@dataclass(frozen=True)
class Samples:
    """Held-out samples: normalised inputs (what the model trained on) and the same in physical units."""

    split: str
    normalized: torch.Tensor
    physical: torch.Tensor


def held_out(train: Dataset, val: Dataset | None, n: int) -> Samples:
    """The first ``n`` samples of the validation split (of the training split when the run has none)."""
    split, dataset = ("val", val) if val is not None and len(val) else ("train", train)  # type: ignore[arg-type]
    indices = list(range(min(n, len(dataset))))  # type: ignore[arg-type]
    normalized = _inputs(dataset, indices)
    parts = data_parts(dataset)
    raw = parts[0].physical() if hasattr(parts[0], "physical") and len(parts) == 1 else None
    return Samples(split, normalized, normalized if raw is None else _inputs(raw, indices))


def _inputs(dataset: Dataset, indices: list[int]) -> torch.Tensor:
    items = (
        dataset.__getitems__(indices) if hasattr(dataset, "__getitems__") else [dataset[i] for i in indices]
    )
    return torch.stack([torch.as_tensor(item[0]) for item in items]).float()


def reference(model: nn.Module, dataset: Dataset, normalized: torch.Tensor) -> Any:
    """The eager model applied as training did: normalised inputs in, outputs de-normalised by the data pipeline."""
    with torch.no_grad():
        out = model(normalized)
    undo = getattr(data_parts(dataset)[0], "denormalize", None)
    if undo is None or not torch.is_tensor(out):
        return out
    return torch.from_numpy(undo(out.float().numpy()))


@dataclass(frozen=True)
class Check:
    """One artefact's agreement with the eager model: the largest errors over every sample and batch size."""

    ok: bool
    max_abs_error: float
    max_rel_error: float  # the largest error over the largest reference value (per output)
    rtol: float
    atol: float
    samples: int
    batch_sizes: tuple[int, ...]
    split: str

    def as_dict(self) -> dict[str, Any]:
        """For the card."""
        return {**asdict(self), "batch_sizes": list(self.batch_sizes)}


def check(
    run: Callable[[torch.Tensor], Any], samples: Samples, expected: Any, rtol: float, atol: float
) -> Check:
    """Run ``run`` on all samples at once and on the first alone; compare with ``expected`` (allclose's rule)."""
    x = samples.physical
    batches = [(x, expected)]
    if len(x) > 1:
        batches.append((x[:1], _first(expected)))
    ok, max_abs, max_rel = True, 0.0, 0.0
    with torch.no_grad():
        for inputs, want in batches:
            got = run(inputs)
            for g, w in zip(_tensors(got), _tensors(want), strict=True):
                g, w = g.detach().cpu().float(), w.detach().cpu().float()
                if g.shape != w.shape:
                    raise ValueError(f"output shape {tuple(g.shape)}, expected {tuple(w.shape)}")
                err = (g - w).abs()
                max_abs = max(max_abs, float(err.max()))
                max_rel = max(max_rel, float(err.max() / w.abs().max().clamp_min(1e-30)))
                ok = ok and bool((err <= atol + rtol * w.abs()).all()) and bool(torch.isfinite(g).all())
    return Check(ok, max_abs, max_rel, rtol, atol, len(x), tuple(len(b[0]) for b in batches), samples.split)


def _tensors(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _first(out: Any) -> Any:
    return tuple(o[:1] for o in out) if isinstance(out, (tuple, list)) else out[:1]
