"""The search space of ``[tune.space]``: Optuna distributions, the grid's points, values as ``--set`` reads them."""

from __future__ import annotations

import itertools
import json
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from caldera.config import ConfigError, RangeSpec


def grid(spec) -> list[dict[str, Any]]:
    """Every combination of the space's lists (sampler 'grid'), else nothing."""
    if spec.sampler != "grid":
        return []
    if not all(isinstance(d, list) for d in spec.space.values()):
        raise ConfigError("tune.sampler = 'grid' needs every tune.space entry to be a list of values")
    keys = list(spec.space)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*spec.space.values())]


def distributions(space: dict[str, list[Any] | RangeSpec]) -> dict[str, Any]:
    """One Optuna distribution per dotted key: choices, integers or floats."""
    dists: dict[str, Any] = {}
    for key, dims in space.items():
        if isinstance(dims, list):
            dists[key] = CategoricalDistribution(dims)
        elif all(isinstance(v, int) for v in (dims.low, dims.high)) and isinstance(dims.step or 1, int):
            dists[key] = IntDistribution(dims.low, dims.high, log=dims.log, step=dims.step or 1)
        else:
            dists[key] = FloatDistribution(dims.low, dims.high, log=dims.log, step=dims.step)
    return dists


def literal(value: Any) -> str:
    """``value`` as ``--set`` reads it back (YAML): 1e-05 would be a string there, 1.0e-05 is a float."""
    text = repr(value) if isinstance(value, float) else json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text
