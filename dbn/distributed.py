"""Distributed DBN training on iterreduce: :class:`DBNMaster` and :class:`DBNWorker`.

The scheme of PayPal's "Deep Learning on Hadoop 2.0" (IterativeReduce):

* **Pre-training**, greedy and layer-wise. For each hidden layer and each epoch (one
  superstep) the master broadcasts the layer's RBM parameters *and* their momentum
  velocities; every worker runs one epoch of CD-k (or ``batches_per_superstep``
  mini-batches) on its own split, starting from the broadcast, and returns the new
  parameters and velocities with the number of examples it saw; the master takes the
  sample-weighted average. When a layer is finished, the broadcast that starts the next
  layer carries the finished layer's recognition weights (``prev/W``, ``prev/b``) and
  every worker pushes its cached split through them itself: no data moves.
  :meth:`DBNMaster.catch_up` returns *all* finished layers, so a replacement worker
  (joining at any superstep, or after a resume) rebuilds its cached representation
  from its raw split and computes exactly what the lost worker would have.
* **Fine-tuning** by back-propagation, where the job file says (``finetune.where``):

  - ``master``: the master reads the labelled training data (``params.train``) and
    runs one epoch per superstep inside :meth:`~DBNMaster.combine`, while the workers
    return an empty update at once (progress and checkpoints keep flowing);
  - ``workers``: parameter-averaged SGD: each superstep every worker runs one
    fine-tuning epoch on its split from the broadcast net and velocities; the master
    averages.

  After every epoch the master measures the validation error (``params.validation``)
  and keeps the parameters of the best epoch; at the end it evaluates them on the
  test set (``params.test``). With ``finetune.average_from: E`` the master also keeps
  the running mean of the parameters at the end of epochs ``E, E+1, ...`` and, from
  epoch ``E`` on, validates and keeps that mean instead (the training itself goes on
  from the latest parameters).

Randomness: a worker uses ``ctx.rng(superstep)`` (and, for an epoch in parts, one shuffle per
layer and epoch drawn from the seed, split, layer and epoch); the master uses
``self.ctx.rng(superstep + 1)`` in ``combine(superstep)`` (the randomness that produces
broadcast ``superstep + 1``) and ``ctx.rng(0)`` in :meth:`initial_update`. So runs with
the same job file give the same model, with or without lost workers or a resume.

Supersteps: pre-training takes ``sum(epochs) * supersteps_per_epoch`` supersteps,
fine-tuning ``finetune.epochs`` more; the last combine returns the :class:`Final`.

Input: Parquet files with a column ``x`` (per example, a list of integer pixels 0..255,
``fixed_size_list<uint8>[n_visible]`` as ``examples/mnist_dbn.py prepare`` writes them, or
of floats in [0, 1]: any features scaled to that range, taken as the visible units'
probabilities) and an integer label ``y``. All the files hold one kind of ``x``;
``iterreduce validate`` refuses, from the files' schemas, an ``x`` or ``y`` of another
type, a fixed width other than ``n_visible``, and pixels in some files beside floats in
others.

Workers and epochs: each worker's epoch takes ``1/workers`` of the data's mini-batches,
and the average of the workers' parameters is one step, not ``workers`` steps: with more
workers an epoch moves the parameters less (PayPal's scheme, and parameter averaging in
general). A job that learns with 2 workers may need more epochs (or
``batches_per_superstep`` with ``supersteps_per_epoch`` > 1, which averages more often per
pass) with 12.

Parameters (``algorithm.params`` of the job file; each value shown is the default)::

    layers: [500, 500, 2000]       # hidden layer widths
    classes: 10                    # softmax outputs
    n_visible: 784                 # input width
    train: PATH                    # labelled training data (for finetune.where: master); a list of paths too
    validation: PATH               # chooses the fine-tuning epoch (optional)
    test: PATH                     # final evaluation (optional)
    max_examples_per_worker: null  # use only the first N rows of each split
    pretrain:
      epochs: 50                   # per layer: a number, or one per layer
      learning_rate: 0.1
      initial_momentum: 0.5
      final_momentum: 0.9
      momentum_switch_epoch: 5
      weight_cost: 0.0002
      init_std: 0.01
      batch_size: 100
      cd_k: 1
      batches_per_superstep: null  # null: a whole epoch per superstep
      supersteps_per_epoch: 1      # supersteps that make one "epoch" (momentum schedule); with
                                   # batches_per_superstep, consecutive slices of one shuffle
    finetune:
      where: master                # or workers
      epochs: 50                   # 0: no fine-tuning; the model is then the pre-trained stack
      learning_rate: 0.1
      momentum: 0.9
      weight_cost: 0.00001
      batch_size: 100
      lr_decay: 1.0
      dropout_input: 0.0
      dropout_hidden: 0.0
      max_norm: 0.0
      top_only_epochs: 0           # first epochs train only the softmax layer
      average_from: null           # 0-based epoch: from then on validate/keep the running mean of the
                                   # epoch-end parameters (stochastic weight averaging)
      final_momentum: null         # momentum rises linearly from `momentum` to this ...
      momentum_ramp_epochs: 0      # ... over these epochs (Hinton et al. 2012: 0.5 -> 0.99 over 500)
      momentum_scales_lr: false    # step = m * step - (1 - m) * lr * grad (Hinton et al. 2012)
      batches_per_superstep: null  # workers mode: mini-batches per worker per superstep
    extra: {}                      # ignored here: settings of subclasses (e.g. test fault injection)

Outputs (:meth:`DBNMaster.save`): ``model.avro`` (:func:`dbn.model.save`),
``filters.png`` (first-layer RBM filters, for 784-value inputs: 28x28 images),
``pretrain.png`` (reconstruction error per layer and epoch), ``finetune.png`` (train /
validation error per epoch, when it fine-tunes); the metrics
``test_error``, ``validation_error`` and ``best_epoch`` go to ``metrics.json``.
``best_epoch`` counts from 0, as ``average_from`` does; the log's "finetune epoch N/M"
counts from 1, so ``best_epoch=19`` is the epoch logged as 20/M. Without a validation set
it is the last epoch. Without fine-tuning (``epochs: 0``) ``model.avro`` is the pre-trained
stack (kind ``stack``: features, no labels) and no error is measured.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iterreduce import Final, Master, Update, Worker, average_metrics, weighted_average
from iterreduce.fs import FilePiece, list_input_files, plan_splits, read_split
from iterreduce.job import closest_match

from . import model as _model
from . import network as _net
from . import plots as _plots
from . import rbm as _rbm
from .data import _to_arrays, check_example_schemas, examples_check

__all__ = ["DBNConfig", "DBNMaster", "DBNWorker"]

RBM_KEYS = _rbm.PARAM_KEYS + _rbm.VELOCITY_KEYS

_PRETRAIN_EXTRA = {"epochs", "batches_per_superstep", "supersteps_per_epoch"}
_FINETUNE_EXTRA = {"where", "batches_per_superstep"}
_TOP_KEYS = {"layers", "classes", "n_visible", "train", "validation", "test", "max_examples_per_worker",
             "pretrain", "finetune", "extra"}


# (kind, lowest, highest, lowest excluded, highest excluded) of every numeric setting
_RBM_RULES = {
    "learning_rate": (float, 0.0, None, True), "initial_momentum": (float, 0.0, 1.0, False, True),
    "final_momentum": (float, 0.0, 1.0, False, True), "momentum_switch_epoch": (int, 0),
    "weight_cost": (float, 0.0), "init_std": (float, 0.0, None, True), "batch_size": (int, 1), "cd_k": (int, 1),
}
_FINETUNE_RULES = {
    "learning_rate": (float, 0.0, None, True), "momentum": (float, 0.0, 1.0, False, True),
    "weight_cost": (float, 0.0), "batch_size": (int, 1), "epochs": (int, 0),
    "dropout_input": (float, 0.0, 1.0, False, True), "dropout_hidden": (float, 0.0, 1.0, False, True),
    "lr_decay": (float, 0.0, 1.0, True), "max_norm": (float, 0.0), "top_only_epochs": (int, 0),
    "average_from": (int, 0),  # or null (off)
    "final_momentum": (float, 0.0, 1.0, False, True),  # or null (off)
    "momentum_ramp_epochs": (int, 0), "momentum_scales_lr": (bool,),
}
_NULLABLE = {"average_from", "final_momentum"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(where: str, value: Any, kind: type, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a setting that is not a number of ``kind`` within [low, high] (ends excluded
    when ``*_open``), or not true/false when ``kind`` is bool, naming it."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return
    ok_type = _is_int(value) if kind is int else (_is_int(value) or isinstance(value, float))
    what = "an integer" if kind is int else "a number"
    rng = ""
    if low is not None or high is not None:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " " + " and ".join(x for x in (lo, hi) if x)
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{where}: expected {what}{rng}, got {value!r}")
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        raise ValueError(f"{where}: expected {what}{rng}, got {value!r}")


def _optional_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected a positive integer or null, got {value!r}")
    return value


@dataclass
class DBNConfig:
    """The algorithm's parameters, validated (see the module docstring)."""

    layers: list[int] = field(default_factory=lambda: [500, 500, 2000])
    classes: int = 10
    n_visible: int = 784
    n_visible_given: bool = True  # False: n_visible is the default, not in the job file
    train: list[str] | None = None  # one path or several in the job file
    validation: str | None = None
    test: str | None = None
    max_examples_per_worker: int | None = None
    rbm: _rbm.RBMSettings = field(default_factory=_rbm.RBMSettings)
    pretrain_epochs: list[int] = field(default_factory=lambda: [50, 50, 50])
    pretrain_batches: int | None = None
    supersteps_per_epoch: int = 1
    finetune: _net.FinetuneSettings = field(default_factory=_net.FinetuneSettings)
    where: str = "master"
    finetune_batches: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "DBNConfig":
        """Validate the job file's ``algorithm.params``; every error names its field."""
        if not isinstance(params, dict):
            raise ValueError(f"algorithm.params: expected a mapping, got {type(params).__name__}")
        unknown = sorted(set(params) - _TOP_KEYS)
        if unknown:
            raise ValueError(f"algorithm.params.{unknown[0]}: unknown parameter{_did_you_mean(unknown[0], _TOP_KEYS)} "
                             f"(known: {', '.join(sorted(_TOP_KEYS))})")
        train = params.get("train")
        if train is not None and not (isinstance(train, str) or (
                isinstance(train, list) and train and all(isinstance(t, str) for t in train))):
            raise ValueError(f"algorithm.params.train: expected a path or a list of paths, got {train!r}")
        for key in ("validation", "test"):
            if params.get(key) is not None and not isinstance(params[key], str):
                raise ValueError(f"algorithm.params.{key}: expected a path, got {params[key]!r}")
        layers = params.get("layers", [500, 500, 2000])
        if not isinstance(layers, list) or not layers or not all(_is_int(n) and n >= 1 for n in layers):
            raise ValueError(f"algorithm.params.layers: expected a list of positive widths, got {layers!r}")
        for key, default, low in (("classes", 10, 2), ("n_visible", 784, 1)):
            _check_number(f"algorithm.params.{key}", params.get(key, default), int, low)
        pre = params.get("pretrain") or {}
        fine = params.get("finetune") or {}
        for name, d in (("pretrain", pre), ("finetune", fine)):
            if not isinstance(d, dict):
                raise ValueError(f"algorithm.params.{name}: expected a mapping, got {d!r}")
        pre, fine = dict(pre), dict(fine)
        rbm_fields = {f.name for f in dataclasses.fields(_rbm.RBMSettings)}
        ft_fields = {f.name for f in dataclasses.fields(_net.FinetuneSettings)}
        for name, d, known in (("pretrain", pre, rbm_fields | _PRETRAIN_EXTRA),
                               ("finetune", fine, ft_fields | _FINETUNE_EXTRA)):
            bad = sorted(set(d) - known)
            if bad:
                raise ValueError(f"algorithm.params.{name}.{bad[0]}: unknown parameter"
                                 f"{_did_you_mean(bad[0], known)} (known: {', '.join(sorted(known))})")
        given = pre.pop("epochs", 50)
        epochs = [given] * len(layers) if not isinstance(given, list) else given
        if len(epochs) != len(layers) or not all(_is_int(e) and e >= 1 for e in epochs):
            raise ValueError(f"algorithm.params.pretrain.epochs: expected a positive number or one per layer "
                             f"({len(layers)}), got {given!r}")
        pretrain_batches = _optional_int(pre.pop("batches_per_superstep", None),
                                         "algorithm.params.pretrain.batches_per_superstep")
        spe = _optional_int(pre.pop("supersteps_per_epoch", 1), "algorithm.params.pretrain.supersteps_per_epoch")
        where = fine.pop("where", "master")
        if where not in ("master", "workers"):
            raise ValueError(f"algorithm.params.finetune.where: expected 'master' or 'workers', got {where!r}")
        finetune_batches = _optional_int(fine.pop("batches_per_superstep", None),
                                         "algorithm.params.finetune.batches_per_superstep")
        for name, d, rules in (("pretrain", pre, _RBM_RULES), ("finetune", fine, _FINETUNE_RULES)):
            for key, value in d.items():
                if not (key in _NULLABLE and value is None):
                    _check_number(f"algorithm.params.{name}.{key}", value, *rules[key])
        rbm = _rbm.RBMSettings(**pre)
        ft = _net.FinetuneSettings(**fine)
        if ft.average_from is not None and ft.average_from >= ft.epochs:
            raise ValueError(f"algorithm.params.finetune.average_from: {ft.average_from} is not an epoch of "
                             f"fine-tuning (epochs 0..{ft.epochs - 1}); use null to turn averaging off")
        return cls(layers=list(layers), classes=params.get("classes", 10), n_visible=params.get("n_visible", 784),
                   n_visible_given="n_visible" in params,
                   train=[train] if isinstance(train, str) else train, validation=params.get("validation"), test=params.get("test"),
                   max_examples_per_worker=_optional_int(params.get("max_examples_per_worker"),
                                                         "algorithm.params.max_examples_per_worker"),
                   rbm=rbm, pretrain_epochs=list(epochs), pretrain_batches=pretrain_batches,
                   supersteps_per_epoch=spe or 1, finetune=ft, where=where, finetune_batches=finetune_batches)

    def schedule(self) -> list[tuple[int, int, int]]:
        """``(layer, epoch, part)`` of every pre-training superstep, in order."""
        out = []
        for layer, epochs in enumerate(self.pretrain_epochs):
            for e in range(epochs):
                for part in range(self.supersteps_per_epoch):
                    out.append((layer, e, part))
        return out


