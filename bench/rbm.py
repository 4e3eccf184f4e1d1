#!/usr/bin/env python
"""Speed of one CD-1 epoch: dbn.rbm beside scikit-learn and beside the machine's GEMM rate.

One epoch over the 60000 MNIST training images, 784 visible / 500 hidden units,
mini-batches of 100, float32 data in [0, 1], in one run:

* ``dbn.rbm.train_epoch`` (CD-1, rbm.m's settings; its products and the momentum
  update go straight to numpy's own OpenBLAS, see ``dbn/_blas.py``; run with
  ``DBN_BLAS=numpy`` for the numpy-only path);
* scikit-learn's ``BernoulliRBM`` (same units, batch size and learning rate,
  ``n_iter=1``, ``verbose=0``, float32 input; it uses persistent CD, one Gibbs step,
  so the same five matrix products per mini-batch);
* the matrix products alone: the five GEMMs one CD-1 mini-batch needs
  (``v W``, ``h W^T``, ``v' W``, ``v^T h``, ``v'^T h'``), into preallocated outputs,
  600 times. That is the time an epoch cannot beat with this BLAS, and its GFLOP/s
  is the machine's own rate for these shapes;
* the same products with ``W += dW`` after each mini-batch: the one write every
  trainer must make. It shows what a weight matrix that changes between the products
  costs them (the threads' caches lose it), apart from the cost of the write itself.

Each figure is the best of ``--repeat`` rounds; every round times every row once, in
turn, so that a machine whose speed drifts (a shared VM) slows all rows alike rather
than one. Needs the ``bench`` extra (scikit-learn) for the comparison; without it that
row is skipped.

    python bench/rbm.py --data ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbn import _blas  # noqa: E402
from dbn import rbm as R  # noqa: E402
from dbn.data import load_mnist  # noqa: E402

from _timing import best_of_rounds  # noqa: E402  (bench/ is on sys.path when a script here runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="directory with the MNIST IDX files (gzipped or not)")
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    x_u8 = load_mnist(a.data)[0]
    x = x_u8.astype(np.float32) / np.float32(255)
    n, nv = x.shape
    nh, bs = a.hidden, a.batch_size
    n_batches = -(-n // bs)
    flops = n_batches * 5 * 2.0 * bs * nv * nh  # five GEMMs of (bs x nv x nh) per mini-batch
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"CD-1 epoch: {n} images, {nv}x{nh}, batch {bs}, float32; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), BLAS threads: {threads}; best of {a.repeat} rounds")
    print(f"dbn products and updates through: {_blas.backend()} (DBN_BLAS=numpy for numpy's matmul only)")

    # the matrix products alone
    rng = np.random.default_rng(a.seed)
    W = (rng.standard_normal((nv, nh)) * 0.01).astype(np.float32)
    v, v2 = x[:bs].copy(), x[bs:2 * bs].copy()
    h, h2 = np.empty((bs, nh), np.float32), np.empty((bs, nh), np.float32)
    vn = np.empty((bs, nv), np.float32)
    g, g2 = np.empty((nv, nh), np.float32), np.empty((nv, nh), np.float32)

    def gemms_once():
        np.matmul(v, W, out=h)
        np.matmul(h, W.T, out=vn)
        np.matmul(v2, W, out=h2)
        np.matmul(v.T, h, out=g)
        np.matmul(v2.T, h2, out=g2)

    def gemms():
        for _ in range(n_batches):
            gemms_once()

    gemms()  # warm up
    dW = np.full_like(W, 1e-12)

    def write_only():
        for _ in range(n_batches):
            np.add(W, dW, out=W)

    def gemms_and_write():
        for _ in range(n_batches):
            gemms_once()
            np.add(W, dW, out=W)

    # ours
    settings = R.RBMSettings(batch_size=bs)

    def ours(data):
        params = R.init_rbm(nv, nh, np.random.default_rng(a.seed), settings)
        R.train_epoch(params, data, 0, np.random.default_rng(a.seed + 1), settings)

    contenders = {"GEMMs alone (5 per mini-batch)": gemms,
                  "W += dW alone": write_only,
                  "GEMMs + W += dW per mini-batch": gemms_and_write,
                  "dbn.rbm.train_epoch, float32 input": lambda: ours(x),
                  "dbn.rbm.train_epoch, uint8 pixels": lambda: ours(x_u8)}
    try:
        from sklearn.neural_network import BernoulliRBM
    except ImportError:
        print("scikit-learn is not installed (pip install -e '.[bench]'): its row is skipped")
    else:
        def sk():
            BernoulliRBM(n_components=nh, learning_rate=0.1, batch_size=bs, n_iter=1, verbose=0,
                         random_state=a.seed).fit(x)

        contenders["scikit-learn BernoulliRBM (n_iter=1)"] = sk
    best = best_of_rounds(a.repeat, contenders)
    t_write = best.pop("W += dW alone")
    t_gemm = best["GEMMs alone (5 per mini-batch)"]
    t_gemm_w = best["GEMMs + W += dW per mini-batch"]
    t_ours = best["dbn.rbm.train_epoch, float32 input"]
    t_sk = best.get("scikit-learn BernoulliRBM (n_iter=1)")
    rows = list(best.items())

    print(f"\n{'':40s} {'s/epoch':>8s} {'GFLOP/s':>8s} {'images/s':>9s}")
    for name, t in rows:
        print(f"{name:40s} {t:8.3f} {flops / t / 1e9:8.1f} {n / t:9.0f}")
    print(f"\nours / GEMM rate: {t_gemm / t_ours:.0%} of the matrix-multiply rate (target >= 75%)")
    print(f"a W that changes every mini-batch costs the GEMMs {t_gemm_w - t_gemm - t_write:.3f} s per epoch "
          f"beyond the write itself ({t_write:.3f} s)")
    if t_sk is not None:
        print(f"ours vs scikit-learn: {t_sk / t_ours:.2f}x faster (target >= 2.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
