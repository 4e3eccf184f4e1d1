"""Numerical tests of dbn.rbm and dbn.network (gradients, CD-k, training)."""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from dbn import network as N
from dbn import rbm as R

MNIST_DIR = (Path(__file__).parents[1] / ".." / "shared" / "data" / "mnist").resolve()


@pytest.fixture(scope="module")
def mnist():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    from dbn.data import load_mnist

    return load_mnist(MNIST_DIR)


# ------------------------------------------------------------- helpers


def test_sigmoid_extremes_without_warnings():
    x = np.array([-1e4, -100, 0, 100, 1e4], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = R.sigmoid(x)
    np.testing.assert_allclose(s, [0, 0, 0.5, 1, 1], atol=1e-30)
    y = x.copy()
    assert R.sigmoid(y, out=y) is y


def test_softmax_rows_sum_to_one():
    z = np.array([[1000.0, 0, -1000], [1, 2, 3]], np.float32)
    p = N.softmax(z)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-6)
    assert np.isfinite(p).all()


# ------------------------------------------------------- gradient check


def _float64_net(sizes, seed):
    rng = np.random.default_rng(seed)
    net = N.init_net(sizes, rng, init_std=0.5, dtype=np.float64)
    for k in N.param_keys(net):
        net[k] += rng.normal(0, 0.3, net[k].shape)
    return net


def _numerical_grads(net, f, eps=1e-6):
    out = {}
    for k in N.param_keys(net):
        P = net[k]
        g = np.zeros_like(P)
        for i in np.ndindex(P.shape):
            old = P[i]
            P[i] = old + eps
            lp = f()
            P[i] = old - eps
            lm = f()
            P[i] = old
            g[i] = (lp - lm) / (2 * eps)
        out[k] = g
    return out


