"""Built-in loss functions by config name."""

from torch import nn

from caldera.models.potential import energy_force_loss

# Named here, not by import path, so that a run directory that uses them needs no --trust-code (docs/security.md).
LOSSES = {"mse": nn.MSELoss, "l1": nn.L1Loss, "cross_entropy": nn.CrossEntropyLoss, "huber": nn.HuberLoss,
          "energy_force": energy_force_loss}  # fmt: skip
