"""``C = alpha op(A) op(B) + beta C``, ``y = alpha A^T x + beta y`` and ``y += a x`` in the BLAS numpy itself uses.

numpy's ``matmul`` has no ``alpha``/``beta``: a momentum update written with it
(``dW *= m; dW += G``) makes extra passes over a weight matrix that does not fit
the core's cache, once per mini-batch. BLAS's own ``sgemm`` does it in the
product. This module finds the OpenBLAS that numpy's wheels bundle (the
ILP64 ``scipy_cblas_sgemm64_`` of numpy 2, ``cblas_sgemm64_`` of numpy 1.22+),
calls it through :mod:`ctypes`, and checks it once against numpy on a small
product before using it. Where there is no such library (another BLAS, another
build), where the check fails, or with ``DBN_BLAS=numpy`` in the environment,
the same functions run in numpy: same results up to rounding, only slower.

Only C-contiguous float32 arrays go to BLAS, and only when the output shares no memory
with an input; anything else takes the numpy path. A read-only output is refused.

A training loop that makes the same products on the same buffers every mini-batch
*prepares* them (:func:`prepare_gemm`, :func:`prepare_gemv`, :func:`prepare_axpy`):
the shapes are checked and the pointers taken once, and each call is then one
foreign call (about 1.5 us instead of 6 us; an RBM epoch makes 6000 of them).
"""

from __future__ import annotations

import ctypes
import glob
import os
import warnings
from typing import Callable

import numpy as np

