"""Bernoulli-Bernoulli Restricted Boltzmann Machine trained with CD-k.

Follows Hinton & Salakhutdinov's ``rbm.m`` and Hinton's "A Practical Guide to
Training Restricted Boltzmann Machines" (UTML TR 2010-003):

* positive phase: hidden probabilities ``p(h|v)`` from the data; binary hidden
  states sampled from them drive the reconstruction;
* negative phase: the reconstruction uses visible *probabilities* (no visible
  sampling), and the hidden statistics of the reconstruction are
  probabilities as well;
* update: ``inc = momentum * inc + lr * (grad - weight_cost * W)`` with
  ``grad = (<v h>_data - <v h>_recon) / batch_size`` (weight cost on ``W`` only,
  never on biases), then ``param += inc``;
* momentum is ``initial_momentum`` for epochs ``0 .. momentum_switch_epoch-1``
  (0-based) and ``final_momentum`` afterwards (``rbm.m``: ``epoch > 5``, 1-based).

Parameters are a plain ``dict[str, np.ndarray]`` of float32 arrays so that
they can be serialised and averaged by a master process:

=========  =======================  ==========================================
key        shape                    meaning
=========  =======================  ==========================================
``W``      [n_visible, n_hidden]    weights (``vishid`` in rbm.m)
``b_vis``  [n_visible]              visible biases (``visbiases``)
``b_hid``  [n_hidden]               hidden biases (``hidbiases``)
``dW``     [n_visible, n_hidden]    velocity of ``W`` (``vishidinc``)
``db_vis`` [n_visible]              velocity of ``b_vis`` (``visbiasinc``)
``db_hid`` [n_hidden]               velocity of ``b_hid`` (``hidbiasinc``)
=========  =======================  ==========================================

Data arrays are ``[n_examples, n_visible]``; either float32 in [0, 1] or uint8
pixels 0..255 (scaled by 1/255 batch by batch, so the full float copy is never
made).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "RBMSettings",
    "PARAM_KEYS",
    "VELOCITY_KEYS",
    "sigmoid",
    "init_rbm",
    "momentum_for",
    "mean_hiddens",
    "sample_hiddens",
    "mean_visibles",
    "sample_visibles",
    "free_energy",
    "reconstruction_error",
    "CDBuffers",
    "cd_statistics",
    "apply_update",
    "train_epoch",
    "transform",
    "RBM",
]

PARAM_KEYS = ("W", "b_vis", "b_hid")
VELOCITY_KEYS = ("dW", "db_vis", "db_hid")

_F32 = np.float32


@dataclass
class RBMSettings:
    """Hyper-parameters of CD-k training (defaults: rbm.m / the practical guide)."""

    learning_rate: float = 0.1
    initial_momentum: float = 0.5
    final_momentum: float = 0.9
    momentum_switch_epoch: int = 5
    weight_cost: float = 0.0002
    init_std: float = 0.01
    batch_size: int = 100
    cd_k: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(-x))`` computed in place when ``out is x``.

    Overflow of ``exp`` for very negative ``x`` gives the correct limit 0.
    """
    if out is None:
        out = np.empty_like(x)
    with np.errstate(over="ignore"):
        np.negative(x, out=out)
        np.exp(out, out=out)
    out += 1
    np.reciprocal(out, out=out)
    return out


def _as_float(v: np.ndarray, dtype=_F32) -> np.ndarray:
    """uint8 pixels -> [0, 1]; float arrays are returned as ``dtype``."""
    dtype = np.dtype(dtype)
    if v.dtype == np.uint8:
        out = v.astype(dtype)
        out *= dtype.type(1.0 / 255.0)
        return out
    return np.asarray(v, dtype=dtype)


