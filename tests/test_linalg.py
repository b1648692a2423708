"""Tests for caldera.linalg: mixed-precision iterative refinement (IR, GMRES-IR, fallback, torch path)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import caldera.linalg.backends as backends
from caldera.linalg import (
    LinearSystemError,
    SingularMatrixError,
    SolveResult,
    backward_error,
    solve,
)

EPS = np.finfo(np.float64).eps


def random_matrix(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n))


def ill_conditioned(n: int, kappa: float, seed: int = 0) -> np.ndarray:
    """U diag(s) V^T with log-spaced singular values from 1 down to 1/kappa."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (u * np.logspace(0, -np.log10(kappa), n)) @ v.T


def manual_backward_error(A: np.ndarray, x: np.ndarray, b: np.ndarray) -> float:
    r = b - A @ x
    return float(np.abs(r).max() / (np.abs(A).sum(axis=1).max() * np.abs(x).max() + np.abs(b).max()))


@pytest.fixture
def lapack_typecodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the precision prefix ('s' or 'd') of every LAPACK routine the NumPy backend fetches."""
    seen: list[str] = []
    real = backends._lapack

    def spy(names, arrays):
        funcs = real(names, arrays)
        seen.extend(f.typecode + name for f, name in zip(funcs, names, strict=True))
        return funcs

    monkeypatch.setattr(backends, "_lapack", spy)
    return seen


@pytest.mark.parametrize("n", [200, 500])
def test_well_conditioned_reaches_fp64_and_matches_numpy(n: int, lapack_typecodes: list[str]) -> None:
    A = random_matrix(n, seed=n)
    b = np.random.default_rng(1).standard_normal(n)
    res = solve(A, b)

    assert isinstance(res, SolveResult)
    assert res.converged and not res.fell_back and res.method == "ir"
    assert res.backward_error <= n * EPS
    assert res.backward_error == pytest.approx(manual_backward_error(A, res.x, b), rel=1e-6)
    assert res.backward_error <= 10 * backward_error(A, np.linalg.solve(A, b), b)
    assert res.x.shape == (n,) and res.x.dtype == np.float64
    x_ref = np.linalg.solve(A, b)
    rel = np.linalg.norm(res.x - x_ref) / np.linalg.norm(x_ref)
    assert rel <= 100 * np.linalg.cond(A) * EPS
    assert len(res.history) == res.iterations + 1 and min(res.history) == res.backward_error
    # The O(n^3) factorization really ran in single precision (sgetrf) and no fp64 LU was needed.
    assert "sgetrf" in lapack_typecodes and "dgetrf" not in lapack_typecodes


def test_input_arrays_are_not_modified() -> None:
    A, b = random_matrix(50), np.ones(50)
    A_copy, b_copy = A.copy(), b.copy()
    solve(A, b)
    np.testing.assert_array_equal(A, A_copy)
    np.testing.assert_array_equal(b, b_copy)


@pytest.mark.parametrize("layout", ["fortran", "strided", "float32", "list"])
def test_other_memory_layouts_and_dtypes(layout: str) -> None:
    base = random_matrix(120, seed=3)
    A = {
        "fortran": np.asfortranarray(base),
        "strided": np.repeat(base, 2, axis=1)[:, ::2],
        "float32": base.astype(np.float32),
        "list": base.tolist(),
    }[layout]
    b = np.linspace(-1, 1, 120)
    res = solve(A, b)
    A64 = np.asarray(A, dtype=np.float64)
    assert res.converged and res.backward_error <= 120 * EPS
    np.testing.assert_allclose(res.x, np.linalg.solve(A64, b), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kappa", [1e8, 1e12])
@pytest.mark.parametrize("method", ["gmres-ir", "auto"])
def test_gmres_ir_on_ill_conditioned(kappa: float, method: str) -> None:
    n = 200
    A = ill_conditioned(n, kappa)
    b = np.random.default_rng(2).standard_normal(n)
    res = solve(A, b, method=method)

    assert res.converged and not res.fell_back
    assert res.method == "gmres-ir" and res.inner_iterations > 0
    assert res.backward_error <= n * EPS
    assert res.backward_error == pytest.approx(backward_error(A, res.x, b), rel=1e-6)
    if method == "auto":
        assert "switched to GMRES-IR" in res.message


def test_plain_ir_on_kappa_1e12_falls_back() -> None:
    n = 200
    A = ill_conditioned(n, 1e12, seed=5)
    b = np.random.default_rng(3).standard_normal(n)

    res = solve(A, b, method="ir")
    assert res.fell_back and not res.converged and res.method == "ir"
    assert "fell back" in res.message
    assert res.backward_error <= n * EPS
    assert res.backward_error <= 10 * backward_error(A, np.linalg.solve(A, b), b)

    res_no_fb = solve(A, b, method="ir", fallback=False)
    assert not res_no_fb.converged and not res_no_fb.fell_back
    assert res_no_fb.backward_error > n * EPS and np.isfinite(res_no_fb.x).all()


def test_forced_fallback_with_zero_iterations() -> None:
    n = 150
    A, b = random_matrix(n, seed=7), np.ones(n)
    res = solve(A, b, max_iter=0)
    assert res.fell_back and not res.converged and res.iterations == 0
    assert "max_iter=0" in res.message
    assert res.backward_error <= n * EPS
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_torch", [False, True])
def test_fallback_when_float32_lu_is_singular(use_torch: bool) -> None:
    # 1 + 1e-9 rounds to 1 in float32, so the float32 copy is the rank-one all-ones matrix.
    n = 60
    A = np.ones((n, n)) + 1e-9 * np.eye(n)
    b = np.random.default_rng(4).standard_normal(n)
    res = solve(torch.from_numpy(A), torch.from_numpy(b)) if use_torch else solve(A, b)
    x = res.x.numpy() if use_torch else res.x
    assert res.fell_back and "zero pivot" in res.message
    assert backward_error(A, x, b) <= n * EPS
    with pytest.raises(LinearSystemError, match="fallback=True"):
        solve(A, b, fallback=False)


@pytest.mark.parametrize("kappa", [1e2, 1e12])
def test_batched_right_hand_sides(kappa: float) -> None:
    n, k = 150, 4
    A = ill_conditioned(n, kappa, seed=8)
    B = np.random.default_rng(5).standard_normal((n, k))
    res = solve(A, B)
    assert res.x.shape == (n, k)
    assert res.converged and not res.fell_back
    per_column = [backward_error(A, res.x[:, j], B[:, j]) for j in range(k)]
    assert max(per_column) == pytest.approx(res.backward_error, rel=1e-6)
    assert max(per_column) <= n * EPS
    if kappa < 1e3:
        np.testing.assert_allclose(res.x, np.linalg.solve(A, B), rtol=1e-10, atol=1e-12)


def test_single_column_matrix_rhs_keeps_its_shape() -> None:
    A, b = random_matrix(40), np.ones((40, 1))
    assert solve(A, b).x.shape == (40, 1)


def test_zero_rhs_gives_zero_solution() -> None:
    res = solve(random_matrix(30), np.zeros(30))
    assert res.converged and res.backward_error == 0.0
    np.testing.assert_array_equal(res.x, 0.0)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_extreme_scaling_stays_in_float32_range(scale: float) -> None:
    n = 80
    A, b = random_matrix(n, seed=9) * scale, np.ones(n) * scale
    res = solve(A, b)
    assert res.converged and not res.fell_back and res.backward_error <= n * EPS


def test_float64_factorization_and_explicit_tol() -> None:
    n = 100
    A, b = random_matrix(n, seed=10), np.ones(n)
    assert solve(A, b, factor_dtype=np.float64).iterations <= 1
    res = solve(A, b, tol=1e-10)
    assert res.tol == 1e-10 and res.converged and res.backward_error <= 1e-10


@pytest.fixture
def factored(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of every matrix the torch path hands to its LU factorisation (the real call, recorded)."""
    seen: list[torch.dtype] = []
    real = torch.linalg.lu_factor_ex

    def spy(A, *args, **kwargs):
        seen.append(A.dtype)
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "lu_factor_ex", spy)
    return seen


