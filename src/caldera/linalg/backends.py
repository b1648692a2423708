"""Input validation and array backends (NumPy/SciPy LAPACK, torch) for caldera.linalg's refinement solvers.

Each backend owns the fp64 copies of A and b, the low-precision LU factors and the handful of kernels the
refinement loop needs, so that `refine.py` stays independent of where the arrays live.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

SUPPORTED_FACTOR_DTYPES = ("float32", "float64")

# About 0.5 MB of float64 per block: |A| is summed in row blocks so validation never allocates an n x n temporary.
_BLOCK_ELEMENTS = 65536
# Larger blocks for torch: on a GPU each block costs kernel launches, and 32 MB temporaries are cheap there.
_TORCH_BLOCK_ELEMENTS = 1 << 22

# Outside this range a power-of-two rescaling keeps A inside float32's normal range during the LU.
_SAFE_NORM_RANGE = (2.0**-60, 2.0**60)


class LinearSystemError(ValueError):
    """Invalid input to caldera.linalg.solve; the message names the problem and how to fix it."""


class SingularMatrixError(LinearSystemError):
    """A is exactly singular: the fp64 LU factorization found a zero pivot."""


def factor_dtype_name(dtype: Any) -> str:
    """Normalize a NumPy/torch dtype or a string to a supported factorization dtype name."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype).removeprefix("torch.")
    if name in ("float16", "bfloat16", "half"):
        raise LinearSystemError(
            f"factor_dtype={name} is not supported: neither LAPACK (SciPy) nor torch.linalg.lu_factor "
            "implement a half-precision LU on CPU or CUDA; use factor_dtype=np.float32."
        )
    if name not in SUPPORTED_FACTOR_DTYPES:
        raise LinearSystemError(f"factor_dtype must be float32 or float64, got {dtype!r}.")
    return name


