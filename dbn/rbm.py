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

from . import _blas, _random

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
    """Binary samples ``(p > U(0,1))`` as 0/1 in ``p``'s dtype (``U`` float32 for float32 ``p``:
    ``rng.random``'s numbers, drawn by :func:`dbn._random.uniform`)."""
    if scratch is None:
        scratch = np.empty(p.shape, np.float32 if p.dtype == np.float32 else np.float64)
    _random.uniform(rng, scratch)
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
    """Preallocated per-batch work arrays of CD-k (float32).

    The data batch and its reconstruction are stacked in ``vv`` [2b, nv] (``v`` =
    its first ``b`` rows, ``v_neg`` the rest), their hidden probabilities in ``hh``
    [2b, nh] (``h_pos``, then ``h_neg`` *negated*), so that both weight
    statistics ``<v h>_data - <v h>_recon`` come out of one matrix product
    ``vv^T hh``. ``h_states``/``rand`` [b, nh], ``diff`` [b, nv], ``u8`` [b, nv]
    for uint8 input; ``half_b_vis``/``half_b_hid`` hold the halved biases and
    ``ones`` [2b] sums rows with a matrix-vector product.
    """

    _PER_ROW = ("h_states", "rand", "diff", "u8")

    def __init__(self, batch_size: int, n_visible: int, n_hidden: int, dtype=_F32):
        b = batch_size
        self.vv = np.empty((2 * b, n_visible), dtype)
        self.hh = np.empty((2 * b, n_hidden), dtype)
        self.h_states = np.empty((b, n_hidden), dtype)
        self.rand = np.empty((b, n_hidden), dtype)
        self.diff = np.empty((b, n_visible), dtype)
        self.u8 = np.empty((b, n_visible), np.uint8)
        self.half_b_vis = np.empty(n_visible, dtype)
        self.half_b_hid = np.empty(n_hidden, dtype)
        self.ones = np.ones(2 * b, dtype)
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
        vars(sub).update(vars(self))
        for k in ("vv", "hh", "ones"):
            setattr(sub, k, getattr(self, k)[:2 * n])
        for k in self._PER_ROW:
            setattr(sub, k, getattr(self, k)[:n])
        sub._split()
        return sub


def _sigmoid_of_half(x: np.ndarray, negate: bool = False) -> None:
    """``x <- sigmoid(2 x)`` (or its negative) in place, as ``(1 + tanh x) / 2``.

    The callers put ``z / 2`` into ``x`` with the matrix product itself (``alpha``
    0.5, the bias halved), so the logistic costs three passes and never overflows.
    """
    np.tanh(x, out=x)
    half = x.dtype.type(-0.5 if negate else 0.5)
    x *= half
    x += half


class _Products:
    """The three products of a Gibbs chain on ``buf`` with weights ``W``, prepared once
    (:func:`dbn._blas.prepare_gemm`): ``up`` fills ``h_pos`` from ``v``, ``down``
    ``v_neg`` from ``h_states``, ``up_neg`` ``h_neg`` from ``v_neg``; each is called with
    ``(alpha, beta)``."""

    def __init__(self, buf: CDBuffers, W: np.ndarray):
        self.up = _blas.prepare_gemm(buf.v, W, buf.h_pos)
        self.down = _blas.prepare_gemm(buf.h_states, W, buf.v_neg, trans_b=True)
        self.up_neg = _blas.prepare_gemm(buf.v_neg, W, buf.h_neg)


