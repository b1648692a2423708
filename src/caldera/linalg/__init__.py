"""Mixed-precision linear solvers: float32 LU with float64 iterative refinement (IR and GMRES-IR)."""

from caldera.linalg.backends import SUPPORTED_FACTOR_DTYPES, LinearSystemError, SingularMatrixError
from caldera.linalg.refine import METHODS, SolveResult, backward_error, solve

__all__ = [
    "METHODS",
    "SUPPORTED_FACTOR_DTYPES",
    "LinearSystemError",
    "SingularMatrixError",
    "SolveResult",
    "backward_error",
    "solve",
]