def make_backend(A: Any, b: Any) -> NumpyBackend | TorchBackend:
    """Pick the torch backend when A or b is a torch tensor, the NumPy/SciPy backend otherwise."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    a_is_tensor = torch is not None and isinstance(A, torch.Tensor)
    b_is_tensor = torch is not None and isinstance(b, torch.Tensor)
    if a_is_tensor != b_is_tensor:
        raise LinearSystemError(
            f"A and b must both be torch tensors or both NumPy arrays, got {type(A).__name__} and "
            f"{type(b).__name__}; convert with torch.as_tensor(..., device=A.device) or .cpu().numpy()."
        )
    return TorchBackend(A, b) if a_is_tensor else NumpyBackend(A, b)


def _check_shapes(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    if len(a_shape) != 2 or a_shape[0] != a_shape[1]:
        raise LinearSystemError(
            f"A must be a square matrix of shape (n, n), got shape {tuple(a_shape)}; "
            "for non-square (least-squares) problems use numpy.linalg.lstsq."
        )
    n = a_shape[0]
    if n == 0:
        raise LinearSystemError("A is empty (shape (0, 0)); pass at least a 1 x 1 system.")
    if len(b_shape) not in (1, 2) or b_shape[0] != n or (len(b_shape) == 2 and b_shape[1] == 0):
        raise LinearSystemError(
            f"b has shape {tuple(b_shape)} but A is {n} x {n}; b must have shape ({n},) or ({n}, k) with k >= 1."
        )


def _check_dtype_kind(name: str, kind: str, dtype: Any) -> None:
    if kind == "c":
        raise LinearSystemError(
            f"{name} is complex ({dtype}); only real systems are supported: split it into a real 2n x 2n system."
        )
    if kind != "f":
        raise LinearSystemError(
            f"{name} has non-floating dtype {dtype}; convert it first, e.g. {name}.astype(np.float64) "
            f"or {name}.double() for a torch tensor."
        )


def _range_scale(norm_a: float, dtype_name: str) -> float:
    """Power-of-two factor that brings ||A|| near 1 when it would over/underflow the factorization dtype."""
    if dtype_name == "float64" or _SAFE_NORM_RANGE[0] <= norm_a <= _SAFE_NORM_RANGE[1]:
        return 1.0
    return math.ldexp(1.0, -math.frexp(norm_a)[1])  # exact: scaling by 2^k introduces no rounding


def _nonfinite_message(name: str, index: tuple[int, ...]) -> str:
    return (
        f"{name} contains NaN or inf (first at index {index}); remove or impute the non-finite entries "
        "before solving."
    )


def _overflow_message() -> str:
    return (
        "the row sums of |A| overflow float64 (entries close to 1e308); rescale the system first, "
        "e.g. divide A and b by abs(A).max()."
    )


def _lapack(names: tuple[str, ...], arrays: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
    try:
        from scipy.linalg import get_lapack_funcs
    except ImportError as exc:  # scipy is only needed for NumPy inputs
        raise ImportError("caldera.linalg needs SciPy for NumPy inputs: pip install scipy") from exc
    return get_lapack_funcs(names, arrays)


def _lapack_lu(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, Any, int]:
    """In-place LAPACK getrf of an array we own; returns (lu, piv, info, getrs, trans)."""
    # LAPACK is column-major: factoring the transpose of a row-major array avoids an n x n copy, and
    # getrs(trans=1) then solves with A itself.
    if mat.flags.f_contiguous:
        target, trans = mat, 0
    else:
        target, trans = np.ascontiguousarray(mat).T, 1
    getrf, getrs = _lapack(("getrf", "getrs"), (target,))
    lu, piv, info = getrf(target, overwrite_a=True)
    if info < 0:
        raise RuntimeError(f"LAPACK {getrf.typecode}getrf rejected argument {-info}")
    return lu, piv, info, getrs, trans


class NumpyBackend:
    """CPU backend: SciPy's LAPACK getrf/getrs in the factorization dtype, fp64 BLAS for residuals."""

    def __init__(self, A: Any, b: Any) -> None:
        a, bb = np.asarray(A), np.asarray(b)
        _check_shapes(a.shape, bb.shape)
        _check_dtype_kind("A", a.dtype.kind, a.dtype)
        _check_dtype_kind("b", bb.dtype.kind, bb.dtype)
        self.n, self.b_shape = a.shape[0], bb.shape
        self.a = np.asarray(a, dtype=np.float64)  # no copy for float64 input; A is never written to
        self.b = bb.astype(np.float64).reshape(self.n, -1)
        self.norm_a = self._inf_norm_checked()
        if not np.isfinite(self.b).all():
            index = tuple(int(i) for i in np.argwhere(~np.isfinite(bb))[0])
            raise LinearSystemError(_nonfinite_message("b", index))
        self.b_norms = self.inf_norms(self.b)
        self._lu: tuple[Any, ...] | None = None
        self._lu64: tuple[Any, ...] | None = None
        self._scale = 1.0

    def _inf_norm_checked(self) -> float:
        a = self.a
        rows = max(1, _BLOCK_ELEMENTS // self.n)
        with np.errstate(over="ignore"):  # overflow is reported below with a clearer message
            if a.flags.f_contiguous and not a.flags.c_contiguous:
                sums = np.zeros(self.n)
                for start in range(0, self.n, rows):  # column blocks are contiguous for Fortran order
                    sums += np.abs(a[:, start : start + rows]).sum(axis=1)
            else:
                sums = np.concatenate([np.abs(a[s : s + rows]).sum(axis=1) for s in range(0, self.n, rows)])
        norm = float(sums.max())  # NaN and inf propagate, so this doubles as the finiteness check
        if not math.isfinite(norm):
            bad = np.argwhere(~np.isfinite(a))
            if len(bad) == 0:
                raise LinearSystemError(_overflow_message())
            raise LinearSystemError(_nonfinite_message("A", tuple(int(i) for i in bad[0])))
        return norm

    def factor(self, dtype_name: str) -> bool:
        """LU-factorize A in the low precision; False if LAPACK hit an exactly zero pivot."""
        self._scale = _range_scale(self.norm_a, dtype_name)
        src = self.a if self._scale == 1.0 else self.a * self._scale
        lu, piv, info, getrs, trans = _lapack_lu(src.astype(dtype_name))  # the one n x n low-precision copy
        self._lu = (lu, piv, getrs, trans)
        return info == 0

    def solve_low(self, r: np.ndarray) -> np.ndarray:
        """Correction A^{-1} r using the low-precision factors (fp64 in, fp64 out)."""
        lu, piv, getrs, trans = self._lu
        # Per-column normalization keeps late, tiny residuals from underflowing in float32.
        s = np.abs(r).max(axis=0)
        s[s == 0] = 1.0
        rhs = np.asfortranarray(r / s, dtype=lu.dtype)
        d, _ = getrs(lu, piv, rhs, trans=trans, overwrite_b=True)
        return d.astype(np.float64) * (s * self._scale)

    def solve_precond(self, v: np.ndarray) -> np.ndarray:
        """Apply the LU preconditioner in fp64 (factors upcast once) to a vector."""
        if self._lu64 is None:
            lu, piv, _, trans = self._lu
            lu64 = lu.astype(np.float64)  # one n x n upcast, paid only when GMRES-IR runs
            (getrs,) = _lapack(("getrs",), (lu64,))
            self._lu64 = (lu64, piv, getrs, trans)
        lu64, piv, getrs, trans = self._lu64
        y, _ = getrs(lu64, piv, v, trans=trans)
        return y * self._scale

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """A @ v in fp64."""
        return self.a @ v

    def residual(self, x: np.ndarray) -> np.ndarray:
        """b - A x in fp64 (BLAS gemv/gemm)."""
        return self.b - self.a @ x

    def inf_norms(self, v: np.ndarray) -> np.ndarray:
        """Per-column infinity norms, on the host."""
        return np.abs(v).max(axis=0)

    def norm2(self, v: np.ndarray) -> float:
        """Euclidean norm of a vector."""
        return float(np.linalg.norm(v))

    def solve_fp64(self) -> np.ndarray:
        """Reference fp64 LAPACK solve (getrf + getrs) used as the fallback."""
        self._lu = self._lu64 = None  # release the low-precision factors before allocating the fp64 copy
        lu, piv, info, getrs, trans = _lapack_lu(self.a.copy(order="K"))
        if info > 0:
            raise SingularMatrixError(_singular_message(info))
        x, _ = getrs(lu, piv, np.asfortranarray(self.b), trans=trans)
        return x

    def as_solution(self, x: Any) -> np.ndarray:
        """Convert a user-supplied solution to fp64 with b's (n, k) layout."""
        return np.asarray(x, dtype=np.float64).reshape(self.n, -1)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        """Zero fp64 array on this backend."""
        return np.zeros(shape)

    def to_host(self, v: np.ndarray) -> np.ndarray:
        """Backend array as a NumPy array."""
        return v

    def from_host(self, v: np.ndarray) -> np.ndarray:
        """NumPy array as a backend array."""
        return v


def _singular_message(info: int) -> str:
    return (
        f"A is singular: the float64 LU factorization found an exactly zero pivot (U[{info - 1}, {info - 1}] "
        "== 0), so the system has no unique solution; check for linearly dependent rows/columns, or use a "
        "least-squares solver such as numpy.linalg.lstsq."
    )


class TorchBackend:
    """torch backend (CPU or CUDA): torch.linalg.lu_factor/lu_solve in low precision, fp64 residuals on device."""

    def __init__(self, A: Any, b: Any) -> None:
        import torch

        self._torch = torch
        _check_shapes(tuple(A.shape), tuple(b.shape))
        for name, t in (("A", A), ("b", b)):
            _check_dtype_kind(name, "c" if t.is_complex() else "f" if t.is_floating_point() else "i", t.dtype)
        if A.device != b.device:
            raise LinearSystemError(f"A is on {A.device} but b is on {b.device}; move both to one device.")
        if A.device.type == "mps":
            raise LinearSystemError(
                "the refinement needs float64 residuals, which the MPS device does not support; "
                "move A and b to the CPU (A.cpu(), b.cpu())."
            )
        self.n, self.b_shape, self.device = A.shape[0], tuple(b.shape), A.device
        with torch.no_grad():
            self.a = A.detach().to(torch.float64)
            self.b = b.detach().to(torch.float64).reshape(self.n, -1).clone()
        self.norm_a = self._inf_norm_checked()
        if not bool(torch.isfinite(self.b).all()):
            index = tuple(int(i) for i in (~torch.isfinite(b)).nonzero()[0])
            raise LinearSystemError(_nonfinite_message("b", index))
        self.b_norms = self.inf_norms(self.b)
        self._lu: tuple[Any, Any] | None = None
        self._lu64: Any = None
        self._scale = 1.0

    def _inf_norm_checked(self) -> float:
        torch = self._torch
        rows = max(1, _TORCH_BLOCK_ELEMENTS // self.n)
        # Block maxima stay on the device so there is one host sync, not one per block.
        maxima = torch.stack([self.a[s : s + rows].abs().sum(dim=1).max() for s in range(0, self.n, rows)])
        norm = float(maxima.max())
        if not math.isfinite(norm):
            bad = (~torch.isfinite(self.a)).nonzero()
            if len(bad) == 0:
                raise LinearSystemError(_overflow_message())
            raise LinearSystemError(_nonfinite_message("A", tuple(int(i) for i in bad[0])))
        return norm

    def factor(self, dtype_name: str) -> bool:
        """LU-factorize A in the low precision; False if the LU hit an exactly zero pivot."""
        torch = self._torch
        self._scale = _range_scale(self.norm_a, dtype_name)
        src = self.a if self._scale == 1.0 else self.a * self._scale
        lu, piv, info = torch.linalg.lu_factor_ex(src.to(getattr(torch, dtype_name)))
        self._lu = (lu, piv)
        return int(info) == 0

    def solve_low(self, r: Any) -> Any:
        """Correction A^{-1} r using the low-precision factors (fp64 in, fp64 out)."""
        lu, piv = self._lu
        # Per-column normalization keeps late, tiny residuals from underflowing in float32.
        s = r.abs().amax(dim=0)
        s = self._torch.where(s == 0, self._torch.ones_like(s), s)
        d = self._torch.linalg.lu_solve(lu, piv, (r / s).to(lu.dtype))
        return d.to(self._torch.float64) * (s * self._scale)

    def solve_precond(self, v: Any) -> Any:
        """Apply the LU preconditioner in fp64 (factors upcast once) to a vector."""
        lu, piv = self._lu
        if self._lu64 is None:
            self._lu64 = lu.to(self._torch.float64)
        return self._torch.linalg.lu_solve(self._lu64, piv, v.unsqueeze(1)).squeeze(1) * self._scale

    def matvec(self, v: Any) -> Any:
        """A @ v in fp64 on the device."""
        return self.a @ v

    def residual(self, x: Any) -> Any:
        """b - A x in fp64 on the device."""
        return self.b - self.a @ x

    def inf_norms(self, v: Any) -> np.ndarray:
        """Per-column infinity norms, on the host."""
        return v.abs().amax(dim=0).cpu().numpy()

    def norm2(self, v: Any) -> float:
        """Euclidean norm of a vector."""
        return float(self._torch.linalg.vector_norm(v))

    def solve_fp64(self) -> Any:
        """Reference fp64 solve (torch LU) used as the fallback."""
        torch = self._torch
        self._lu = self._lu64 = None  # release the low-precision factors before the fp64 copy
        lu, piv, info = torch.linalg.lu_factor_ex(self.a)
        if int(info) > 0:
            raise SingularMatrixError(_singular_message(int(info)))
        return torch.linalg.lu_solve(lu, piv, self.b)

    def as_solution(self, x: Any) -> Any:
        """Convert a user-supplied solution to fp64 with b's (n, k) layout."""
        return self._torch.as_tensor(x, device=self.device).to(self._torch.float64).reshape(self.n, -1)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        """Zero fp64 tensor on this backend's device."""
        return self._torch.zeros(shape, dtype=self._torch.float64, device=self.device)

    def to_host(self, v: Any) -> np.ndarray:
        """Device tensor as a NumPy array."""
        return v.detach().cpu().numpy()

    def from_host(self, v: np.ndarray) -> Any:
        """NumPy array as a device tensor."""
        return self._torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
