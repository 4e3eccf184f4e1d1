"""Deep Belief Network stack and its discriminative fine-tuning.

Pre-training (Hinton, Osindero & Teh 2006; Hinton & Salakhutdinov 2006): RBMs
are trained greedily, each on the hidden probabilities of the one below
(:func:`pretrain`, or layer by layer with :mod:`dbn.rbm`). :class:`DBN` holds
the resulting recognition weights ``(W, b_hid)`` and maps data up the stack.

Fine-tuning: :func:`init_classifier` turns the stack into a feed-forward
classifier -- sigmoid hidden layers initialised from the RBMs plus a softmax
output layer (small Gaussian init) -- trained with mini-batch SGD with momentum
on the cross-entropy (:func:`finetune_epoch`), optionally with dropout
(Srivastava et al. 2014; *inverted* dropout: kept units are scaled by
``1/(1-p)`` while training, so nothing changes at test time).

A network ("net") is a plain ``dict[str, np.ndarray]`` (float32 for training,
any float dtype works, float64 is used by the gradient check):

=========  =================  ===============================================
key        shape              meaning
=========  =================  ===============================================
``Wi``     [n_i, n_{i+1}]     weights of layer i (i = 0 .. L-1; ``W{L-1}`` is
                              the softmax layer); ``n_0`` = input size
``bi``     [n_{i+1}]          biases of layer i
``dWi``    like ``Wi``        velocity (momentum state) of ``Wi``
``dbi``    like ``bi``        velocity of ``bi``
=========  =================  ===============================================

Update rule (the same sign convention as :mod:`dbn.rbm`):
``dW = momentum * dW - lr * (grad + weight_cost * W); W += dW``
(weight cost on weights only). ``grad`` is the mean over the mini-batch of the
cross-entropy gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import _blas, _random
from . import rbm as _rbm
from .rbm import sigmoid

__all__ = [
    "FinetuneSettings",
    "DBN",
    "stack",
    "pretrain",
    "init_classifier",
    "init_net",
    "n_layers",
    "layer_sizes",
    "param_keys",
    "velocity_keys",
    "forward",
    "softmax",
    "Workspace",
    "loss_and_grads",
    "apply_update",
    "learning_rate_for",
    "finetune_epoch",
    "hidden_activations",
    "predict_proba",
    "predict",
    "error_rate",
    "cross_entropy",
    "average_params",
]

_F32 = np.float32


@dataclass
class FinetuneSettings:
    """Hyper-parameters of supervised fine-tuning.

    ``dropout_input``/``dropout_hidden`` are drop probabilities (0 = off;
    0.2 / 0.5 are the usual values). The learning rate of (0-based) epoch e is
    ``learning_rate * lr_decay ** e``. ``max_norm`` > 0 caps the L2 norm of
    each unit's incoming weight vector (Srivastava et al.; 0 = off).
    During the first ``top_only_epochs`` epochs only the output layer learns
    (Hinton & Salakhutdinov's mnistclassify.m: the new softmax layer settles
    before its large early gradients reach the pre-trained features).
    ``average_from`` (0-based epoch, ``None`` = off) is used by
    :class:`dbn.distributed.DBNMaster`: from that epoch on the master keeps the
    running mean of the end-of-epoch parameters (stochastic weight averaging,
    Izmailov et al. 2018) and validates, keeps and tests the mean instead of the
    last epoch's parameters; training itself goes on from the last parameters.

    Hinton et al. 2012's dropout schedule ("Improving neural networks by
    preventing co-adaptation of feature detectors", appendix A): with
    ``final_momentum`` set, the momentum of epoch e rises linearly from
    ``momentum`` to ``final_momentum`` over ``momentum_ramp_epochs`` epochs and
    stays there; with ``momentum_scales_lr`` the step is
    ``dP = m dP - (1 - m) lr grad``, so the step size does not grow as ``m``
    does.
    """

    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_cost: float = 1e-5
    batch_size: int = 100
    epochs: int = 50
    dropout_input: float = 0.0
    dropout_hidden: float = 0.0
    lr_decay: float = 1.0
    max_norm: float = 0.0
    top_only_epochs: int = 0
    average_from: int | None = None
    final_momentum: float | None = None
    momentum_ramp_epochs: int = 0
    momentum_scales_lr: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------- the stack


def _scale_input(x: np.ndarray, dtype=_F32) -> np.ndarray:
    dtype = np.dtype(dtype)
    if x.dtype == np.uint8:
        out = x.astype(dtype)
        out *= dtype.type(1.0 / 255.0)
        return out
    return np.asarray(x, dtype=dtype)


@dataclass
class DBN:
    """A pre-trained stack: ``layers[i] = (W [n_i, n_{i+1}], b_hid [n_{i+1}])``."""

    layers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        """Layer widths ``[n_visible, n_hidden_1, ...]``."""
        if not self.layers:
            return []
        return [self.layers[0][0].shape[0]] + [W.shape[1] for W, _ in self.layers]

    def up(self, x: np.ndarray, n: int | None = None, batch_size: int = 10000) -> np.ndarray:
        """Hidden probabilities after the first ``n`` layers (all by default).

        ``x`` uint8 or float [m, n_visible] -> float32 [m, sizes[n]].
        """
        layers = self.layers if n is None else self.layers[:n]
        out = np.empty((len(x), layers[-1][0].shape[1] if layers else x.shape[1]), _F32)
        for lo in range(0, len(x), batch_size):
            a = _scale_input(x[lo:lo + batch_size])
            for W, b in layers:
                a = sigmoid(a @ W + b)
            out[lo:lo + batch_size] = a
        return out

    def add(self, rbm_params: dict) -> None:
        """Append a trained RBM's recognition weights (copies)."""
        self.layers.append((rbm_params["W"].astype(_F32, copy=True),
                            rbm_params["b_hid"].astype(_F32, copy=True)))


