"""Built-in loss functions by config name."""

from torch import nn

LOSSES = {"mse": nn.MSELoss, "l1": nn.L1Loss, "cross_entropy": nn.CrossEntropyLoss, "huber": nn.HuberLoss}