def _read_xy(pieces: list[FilePiece], cfg: DBNConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and labels of ``pieces``; a bad example is refused naming its file and row."""
    check = examples_check(cfg.n_visible, cfg.classes, classes_from="algorithm.params.classes",
                           features_from="algorithm.params.n_visible", labels=True,
                           features_default=not cfg.n_visible_given)
    # check_examples refuses null examples, pixels and labels in its own words: no second pass for them
    return _to_arrays(read_split(pieces, ["x", "y"], check=check, nulls=True), cfg.n_visible)


def _read_path(path: str | list[str], cfg: DBNConfig) -> tuple[np.ndarray, np.ndarray]:
    return _read_xy([FilePiece(f) for f in list_input_files([path] if isinstance(path, str) else path)], cfg)


# --------------------------------------------------------------------------- worker


class DBNWorker(Worker):
    """Trains on one split: RBM epochs on its cached representation, or fine-tuning epochs."""

    def setup(self, ctx):
        self.cfg = DBNConfig.from_params(ctx.params)
        self.x, self.y = _read_xy(ctx.split, self.cfg)
        if self.cfg.max_examples_per_worker:
            n = self.cfg.max_examples_per_worker
            self.x, self.y = self.x[:n].copy(), self.y[:n].copy()
        self.depth = 0          # layers self.cache has gone through (0: the raw pixels)
        self.cache: np.ndarray | None = None
        self.layers: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # finished layers not yet applied
        cu = ctx.catch_up
        if cu is not None:
            for i in range(int(cu.meta.get("finished", 0))):
                self.layers[i] = (cu.arrays[f"layer{i}/W"], cu.arrays[f"layer{i}/b"])
        ctx.log.info("DBN worker: %d examples, catch-up with %d finished layer(s), starting at superstep %d",
                     len(self.x), len(self.layers), ctx.start_superstep)

    def _advance(self, layer: int, ctx) -> np.ndarray:
        """The split as seen by ``layer`` (raw pixels for layer 0), applying finished layers."""
        while self.depth < layer:
            if self.depth not in self.layers:
                raise RuntimeError(f"layer {self.depth} is finished but neither the broadcast nor the catch-up "
                                   "carried its weights")
            W, b = self.layers.pop(self.depth)
            src = self.x if self.depth == 0 else self.cache
            t0 = time.monotonic()
            self.cache = _rbm.transform(src, {"W": W, "b_hid": b})
            self.depth += 1
            ctx.log.info("pushed the split through layer %d (%d units) in %.2f s", self.depth - 1, W.shape[1],
                         time.monotonic() - t0)
        return self.x if self.depth == 0 else self.cache

    def compute(self, update, superstep, ctx):
        kind = update.meta.get("kind")
        if kind == "pretrain":
            layer = int(update.meta["layer"])
            if "prev/W" in update.arrays:
                self.layers.setdefault(layer - 1, (update.arrays["prev/W"], update.arrays["prev/b"]))
            data = self._advance(layer, ctx)
            params = {k: np.array(update.arrays[k], copy=True) for k in RBM_KEYS}
            s = self.cfg.rbm
            k, order, first = self.cfg.pretrain_batches, None, 0
            part = int(update.meta.get("part", 0))
            if k is not None and self.cfg.supersteps_per_epoch > 1:
                # the parts of one epoch share its order (drawn from the seed, split, layer and epoch)
                # and take consecutive batches of it, so together they visit every row once
                order = np.random.default_rng([ctx.seed, ctx.split_index, 0x0E90C4, layer,
                                               int(update.meta["epoch"])]).permutation(len(data))
                first = part * k
            err = _rbm.train_epoch(params, data, int(update.meta["epoch"]), ctx.rng(superstep), s,
                                   batches=k, order=order, first_batch=first)
            n = len(data)
            if self.cfg.pretrain_batches is not None:
                n = min(n, self.cfg.pretrain_batches * min(s.batch_size, n))
            return Update(params, num_samples=n, metrics={"recon_error": err})
        # pre-training is over: the cached representation is not needed any more
        self.cache, self.layers = None, {}
        if kind == "finetune":
            net = {k: np.array(a, copy=True) for k, a in update.arrays.items()}
            loss, err = _net.finetune_epoch(net, self.x, self.y, int(update.meta["epoch"]), ctx.rng(superstep),
                                            self.cfg.finetune, batches=self.cfg.finetune_batches)
            n = len(self.x)
            if self.cfg.finetune_batches is not None:
                n = min(n, self.cfg.finetune_batches * min(self.cfg.finetune.batch_size, n))
            return Update(net, num_samples=n, metrics={"loss": loss, "train_error": err})
        if kind == "idle":
            return Update()
        raise ValueError(f"unknown broadcast kind {kind!r}")


# --------------------------------------------------------------------------- master


def _did_you_mean(key: str, known: Any) -> str:
    close = closest_match(key, known)
    return f"; did you mean {close!r}?" if close else ""


class DBNMaster(Master):
    """Averages the workers' RBMs layer by layer, then fine-tunes (here or on the workers)."""

    @classmethod
    def input_columns(cls, params):
        return ["x", "y"]  # every worker reads both (_read_xy)

    @classmethod
    def check_input(cls, params, schemas):
        cfg = DBNConfig.from_params(params)
        check_example_schemas(schemas, cfg.n_visible, "algorithm.params.n_visible", not cfg.n_visible_given)

    @classmethod
    def input_paths(cls, params):
        cfg = DBNConfig.from_params(params)
        return [*(cfg.train or []), *([cfg.validation] if cfg.validation else []), *([cfg.test] if cfg.test else [])]

    @classmethod
    def check_params(cls, params):
        cfg = DBNConfig.from_params(params)
        if cfg.where == "master" and cfg.finetune.epochs > 0 and not cfg.train:
            raise ValueError("algorithm.params.train: the path of the labelled training data is needed for "
                             "finetune.where: master (or fine-tune on the workers: finetune.where: workers)")
        train = {os.path.normpath(p) for p in cfg.train or []}
        for key in ("validation", "test"):
            path = getattr(cfg, key)
            if path and os.path.normpath(path) in train:  # allowed, but its error says nothing of new data
                logging.getLogger("dbn").warning(
                    "algorithm.params.%s: %s is also training data (algorithm.params.train): its error will not "
                    "measure how the model does on data it has not seen", key, path)

    def setup(self, ctx):
        super().setup(ctx)
        self.cfg = cfg = DBNConfig.from_params(ctx.params)
        self.plan = cfg.schedule()
        self.P = len(self.plan)
        self.F = cfg.finetune.epochs
        self.step = 0                                # the superstep of the current broadcast
        self.finished: list[dict[str, np.ndarray]] = []  # W, b_vis, b_hid of finished layers
        self.rbm: dict[str, np.ndarray] | None = None    # the layer in training, with velocities
        self.recon: list[list[float]] = [[] for _ in cfg.layers]
        self.net: dict[str, np.ndarray] | None = None    # the classifier, with velocities
        self.curves: dict[str, list[float]] = {"loss": [], "train_error": [], "validation_error": []}
        self.best: dict[str, np.ndarray] | None = None
        self.best_val = math.inf
        self.best_epoch = -1
        self.avg: dict[str, np.ndarray] | None = None  # running mean of the epoch-end params (average_from)
        self.times: dict[str, float] = {}
        self.train = self.validation = self.test = None
        t0 = time.monotonic()
        if cfg.where == "master" and self.F > 0:
            if not cfg.train:
                raise ValueError("algorithm.params.train: the path of the labelled training data is needed "
                                 "for finetune.where: master")
            self.train = self._read_train([ctx.resolve(t) for t in cfg.train])
        if cfg.validation:
            self.validation = _read_path(ctx.resolve(cfg.validation), cfg)
        if cfg.test:
            self.test = _read_path(ctx.resolve(cfg.test), cfg)
        ctx.log.info("DBN master: %s, %d pre-training + %d fine-tuning supersteps (fine-tuning on the %s); "
                     "data loaded in %.1f s", "-".join(map(str, [cfg.n_visible, *cfg.layers, cfg.classes])),
                     self.P, self.F, cfg.where, time.monotonic() - t0)

    def _read_train(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        n = self.cfg.max_examples_per_worker
        if not n:
            return _read_path(paths, self.cfg)
        # the first n rows of each split of `train`: the workers' examples when `train` lists the
        # job's input paths, as the example job files do
        xs, ys = [], []
        for pieces in plan_splits(paths, self.ctx.num_workers, columns=["x", "y"]):
            x, y = _read_xy(pieces, self.cfg)
            xs.append(x[:n])
            ys.append(y[:n])
        return np.concatenate(xs), np.concatenate(ys)

    # ----------------------------------------------------------------- broadcasts
    def initial_update(self):
        self.step = 0
        self.rbm = _rbm.init_rbm(self.cfg.n_visible, self.cfg.layers[0], self.ctx.rng(0), self.cfg.rbm)
        return self._broadcast()

    def _broadcast(self) -> Update:
        s = self.step
        if s < self.P:
            layer, epoch, part = self.plan[s]
            arrays = dict(self.rbm)
            if layer > 0 and epoch == 0 and part == 0:
                arrays["prev/W"] = self.finished[layer - 1]["W"]
                arrays["prev/b"] = self.finished[layer - 1]["b_hid"]
            return Update(arrays, meta={"kind": "pretrain", "layer": layer, "epoch": epoch, "part": part})
        epoch = s - self.P
        if self.cfg.where == "workers":
            return Update(dict(self.net), meta={"kind": "finetune", "epoch": epoch})
        return Update(meta={"kind": "idle", "epoch": epoch})

    def catch_up(self):
        arrays = {}
        for i, p in enumerate(self.finished):
            arrays[f"layer{i}/W"] = p["W"]
            arrays[f"layer{i}/b"] = p["b_hid"]
        return Update(arrays, meta={"finished": len(self.finished)})

    # ----------------------------------------------------------------- combine
    def combine(self, updates, superstep):
        if superstep != self.step:
            raise RuntimeError(f"combine for superstep {superstep}, but the master is at {self.step}")
        rng = self.ctx.rng(superstep + 1)
        t0 = time.monotonic()
        if superstep < self.P:
            metrics = self._combine_pretrain(updates, superstep, rng)
            self.times["pretrain_combine"] = self.times.get("pretrain_combine", 0.0) + time.monotonic() - t0
        else:
            metrics = self._combine_finetune(updates, superstep - self.P, rng)
            self.times["finetune_master"] = self.times.get("finetune_master", 0.0) + time.monotonic() - t0
        self.step = superstep + 1
        if self.step >= self.P + self.F:
            return self._final(metrics)
        nxt = self._broadcast()
        return Update(nxt.arrays, metrics=metrics, meta=nxt.meta)

    def _combine_pretrain(self, updates, superstep, rng) -> dict[str, float]:
        layer, epoch, part = self.plan[superstep]
        self.rbm = weighted_average(updates, RBM_KEYS)
        err = average_metrics(updates).get("recon_error", float("nan"))
        self.recon[layer].append(float(err))
        metrics = {"recon_error": float(err)}
        last = superstep + 1 == self.P or self.plan[superstep + 1][0] != layer
        if last:
            self.finished.append({k: self.rbm[k] for k in _rbm.PARAM_KEYS})
            self.ctx.log.info("layer %d/%d pre-trained: reconstruction error %.4f", layer + 1,
                              len(self.cfg.layers), err)
            if layer + 1 < len(self.cfg.layers):
                self.rbm = _rbm.init_rbm(self.cfg.layers[layer], self.cfg.layers[layer + 1], rng, self.cfg.rbm)
            elif self.F > 0:  # the classifier to fine-tune: the stack and a new softmax layer
                self.rbm = None
                self.net = _net.init_classifier(_net.stack(self.finished), self.cfg.classes, rng)
            else:  # no fine-tuning: the stack is the model
                self.rbm = None
        return metrics

    def _params_only(self) -> dict[str, np.ndarray]:
        return {k: self.net[k].copy() for k in _net.param_keys(self.net)}

    def _combine_finetune(self, updates, epoch, rng) -> dict[str, float]:
        if self.cfg.where == "workers":
            self.net = weighted_average(updates, list(self.net))
            m = average_metrics(updates)
            loss, train_err = m.get("loss", float("nan")), m.get("train_error", float("nan"))
        else:
            loss, train_err = _net.finetune_epoch(self.net, self.train[0], self.train[1], epoch, rng,
                                                  self.cfg.finetune)
        extra = {}
        candidate = self._params_only()
        start = self.cfg.finetune.average_from
        if start is not None and epoch >= start:
            n = epoch - start + 1  # epochs start..epoch
            if self.avg is None or n == 1:
                self.avg = candidate
            else:  # running mean: avg += (p - avg) / n
                for k, p in candidate.items():
                    a = self.avg[k]
                    a += (p - a) / np.float32(n)
            if self.validation is not None:  # the last epoch's own error, for comparison
                extra["validation_error_last"] = _net.error_rate(candidate, *self.validation)
            candidate = {k: v.copy() for k, v in self.avg.items()}
        val = _net.error_rate(candidate, *self.validation) if self.validation is not None else float("nan")
        self.curves["loss"].append(float(loss))
        self.curves["train_error"].append(float(train_err))
        self.curves["validation_error"].append(float(val))
        # keep the best validation epoch (the last one when there is no validation set)
        if self.validation is None or val < self.best_val:
            self.best, self.best_val, self.best_epoch = candidate, float(val), epoch
        return {"loss": float(loss), "train_error": float(train_err), "validation_error": float(val), **extra}

    def _final(self, metrics: dict[str, float]) -> Final:
        if self.F > 0:
            params = self.best
            out = {"validation_error": float(self.best_val), "best_epoch": self.best_epoch}
            if self.test is not None:
                out["test_error"] = _net.error_rate(params, *self.test)
            self.ctx.log.info("final: %s", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in out.items()))
        else:  # no fine-tuning: the pre-trained stack, without the softmax it was never trained with
            params = {f"{k}{i}": v for i, (W, b) in enumerate(_net.stack(self.finished).layers)
                      for k, v in (("W", W), ("b", b))}
            out = {}
            self.ctx.log.info("final: no fine-tuning (finetune.epochs 0): the model is the pre-trained stack, "
                              "a feature extractor without a classifier")
        meta = {
            "sizes": _net.layer_sizes(params),
            "finetune_where": self.cfg.where,
            "pretrain_epochs": self.cfg.pretrain_epochs,
            "finetune_epochs": self.F,
            "best_epoch": self.best_epoch,
            "rbm_settings": self.cfg.rbm.to_dict(),
            "finetune_settings": self.cfg.finetune.to_dict(),
            "reconstruction_error": self.recon,
            "finetune_curves": self.curves,
        }
        return Final(params, num_samples=0, metrics={**metrics, **out}, meta=meta)

    # ----------------------------------------------------------------- progress
    def phase(self):
        s = self.step
        if s < self.P:
            layer, epoch, part = self.plan[s]
            txt = (f"pretrain layer {layer + 1}/{len(self.cfg.layers)} "
                   f"epoch {epoch + 1}/{self.cfg.pretrain_epochs[layer]}")
            if self.cfg.supersteps_per_epoch > 1:
                txt += f" part {part + 1}/{self.cfg.supersteps_per_epoch}"
            return txt
        if s < self.P + self.F:
            return f"finetune epoch {s - self.P + 1}/{self.F} ({self.cfg.where})"
        return "done"

    def total_supersteps(self):
        return self.P + self.F

    # ----------------------------------------------------------------- checkpoints
    def state(self):
        arrays: dict[str, np.ndarray] = {}
        for i, p in enumerate(self.finished):
            arrays.update({f"finished{i}/{k}": v for k, v in p.items()})
        groups = (("rbm", self.rbm), ("net", self.net), ("best", self.best), ("avg", self.avg))
        for name, d in groups:
            if d is not None:
                arrays.update({f"{name}/{k}": v for k, v in d.items()})
        meta = {
            "step": self.step, "finished": len(self.finished), "recon": self.recon, "curves": self.curves,
            "best_val": None if math.isinf(self.best_val) else self.best_val, "best_epoch": self.best_epoch,
            "has": [n for n, d in groups if d is not None],
        }
        return Update(arrays, meta=meta)

    def restore(self, state):
        m, a = state.meta, state.arrays

        def group(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) + 1:]: np.array(v, copy=True) for k, v in a.items() if k.startswith(prefix + "/")}

        self.step = int(m["step"])
        self.finished = [group(f"finished{i}") for i in range(int(m["finished"]))]
        self.rbm = group("rbm") if "rbm" in m["has"] else None
        self.net = group("net") if "net" in m["has"] else None
        self.best = group("best") if "best" in m["has"] else None
        self.avg = group("avg") if "avg" in m["has"] else None
        self.recon = [list(r) for r in m["recon"]]
        self.curves = {k: list(v) for k, v in m["curves"].items()}
        self.best_val = math.inf if m["best_val"] is None else float(m["best_val"])
        self.best_epoch = int(m["best_epoch"])
        if self.net is not None:  # key order matters to weighted_average callers and the model file
            self.net = {k: self.net[k] for k in _net.param_keys(self.net) + _net.velocity_keys(self.net)}

    # ----------------------------------------------------------------- output
    def save(self, final, output):
        buf = io.BytesIO()
        net = _net.stack(self.finished) if self.F == 0 else dict(final.arrays)  # kind "stack" or "classifier"
        _model.save(buf, net, meta={"trainer": "dbn.distributed", "metrics": final.metrics, **final.meta})
        output.write_bytes("model.avro", buf.getvalue())
        with tempfile.TemporaryDirectory() as tmp:
            pngs = {}
            if self.finished and self.finished[0]["W"].shape[0] == 784:
                pngs["filters.png"] = lambda p: _plots.filter_grid_png(self.finished[0]["W"], p)
            pngs["pretrain.png"] = lambda p: _plots.learning_curves_png(
                {f"layer {i + 1}": r for i, r in enumerate(self.recon)}, p, "RBM reconstruction error")
            if self.curves["train_error"]:
                pngs["finetune.png"] = lambda p: _plots.learning_curves_png(
                    {"train": self.curves["train_error"], "validation": self.curves["validation_error"]}, p,
                    f"Fine-tuning error rate ({self.cfg.where})")
            for name, draw in pngs.items():
                path = os.path.join(tmp, name)
                draw(path)
                with open(path, "rb") as f:
                    output.write_bytes(name, f.read())