def stack(rbms: Sequence[dict]) -> DBN:
    """A :class:`DBN` from RBM parameter dicts (bottom first)."""
    d = DBN()
    for p in rbms:
        d.add(p)
    return d


def pretrain(
    x: np.ndarray,
    hidden_sizes: Sequence[int],
    epochs: int | Sequence[int],
    rng: np.random.Generator,
    settings: _rbm.RBMSettings | None = None,
    callback: Callable[[int, int, float], None] | None = None,
) -> tuple[DBN, list[dict], list[list[float]]]:
    """Greedy layer-wise pre-training on a single process.

    ``x`` uint8 or float32 [n, d]. ``epochs`` per layer (an int or one per
    layer). ``callback(layer, epoch, recon_error)`` is called after each
    epoch. Returns ``(dbn, rbm_params_list, errors_per_layer)``.
    """
    s = settings or _rbm.RBMSettings()
    if isinstance(epochs, int):
        epochs = [epochs] * len(hidden_sizes)
    if len(epochs) != len(hidden_sizes):
        raise ValueError(f"pretrain: {len(hidden_sizes)} hidden layers but {len(epochs)} epoch counts")
    data = x
    params_list, errors = [], []
    for li, (nh, ne) in enumerate(zip(hidden_sizes, epochs)):
        p = _rbm.init_rbm(data.shape[1], nh, rng, s)
        errs = []
        for e in range(ne):
            err = _rbm.train_epoch(p, data, e, rng, s)
            errs.append(err)
            if callback is not None:
                callback(li, e, err)
        params_list.append(p)
        errors.append(errs)
        if li + 1 < len(hidden_sizes):
            data = _rbm.transform(data, p)
    return stack(params_list), params_list, errors


def init_classifier(
    dbn: DBN | Sequence[tuple[np.ndarray, np.ndarray]],
    n_classes: int,
    rng: np.random.Generator,
    init_std: float = 0.01,
) -> dict[str, np.ndarray]:
    """Classifier net from a stack: hidden layers copied from the RBMs, a new
    softmax layer ``W ~ N(0, init_std^2)``, ``b = 0``; velocities zero.
    Also works for an empty stack (plain softmax regression)."""
    layers = dbn.layers if isinstance(dbn, DBN) else list(dbn)
    net: dict[str, np.ndarray] = {}
    for i, (W, b) in enumerate(layers):
        net[f"W{i}"] = np.array(W, _F32)
        net[f"b{i}"] = np.array(b, _F32)
    top = layers[-1][0].shape[1] if layers else None
    if top is None:
        raise ValueError("empty stack: use init_net([n_in, n_classes], rng)")
    L = len(layers)
    net[f"W{L}"] = (rng.standard_normal((top, n_classes), dtype=_F32) * _F32(init_std)).astype(_F32)
    net[f"b{L}"] = np.zeros(n_classes, _F32)
    _add_velocities(net)
    return net