def _rel_err(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("weight_cost", [0.0, 0.01])
def test_gradient_check(weight_cost):
    """Back-propagation against central differences on a float64 copy of a tiny net."""
    net32 = N.init_net([6, 5, 4, 3], np.random.default_rng(0), init_std=0.5)
    net = _float64_net([6, 5, 4, 3], 1)
    net.update({k: v.astype(np.float64) + net[k] for k, v in net32.items() if k in N.param_keys(net)})
    rng = np.random.default_rng(2)
    x = rng.random((7, 6))
    y = rng.integers(0, 3, 7)
    loss, grads, probs = N.loss_and_grads(net, x, y, weight_cost)
    grads = {k: v.copy() for k, v in grads.items()}
    assert probs.dtype == np.float64
    num = _numerical_grads(net, lambda: N.loss_and_grads(net, x, y, weight_cost)[0])
    for k in N.param_keys(net):
        assert _rel_err(grads[k], num[k]) < 1e-5, k


def test_gradient_check_with_dropout():
    """With the same masks (same rng seed per evaluation) dropout is differentiable."""
    net = _float64_net([5, 6, 4, 3], 3)
    x = np.random.default_rng(4).random((6, 5))
    y = np.array([0, 1, 2, 0, 1, 2])

    def f(with_grads=False):
        out = N.loss_and_grads(net, x, y, 0.001, np.random.default_rng(9), 0.2, 0.5)
        return out if with_grads else out[0]

    _, grads, _ = f(True)
    grads = {k: v.copy() for k, v in grads.items()}
    num = _numerical_grads(net, f)
    for k in N.param_keys(net):
        assert _rel_err(grads[k], num[k]) < 1e-5, k


def test_finetune_update_rule_matches_formula():
    net = N.init_net([4, 3, 2], np.random.default_rng(0), init_std=0.3)
    x = np.random.default_rng(1).random((5, 4)).astype(np.float32)
    y = np.array([0, 1, 1, 0, 1])
    before = {k: v.copy() for k, v in net.items()}
    _, g, _ = N.loss_and_grads(net, x, y, 0.01)
    g = {k: v.copy() for k, v in g.items()}
    N.apply_update(net, g, 0.1, 0.9)
    for k in N.param_keys(net):
        v = 0.9 * before["d" + k] - 0.1 * g[k]
        np.testing.assert_allclose(net["d" + k], v, rtol=1e-6)
        np.testing.assert_allclose(net[k], before[k] + v, rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_finetune_epoch_makes_the_steps_of_loss_and_grads_and_apply_update(dropout):
    """finetune_epoch's fused step (no gradient buffer, W_prev ping-pong) gives the net that
    loss_and_grads + apply_update give batch by batch, with the same random draws; a short
    last batch included; the caller's arrays hold the result."""
    rng = np.random.default_rng(0)
    net = N.init_net([12, 9, 7, 4], rng, init_std=0.3)
    for k in N.velocity_keys(net):
        net[k][...] = rng.normal(0, 0.01, net[k].shape)
    x = rng.random((50, 12), dtype=np.float32)
    y = rng.integers(0, 4, 50)
    s = N.FinetuneSettings(batch_size=20, learning_rate=0.4, momentum=0.8, weight_cost=1e-3,
                           dropout_input=dropout, dropout_hidden=dropout)
    ref = {k: v.copy() for k, v in net.items()}
    arrays = {k: net[k] for k in net}
    loss, err = N.finetune_epoch(net, x, y, 3, np.random.default_rng(7), s)
    r = np.random.default_rng(7)
    order = r.permutation(50)
    losses, wrong = [], 0
    for b in range(3):
        idx = order[b * 20:(b + 1) * 20]
        lb, g, probs = N.loss_and_grads(ref, x[idx], y[idx], s.weight_cost, r, dropout, dropout)
        N.apply_update(ref, g, s.learning_rate, s.momentum)
        losses.append(lb * len(idx))
        wrong += int((probs.argmax(1) != y[idx]).sum())
    assert loss == pytest.approx(sum(losses) / 50, rel=1e-5) and err == wrong / 50
    for k in ref:
        assert net[k] is arrays[k], k
        np.testing.assert_allclose(net[k], ref[k], rtol=1e-4, atol=2e-6, err_msg=k)


# ----------------------------------------------------------------- RBM


def test_free_energy_matches_brute_force():
    rng = np.random.default_rng(0)
    p = R.init_rbm(3, 2, rng, R.RBMSettings(init_std=1.0))
    p["b_vis"][:] = rng.normal(size=3)
    p["b_hid"][:] = rng.normal(size=2)
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    vs = np.array(list(itertools.product([0, 1], repeat=3)), np.float64)
    hs = np.array(list(itertools.product([0, 1], repeat=2)), np.float64)
    F = R.free_energy(vs, p64)
    for v, f in zip(vs, F):
        E = -(v @ p64["b_vis"]) - hs @ p64["b_hid"] - (v @ p64["W"]) @ hs.T
        assert f == pytest.approx(-np.log(np.exp(-E).sum()), rel=1e-10)


def test_init_and_shapes():
    p = R.init_rbm(784, 50, np.random.default_rng(0))
    assert {k: v.shape for k, v in p.items()} == {
        "W": (784, 50), "b_vis": (784,), "b_hid": (50,), "dW": (784, 50), "db_vis": (784,), "db_hid": (50,)}
    assert all(v.dtype == np.float32 for v in p.values())
    assert abs(p["W"].std() - 0.01) < 0.001 and not p["dW"].any()
    p2 = R.init_rbm(3, 2, np.random.default_rng(0), visible_mean=np.array([0.5, 0.1, 0.0]))
    np.testing.assert_allclose(p2["b_vis"], [0, np.log(0.1 / 0.9), np.log(1e-3 / (1 - 1e-3))], rtol=1e-5)
    assert R.momentum_for(4, R.RBMSettings()) == 0.5 and R.momentum_for(5, R.RBMSettings()) == 0.9


def _rbm_m_reference(params, data, rng, s, momentum, batches=1):
    """``batches`` rbm.m mini-batch updates in float64 with the same random draws."""
    n, bs = len(data), s.batch_size
    perm = rng.permutation(n)
    W, bv, bh = (params[k].astype(np.float64) for k in ("W", "b_vis", "b_hid"))
    dW, dbv, dbh = (params[k].astype(np.float64) for k in ("dW", "db_vis", "db_hid"))
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    err = 0.0
    for b in range(batches):
        v = data[perm[b * bs:(b + 1) * bs]].astype(np.float64)
        m = len(v)
        poshidprobs = sig(v @ W + bh)
        states = (poshidprobs > rng.random(poshidprobs.shape, dtype=np.float32)).astype(np.float64)
        negdata = sig(states @ W.T + bv)
        neghidprobs = sig(negdata @ W + bh)
        err += ((v - negdata) ** 2).sum()
        dW = momentum * dW + s.learning_rate * ((v.T @ poshidprobs - negdata.T @ neghidprobs) / m
                                                - s.weight_cost * W)
        dbv = momentum * dbv + s.learning_rate / m * (v.sum(0) - negdata.sum(0))
        dbh = momentum * dbh + s.learning_rate / m * (poshidprobs.sum(0) - neghidprobs.sum(0))
        W, bv, bh = W + dW, bv + dbv, bh + dbh
    seen = min(n, batches * bs)
    return {"W": W, "b_vis": bv, "b_hid": bh, "dW": dW, "db_vis": dbv, "db_hid": dbh}, err / seen


def _random_rbm(nv, nh, rng):
    p = R.init_rbm(nv, nh, rng, R.RBMSettings(init_std=0.3))
    for k in ("b_vis", "b_hid", "dW", "db_vis", "db_hid"):
        p[k][...] = rng.normal(0, 0.1, p[k].shape)
    return p


@pytest.mark.parametrize("batches", [1, 2, 3])
def test_cd1_steps_match_rbm_m(batches):
    # 40 rows in batches of 16: three batches end with a short one (8 rows)
    s = R.RBMSettings(batch_size=16)
    rng = np.random.default_rng(0)
    data = (rng.random((40, 12)) < 0.3).astype(np.float32)
    p = _random_rbm(12, 7, rng)
    ref, ref_err = _rbm_m_reference(p, data, np.random.default_rng(5), s, 0.9, batches)
    err = R.train_epoch(p, data, epoch=7, rng=np.random.default_rng(5), settings=s, batches=batches)
    assert err == pytest.approx(ref_err, rel=1e-5)
    for k in ref:
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-4, atol=2e-6, err_msg=k)


def test_cd_statistics_and_apply_update_make_the_rbm_m_step():
    s = R.RBMSettings(batch_size=16)
    rng = np.random.default_rng(0)
    data = (rng.random((16, 12)) < 0.3).astype(np.float32)
    p = _random_rbm(12, 7, rng)
    ref, ref_err = _rbm_m_reference(p, data, np.random.default_rng(5), s, 0.9)
    r = np.random.default_rng(5)
    v = data[r.permutation(16)]
    grads, err = R.cd_statistics(v, p, r, k=1)
    assert err / 16 == pytest.approx(ref_err, rel=1e-5)
    R.apply_update(p, grads, 0.9, s)
    for k in ref:
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-4, atol=2e-6, err_msg=k)


