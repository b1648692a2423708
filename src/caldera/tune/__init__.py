"""``caldera tune``: asynchronous hyperparameter search over the allocation (Optuna, a journal file, pruning).

Modules: ``search`` (the loop every trial group runs), ``study`` (the shared journal study and its hand-out),
``trial`` (one trial: a training run with per-epoch reports), ``report`` (trials.csv, best.json, plots),
``space`` (the search space).
"""

from caldera.errors import ConfigError

try:
    import optuna as _optuna  # noqa: F401 -- present, or one line naming the install
except ImportError:
    raise ConfigError("caldera tune samples with Optuna: pip install optuna (or caldera[tune])") from None

from caldera.tune.report import TuneFailed
from caldera.tune.search import tune

__all__ = ["TuneFailed", "tune"]
