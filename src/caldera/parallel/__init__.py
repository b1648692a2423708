"""Parallel training strategies, one per module, selected by name in ``[parallel] strategy``."""

from caldera.parallel import allreduce as _allreduce  # noqa: F401  (registers "allreduce")
from caldera.parallel import async_shared as _async_shared  # noqa: F401  (registers "async-shared")
from caldera.parallel import local_sgd as _local_sgd  # noqa: F401  (registers "local-sgd")
from caldera.parallel import param_server as _param_server  # noqa: F401  (registers "async-ps")
from caldera.parallel import pipeline as _pipeline  # noqa: F401  (registers "pipeline")
from caldera.parallel import single as _single  # noqa: F401  (registers "single")
from caldera.parallel.base import Strategy as Strategy
from caldera.parallel.base import available_strategies as available_strategies
from caldera.parallel.base import make_strategy as make_strategy
from caldera.parallel.base import register as register

__all__ = ["Strategy", "available_strategies", "make_strategy", "register"]