def test_torch_cpu_path(factored: list[torch.dtype]) -> None:
    n = 200
    A = torch.from_numpy(random_matrix(n, seed=11))
    B = torch.from_numpy(np.random.default_rng(6).standard_normal((n, 3)))

    res = solve(A, B)
    assert isinstance(res.x, torch.Tensor) and res.x.dtype == torch.float64 and res.x.shape == (n, 3)
    assert res.x.device == A.device
    assert res.converged and not res.fell_back and res.backward_error <= n * EPS
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B), rtol=1e-9, atol=1e-12)
    assert factored == [torch.float32]

    res32 = solve(
        A.float(), B[:, 0].float()
    )  # float32 data is exact in fp64, so this is a fp64-accurate solve
    assert res32.x.shape == (n,) and res32.x.dtype == torch.float64
    assert res32.backward_error <= n * EPS
    assert res32.backward_error == pytest.approx(
        backward_error(A.float(), res32.x, B[:, 0].float()), rel=1e-6
    )


def test_torch_gmres_ir_and_fallback() -> None:
    n = 100  # small: the GMRES loop issues many tiny torch ops, which are slow on a busy CPU
    A = torch.from_numpy(ill_conditioned(n, 1e12, seed=12))
    b = torch.from_numpy(np.random.default_rng(7).standard_normal(n))
    res = solve(A, b)
    assert res.method == "gmres-ir" and res.converged and not res.fell_back
    assert res.backward_error <= n * EPS

    forced = solve(A, b, max_iter=0)
    assert forced.fell_back and forced.backward_error <= n * EPS
    assert isinstance(forced.x, torch.Tensor) and forced.x.shape == (n,)