__all__ = ["gemm", "axpy", "prepare_gemm", "prepare_gemv", "prepare_axpy", "backend"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_F32 = np.dtype(np.float32)


def _library_candidates() -> list[str]:
    """Shared libraries next to numpy that may hold its OpenBLAS (wheel layouts)."""
    base = os.path.dirname(np.__file__)
    pats = [os.path.join(base, "..", "numpy.libs", "*openblas*"),  # Linux wheels
            os.path.join(base, ".dylibs", "*openblas*"),  # macOS wheels
            os.path.join(base, ".libs", "*openblas*")]  # older wheels
    return sorted({os.path.realpath(p) for pat in pats for p in glob.glob(pat)})


def _bind(lib: ctypes.CDLL):
    """(sgemm, sgemv, saxpy) of ``lib`` with 64-bit integer arguments, or None."""
    i64, f32, ptr, enum = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    for prefix, suffix in (("scipy_cblas_", "64_"), ("cblas_", "64_")):
        try:
            sgemm = getattr(lib, f"{prefix}sgemm{suffix}")
            sgemv = getattr(lib, f"{prefix}sgemv{suffix}")
            saxpy = getattr(lib, f"{prefix}saxpy{suffix}")
        except AttributeError:
            continue
        sgemm.argtypes = [enum, enum, enum, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
        sgemv.argtypes = [enum, enum, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
        saxpy.argtypes = [i64, f32, ptr, i64, ptr, i64]
        sgemm.restype = sgemv.restype = saxpy.restype = None
        return sgemm, sgemv, saxpy
    return None


def _gemm_numpy(A, B, C, trans_a, trans_b, alpha, beta):
    prod = np.matmul(A.T if trans_a else A, B.T if trans_b else B)
    if alpha != 1.0:
        prod *= C.dtype.type(alpha)
    if beta == 0.0:
        C[...] = prod
    else:
        if beta != 1.0:
            C *= C.dtype.type(beta)
        C += prod


class _Blas:
    def __init__(self, sgemm, sgemv, saxpy, path: str):
        self.sgemm, self.sgemv, self.saxpy, self.path = sgemm, sgemv, saxpy, path

    def gemm(self, A, B, C, trans_a, trans_b):
        """``run(alpha, beta)`` making ``C = alpha op(A) op(B) + beta C`` (shapes already checked)."""
        f, m, n = self.sgemm, *C.shape
        k = A.shape[0] if trans_a else A.shape[1]
        head = (_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k)
        pa, lda, pb, ldb, pc, ldc = A.ctypes.data, A.shape[1], B.ctypes.data, B.shape[1], C.ctypes.data, n

        def run(alpha, beta, _keep=(A, B, C)):  # _keep: the pointers stay valid while run exists
            f(*head, alpha, pa, lda, pb, ldb, beta, pc, ldc)
        return run

    def gemv(self, A, x, y):
        """``run(alpha, beta)`` making ``y = alpha A^T x + beta y``."""
        f, (m, n) = self.sgemv, A.shape
        pa, px, py = A.ctypes.data, x.ctypes.data, y.ctypes.data

        def run(alpha, beta, _keep=(A, x, y)):
            f(_ROW_MAJOR, _TRANS, m, n, alpha, pa, n, px, 1, beta, py, 1)
        return run

    def axpy(self, x, y):
        """``run(a)`` making ``y += a x``."""
        f, size, px, py = self.saxpy, y.size, x.ctypes.data, y.ctypes.data

        def run(a, _keep=(x, y)):
            f(size, a, px, 1, py, 1)
        return run


def _self_check(blas: _Blas) -> bool:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((7, 5)).astype(np.float32)
    B = rng.standard_normal((6, 7)).astype(np.float32)
    C0 = rng.standard_normal((5, 6)).astype(np.float32)
    C, ref = C0.copy(), C0.copy()
    blas.gemm(A, B, C, True, True)(0.5, -0.25)
    _gemm_numpy(A, B, ref, True, True, 0.5, -0.25)
    x, y = rng.standard_normal(9).astype(np.float32), rng.standard_normal(9).astype(np.float32)
    y_ref = y + np.float32(1.5) * x
    blas.axpy(x, y)(1.5)
    u, z = rng.standard_normal(7).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    z_ref = np.float32(2.0) * (A.T @ u) + np.float32(0.5) * z
    blas.gemv(A, u, z)(2.0, 0.5)
    return bool(np.allclose(C, ref, rtol=1e-5, atol=1e-5) and np.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
                and np.allclose(z, z_ref, rtol=1e-5, atol=1e-5))


def _load() -> _Blas | None:
    if os.environ.get("DBN_BLAS", "").lower() == "numpy":
        return None
    for path in _library_candidates():
        try:
            fns = _bind(ctypes.CDLL(path))
        except OSError:
            continue
        if fns is None:
            continue
        blas = _Blas(*fns, path)
        if _self_check(blas):
            return blas
        warnings.warn(f"dbn: the BLAS in {path} disagrees with numpy on a test product; using numpy",
                      RuntimeWarning, stacklevel=2)
    return None


_BLAS = _load()


def backend() -> str:
    """``"blas:<library>"`` when products go to BLAS directly, else ``"numpy"``."""
    return f"blas:{os.path.basename(_BLAS.path)}" if _BLAS is not None else "numpy"


def _direct(op: str, out: np.ndarray, *inputs: np.ndarray) -> bool:
    """Whether BLAS itself can write ``out`` from ``inputs``; refuses a read-only ``out``
    (BLAS would write into it all the same: into bytes, a read-only memory map...)."""
    if not out.flags.writeable:
        raise ValueError(f"{op}: the output array is read-only")
    return (_BLAS is not None and all(a.dtype == _F32 and a.flags.c_contiguous for a in (out, *inputs))
            and not any(np.may_share_memory(out, a) for a in inputs))


def prepare_gemm(A: np.ndarray, B: np.ndarray, C: np.ndarray, *, trans_a: bool = False,
                 trans_b: bool = False) -> Callable[[float, float], None]:
    """``run(alpha, beta)`` making ``C = alpha op(A) op(B) + beta C`` in place, as often as
    called, with the shapes checked now. The arrays must stay the same arrays (not
    resized or swapped for others); their contents may change between calls.

    ``beta=0`` ignores what ``C`` held (as BLAS does), so ``C`` may be uninitialised.
    Raises ``ValueError`` when the shapes do not fit.
    """
    ra, ca = A.shape[::-1] if trans_a else A.shape
    rb, cb = B.shape[::-1] if trans_b else B.shape
    if ca != rb or C.shape != (ra, cb):
        raise ValueError(f"gemm: op(A) {ra}x{ca}, op(B) {rb}x{cb}, C {C.shape[0]}x{C.shape[1]} do not fit")
    if _direct("gemm", C, A, B) and ca and C.size:
        return _BLAS.gemm(A, B, C, trans_a, trans_b)
    if C.size == 0:
        return lambda alpha, beta: None
    return lambda alpha, beta: _gemm_numpy(A, B, C, trans_a, trans_b, alpha, beta)


def prepare_gemv(A: np.ndarray, x: np.ndarray, y: np.ndarray) -> Callable[[float, float], None]:
    """``run(alpha, beta)`` making ``y = alpha A^T x + beta y`` (``A`` [m, n], ``x`` [m],
    ``y`` [n]): column sums of ``A`` when ``x`` is ones. As :func:`prepare_gemm`."""
    if A.ndim != 2 or x.shape != A.shape[:1] or y.shape != A.shape[1:]:
        raise ValueError(f"gemv: A {A.shape}, x {x.shape}, y {y.shape} do not fit A^T x")
    if _direct("gemv", y, A, x) and x.size and y.size:
        return _BLAS.gemv(A, x, y)
    if y.size == 0:
        return lambda alpha, beta: None

    def run(alpha, beta):
        prod = np.matmul(x, A)
        prod *= y.dtype.type(alpha)
        if beta == 0.0:  # as BLAS: what y held does not matter (NaN included)
            y[...] = prod
        else:
            np.multiply(y, y.dtype.type(beta), out=y)
            np.add(y, prod, out=y)
    return run


def prepare_axpy(x: np.ndarray, y: np.ndarray) -> Callable[[float], None]:
    """``run(a)`` making ``y += a x`` in place (same shapes). As :func:`prepare_gemm`."""
    if x.shape != y.shape:
        raise ValueError(f"axpy: x {x.shape} and y {y.shape} differ")
    if _direct("axpy", y, x) and y.size:
        return _BLAS.axpy(x, y)

    def run(a):
        np.add(y, y.dtype.type(a) * x, out=y)
    return run


def gemm(A: np.ndarray, B: np.ndarray, C: np.ndarray, *, trans_a: bool = False, trans_b: bool = False,
         alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``C = alpha op(A) op(B) + beta C`` in place (``op`` transposes when asked); returns ``C``.

    ``beta=0`` ignores what ``C`` held (as BLAS does), so ``C`` may be uninitialised.
    """
    prepare_gemm(A, B, C, trans_a=trans_a, trans_b=trans_b)(float(alpha), float(beta))
    return C


def axpy(a: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``y += a x`` in place (same shapes); returns ``y``."""
    prepare_axpy(x, y)(float(a))
    return y