def _cd_phases(buf: CDBuffers, products: _Products, b_vis: np.ndarray, b_hid: np.ndarray,
               rng: np.random.Generator, k: int) -> None:
    """Fill ``buf`` for the batch in ``buf.v``: ``h_pos``, ``k`` Gibbs steps to
    ``v_neg``, and ``-h_neg`` (see :class:`CDBuffers`), with ``products`` of ``buf``."""
    np.multiply(b_hid, 0.5, out=buf.half_b_hid)
    np.multiply(b_vis, 0.5, out=buf.half_b_vis)
    np.copyto(buf.h_pos, buf.half_b_hid)
    products.up(0.5, 1.0)
    _sigmoid_of_half(buf.h_pos)
    _bernoulli(buf.h_pos, rng, out=buf.h_states, scratch=buf.rand)
    for step in range(k):
        last = step + 1 == k
        np.copyto(buf.v_neg, buf.half_b_vis)
        products.down(0.5, 1.0)
        _sigmoid_of_half(buf.v_neg)
        np.copyto(buf.h_neg, buf.half_b_hid)
        products.up_neg(0.5, 1.0)
        _sigmoid_of_half(buf.h_neg, negate=last)
        if not last:
            _bernoulli(buf.h_neg, rng, out=buf.h_states, scratch=buf.rand)


def _batch_error(buf: CDBuffers) -> float:
    """Summed squared reconstruction error of the batch (``rbm.m``'s ``err``); leaves ``v - v_neg`` in ``diff``."""
    np.subtract(buf.v, buf.v_neg, out=buf.diff)
    d = buf.diff.reshape(-1)
    return float(np.dot(d, d))


def cd_statistics(
    v: np.ndarray,
    params: dict,
    rng: np.random.Generator,
    k: int = 1,
    buffers: CDBuffers | None = None,
    scale: float = 1.0,
) -> tuple[dict[str, np.ndarray], float]:
    """CD-k gradient estimate on one mini-batch (no parameter change).

    ``v`` float32 [b, n_visible] in [0, 1], or uint8 pixels (scaled by 1/255). Returns ``(grads, err)`` where
    ``grads`` has ``W`` [nv, nh], ``b_vis`` [nv], ``b_hid`` [nh] holding
    ``scale`` times the *batch-mean* ``<.>_data - <.>_recon`` (without weight
    cost) and ``err`` is the summed squared reconstruction error of the batch
    (``rbm.m``'s ``err``). :func:`train_epoch` makes the same estimate and fuses
    it with the update.
    """
    n = v.shape[0]
    W = params["W"]
    buf = buffers.view(n) if buffers is not None else CDBuffers(n, *W.shape, W.dtype)
    if v.dtype == np.uint8:
        np.multiply(v, buf.v.dtype.type(1.0 / 255.0), out=buf.v)
    elif v is not buf.v:
        buf.v[...] = v
    _cd_phases(buf, _Products(buf, W), params["b_vis"], params["b_hid"], rng, k)
    err = _batch_error(buf)
    s = W.dtype.type(scale / n)
    g_W = _blas.gemm(buf.vv, buf.hh, np.empty_like(W), trans_a=True, alpha=s)
    return {"W": g_W, "b_vis": (buf.ones[:n] @ buf.diff) * s, "b_hid": (buf.ones @ buf.hh) * s}, err