def test_tensor_requiring_grad_is_accepted() -> None:
    A = torch.from_numpy(random_matrix(30)).requires_grad_(True)
    b = torch.ones(30, dtype=torch.float64)
    assert solve(A, b).converged


BAD_INPUTS = [
    (np.ones((3, 4)), np.ones(3), "square matrix"),
    (np.ones((2, 2, 2)), np.ones(2), "square matrix"),
    (np.zeros((0, 0)), np.ones(0), "empty"),
    (np.eye(3), np.ones(4), r"b has shape \(4,\) but A is 3 x 3"),
    (np.eye(3), np.ones((3, 0)), r"k >= 1"),
    (np.eye(3), np.ones((3, 2, 1)), r"b must have shape \(3,\) or \(3, k\)"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), np.ones(2), r"A contains NaN or inf \(first at index \(0, 1\)\)"),
    (np.array([[1.0, 0.0], [np.inf, 1.0]]), np.ones(2), r"A contains NaN or inf \(first at index \(1, 0\)\)"),
    (np.eye(2), np.array([1.0, -np.inf]), r"b contains NaN or inf \(first at index \(1,\)\)"),
    (np.eye(3, dtype=np.int64), np.ones(3), "non-floating dtype int64"),
    (np.eye(3), np.array([True, False, True]), "non-floating dtype bool"),
    (np.eye(3) + 0j, np.ones(3), "complex"),
    (np.full((2, 2), 1e308), np.ones(2), "overflow"),
    (torch.eye(3, dtype=torch.float64), np.ones(3), "must both be torch tensors or both NumPy arrays"),
    (torch.eye(3, dtype=torch.int64), torch.ones(3), "non-floating dtype torch.int64"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.ones(2), "A contains NaN or inf"),
    (torch.eye(3), torch.ones(2), r"b has shape \(2,\)"),
]


@pytest.mark.parametrize(("A", "b", "match"), BAD_INPUTS)
def test_bad_input_gives_clear_error(A, b, match: str) -> None:
    with pytest.raises(LinearSystemError, match=match):
        solve(A, b)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_exactly_singular_matrix(as_tensor: bool) -> None:
    A = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]])  # row 2 = 2 * row 1
    b = np.ones(3)
    if as_tensor:
        A, b = torch.from_numpy(A), torch.from_numpy(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no LinAlgWarning leaks out: the error carries the message
        with pytest.raises(SingularMatrixError, match="singular.*zero pivot.*lstsq") as info:
            solve(A, b)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor_dtype": np.float16}, "float16 is not supported"),
        ({"factor_dtype": torch.bfloat16}, "bfloat16 is not supported"),
        ({"factor_dtype": np.int32}, "float32 or float64"),
        ({"method": "cg"}, "method must be one of"),
        ({"tol": 0.0}, "tol must be a positive"),
        ({"tol": float("nan")}, "tol must be a positive"),
        ({"max_iter": -1}, "max_iter"),
        ({"gmres_tol": 2.0}, "gmres_tol"),
        ({"gmres_max_iter": 0}, "gmres_max_iter"),
    ],
)
def test_bad_options_give_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(LinearSystemError, match=match):
        solve(np.eye(3), np.ones(3), **kwargs)


SPELLINGS = {
    "float32": ["float32", np.float32, np.dtype("float32"), torch.float32],
    "float64": ["float64", np.float64, np.dtype("float64"), torch.float64, float],
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_factor_dtype_spellings_factor_in_that_dtype(
    name: str, lapack_typecodes: list[str], factored: list[torch.dtype]
) -> None:
    """Every spelling of a dtype reaches the LU routine in that dtype, on the LAPACK and the torch path alike
    (converging proves nothing: a float64 LU converges too)."""
    A, b, prefix = random_matrix(20), np.ones(20), "s" if name == "float32" else "d"
    for dtype in SPELLINGS[name]:
        lapack_typecodes.clear()
        assert solve(A, b, factor_dtype=dtype).converged
        # sgetrf/sgetrs are LAPACK's float32 LU and solve, dgetrf/dgetrs its float64 ones.
        assert lapack_typecodes == [f"{prefix}getrf", f"{prefix}getrs"], dtype
        factored.clear()
        assert solve(torch.from_numpy(A), torch.from_numpy(b), factor_dtype=dtype).converged
        assert factored == [getattr(torch, name)], dtype