def init_rbm(
    n_visible: int,
    n_hidden: int,
    rng: np.random.Generator,
    settings: RBMSettings | None = None,
    visible_mean: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Create RBM parameters.

    ``W ~ N(0, init_std^2)``, biases 0 (as rbm.m), velocities 0. If
    ``visible_mean`` (float [n_visible], the fraction of examples with each
    unit on) is given, ``b_vis = log(p / (1 - p))`` as the practical guide
    suggests (p clipped to [1e-3, 1 - 1e-3]).

    Returns a dict of float32 arrays (see the module docstring for keys).
    """
    s = settings or RBMSettings()
    W = (rng.standard_normal((n_visible, n_hidden), dtype=_F32) * _F32(s.init_std)).astype(_F32)
    b_vis = np.zeros(n_visible, _F32)
    if visible_mean is not None:
        p = np.clip(np.asarray(visible_mean, np.float64), 1e-3, 1 - 1e-3)
        b_vis[:] = np.log(p / (1 - p))
    return {
        "W": W,
        "b_vis": b_vis,
        "b_hid": np.zeros(n_hidden, _F32),
        "dW": np.zeros_like(W),
        "db_vis": np.zeros(n_visible, _F32),
        "db_hid": np.zeros(n_hidden, _F32),
    }


def momentum_for(epoch: int, settings: RBMSettings) -> float:
    """Momentum used in (0-based) ``epoch``."""
    return settings.initial_momentum if epoch < settings.momentum_switch_epoch else settings.final_momentum


def mean_hiddens(v: np.ndarray, params: dict, out: np.ndarray | None = None) -> np.ndarray:
    """``p(h=1 | v) = sigmoid(v W + b_hid)``: float [n, n_hidden].

    ``v`` float [n, n_visible] (or uint8 pixels). ``out`` (float32
    [n, n_hidden]) is filled and returned if given.
    """
    W = params["W"]
    v = _as_float(v, W.dtype)
    out = np.matmul(v, W, out=out)
    out += params["b_hid"]
    return sigmoid(out, out=out)


def sample_hiddens(
    v: np.ndarray, params: dict, rng: np.random.Generator, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample binary hidden states given ``v``.

    Returns ``(probabilities, states)``, both float [n, n_hidden]; states are
    0.0/1.0. ``out`` receives the probabilities.
    """
    p = mean_hiddens(v, params, out=out)
    return p, _bernoulli(p, rng)


def mean_visibles(h: np.ndarray, params: dict, out: np.ndarray | None = None) -> np.ndarray:
    """``p(v=1 | h) = sigmoid(h W^T + b_vis)``: float [n, n_visible]."""
    out = np.matmul(h, params["W"].T, out=out)
    out += params["b_vis"]
    return sigmoid(out, out=out)


def sample_visibles(
    h: np.ndarray, params: dict, rng: np.random.Generator, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample binary visible states given ``h``; returns ``(probabilities, states)``."""
    p = mean_visibles(h, params, out=out)
    return p, _bernoulli(p, rng)


def _bernoulli(p: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None,
               scratch: np.ndarray | None = None) -> np.ndarray:
    """Binary samples ``(p > U(0,1))`` as 0/1 in ``p``'s dtype."""
    if scratch is None:
        scratch = rng.random(p.shape, dtype=np.float32 if p.dtype == np.float32 else np.float64)
    else:
        rng.random(out=scratch, dtype=scratch.dtype)
    if out is None:
        out = np.empty_like(p)
    np.greater(p, scratch, out=out)  # bool -> float cast 0/1
    return out


def free_energy(v: np.ndarray, params: dict) -> np.ndarray:
    """Free energy ``F(v) = -v.b_vis - sum_j log(1 + exp(v W_j + b_hid_j))``.

    Returns float [n]. Lower is more probable; comparing the mean on training
    and held-out data monitors over-fitting (practical guide, section 6).
    """
    W = params["W"]
    v = _as_float(v, W.dtype)
    x = v @ W
    x += params["b_hid"]
    return -(v @ params["b_vis"]) - np.logaddexp(0, x).sum(axis=1)


def reconstruction_error(v: np.ndarray, params: dict, rng: np.random.Generator | None = None) -> float:
    """Mean over examples of the squared error summed over visible units
    between ``v`` and its one-step reconstruction (sampled hidden states when
    ``rng`` is given, as in training; hidden probabilities otherwise)."""
    v = _as_float(v, params["W"].dtype)
    h = mean_hiddens(v, params)
    if rng is not None:
        h = _bernoulli(h, rng)
    r = mean_visibles(h, params)
    r -= v
    return float(np.einsum("ij,ij->", r, r) / max(len(v), 1))


class CDBuffers:
    """Preallocated per-batch work arrays for :func:`cd_statistics` (float32).

    The data batch and its reconstruction are stacked in ``vv`` [2b, nv] (``v`` =
    its first ``b`` rows, ``v_neg`` the rest), their hidden probabilities in ``hh``
    [2b, nh] (``h_pos``, ``h_neg``), so that both weight statistics come out of one
    matrix product ``vv^T hh``. ``h_states``/``rand`` [b, nh], ``diff`` [b, nv],
    ``g_W`` [nv, nh], ``u8`` [b, nv] for uint8 input.
    """

    def __init__(self, batch_size: int, n_visible: int, n_hidden: int, dtype=_F32):
        b = batch_size
        self.vv = np.empty((2 * b, n_visible), dtype)
        self.hh = np.empty((2 * b, n_hidden), dtype)
        self.h_states = np.empty((b, n_hidden), dtype)
        self.rand = np.empty((b, n_hidden), dtype)
        self.diff = np.empty((b, n_visible), dtype)
        self.g_W = np.empty((n_visible, n_hidden), dtype)
        self.u8 = np.empty((b, n_visible), np.uint8)
        self._split()

    def _split(self) -> None:
        b = len(self.vv) // 2
        self.v, self.v_neg = self.vv[:b], self.vv[b:]
        self.h_pos, self.h_neg = self.hh[:b], self.hh[b:]

    def view(self, n: int) -> "CDBuffers":
        """Buffers for a smaller last batch of ``n`` rows."""
        if 2 * n == len(self.vv):
            return self
        sub = object.__new__(CDBuffers)
        for k, a in vars(self).items():
            if k in ("vv", "hh"):
                a = a[:2 * n]
            elif k != "g_W":
                a = a[:n]
            setattr(sub, k, a)
        sub._split()
        return sub


def cd_statistics(
    v: np.ndarray,
    params: dict,
    rng: np.random.Generator,
    k: int = 1,
    buffers: CDBuffers | None = None,
    scale: float = 1.0,
) -> tuple[dict[str, np.ndarray], float]:
    """CD-k gradient estimate on one mini-batch (no parameter change).

    ``v`` float32 [b, n_visible] in [0, 1]. Returns ``(grads, err)`` where
    ``grads`` has ``W`` [nv, nh], ``b_vis`` [nv], ``b_hid`` [nh] holding
    ``scale`` times the *batch-mean* ``<.>_data - <.>_recon`` (without weight
    cost; these may be views into ``buffers``) and ``err`` is the summed squared
    reconstruction error of the batch (``rbm.m``'s ``err``).
    """
    n = v.shape[0]
    nv, nh = params["W"].shape
    buf = buffers.view(n) if buffers is not None else CDBuffers(n, nv, nh, params["W"].dtype)
    if v is not buf.v:
        buf.v[...] = v
    dt = params["W"].dtype.type
    # positive phase
    mean_hiddens(buf.v, params, out=buf.h_pos)
    pos_vis = buf.v.sum(axis=0)
    pos_hid = buf.h_pos.sum(axis=0)
    # negative phase: sampled hidden states -> visible probabilities -> hidden probabilities
    _bernoulli(buf.h_pos, rng, out=buf.h_states, scratch=buf.rand)
    for step in range(k):
        mean_visibles(buf.h_states, params, out=buf.v_neg)
        mean_hiddens(buf.v_neg, params, out=buf.h_neg)
        if step + 1 < k:
            _bernoulli(buf.h_neg, rng, out=buf.h_states, scratch=buf.rand)
    s = dt(scale / n)
    g_vis = (pos_vis - buf.v_neg.sum(axis=0)) * s
    g_hid = (pos_hid - buf.h_neg.sum(axis=0)) * s
    np.subtract(buf.v, buf.v_neg, out=buf.diff)
    err = float(np.einsum("ij,ij->", buf.diff, buf.diff))
    # both weight statistics in one product: [v; v_neg]^T [s h_pos; -s h_neg]
    buf.h_pos *= s
    buf.h_neg *= -s
    np.matmul(buf.vv.T, buf.hh, out=buf.g_W)
    return {"W": buf.g_W, "b_vis": g_vis, "b_hid": g_hid}, err


def apply_update(params: dict, grads: dict, momentum: float, settings: RBMSettings,
                 scaled: bool = False, scratch: np.ndarray | None = None) -> None:
    """Momentum step in place (rbm.m):
    ``dW = m dW + lr (gW - weight_cost W); W += dW``; biases without weight cost.

    With ``scaled=True`` the ``grads`` already hold ``lr`` times the gradient (as
    :func:`cd_statistics` gives with ``scale=lr``). ``scratch`` (like ``W``) avoids
    allocating a temporary; it may be ``grads["W"]`` itself, which is read before
    ``scratch`` is written.
    """
    W = params["W"]
    dt = W.dtype.type
    lr, m = dt(settings.learning_rate), dt(momentum)
    tmp = scratch if scratch is not None else np.empty_like(W)
    dW = params["dW"]
    dW *= m
    if scaled:
        dW += grads["W"]
    else:
        np.multiply(grads["W"], lr, out=tmp)
        dW += tmp
    if settings.weight_cost:
        np.multiply(W, lr * dt(settings.weight_cost), out=tmp)
        dW -= tmp
    W += dW
    for p, d in (("b_vis", "db_vis"), ("b_hid", "db_hid")):
        vel = params[d]
        vel *= m
        vel += grads[p] if scaled else lr * grads[p]
        params[p] += vel


def _gather(data: np.ndarray, idx: np.ndarray, buf: CDBuffers) -> np.ndarray:
    """Copy rows ``idx`` of ``data`` into ``buf.v`` (scaling uint8 to [0, 1])."""
    n = len(idx)
    buf = buf.view(n)
    if data.dtype == np.uint8:
        np.take(data, idx, axis=0, out=buf.u8)
        np.multiply(buf.u8, buf.v.dtype.type(1.0 / 255.0), out=buf.v)
    elif data.dtype == buf.v.dtype:
        np.take(data, idx, axis=0, out=buf.v)
    else:
        buf.v[...] = data[idx]
    return buf.v


def train_epoch(
    params: dict,
    data: np.ndarray,
    epoch: int,
    rng: np.random.Generator,
    settings: RBMSettings | None = None,
    batches: int | None = None,
) -> float:
    """One epoch of CD-k over ``data``; updates ``params`` in place.

    ``data``: float32 [n, n_visible] in [0, 1] (or uint8 pixels). The rows are
    shuffled by ``rng`` (deterministic given its state) and cut into
    mini-batches of ``settings.batch_size`` (the last one may be smaller).
    ``epoch`` (0-based) selects the momentum. ``batches`` limits how many
    mini-batches are processed (e.g. a worker's share of a super-step).

    Returns the mean reconstruction error per example: squared error summed
    over visible units, averaged over the examples seen (``rbm.m``'s
    ``errsum`` divided by the number of examples).
    """
    s = settings or RBMSettings()
    n = len(data)
    if n == 0:
        return 0.0
    nv, nh = params["W"].shape
    if data.shape[1] != nv:
        raise ValueError(f"data has {data.shape[1]} columns, the RBM {nv} visible units")
    bs = min(s.batch_size, n)
    order = rng.permutation(n)
    n_batches = -(-n // bs)
    if batches is not None:
        n_batches = min(n_batches, batches)
    buf = CDBuffers(bs, nv, nh, params["W"].dtype)
    momentum = momentum_for(epoch, s)
    err_sum, seen = 0.0, 0
    for b in range(n_batches):
        idx = order[b * bs:(b + 1) * bs]
        v = _gather(data, idx, buf)
        grads, err = cd_statistics(v, params, rng, s.cd_k, buf, scale=s.learning_rate)
        apply_update(params, grads, momentum, s, scaled=True, scratch=buf.g_W)  # g_W is spent by then
        err_sum += err
        seen += len(idx)
    return err_sum / seen


def transform(data: np.ndarray, params: dict, batch_size: int = 10000) -> np.ndarray:
    """Hidden probabilities ``p(h|v)`` for all rows: float32 [n, n_hidden].

    ``data`` float [n, n_visible] in [0, 1] or uint8. These are the training
    data of the next RBM in the stack. Computed in chunks of ``batch_size``.
    """
    n = len(data)
    out = np.empty((n, params["W"].shape[1]), params["W"].dtype)
    for lo in range(0, n, batch_size):
        mean_hiddens(data[lo:lo + batch_size], params, out=out[lo:lo + batch_size])
    return out


class RBM:
    """Thin object wrapper over the functions above (sklearn-like).

    ``RBM(n_hidden, settings, seed).fit(data, epochs)``; ``transform(data)``.
    The parameter dict is ``self.params``; per-epoch errors in ``self.errors``.
    """

    def __init__(self, n_hidden: int, settings: RBMSettings | None = None, seed: int = 0):
        self.n_hidden = n_hidden
        self.settings = settings or RBMSettings()
        self.rng = np.random.default_rng(seed)
        self.params: dict | None = None
        self.errors: list[float] = []

    def fit(self, data: np.ndarray, epochs: int = 10, verbose: bool = False) -> "RBM":
        if self.params is None:
            self.params = init_rbm(data.shape[1], self.n_hidden, self.rng, self.settings)
        start = len(self.errors)
        for e in range(start, start + epochs):
            self.errors.append(train_epoch(self.params, data, e, self.rng, self.settings))
            if verbose:
                print(f"epoch {e}: reconstruction error {self.errors[-1]:.3f}")
        return self

    def transform(self, data: np.ndarray) -> np.ndarray:
        return transform(data, self.params)
