"""Solve an ill-conditioned system with a float32 LU plus float64 refinement and print what happened.

Run: python examples/linalg_refinement.py
Smoke run (seconds): python examples/linalg_refinement.py --smoke
"""

from __future__ import annotations

import argparse

import numpy as np

from caldera.linalg import backward_error, solve


def ill_conditioned(n: int, kappa: float, seed: int = 0) -> np.ndarray:
    """U diag(s) V^T with singular values log-spaced from 1 down to 1/kappa."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (u * np.logspace(0, -np.log10(kappa), n)) @ v.T


def main() -> None:
    """Solve one system with each method and print the result fields."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (the test suite runs this)")
    n, kappa = (100 if p.parse_args().smoke else 300), 1e10
    A = ill_conditioned(n, kappa)
    b = np.random.default_rng(1).standard_normal(n)
    reference = backward_error(A, np.linalg.solve(A, b), b)
    print(f"n = {n}, cond(A) ~ {kappa:.0e}; numpy fp64 backward error {reference:.1e}")
    for method in ("ir", "gmres-ir", "auto"):
        res = solve(A, b, factor_dtype=np.float32, method=method)
        print(f"\nmethod={method!r}")
        print(f"  method used      {res.method}")
        print(f"  converged        {res.converged}   fell_back {res.fell_back}")
        print(f"  backward error   {res.backward_error:.2e}   (tol {res.tol:.1e})")
        print(f"  iterations       {res.iterations} outer, {res.inner_iterations} GMRES")
        print(f"  history          {', '.join(f'{e:.1e}' for e in res.history)}")
        if res.message:
            print(f"  message          {res.message}")


if __name__ == "__main__":
    main()