def apply_update(params: dict, grads: dict, momentum: float, settings: RBMSettings) -> None:
    """Momentum step in place (rbm.m):
    ``dW = m dW + lr (gW - weight_cost W); W += dW``; biases without weight cost.

    ``grads`` as :func:`cd_statistics` gives them with ``scale=1``.
    """
    W = params["W"]
    dt = W.dtype.type
    lr, m = dt(settings.learning_rate), dt(momentum)
    dW = params["dW"]
    dW *= m
    dW += lr * grads["W"]
    if settings.weight_cost:
        dW -= (lr * dt(settings.weight_cost)) * W
    W += dW
    for p, d in (("b_vis", "db_vis"), ("b_hid", "db_hid")):
        vel = params[d]
        vel *= m
        vel += lr * grads[p]
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
    order: np.ndarray | None = None,
    first_batch: int = 0,
) -> float:
    """One epoch of CD-k over ``data``; updates ``params`` in place.

    ``data``: float32 [n, n_visible] in [0, 1] (or uint8 pixels). The rows are
    shuffled by ``rng`` (deterministic given its state) and cut into
    mini-batches of ``settings.batch_size`` (the last one may be smaller).
    ``epoch`` (0-based) selects the momentum. ``batches`` limits how many
    mini-batches are processed (e.g. a worker's share of a super-step).
    An epoch made of parts passes the same ``order`` (a permutation of the rows,
    then not drawn from ``rng``) to each part and its own ``first_batch``: part
    ``i`` of ``k`` batches each takes batches ``i k .. i k + k - 1`` of that order
    (counted round), so the parts visit every row once.

    Returns the mean reconstruction error per example: squared error summed
    over visible units, averaged over the examples seen (``rbm.m``'s
    ``errsum`` divided by the number of examples).

    The update is rbm.m's (:func:`apply_update`), written so that it costs one
    pass over ``W`` beyond the products: with ``W_prev = W - dW``,
    ``W_next = (1 + m - lr wc) W - m W_prev + lr G`` (``G`` the batch-mean
    statistics). ``W_prev`` is overwritten by ``W_next`` (``sgemm`` with
    ``beta = -m``, then ``W_prev += (1 + m - lr wc) W``) and the two swap; ``dW`` is
    ``W - W_prev`` again when the epoch ends.
    """
    s = settings or RBMSettings()
    n = len(data)
    if n == 0:
        return 0.0
    W = params["W"]
    nv, nh = W.shape
    if data.shape[1] != nv:
        raise ValueError(f"data has {data.shape[1]} columns, the RBM {nv} visible units")
    bs = min(s.batch_size, n)
    if order is None:
        order = rng.permutation(n)
    elif len(order) != n:
        raise ValueError(f"order has {len(order)} rows, data {n}")
    total = -(-n // bs)
    n_batches = total if batches is None else min(total, batches)
    full = CDBuffers(bs, nv, nh, W.dtype)
    m = momentum_for(epoch, s)
    lr = s.learning_rate
    keep = 1.0 + m - lr * s.weight_cost
    b_vis, b_hid, db_vis, db_hid = params["b_vis"], params["b_hid"], params["db_vis"], params["db_hid"]
    W_prev = W - params["dW"]
    plans: dict[tuple[int, int], tuple] = {}

    def plan(rows: int, parity: int) -> tuple:
        """Buffers and prepared calls for a batch of ``rows`` when ``W`` (parity 0) or
        ``W_prev`` (parity 1) holds the current weights."""
        if (rows, parity) not in plans:
            buf = full.view(rows)
            cur, nxt = (W, W_prev) if parity == 0 else (W_prev, W)
            plans[rows, parity] = (
                buf, _Products(buf, cur),
                _blas.prepare_gemm(buf.vv, buf.hh, nxt, trans_a=True),  # nxt = step vv^T hh + beta nxt
                _blas.prepare_axpy(cur, nxt),  # nxt += keep cur
                _blas.prepare_gemv(buf.diff, buf.ones[:rows], db_vis),  # db = step (col sums) + m db
                _blas.prepare_gemv(buf.hh, buf.ones, db_hid),
                _blas.prepare_axpy(db_vis, b_vis), _blas.prepare_axpy(db_hid, b_hid))
        return plans[rows, parity]

    err_sum, seen = 0.0, 0
    for b in range(n_batches):
        at = (first_batch + b) % total
        idx = order[at * bs:(at + 1) * bs]
        buf, products, stats, add_keep, vis_sums, hid_sums, step_vis, step_hid = plan(len(idx), b % 2)
        _gather(data, idx, buf)
        _cd_phases(buf, products, b_vis, b_hid, rng, s.cd_k)
        err_sum += _batch_error(buf)
        step = lr / len(idx)
        # W_next = -m W_prev + lr G + (1 + m - lr wc) W, written over W_prev
        stats(step, -m)
        add_keep(keep)
        vis_sums(step, m)  # db_vis = m db_vis + lr (<v>_data - <v>_recon)
        step_vis(1.0)
        hid_sums(step, m)
        step_hid(1.0)
        seen += len(idx)
    if n_batches % 2 == 0:  # the current weights are in W, the previous ones in W_prev
        np.subtract(W, W_prev, out=params["dW"])
    else:
        np.subtract(W_prev, W, out=params["dW"])
        W[...] = W_prev
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
