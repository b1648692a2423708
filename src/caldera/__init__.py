"""Caldera: train, tune and deploy neural networks inside HPC workflows, from a laptop to thousands of ranks."""

from caldera.config import Config as Config
from caldera.config import ConfigError as ConfigError
from caldera.config import load_config as load_config
from caldera.errors import NonFiniteLossError as NonFiniteLossError
from caldera.log import setup as _setup_logging
from caldera.train.callbacks import Callback as Callback
from caldera.train.callbacks import EarlyStopping as EarlyStopping
from caldera.train.callbacks import TensorBoard as TensorBoard
from caldera.train.trainer import Trainer as Trainer
from caldera.version import __version__ as __version__
from caldera.watchdog import Watchdog as Watchdog
from caldera.world import World as World
from caldera.world import init as init
from caldera.world import init_process_group as init_process_group

_setup_logging()  # library messages reach stderr unless the program set up logging itself

__all__ = [
    "Callback", "Config", "ConfigError", "EarlyStopping", "NonFiniteLossError", "TensorBoard", "Trainer",
    "Watchdog", "World", "init", "init_process_group", "load_config",
]  # fmt: skip
