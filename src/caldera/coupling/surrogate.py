"""A trained model called from inside a simulation: in the same process, NumPy in and NumPy out.

No server, no payload limit, no serialisation: the simulation hands over its arrays and gets arrays back, on the
rank's GPU when it has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from caldera.config import Config
from caldera.registry import resolve
from caldera.train.run import load_run_model
from caldera.train.rundir import RunDir
from caldera.world import local_rank_hint, pick_device


class Surrogate:
    """Call a trained model like a function of arrays: ``y = surrogate(x)``, batched, without gradients."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None,
                 batch_size: int = 1024, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        # A GPU per local rank, as caldera.init() picks, but without its collective: a surrogate may live on
        # only some ranks of a simulation.
        self.device = torch.device(device) if device is not None else pick_device(local_rank_hint())
        # dtype: e.g. float64 for a simulation that integrates in double precision (forces for MD).
        self.model = model.to(self.device, dtype).eval()
        self.batch_size = batch_size
        self.dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device | None = None,
                 batch_size: int = 1024, dtype: torch.dtype | None = None,
                 trust_code: bool = False) -> Surrogate:  # fmt: skip
        """Rebuild the model of a finished ``caldera train`` run from its run directory, or of a registry model
        ``NAME@VERSION`` ($CALDERA_REGISTRY; its hashes checked), and load its weights."""
        files = RunDir(resolve(run_dir))
        missing = files.missing()
        if missing:
            raise FileNotFoundError(
                f"{run_dir} has no {' or '.join(missing)}: give the run directory of a finished `caldera train` "
                "run (its [run] dir), or build the model yourself and pass it to Surrogate(model)"
            )
        # Only the model is built here, so only its import path needs trust (a custom data source stays unread).
        cfg = Config.model_validate(files.read_config(trust_code=trust_code, keys=("model.name",)))
        return cls(load_run_model(files, cfg), device, batch_size, dtype)

    @torch.no_grad()
    def __call__(self, x: Any) -> Any:
        """Predict for a batch ``x`` (first dimension = samples); a NumPy array gives a NumPy array back."""
        as_numpy = not torch.is_tensor(x)
        xs = torch.as_tensor(np.asarray(x)) if as_numpy else x
        if xs.dim() == 0 or len(xs) == 0:
            raise ValueError(f"Surrogate expects a non-empty batch (first dimension = samples), got shape "
                             f"{tuple(xs.shape)}")  # fmt: skip
        out = torch.cat(
            [self.model(chunk.to(self.device, self.dtype)) for chunk in xs.split(self.batch_size)]
        )
        # Hand back what the simulation gave: its array type, device and floating-point precision.
        dtype = xs.dtype if xs.is_floating_point() else out.dtype
        return out.to("cpu", dtype).numpy() if as_numpy else out.to(xs.device, dtype)
