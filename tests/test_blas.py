"""dbn._blas: the direct BLAS calls agree with numpy, and the numpy fallback trains the same RBM;
dbn._random draws numpy's own numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dbn import _blas, _random

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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # float64 takes the numpy path
def test_prepared_calls_repeat_their_product_on_the_arrays_current_contents(dtype):
    rng = np.random.default_rng(4)
    A = rng.standard_normal((11, 6)).astype(dtype)
    B = rng.standard_normal((6, 9)).astype(dtype)
    C = np.zeros((11, 9), dtype)
    x, y = rng.standard_normal(11).astype(dtype), rng.standard_normal(6).astype(dtype)
    acc = np.zeros_like(C)
    gemm = _blas.prepare_gemm(A, B, C)
    gemv = _blas.prepare_gemv(A, x, y)
    axpy = _blas.prepare_axpy(C, acc)
    for step in range(3):
        A *= dtype(1.5)  # new contents, same arrays
        x -= dtype(0.25)
        C_ref, y_ref = 0.5 * (A @ B) - 0.9 * C, 2.0 * (A.T @ x) + 0.75 * y
        gemm(0.5, -0.9)
        gemv(2.0, 0.75)
        acc_ref = acc - 1.25 * C
        axpy(-1.25)
        np.testing.assert_allclose(C, C_ref, rtol=1e-4, atol=1e-4, err_msg=f"gemm, call {step}")
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4, err_msg=f"gemv, call {step}")
        np.testing.assert_allclose(acc, acc_ref, rtol=1e-5, atol=1e-5, err_msg=f"axpy, call {step}")
    with pytest.raises(ValueError, match=r"gemv: A \(11, 6\), x \(6,\)"):
        _blas.prepare_gemv(A, y, y)


def test_read_only_outputs_are_refused_and_overlapping_ones_take_numpy():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((6, 6)).astype(np.float32)
    frozen = np.frombuffer(bytes(24), dtype=np.float32)  # read-only: BLAS would write into the bytes
    for call, args in [(_blas.prepare_axpy, (np.ones(6, np.float32), frozen)),
                       (_blas.prepare_gemv, (A, np.ones(6, np.float32), frozen)),
                       (_blas.prepare_gemm, (A, A[:, :1].copy(), frozen.reshape(6, 1)))]:
        with pytest.raises(ValueError, match="the output array is read-only"):
            call(*args)
    assert frozen.tobytes() == bytes(24)
    # C is A itself: BLAS's answer would be undefined; the numpy path reads A before writing
    ref = A @ A
    _blas.gemm(A, A, A)
    np.testing.assert_allclose(A, ref, rtol=1e-5, atol=1e-5)


def test_gemv_beta_zero_ignores_what_y_held_on_either_path():
    A = np.ones((3, 4), np.float32)
    for x in (np.ones(3, np.float32), np.ones(3)):  # float64 x takes the numpy path
        y = np.full(4, np.nan, np.float32)
        _blas.prepare_gemv(A, x, y)(2.0, 0.0)
        np.testing.assert_array_equal(y, [6.0, 6.0, 6.0, 6.0])


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


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.PCG64DXSM, np.random.MT19937])
@pytest.mark.parametrize("shape", [(0,), (1,), (2,), (7,), (3, 5), (100, 500)])
@pytest.mark.parametrize("half_kept", [False, True])
def test_uniform_draws_the_numbers_and_leaves_the_state_rng_random_does(bit_generator, shape, half_kept):
    ours, ref = (np.random.Generator(bit_generator(42)) for _ in range(2))
    if half_kept:  # an odd float32 draw leaves PCG64 holding the high half of its last output
        ours.random(3, dtype=np.float32), ref.random(3, dtype=np.float32)
    out = np.full(shape, np.nan, np.float32)
    assert _random.uniform(ours, out) is out
    np.testing.assert_array_equal(out, ref.random(shape, dtype=np.float32))
    _assert_same_future(ours, ref)


def _assert_same_future(ours, ref):
    """The two generators go on with the same draws (a kept half included)."""
    np.testing.assert_array_equal(ours.random(5, dtype=np.float32), ref.random(5, dtype=np.float32))
    np.testing.assert_array_equal(ours.bit_generator.random_raw(3), ref.bit_generator.random_raw(3))


def test_uniform_takes_numpys_path_for_float64():
    ours, ref = np.random.default_rng(1), np.random.default_rng(1)
    out64 = np.empty(9)
    np.testing.assert_array_equal(_random.uniform(ours, out64), ref.random(9))
    _assert_same_future(ours, ref)