def init_net(sizes: Sequence[int], rng: np.random.Generator, init_std: float = 0.01,
             dtype=_F32) -> dict[str, np.ndarray]:
    """A randomly initialised net with layer widths ``sizes`` (no pre-training)."""
    net = {}
    for i in range(len(sizes) - 1):
        net[f"W{i}"] = (rng.standard_normal((sizes[i], sizes[i + 1])) * init_std).astype(dtype)
        net[f"b{i}"] = np.zeros(sizes[i + 1], dtype)
    _add_velocities(net)
    return net


def _add_velocities(net: dict) -> None:
    for k in param_keys(net):
        net["d" + k] = np.zeros_like(net[k])


def n_layers(net: dict) -> int:
    """Number of weight layers (hidden layers + the softmax layer)."""
    n = 0
    while f"W{n}" in net:
        n += 1
    return n


def layer_sizes(net: dict) -> list[int]:
    """``[n_input, n_hidden_1, ..., n_classes]``."""
    L = n_layers(net)
    return [net["W0"].shape[0]] + [net[f"W{i}"].shape[1] for i in range(L)]


def param_keys(net: dict) -> list[str]:
    """``["W0", "b0", "W1", "b1", ...]``."""
    return [k for i in range(n_layers(net)) for k in (f"W{i}", f"b{i}")]


def velocity_keys(net: dict) -> list[str]:
    """``["dW0", "db0", ...]``."""
    return ["d" + k for k in param_keys(net)]


# ------------------------------------------------------------- forward / back


