#!/usr/bin/env python
"""Single-process reference: train a DBN on MNIST (default 784-500-500-2000-10).

Greedy RBM pre-training (CD-1, rbm.m settings) then back-propagation
fine-tuning with momentum, optionally with dropout. Prints per-epoch
reconstruction error, per-epoch validation/test error and timings; writes
``model.avro``, ``results.json`` and PNG plots into ``--out``.

Splits: train = first 60000-``--validation`` training images, validation =
the rest, test = the 10000 test images. ``--train-limit`` uses only the first
N training examples (for quick checks).

Example (the full run takes hours on one process)::

    python bench/dbn_single.py --data ../shared/data/mnist --out runs/single \\
        --pretrain-epochs 50 --finetune-epochs 50

Quick smoke test::

    python bench/dbn_single.py --data ../shared/data/mnist --hidden 100,100 \\
        --pretrain-epochs 1 --finetune-epochs 1 --train-limit 2000 --out /tmp/dbn
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbn import model as M  # noqa: E402
from dbn import network as N  # noqa: E402
from dbn import plots  # noqa: E402
from dbn import rbm as R  # noqa: E402
from dbn.data import download_mnist, load_mnist  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="directory with the four MNIST IDX files (downloaded there if missing)")
    p.add_argument("--out", default="runs/dbn_single", help="output directory")
    p.add_argument("--hidden", default="500,500,2000", help="hidden layer sizes, comma separated")
    p.add_argument("--pretrain-epochs", default="50",
                   help="RBM epochs per layer: one number or one per layer (comma separated)")
    p.add_argument("--finetune-epochs", type=int, default=50)
    p.add_argument("--rbm-lr", type=float, default=0.1)
    p.add_argument("--rbm-batch", type=int, default=100)
    p.add_argument("--cd-k", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1, help="fine-tuning learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-cost", type=float, default=1e-5)
    p.add_argument("--batch", type=int, default=100, help="fine-tuning batch size")
    p.add_argument("--lr-decay", type=float, default=1.0)
    p.add_argument("--dropout-input", type=float, default=0.0)
    p.add_argument("--dropout-hidden", type=float, default=0.0)
    p.add_argument("--max-norm", type=float, default=0.0)
    p.add_argument("--validation", type=int, default=10000)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training rows")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(a.data) if a.data else out / "mnist"
    if not (data_dir / "train-images-idx3-ubyte.gz").exists() and not (data_dir / "train-images-idx3-ubyte").exists():
        download_mnist(data_dir)
    t0 = time.time()
    x_all, y_all, x_test, y_test = load_mnist(data_dir)
    n_train = len(x_all) - a.validation
    x_tr, y_tr = x_all[:n_train], y_all[:n_train]
    x_va, y_va = x_all[n_train:], y_all[n_train:]
    if a.train_limit:
        x_tr, y_tr = x_tr[:a.train_limit], y_tr[:a.train_limit]
    print(f"data: train {len(x_tr)}, validation {len(x_va)}, test {len(x_test)} "
          f"({time.time() - t0:.1f}s)", flush=True)

    hidden = [int(h) for h in a.hidden.split(",")]
    pe = [int(e) for e in a.pretrain_epochs.split(",")]
    pe = pe * len(hidden) if len(pe) == 1 else pe
    if len(pe) != len(hidden):
        raise SystemExit("--pretrain-epochs: give one number or one per hidden layer")
    rs = R.RBMSettings(learning_rate=a.rbm_lr, batch_size=a.rbm_batch, cd_k=a.cd_k)
    fs = N.FinetuneSettings(learning_rate=a.lr, momentum=a.momentum, weight_cost=a.weight_cost,
                            batch_size=a.batch, epochs=a.finetune_epochs, dropout_input=a.dropout_input,
                            dropout_hidden=a.dropout_hidden, lr_decay=a.lr_decay, max_norm=a.max_norm)
    rng = np.random.default_rng(a.seed)
    results: dict = {"args": vars(a), "rbm_settings": rs.to_dict(), "finetune_settings": fs.to_dict(),
                     "sizes": [784] + hidden + [10], "pretrain": [], "finetune": []}

    # ---- greedy pre-training
    t_pre = time.time()
    data = x_tr
    rbms = []
    for li, (nh, ne) in enumerate(zip(hidden, pe)):
        p = R.init_rbm(data.shape[1], nh, rng, rs)
        layer = {"layer": li, "n_visible": data.shape[1], "n_hidden": nh, "errors": [], "seconds": []}
        for e in range(ne):
            t = time.time()
            err = R.train_epoch(p, data, e, rng, rs)
            dt = time.time() - t
            layer["errors"].append(err)
            layer["seconds"].append(dt)
            print(f"pretrain layer {li} ({data.shape[1]}x{nh}) epoch {e + 1}/{ne}: "
                  f"reconstruction error {err:.4f}  {dt:.2f}s", flush=True)
        rbms.append(p)
        results["pretrain"].append(layer)
        if li == 0:
            plots.filter_grid_png(p["W"], out / "filters_layer0.png")
        if li + 1 < len(hidden):
            data = R.transform(data, p)
    del data
    results["pretrain_seconds"] = time.time() - t_pre
    print(f"pre-training done in {results['pretrain_seconds']:.1f}s", flush=True)

    # ---- fine-tuning
    net = N.init_classifier(N.stack(rbms), 10, rng)
    va0, te0 = N.error_rate(net, x_va, y_va) if len(x_va) else float("nan"), N.error_rate(net, x_test, y_test)
    print(f"before fine-tuning: validation error {va0:.4f}, test error {te0:.4f}", flush=True)
    t_ft = time.time()
    best = (float("inf"), -1)
    for e in range(fs.epochs):
        t = time.time()
        loss, train_err = N.finetune_epoch(net, x_tr, y_tr, e, rng, fs)
        dt = time.time() - t
        va = N.error_rate(net, x_va, y_va) if len(x_va) else float("nan")
        te = N.error_rate(net, x_test, y_test)
        results["finetune"].append({"epoch": e, "loss": loss, "train_error": train_err,
                                    "validation_error": va, "test_error": te, "seconds": dt})
        if va < best[0]:
            best = (va, e)
        print(f"finetune epoch {e + 1}/{fs.epochs}: loss {loss:.4f}  train error {train_err:.4f}  "
              f"validation error {va:.4f}  test error {te:.4f}  {dt:.2f}s", flush=True)
    results["finetune_seconds"] = time.time() - t_ft
    results["total_seconds"] = time.time() - t0
    if results["finetune"]:
        last = results["finetune"][-1]
        results["final"] = {"validation_error": last["validation_error"], "test_error": last["test_error"],
                            "best_validation_epoch": best[1]}
    print(f"fine-tuning done in {results['finetune_seconds']:.1f}s; total {results['total_seconds']:.1f}s",
          flush=True)

    M.save(out / "model.avro", net, {"trainer": "bench/dbn_single.py", "results": results})
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots.learning_curves_png({f"layer {r['layer']}": r["errors"] for r in results["pretrain"]},
                              out / "pretrain_curves.png", "RBM reconstruction error")
    if results["finetune"]:
        plots.learning_curves_png(
            {k: [r[k + "_error"] for r in results["finetune"]] for k in ("train", "validation", "test")},
            out / "finetune_curves.png", "Fine-tuning error rate")
    print(f"wrote {out / 'model.avro'}, {out / 'results.json'} and plots", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
