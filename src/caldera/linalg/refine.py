"""Mixed-precision iterative refinement for dense linear systems A x = b.

The LU factorization (the O(n^3) part) runs in low precision (float32); residuals and solution updates run
in float64, so the answer reaches fp64 backward error at roughly the cost of a float32 solve. Plain
iterative refinement (IR) handles well-conditioned systems; GMRES-IR (Carson & Higham, SIAM J. Sci. Comput.
2017/2018) uses the low-precision LU factors as a preconditioner for fp64 GMRES and copes with
ill-conditioned ones. When neither converges the solver falls back to an fp64 LAPACK/torch solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from caldera.linalg.backends import LinearSystemError, factor_dtype_name, make_backend

Method = Literal["auto", "ir", "gmres-ir"]
METHODS = ("auto", "ir", "gmres-ir")
EPS64 = float(np.finfo(np.float64).eps)

# A healthy refinement step at least halves the backward error; anything slower counts as stagnation.
_STAGNATION_RATIO = 0.5


@dataclass(frozen=True)
class SolveResult:
    """Outcome of `solve`: the solution plus how it was obtained."""

    x: Any  # np.ndarray or torch.Tensor (float64), same shape as b and, for tensors, same device
    iterations: int  # outer refinement steps after the initial low-precision solve
    backward_error: float  # max over columns of ||b - A x|| / (||A|| ||x|| + ||b||), infinity norms
    converged: bool  # refinement reached backward error <= tol (False whenever fell_back is True)
    fell_back: bool  # x comes from the fp64 LAPACK/torch solve
    method: str  # refinement method that ran last: "ir" or "gmres-ir"
    tol: float  # backward error accepted as converged (n * eps64 unless given)
    history: list[float] = field(default_factory=list)  # backward error of the initial solve, then per step
    inner_iterations: int = 0  # total GMRES iterations (GMRES-IR only)
    message: str = ""  # why refinement switched method or fell back


@dataclass(frozen=True)
class _Targets:
    """Backward-error goals: cheap IR steps go on to `target`; anything at or below `accept` converged."""

    target: float
    accept: float

    def goal(self, method: str) -> float:
        # A GMRES-IR step costs O(n) Krylov iterations, so it is only worth taking until `accept`.
        return self.target if method == "ir" else self.accept


@dataclass
class _Run:
    """Mutable state of one refinement run."""

    x: Any
    errors: np.ndarray
    method: str
    history: list[float]
    iterations: int = 0
    inner_iterations: int = 0
    message: str = ""

    @property
    def error(self) -> float:
        return float(self.errors.max())


def solve(
    A: Any,
    b: Any,
    factor_dtype: Any = np.float32,
    method: Method = "auto",
    tol: float | None = None,
    max_iter: int = 30,
    *,
    fallback: bool = True,
    gmres_tol: float = 1e-10,
    gmres_max_iter: int | None = None,
) -> SolveResult:
    """Solve A x = b with a low-precision LU and fp64 iterative refinement (IR, GMRES-IR or auto)."""
    _check_options(method, tol, max_iter, gmres_tol, gmres_max_iter)
    dtype_name = factor_dtype_name(factor_dtype)
    ops = make_backend(A, b)
    # Default: IR runs on to unit-roundoff level (as good as an fp64 LAPACK solve) but n * eps64 counts as
    # converged; an explicit tol is both the goal and the acceptance threshold.
    targets = _Targets(EPS64, ops.n * EPS64) if tol is None else _Targets(float(tol), float(tol))
    inner_max = min(ops.n, 500 if gmres_max_iter is None else gmres_max_iter)

    if ops.factor(dtype_name):
        run = _refine(ops, method, targets, max_iter, gmres_tol, inner_max)
    else:
        run = _Run(None, np.array([math.inf]), "gmres-ir" if method == "gmres-ir" else "ir", [])
        run.message = f"the {dtype_name} LU hit an exactly zero pivot (A is singular in {dtype_name})"

    converged = run.error <= targets.accept
    fell_back = not converged and fallback
    if fell_back:
        run.x = ops.solve_fp64()
        run.errors = _backward_errors(ops, ops.residual(run.x), run.x)
        run.message = f"{run.message}; fell back to a float64 LU solve".lstrip("; ")
    if run.x is None:  # low-precision LU failed and the caller disabled the fallback
        raise LinearSystemError(
            f"{run.message}; call solve(..., fallback=True) to use a float64 solve instead."
        )
    return SolveResult(
        x=run.x.reshape(ops.b_shape),
        iterations=run.iterations,
        backward_error=run.error,
        converged=converged,
        fell_back=fell_back,
        method=run.method,
        tol=targets.accept,
        history=run.history,
        inner_iterations=run.inner_iterations,
        message=run.message,
    )


def backward_error(A: Any, x: Any, b: Any) -> float:
    """Normwise backward error max_j ||b_j - A x_j|| / (||A|| ||x_j|| + ||b_j||) in the infinity norm."""
    ops = make_backend(A, b)
    x64 = ops.as_solution(x)
    return float(_backward_errors(ops, ops.residual(x64), x64).max())


def _check_options(
    method: str, tol: float | None, max_iter: int, gmres_tol: float, gmres_max_iter: int | None
) -> None:
    if method not in METHODS:
        raise LinearSystemError(f"method must be one of {METHODS}, got {method!r}.")
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise LinearSystemError(f"tol must be a positive finite number (or None for n * eps64), got {tol!r}.")
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise LinearSystemError(f"max_iter must be a non-negative integer, got {max_iter!r}.")
    if not (0 < gmres_tol < 1):
        raise LinearSystemError(f"gmres_tol must lie in (0, 1), got {gmres_tol!r}.")
    if gmres_max_iter is not None and gmres_max_iter < 1:
        raise LinearSystemError(f"gmres_max_iter must be a positive integer, got {gmres_max_iter!r}.")


def _backward_errors(ops: Any, r: Any, x: Any) -> np.ndarray:
    """Per-column normwise backward errors; non-finite iterates count as infinitely bad."""
    num = ops.inf_norms(r)
    den = ops.norm_a * ops.inf_norms(x) + ops.b_norms
    errors = np.divide(num, den, out=np.where(num > 0, np.inf, 0.0), where=den > 0)
    errors[~np.isfinite(errors)] = np.inf
    return errors


def _refine(
    ops: Any, method: str, targets: _Targets, max_iter: int, gmres_tol: float, inner_max: int
) -> _Run:
    """Refine from the low-precision solve until the goal, stagnation (switch or stop) or max_iter."""
    x = ops.solve_low(ops.b)
    r = ops.residual(x)
    run = _Run(x, _backward_errors(ops, r, x), "gmres-ir" if method == "gmres-ir" else "ir", [])
    run.history.append(run.error)
    best = (run.errors, x)
    while run.error > targets.goal(run.method) and run.iterations < max_iter:
        if run.method == "ir":
            d = ops.solve_low(r)
        else:
            d = _gmres_correction(ops, r, run, targets.goal(run.method), gmres_tol, inner_max)
        x_new = x + d
        r_new = ops.residual(x_new)
        errors = _backward_errors(ops, r_new, x_new)
        new_error = float(errors.max())
        run.iterations += 1
        run.history.append(new_error)
        if new_error < best[0].max():
            best = (errors, x_new)
        if new_error <= _STAGNATION_RATIO * run.error or new_error <= targets.goal(run.method):
            run.errors, x, r = errors, x_new, r_new
            continue
        # Stagnation or divergence: a healthy refinement step at least halves the backward error.
        if best[0].max() <= targets.accept:
            break  # at the rounding floor, already good enough
        if run.method == "ir" and method == "auto":
            run.message = f"IR stagnated at step {run.iterations}; switched to GMRES-IR"
            run.method = "gmres-ir"
            run.errors, x = best  # GMRES-IR restarts from the best iterate, not a diverged one
            r = ops.residual(x)
            continue
        run.message = f"{run.method} stagnated at backward error {new_error:.2e} > tol {targets.accept:.2e}"
        break
    else:
        if best[0].max() > targets.accept:
            reason = f"max_iter={max_iter} reached at backward error {best[0].max():.2e} > tol {targets.accept:.2e}"
            run.message = f"{run.message}; {reason}" if run.message else reason
    run.errors, run.x = best
    return run


def _gmres_correction(ops: Any, r: Any, run: _Run, tol: float, gmres_tol: float, inner_max: int) -> Any:
    """Solve A d = r column by column with GMRES on the LU-preconditioned system M^{-1} A d = M^{-1} r."""
    d = ops.zeros(tuple(r.shape))
    for j in np.flatnonzero(run.errors > tol).tolist():  # converged columns need no correction
        rhs = ops.solve_precond(r[:, j])
        y, steps = _gmres(ops, lambda v: ops.solve_precond(ops.matvec(v)), rhs, gmres_tol, inner_max)
        d[:, j] = y
        run.inner_iterations += steps
    return d


def _gmres(ops: Any, op: Any, rhs: Any, rtol: float, max_steps: int) -> tuple[Any, int]:
    """GMRES from a zero guess (CGS2 Arnoldi, Givens rotations); returns (solution, steps)."""
    beta = ops.norm2(rhs)
    if beta == 0 or not math.isfinite(beta):
        return rhs * 0, 0
    basis = ops.zeros((max_steps + 1, rhs.shape[0]))  # rows are the Krylov vectors: contiguous on any backend
    basis[0] = rhs / beta
    hess = np.zeros((max_steps + 1, max_steps))
    rot = np.zeros((max_steps, 2))
    g = np.zeros(max_steps + 1)
    g[0] = beta
    steps = 0
    for j in range(max_steps):
        w = op(basis[j])
        v = basis[: j + 1]
        h = v @ w
        w = w - v.T @ h
        h2 = v @ w  # second Gram-Schmidt pass restores the orthogonality lost to cancellation
        w = w - v.T @ h2
        h_next = ops.norm2(w)
        hess[: j + 1, j] = ops.to_host(h + h2)
        if not _apply_givens(hess, rot, g, j, h_next):
            break
        steps = j + 1
        if abs(g[j + 1]) <= rtol * beta or h_next == 0:
            break
        basis[j + 1] = w / h_next
    if steps == 0:
        return rhs * 0, 0
    y = np.linalg.solve(np.triu(hess[:steps, :steps]), g[:steps])
    return basis[:steps].T @ ops.from_host(y), steps


def _apply_givens(hess: np.ndarray, rot: np.ndarray, g: np.ndarray, j: int, h_next: float) -> bool:
    """Reduce column j of the Hessenberg matrix to triangular form; False on an exact breakdown."""
    for i in range(j):
        c, s = rot[i]
        hess[i, j], hess[i + 1, j] = c * hess[i, j] + s * hess[i + 1, j], -s * hess[i, j] + c * hess[i + 1, j]
    rho = math.hypot(hess[j, j], h_next)
    if rho == 0 or not math.isfinite(rho):
        return False
    c, s = hess[j, j] / rho, h_next / rho
    rot[j] = (c, s)
    hess[j, j] = rho
    g[j + 1] = -s * g[j]
    g[j] = c * g[j]
    return True
