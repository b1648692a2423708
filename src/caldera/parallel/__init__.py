"""Parallel training strategies, one per module, selected by name in ``[parallel] strategy``."""

from caldera.names import STRATEGIES
from caldera.parallel.base import Strategy as Strategy
from caldera.parallel.base import available_strategies as available_strategies
from caldera.parallel.base import make_strategy as make_strategy
from caldera.parallel.base import register as register

# Looking each built-in up imports its module, whose @register makes it available to make_strategy; the list of
# built-ins is caldera/names.py's.
for _name in list(STRATEGIES):
    STRATEGIES[_name]

__all__ = ["Strategy", "available_strategies", "make_strategy", "register"]
