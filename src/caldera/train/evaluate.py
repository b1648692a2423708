"""Evaluation sums: the loss and metrics of batches, weighted by their samples, averaged over all ranks.

The Trainer's validation (and through it OnlineTrainer.evaluate) and ``caldera predict``'s scores add up the same
numbers in the same order with this one class, so a score means the same wherever it is printed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from caldera.comm import Communicator
from caldera.train.metrics import Metric


class Scores:
    """Running sums of the loss and each metric over batches (weighted by samples), then their mean over ranks."""

    def __init__(self, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None,
                 metrics: Mapping[str, Metric] | None = None) -> None:  # fmt: skip
        # loss_fn None: count the samples only (predictions without targets to score against).
        self.loss_fn, self.metrics = loss_fn, dict(metrics or {})
        self.sums = torch.zeros(2 + len(self.metrics), dtype=torch.float64)  # loss, metrics..., count

    def add(self, out: Any, y: torch.Tensor, n: int) -> None:
        """Score one batch of ``n`` samples: ``out`` the model's output, ``y`` its target (call under autocast)."""
        if self.loss_fn is not None:
            values = [self.loss_fn(out, y)] + [fn(out.float(), y) for fn in self.metrics.values()]
            self.sums[:-1] += torch.stack([v.detach().double().cpu() for v in values]) * n
        self.sums[-1] += n

    def reduce(self, comm: Communicator, prefix: str = "") -> dict[str, float]:
        """Every rank's sums added up (collective: every rank calls it, with or without batches); the means."""
        comm.Allreduce(self.sums)
        names = ["loss", *self.metrics] if self.loss_fn is not None else []
        return {prefix + k: float(v / self.sums[-1]) for k, v in zip(names, self.sums[:-1])}
