"""The error classes raised across layers, defined at the bottom so that any layer can raise or catch them.

Each message is one line naming the problem and the fix; the CLI prints it and exits with code 2 (docs/cli.md).
The modules that raise them re-export them (``caldera.config.ConfigError``, ``caldera.data.DataError``,
``caldera.checkpoint.CheckpointError``), so both import paths name the same class.
"""


class ConfigError(ValueError):
    """A run file that cannot be used; the message names the key and the fix."""


class UntrustedCode(ConfigError):
    """A run directory names code to import (``pkg.mod:Name``) that the user has not said they trust."""


class DataError(ValueError):
    """A data file that cannot be used as asked; the message names the file, the variable and the fix."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot be restored into this run."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and what to try."""
