"""dbn._blas: the direct BLAS calls agree with numpy, and the numpy fallback trains the same RBM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dbn import _blas

ROOT = Path(__file__).resolve().parents[1]


def test_numpy_wheels_blas_is_used_when_present():
    if not _blas._library_candidates():
        pytest.skip("this numpy bundles no OpenBLAS next to it")
    assert _blas.backend().startswith("blas:"), _blas.backend()


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 1.0), (-0.003, -0.9)])
def test_gemm_matches_numpy(trans_a, trans_b, alpha, beta):
    rng = np.random.default_rng(1)
    m, k, n = 37, 53, 29
    A = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    B = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    C = rng.standard_normal((m, n)).astype(np.float32)
    ref = alpha * ((A.T if trans_a else A).astype(np.float64) @ (B.T if trans_b else B)) + beta * C
    out = _blas.gemm(A, B, C, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
    assert out is C
    np.testing.assert_allclose(C, ref, rtol=1e-4, atol=1e-4)


def test_gemm_beta_zero_ignores_what_c_held_and_odd_inputs_take_numpy():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((6, 8)).astype(np.float32)
    B = rng.standard_normal((8, 4)).astype(np.float32)
    C = np.full((6, 4), np.nan, np.float32)
    _blas.gemm(A, B, C)
    np.testing.assert_allclose(C, A @ B, rtol=1e-5, atol=1e-5)
    # a strided view and float64 go through numpy, same answer
    big = rng.standard_normal((6, 16)).astype(np.float32)
    C2 = np.zeros((6, 4), np.float32)
    _blas.gemm(big[:, ::2], B, C2, alpha=2.0)
    np.testing.assert_allclose(C2, 2 * big[:, ::2] @ B, rtol=1e-5, atol=1e-5)
    C3 = np.ones((6, 4))
    _blas.gemm(A.astype(np.float64), B.astype(np.float64), C3, beta=1.0)
    np.testing.assert_allclose(C3, 1 + A.astype(np.float64) @ B, rtol=1e-6)


def test_gemm_and_axpy_refuse_shapes_that_do_not_fit():
    A, B = np.zeros((3, 4), np.float32), np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"op\(A\) 3x4, op\(B\) 5x2"):
        _blas.gemm(A, B, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="axpy: x"):
        _blas.axpy(1.0, np.zeros(3, np.float32), np.zeros(4, np.float32))


def test_axpy_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 7)).astype(np.float32)
    y = rng.standard_normal((30, 7)).astype(np.float32)
    ref = y + np.float32(-1.25) * x
    _blas.axpy(-1.25, x, y)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


_TRAIN = """
import sys, numpy as np
from dbn import _blas, rbm as R
rng = np.random.default_rng(0)
x = (rng.random((230, 20)) < 0.4).astype(np.float32)
p = R.init_rbm(20, 9, np.random.default_rng(1))
errs = [R.train_epoch(p, x, e, np.random.default_rng(10 + e), R.RBMSettings(batch_size=50)) for e in range(8)]
np.savez(sys.argv[1], errs=errs, **p)
print(_blas.backend())
"""


def test_numpy_fallback_trains_the_same_rbm(tmp_path):
    results = {}
    for mode in ("", "numpy"):
        env = dict(os.environ, DBN_BLAS=mode, PYTHONPATH=str(ROOT))
        out = tmp_path / f"rbm-{mode or 'default'}.npz"
        proc = subprocess.run([sys.executable, "-c", _TRAIN, str(out)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        results[mode] = (proc.stdout.strip(), np.load(out))
    assert results["numpy"][0] == "numpy"
    a, b = results[""][1], results["numpy"][1]
    np.testing.assert_allclose(a["errs"], b["errs"], rtol=1e-4)
    assert a["errs"][-1] < a["errs"][0]
    for k in ("W", "b_vis", "b_hid", "dW", "db_vis", "db_hid"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-5, err_msg=k)