def softmax(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise softmax (in place when ``out is z``)."""
    if out is None:
        out = np.empty_like(z)
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def forward(net: dict, x: np.ndarray, n: int | None = None) -> list[np.ndarray]:
    """Activations of every layer (no dropout): ``[a_1, ..., a_L]`` where
    ``a_i`` float [m, n_i] are sigmoid probabilities and ``a_L`` the softmax
    class probabilities. ``x`` uint8 or float [m, n_0]. If ``n`` is given,
    stops after ``n`` layers."""
    L = n_layers(net)
    n = L if n is None else n
    a = _scale_input(x, net["W0"].dtype)
    acts = []
    for i in range(n):
        z = a @ net[f"W{i}"]
        z += net[f"b{i}"]
        a = softmax(z, out=z) if i == L - 1 else sigmoid(z, out=z)
        acts.append(a)
    return acts


def cross_entropy(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean ``-log p(y|x)`` for probabilities [m, k] and int labels [m]."""
    p = probs[np.arange(len(y)), y]
    return float(-np.log(np.maximum(p, np.finfo(probs.dtype).tiny)).mean())


class Workspace:
    """Preallocated mini-batch buffers for :func:`loss_and_grads`.

    ``x`` [b, n_0] input (``u8`` for uint8 gathering), ``act[i]`` [b, n_{i+1}]
    layer outputs, ``inp[i]`` the (dropped-out) input of layer i, ``mask[i]``
    dropout masks of layer i's input, ``delta[i]`` back-propagated errors,
    ``tmp[i]`` scratch, ``grads`` like the net's parameters.
    """

    def __init__(self, net: dict, batch_size: int):
        dt = net["W0"].dtype
        sizes = layer_sizes(net)
        b = batch_size
        self.x = np.empty((b, sizes[0]), dt)
        self.u8 = np.empty((b, sizes[0]), np.uint8)
        self.act = [np.empty((b, s), dt) for s in sizes[1:]]
        self.delta = [np.empty((b, s), dt) for s in sizes[1:]]
        self.tmp = [np.empty((b, s), dt) for s in sizes[1:]]
        self.mask = [np.empty((b, s), dt) for s in sizes[:-1]]
        self.dropped = [np.empty((b, s), dt) for s in sizes[:-1]]
        self.grads = {k: np.empty_like(net[k]) for k in param_keys(net)}
        self.scratch = {k: np.empty_like(net[k]) for k in param_keys(net) if k.startswith("W")}

    def rows(self, n: int) -> "Workspace":
        """Row views for a smaller (last) batch."""
        if n == self.x.shape[0]:
            return self
        w = object.__new__(Workspace)
        for k, v in vars(self).items():
            setattr(w, k, v if k in ("grads", "scratch") else (v[:n] if isinstance(v, np.ndarray) else [a[:n] for a in v]))
        return w


def _dropout_mask(out: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Inverted-dropout mask in ``out``: 0 with prob ``p``, else ``1/(1-p)``."""
    _random.uniform(rng, out)
    np.greater_equal(out, out.dtype.type(p), out=out)
    out *= out.dtype.type(1.0 / (1.0 - p))
    return out


def _backprop(
    net: dict,
    x: np.ndarray,
    y: np.ndarray,
    weight_cost: float,
    rng: np.random.Generator | None,
    dropout_input: float,
    dropout_hidden: float,
    ws: Workspace,
    first: int,
    on_layer: Callable[[int, np.ndarray, np.ndarray], None],
) -> tuple[float, np.ndarray]:
    """Forward pass and back-propagation of one mini-batch; returns ``(loss, probs)``.

    For each layer ``i`` from the top down to ``first`` it calls
    ``on_layer(i, a, d)`` with the layer's (dropped-out) input ``a`` [m, n_i] and the
    error ``d`` [m, n_{i+1}] of its pre-activations, already divided by ``m``: the
    weight gradient is ``a^T d`` and the bias gradient the column sums of ``d``.
    ``on_layer`` must leave ``net`` as it was until the pass is over (the layer
    below still back-propagates through ``W{i}``).
    """
    L = n_layers(net)
    m = len(x)
    dt = net["W0"].dtype.type
    a = x
    inputs = []
    for i in range(L):
        p = dropout_input if i == 0 else dropout_hidden
        if p > 0:
            _dropout_mask(ws.mask[i], p, rng)
            a = np.multiply(a, ws.mask[i], out=ws.dropped[i])
        inputs.append(a)
        z = np.matmul(a, net[f"W{i}"], out=ws.act[i])
        z += net[f"b{i}"]
        a = softmax(z, out=z) if i == L - 1 else sigmoid(z, out=z)
    probs = ws.act[L - 1]
    loss = cross_entropy(probs, y)
    # backward: output delta = (p - onehot) / m
    d = ws.delta[L - 1]
    d[...] = probs
    d[np.arange(m), y] -= 1
    d *= dt(1.0 / m)
    for i in range(L - 1, first - 1, -1):
        on_layer(i, inputs[i], d)
        if i > first:
            dp = np.matmul(d, net[f"W{i}"].T, out=ws.delta[i - 1])
            s = ws.act[i - 1]
            t = np.subtract(1, s, out=ws.tmp[i - 1])
            t *= s
            dp *= t
            if dropout_hidden > 0:
                dp *= ws.mask[i]
            d = dp
    if weight_cost:
        loss += 0.5 * weight_cost * sum(float(np.vdot(net[f"W{i}"], net[f"W{i}"])) for i in range(L))
    return loss, probs


def loss_and_grads(
    net: dict,
    x: np.ndarray,
    y: np.ndarray,
    weight_cost: float = 0.0,
    rng: np.random.Generator | None = None,
    dropout_input: float = 0.0,
    dropout_hidden: float = 0.0,
    workspace: Workspace | None = None,
    first: int = 0,
) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """Mean cross-entropy (plus ``0.5 * weight_cost * sum ||W_i||^2``) of a
    mini-batch and its gradient by back-propagation.

    ``x`` float [m, n_0] in [0, 1] (the net's dtype), ``y`` int [m]. Dropout
    (needs ``rng``) is applied to the inputs of the first layer with
    ``dropout_input`` and to those of the later layers with ``dropout_hidden``.
    Returns ``(loss, grads, probs)``: ``grads[k]`` like ``net[k]`` (views into
    ``workspace`` if given, valid until its next use), ``probs`` [m, k] the
    softmax output. With ``first`` > 0 the gradients of layers below ``first`` are
    neither computed nor returned.
    """
    ws = workspace.rows(len(x)) if workspace is not None else Workspace(net, len(x))
    dt = net["W0"].dtype.type
    g = ws.grads

    def grads_of(i, a, d):
        np.matmul(a.T, d, out=g[f"W{i}"])
        np.sum(d, axis=0, out=g[f"b{i}"])
        if weight_cost:
            g[f"W{i}"] += np.multiply(net[f"W{i}"], dt(weight_cost), out=ws.scratch[f"W{i}"])

    loss, probs = _backprop(net, x, y, weight_cost, rng, dropout_input, dropout_hidden, ws, first, grads_of)
    if first:
        g = {k: v for k, v in g.items() if int(k[1:]) >= first}
    return loss, g, probs


def apply_update(net: dict, grads: dict, learning_rate: float, momentum: float,
                 max_norm: float = 0.0, consume: bool = False) -> None:
    """``dP = momentum dP - lr grad; P += dP`` for every parameter (in place).
    ``grads`` already contain the weight cost. ``max_norm`` > 0 then rescales
    each column (a unit's incoming weights) of every trained ``W``, the softmax
    layer's included, whose L2 norm exceeds it. ``consume=True`` lets
    the step scale ``grads`` in place instead of allocating temporaries."""
    dt = net["W0"].dtype.type
    lr, m = dt(learning_rate), dt(momentum)
    for k in param_keys(net):
        if k not in grads:  # a frozen layer (FinetuneSettings.top_only_epochs)
            continue
        v = net["d" + k]
        v *= m
        v -= np.multiply(grads[k], lr, out=grads[k]) if consume else lr * grads[k]
        net[k] += v
    if max_norm > 0:
        for i in range(n_layers(net)):
            if f"W{i}" not in grads:
                continue
            W = net[f"W{i}"]
            norms = np.sqrt(np.einsum("ij,ij->j", W, W))
            scale = np.minimum(1, dt(max_norm) / np.maximum(norms, dt(1e-12)))
            W *= scale.astype(W.dtype)


def momentum_for(epoch: int, settings: FinetuneSettings) -> float:
    """Momentum of (0-based) ``epoch``: ``momentum``, or with ``final_momentum`` set
    ``momentum + (final_momentum - momentum) * min(1, epoch / momentum_ramp_epochs)``
    (``final_momentum`` from epoch 0 when ``momentum_ramp_epochs`` is 0)."""
    s = settings
    if s.final_momentum is None:
        return s.momentum
    if s.momentum_ramp_epochs <= 0 or epoch >= s.momentum_ramp_epochs:
        return s.final_momentum
    return s.momentum + (s.final_momentum - s.momentum) * epoch / s.momentum_ramp_epochs


def learning_rate_for(epoch: int, settings: FinetuneSettings) -> float:
    """Learning rate of (0-based) ``epoch``: ``lr * lr_decay ** epoch``, times
    ``1 - momentum_for(epoch)`` with ``momentum_scales_lr``."""
    lr = settings.learning_rate * settings.lr_decay ** epoch
    if settings.momentum_scales_lr:
        lr *= 1.0 - momentum_for(epoch, settings)
    return lr


def _gather(x: np.ndarray, idx: np.ndarray, ws: Workspace) -> np.ndarray:
    n = len(idx)
    if x.dtype == np.uint8:
        np.take(x, idx, axis=0, out=ws.u8[:n])
        return np.multiply(ws.u8[:n], ws.x.dtype.type(1.0 / 255.0), out=ws.x[:n])
    if x.dtype == ws.x.dtype:
        return np.take(x, idx, axis=0, out=ws.x[:n])
    ws.x[:n] = x[idx]
    return ws.x[:n]


def finetune_epoch(
    net: dict,
    x: np.ndarray,
    y: np.ndarray,
    epoch: int,
    rng: np.random.Generator,
    settings: FinetuneSettings | None = None,
    batches: int | None = None,
) -> tuple[float, float]:
    """One epoch of mini-batch SGD with momentum; updates ``net`` in place.

    ``x`` uint8 [n, d] or float32 in [0, 1]; ``y`` int [n]. Rows are shuffled
    by ``rng``; ``batches`` limits the number of mini-batches. The learning
    rate is :func:`learning_rate_for` ``(epoch)``, the momentum
    :func:`momentum_for` ``(epoch)``; dropout from ``settings``.
    Returns ``(mean training cross-entropy, training error rate)`` over the
    mini-batches seen (with dropout active, so they are noisy estimates).

    The step is :func:`apply_update`'s. Without ``max_norm`` it is made without a
    gradient buffer and with one pass over each weight matrix: with
    ``W_prev = W - dW``, ``W_next = (1 + m - lr wc) W - m W_prev - lr a^T d`` goes
    into ``W_prev``'s buffer (``sgemm`` with ``beta = -m``, then an ``axpy``) and
    the two swap; ``dW`` is ``W - W_prev`` again when the epoch ends. With
    ``max_norm`` the weights are rescaled after each step and the velocity is
    kept apart, so that path computes the gradient and calls :func:`apply_update`.
    """
    s = settings or FinetuneSettings()
    n = len(x)
    if n == 0:  # an empty split: nothing to learn from (as rbm.train_epoch)
        return 0.0, 0.0
    bs = min(s.batch_size, n)
    order = rng.permutation(n)
    n_batches = -(-n // bs)
    if batches is not None:
        n_batches = min(n_batches, batches)
    ws = Workspace(net, bs)
    lr, momentum = learning_rate_for(epoch, s), momentum_for(epoch, s)
    first = n_layers(net) - 1 if epoch < s.top_only_epochs else 0
    y = np.asarray(y, np.int64)
    dt = net["W0"].dtype.type
    fused = s.max_norm <= 0
    learning = [f"W{i}" for i in range(first, n_layers(net))]
    start = {k: net[k] for k in learning}
    prev = {k: net[k] - net["d" + k] for k in learning} if fused else {}
    keep = 1.0 + momentum - lr * s.weight_cost

    def step(i, a, d):
        k, kb = f"W{i}", f"b{i}"
        W_next = _blas.gemm(a, d, prev[k], trans_a=True, alpha=-lr, beta=-momentum)
        _blas.axpy(keep, net[k], W_next)
        g = np.sum(d, axis=0, out=ws.grads[kb])
        g *= dt(-lr)
        v = net["d" + kb]
        v *= dt(momentum)
        v += g
        net[kb] += v

    loss_sum, wrong, seen = 0.0, 0, 0
    try:
        for b in range(n_batches):
            idx = order[b * bs:(b + 1) * bs]
            xb = _gather(x, idx, ws)
            yb = y[idx]
            if fused:
                loss, probs = _backprop(net, xb, yb, s.weight_cost, rng, s.dropout_input, s.dropout_hidden,
                                        ws.rows(len(idx)), first, step)
                for k in learning:
                    net[k], prev[k] = prev[k], net[k]
            else:
                loss, grads, probs = loss_and_grads(net, xb, yb, s.weight_cost, rng,
                                                    s.dropout_input, s.dropout_hidden, ws, first)
                apply_update(net, grads, lr, momentum, s.max_norm, consume=True)
            wrong += int(np.count_nonzero(probs.argmax(axis=1) != yb))
            loss_sum += loss * len(idx)
            seen += len(idx)
    finally:  # the caller's arrays hold the result, and dW = W - W_prev
        for k, W in start.items() if fused else ():
            if net[k] is W:
                np.subtract(W, prev[k], out=net["d" + k])
            else:  # the result is in the other buffer, W holds W_prev
                np.subtract(net[k], W, out=net["d" + k])
                W[...] = net[k]
                net[k] = W
    return loss_sum / max(seen, 1), wrong / max(seen, 1)


# ----------------------------------------------------------------- inference


def hidden_activations(net: dict, x: np.ndarray, layer: int, batch_size: int = 10000) -> np.ndarray:
    """Output of hidden layer ``layer`` (1-based: 1 = first hidden layer; the
    softmax output is layer ``n_layers(net)``): float [m, n_layer]."""
    L = n_layers(net)
    if not 1 <= layer <= L:
        raise ValueError(f"layer must be in 1..{L}, got {layer}")
    out = np.empty((len(x), layer_sizes(net)[layer]), net["W0"].dtype)
    for lo in range(0, len(x), batch_size):
        out[lo:lo + batch_size] = forward(net, x[lo:lo + batch_size], n=layer)[-1]
    return out


def predict_proba(net: dict, x: np.ndarray, batch_size: int = 10000) -> np.ndarray:
    """Class probabilities float [m, n_classes] (no dropout: inverted dropout
    needs no test-time scaling)."""
    return hidden_activations(net, x, n_layers(net), batch_size)


def predict(net: dict, x: np.ndarray, batch_size: int = 10000) -> np.ndarray:
    """Most probable class, int64 [m]."""
    return predict_proba(net, x, batch_size).argmax(axis=1).astype(np.int64)


def error_rate(net: dict, x: np.ndarray, y: np.ndarray, batch_size: int = 10000) -> float:
    """Fraction of misclassified rows."""
    return float(np.mean(predict(net, x, batch_size) != np.asarray(y)))


def average_params(dicts: Sequence[dict[str, np.ndarray]],
                   weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Element-wise (weighted) mean of parameter dicts with the same keys --
    RBM params or nets, velocities included. ``weights`` (e.g. examples seen
    per worker) default to equal; the result keeps each array's dtype."""
    if not dicts:
        raise ValueError("nothing to average")
    w = np.ones(len(dicts)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    out = {}
    for k, a0 in dicts[0].items():
        acc = np.zeros(a0.shape, np.float64)
        for wi, d in zip(w, dicts):
            acc += wi * d[k]
        out[k] = acc.astype(a0.dtype)
    return out
