"""``python -m caldera``: the ``caldera`` command, for when the environment's bin/ is not on PATH (mpiexec)."""

import sys

from caldera.cli import main

sys.exit(main())
