"""Built-in loss functions by config name (the table lives in caldera/registry.py)."""

from caldera.registry import LOSSES as LOSSES