def test_cd_k_and_uint8_input():
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (50, 10), dtype=np.uint8)
    xf = x8.astype(np.float32) / 255
    pa_ = R.init_rbm(10, 4, np.random.default_rng(1))
    pb = {k: v.copy() for k, v in pa_.items()}
    ea = R.train_epoch(pa_, x8, 0, np.random.default_rng(2), R.RBMSettings(batch_size=8, cd_k=3))
    eb = R.train_epoch(pb, xf, 0, np.random.default_rng(2), R.RBMSettings(batch_size=8, cd_k=3))
    assert ea == pytest.approx(eb, rel=1e-5)
    for k in pa_:
        np.testing.assert_allclose(pa_[k], pb[k], rtol=1e-5, atol=1e-7)
    # cd_statistics scales uint8 pixels as train_epoch does
    g8, e8 = R.cd_statistics(x8[:8], pa_, np.random.default_rng(3), k=2)
    gf, ef = R.cd_statistics(xf[:8], pa_, np.random.default_rng(3), k=2)
    assert e8 == pytest.approx(ef, rel=1e-5)
    for k in gf:
        np.testing.assert_allclose(g8[k], gf[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_an_epoch_in_parts_visits_every_row_once_as_the_whole_epoch():
    rng = np.random.default_rng(0)
    x = (rng.random((95, 12)) < 0.4).astype(np.float32)  # 10 batches of 10, the last of 5
    s = R.RBMSettings(batch_size=10)
    whole = R.init_rbm(12, 5, np.random.default_rng(1))
    parts = {k: v.copy() for k, v in whole.items()}
    wrapped = {k: v.copy() for k, v in whole.items()}
    start = {k: v.copy() for k, v in whole.items()}
    order = np.random.default_rng(2).permutation(95)
    e_whole = R.train_epoch(whole, x, 0, np.random.default_rng(3), s, order=order)
    r, errs = np.random.default_rng(3), []
    for first, k in ((0, 3), (3, 3), (6, 3), (9, 1)):  # batches 0-2, 3-5, 6-8, 9
        errs.append(R.train_epoch(parts, x, 0, r, s, batches=k, order=order, first_batch=first))
    for key in whole:
        np.testing.assert_allclose(parts[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert np.dot(errs, [30, 30, 30, 5]) / 95 == pytest.approx(e_whole, rel=1e-5)
    # batch numbers count round: batch 10 is batch 0
    R.train_epoch(wrapped, x, 0, np.random.default_rng(4), s, batches=2, order=order, first_batch=10)
    R.train_epoch(start, x, 0, np.random.default_rng(4), s, batches=2, order=order, first_batch=0)
    for key in start:
        np.testing.assert_array_equal(wrapped[key], start[key], err_msg=key)
    with pytest.raises(ValueError, match="order has 3 rows, data 95"):
        R.train_epoch(parts, x, 0, r, s, order=np.arange(3))


def test_empty_splits_and_mismatched_epoch_counts():
    net = N.init_net([10, 4, 3], np.random.default_rng(0), init_std=0.1)
    before = {k: v.copy() for k, v in net.items()}
    assert N.finetune_epoch(net, np.zeros((0, 10), np.uint8), np.zeros(0, np.int64), 0,
                            np.random.default_rng(1)) == (0.0, 0.0)
    for k in before:
        np.testing.assert_array_equal(net[k], before[k])
    x = (np.random.default_rng(2).random((20, 10)) < 0.5).astype(np.float32)
    with pytest.raises(ValueError, match="3 hidden layers but 2 epoch counts"):
        N.pretrain(x, [6, 5, 4], [1, 1], np.random.default_rng(3))


def test_rbm_on_mnist_subset_learns_and_is_deterministic(mnist):
    x = mnist[0][:2000]

    def run(seed):
        rng = np.random.default_rng(seed)
        p = R.init_rbm(784, 100, rng)
        errs = [R.train_epoch(p, x, e, rng) for e in range(3)]
        return p, errs

    p1, e1 = run(42)
    p2, e2 = run(42)
    assert e1[0] > e1[1] > e1[2], e1
    assert e1 == e2
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    _, e3 = run(43)
    assert e3 != e1
    h = R.transform(x[:100], p1)
    assert h.shape == (100, 100) and h.dtype == np.float32 and 0 <= h.min() and h.max() <= 1
    # held-out reconstruction is close to the training figure (no gross over-fit)
    assert R.reconstruction_error(mnist[2][:500], p1) < 1.5 * e1[-1]


# ----------------------------------------------------------------- DBN


def test_dbn_stack_up_matches_transform():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    dbn, params, errs = N.pretrain(x, [8, 6], [2, 1], rng, R.RBMSettings(batch_size=10))
    assert dbn.sizes == [20, 8, 6] and [len(e) for e in errs] == [2, 1]
    np.testing.assert_allclose(dbn.up(x), R.transform(R.transform(x, params[0]), params[1]), rtol=1e-6)
    np.testing.assert_allclose(dbn.up(x, 1), R.transform(x, params[0]), rtol=1e-6)
    net = N.init_classifier(dbn, 4, rng)
    assert N.layer_sizes(net) == [20, 8, 6, 4]
    assert N.param_keys(net) == ["W0", "b0", "W1", "b1", "W2", "b2"]
    assert N.velocity_keys(net) == ["dW0", "db0", "dW1", "db1", "dW2", "db2"]
    np.testing.assert_allclose(N.hidden_activations(net, x, 2), dbn.up(x), rtol=1e-6)


def test_small_dbn_accuracy(mnist):
    """784-200-200-10 on 5000 examples, single process: < 10% error on 2000 test images."""
    x_tr, y_tr, x_te, y_te = mnist
    rng = np.random.default_rng(0)
    x, y = x_tr[:5000], y_tr[:5000]
    dbn, _, errs = N.pretrain(x, [200, 200], 3, rng, R.RBMSettings(batch_size=20))
    assert all(e[0] > e[-1] for e in errs)
    net = N.init_classifier(dbn, 10, rng)
    s = N.FinetuneSettings(batch_size=20, epochs=6)
    losses = [N.finetune_epoch(net, x, y, e, rng, s)[0] for e in range(s.epochs)]
    assert losses[-1] < losses[0]
    err = N.error_rate(net, x_te[:2000], y_te[:2000])
    assert err < 0.10, err


def test_finetune_with_dropout_runs_and_is_deterministic(mnist):
    x, y = mnist[0][:1000], mnist[1][:1000]
    s = N.FinetuneSettings(dropout_input=0.2, dropout_hidden=0.5, lr_decay=0.95, max_norm=3.0)

    def run():
        rng = np.random.default_rng(0)
        net = N.init_net([784, 50, 10], rng, init_std=0.1)
        res = [N.finetune_epoch(net, x, y, e, rng, s) for e in range(6)]
        return net, res

    n1, r1 = run()
    n2, r2 = run()
    assert r1 == r2 and r1[-1][0] < r1[0][0]
    np.testing.assert_array_equal(n1["W0"], n2["W0"])
    assert np.sqrt((n1["W0"] ** 2).sum(0)).max() <= 3.0 + 1e-4
    assert N.error_rate(n1, mnist[2][:1000], mnist[3][:1000]) < 0.3


def test_average_params():
    a = R.init_rbm(4, 3, np.random.default_rng(0))
    b = R.init_rbm(4, 3, np.random.default_rng(1))
    m = N.average_params([a, b])
    assert set(m) == set(a) and m["W"].dtype == np.float32
    np.testing.assert_allclose(m["W"], (a["W"] + b["W"]) / 2, rtol=1e-6)
    m = N.average_params([a, b], weights=[3, 1])
    np.testing.assert_allclose(m["W"], 0.75 * a["W"] + 0.25 * b["W"], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("max_norm", [0.0, 2.0])  # the fused step and the one with a gradient buffer
def test_top_only_epochs_freeze_the_pretrained_layers(max_norm):
    rng = np.random.default_rng(0)
    net = N.init_net([12, 9, 7, 4], rng, init_std=0.3)
    x = rng.random((60, 12), dtype=np.float32)
    y = rng.integers(0, 4, 60)
    # the top layer's gradient is the same whether or not the lower layers are back-propagated
    _, full, _ = N.loss_and_grads(net, x, y, 1e-3)
    full = {k: v.copy() for k, v in full.items()}
    _, top, _ = N.loss_and_grads(net, x, y, 1e-3, first=2)
    assert set(top) == {"W2", "b2"}
    for k in top:
        np.testing.assert_array_equal(top[k], full[k])
    s = N.FinetuneSettings(batch_size=20, top_only_epochs=1, learning_rate=0.5, max_norm=max_norm)
    before = {k: v.copy() for k, v in net.items()}
    N.finetune_epoch(net, x, y, 0, np.random.default_rng(1), s)
    for k in ("W0", "b0", "W1", "b1", "dW0", "dW1"):
        np.testing.assert_array_equal(net[k], before[k], err_msg=k)
    assert not np.array_equal(net["W2"], before["W2"]) and net["dW2"].any()
    N.finetune_epoch(net, x, y, 1, np.random.default_rng(2), s)  # epoch 1: every layer learns
    assert not np.array_equal(net["W0"], before["W0"]) and net["dW0"].any()


def test_momentum_ramp_and_momentum_scaled_steps():
    """Hinton et al. 2012's schedule: momentum rising linearly to ``final_momentum``, steps
    scaled by ``1 - momentum``; an epoch with the schedule equals one with those numbers fixed."""
    s = N.FinetuneSettings(momentum=0.5, final_momentum=0.9, momentum_ramp_epochs=4, learning_rate=2.0,
                           lr_decay=0.5, momentum_scales_lr=True)
    assert [N.momentum_for(e, s) for e in range(6)] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 0.9])
    assert N.learning_rate_for(1, s) == pytest.approx(2.0 * 0.5 * (1 - 0.6))
    assert N.momentum_for(3, N.FinetuneSettings(momentum=0.7)) == 0.7  # no final_momentum: constant
    assert N.momentum_for(0, N.FinetuneSettings(final_momentum=0.95)) == 0.95  # no ramp: at once
    rng = np.random.default_rng(0)
    base = N.init_net([12, 9, 4], rng, init_std=0.3)
    x = rng.random((60, 12), dtype=np.float32)
    y = rng.integers(0, 4, 60)
    a, b = ({k: v.copy() for k, v in base.items()} for _ in range(2))
    for k in N.velocity_keys(a):  # non-zero velocities, so the momentum matters
        a[k][...] = b[k][...] = 0.01
    N.finetune_epoch(a, x, y, 2, np.random.default_rng(1), N.FinetuneSettings(
        batch_size=20, momentum=0.5, final_momentum=0.9, momentum_ramp_epochs=4, learning_rate=1.0,
        momentum_scales_lr=True))
    N.finetune_epoch(b, x, y, 2, np.random.default_rng(1), N.FinetuneSettings(
        batch_size=20, momentum=0.7, learning_rate=0.3))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    c = {k: v.copy() for k, v in base.items()}
    N.finetune_epoch(c, x, y, 2, np.random.default_rng(1), N.FinetuneSettings(batch_size=20, momentum=0.5,
                                                                            learning_rate=1.0))
    assert not np.allclose(c["W0"], a["W0"])


def test_momentum_schedule_settings_are_checked():
    from dbn.distributed import DBNConfig

    ft = DBNConfig.from_params({"finetune": {"final_momentum": 0.99, "momentum_ramp_epochs": 500,
                                             "momentum_scales_lr": True, "epochs": 600}}).finetune
    assert (ft.final_momentum, ft.momentum_ramp_epochs, ft.momentum_scales_lr) == (0.99, 500, True)
    for key, bad in (("final_momentum", 1.0), ("final_momentum", -0.1), ("momentum_ramp_epochs", -1),
                     ("momentum_ramp_epochs", 2.5), ("momentum_scales_lr", 1), ("momentum_scales_lr", "yes")):
        with pytest.raises(ValueError, match=f"algorithm.params.finetune.{key}"):
            DBNConfig.from_params({"finetune": {key: bad}})
