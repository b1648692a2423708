"""``python -m caldera``: the ``caldera`` command, for when the environment's bin/ is not on PATH (mpiexec)."""

from caldera.cli import run

run()
