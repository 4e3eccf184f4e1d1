#!/usr/bin/env python
"""Fine-tuning throughput: dbn.network beside scikit-learn's MLPClassifier.

The full classifier 784-500-500-2000-10 (logistic hidden units, softmax output,
cross-entropy), mini-batches of 100, SGD with momentum 0.9, float32, one epoch over
``--examples`` MNIST training images, in one run:

* ``dbn.network.finetune_epoch`` without dropout, and with dropout 0.2 / 0.5;
* scikit-learn's ``MLPClassifier`` with the same layers, activation, batch size,
  solver and momentum (``max_iter=1``, no early stopping, float32 input);
* the forward and backward matrix products alone (what an epoch cannot beat).

Prints examples per second for each. Each figure is the best of ``--repeat`` rounds,
each round timing every row once, in turn.

    python bench/finetune.py --data ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbn import network as N  # noqa: E402
from dbn.data import load_mnist  # noqa: E402

from _timing import best_of_rounds  # noqa: E402  (bench/ is on sys.path when a script here runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="directory with the MNIST IDX files (gzipped or not)")
    ap.add_argument("--layers", default="500,500,2000", help="hidden layer widths")
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    x_u8, y = load_mnist(a.data)[:2]
    x_u8, y = x_u8[:a.examples], y[:a.examples]
    x = x_u8.astype(np.float32) / np.float32(255)
    hidden = [int(s) for s in a.layers.split(",")]
    sizes = [x.shape[1], *hidden, 10]
    n, bs = len(x), a.batch_size
    n_batches = -(-n // bs)
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"fine-tuning epoch: {n} images, {'-'.join(map(str, sizes))}, batch {bs}, float32; "
          f"{os.cpu_count()} CPUs, BLAS threads: {threads}; best of {a.repeat} rounds")

    # forward (every layer) + backward (weight gradient every layer, input gradient all but the first)
    rng = np.random.default_rng(a.seed)
    Ws = [(rng.standard_normal((i, o)) * 0.01).astype(np.float32) for i, o in zip(sizes, sizes[1:])]
    acts = [x[:bs].copy()] + [np.empty((bs, o), np.float32) for o in sizes[1:]]
    grads = [np.empty_like(W) for W in Ws]
    deltas = [np.empty((bs, i), np.float32) for i in sizes[:-1]]
    flops = n_batches * sum(2.0 * bs * W.size * (2 if i == 0 else 3) for i, W in enumerate(Ws))

    def gemms():
        for _ in range(n_batches):
            for i, W in enumerate(Ws):
                np.matmul(acts[i], W, out=acts[i + 1])
            for i in range(len(Ws) - 1, -1, -1):
                np.matmul(acts[i].T, acts[i + 1], out=grads[i])
                if i:
                    np.matmul(acts[i + 1], Ws[i].T, out=deltas[i])

    gemms()

    def ours(settings):
        net = N.init_net(sizes, np.random.default_rng(a.seed))
        N.finetune_epoch(net, x, y, 0, np.random.default_rng(a.seed + 1), settings)

    plain = N.FinetuneSettings(learning_rate=0.1, momentum=0.9, batch_size=bs)
    drop = N.FinetuneSettings(learning_rate=0.1, momentum=0.9, batch_size=bs, dropout_input=0.2,
                              dropout_hidden=0.5)
    contenders = {"matrix products alone": gemms,
                  "dbn.network.finetune_epoch": lambda: ours(plain),
                  "dbn.network.finetune_epoch, dropout": lambda: ours(drop)}
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        print("scikit-learn is not installed (pip install -e '.[bench]'): its row is skipped")
    else:
        def sk():
            clf = MLPClassifier(hidden_layer_sizes=hidden, activation="logistic", solver="sgd",
                                learning_rate_init=0.1, momentum=0.9, nesterovs_momentum=False,
                                batch_size=bs, max_iter=1, alpha=1e-5, shuffle=True, random_state=a.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x, y)

        contenders["scikit-learn MLPClassifier (max_iter=1)"] = sk
    best = best_of_rounds(a.repeat, contenders)
    rows = list(best.items())
    t_products, t_ours = best["matrix products alone"], best["dbn.network.finetune_epoch"]
    t_sk = best.get("scikit-learn MLPClassifier (max_iter=1)")

    print(f"\n{'':42s} {'s/epoch':>8s} {'examples/s':>11s} {'GFLOP/s':>8s}")
    for name, t in rows:
        print(f"{name:42s} {t:8.3f} {n / t:11.0f} {flops / t / 1e9:8.1f}")
    print(f"\nours / matrix products: {t_products / t_ours:.0%}")
    if t_sk is not None:
        print(f"ours vs scikit-learn: {t_sk / t_ours:.2f}x the examples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
