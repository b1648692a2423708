"""Built-in loss functions by config name (the table lives in caldera/names.py)."""

from caldera.names import LOSSES as LOSSES
