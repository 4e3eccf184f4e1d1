"""Multinomial logistic regression by parameter-averaged SGD (the KnittingBoar idea),
written with nothing but the public iterreduce API.

Every superstep each worker runs one epoch of mini-batch SGD on its split, starting
from the master's weights; the master averages the workers' weights (weighted by their
sample counts), evaluates on the test set, and after ``epochs`` supersteps writes the model.

Input: Parquet with a fixed-size-list column ``x`` (uint8 pixels, or floats) and an
integer column ``y`` (see ``python examples/mnist_dbn.py prepare``).
"""

from __future__ import annotations

import numpy as np

from iterreduce import Final, Master, Update, Worker, closest_match, weighted_average


def xy_from_table(table) -> tuple[np.ndarray, np.ndarray]:
    """x as float32 in [0, 1] (uint8 pixels are divided by 255), y as int64."""
    x = table.column("x").combine_chunks()
    width = x.type.list_size
    x = x.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    return x, table.column("y").to_numpy().astype(np.int64)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class LogRegWorker(Worker):
    def setup(self, ctx):
        self.x, self.y = xy_from_table(ctx.read_table(["x", "y"]))
        self.p = ctx.params

    def compute(self, update, superstep, ctx):
        W = update.arrays["W"].copy()
        b = update.arrays["b"].copy()
        lr = float(update.meta["learning_rate"])
        batch, l2 = int(self.p.get("batch_size", 100)), float(self.p.get("l2", 1e-4))
        order = ctx.rng(superstep).permutation(len(self.y))
        onehot = np.eye(W.shape[1], dtype=np.float32)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            xb = self.x[idx]
            delta = softmax(xb @ W + b)
            delta -= onehot[self.y[idx]]
            delta /= len(idx)
            W -= lr * (xb.T @ delta + l2 * W)
            b -= lr * delta.sum(axis=0)
        p = softmax(self.x @ W + b)
        loss = float(-np.log(p[np.arange(len(self.y)), self.y] + 1e-12).mean())
        err = float((p.argmax(axis=1) != self.y).mean())
        return Update({"W": W, "b": b}, num_samples=len(self.y), metrics={"loss": loss, "train_error": err})


class LogRegMaster(Master):
    PARAMS = {"epochs", "learning_rate", "decay", "batch_size", "l2", "features", "classes", "test"}

    @classmethod
    def input_columns(cls, params):  # what the workers read: every input file must have them, of one type
        return ["x", "y"]

    @classmethod
    def input_paths(cls, params):  # what the master reads itself: validate/run/submit check they exist
        return [params["test"]] if params.get("test") else []

    @classmethod
    def check_params(cls, params):  # called by `iterreduce validate/run/submit` before anything starts
        for key, value in params.items():
            if key not in cls.PARAMS:
                close = closest_match(key, cls.PARAMS)
                hint = f"did you mean {close!r}? " if close else ""
                raise ValueError(f"algorithm.params.{key}: unknown parameter "
                                 f"({hint}known: {', '.join(sorted(cls.PARAMS))})")
            if key == "test":
                if not isinstance(value, str):
                    raise ValueError(f"algorithm.params.test: expected a path, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"algorithm.params.{key}: expected a positive number, got {value!r}")

    def setup(self, ctx):
        super().setup(ctx)
        self.p = ctx.params
        self.epochs = int(self.p.get("epochs", 10))
        self.epoch = 0
        self.test = None
        if self.p.get("test"):
            self.test = xy_from_table(ctx.read_table(self.p["test"], ["x", "y"]))

    def _lr(self) -> float:
        return float(self.p.get("learning_rate", 0.5)) * float(self.p.get("decay", 0.8)) ** self.epoch

    def initial_update(self):
        d, k = int(self.p.get("features", 784)), int(self.p.get("classes", 10))
        return Update({"W": np.zeros((d, k), np.float32), "b": np.zeros(k, np.float32)},
                      meta={"learning_rate": self._lr()})

    def combine(self, updates, superstep):
        avg = weighted_average(updates)
        self.epoch = superstep + 1
        metrics = {}
        if self.test is not None:
            x, y = self.test
            metrics["test_error"] = float(((x @ avg["W"] + avg["b"]).argmax(axis=1) != y).mean())
        if self.epoch >= self.epochs:
            return Final(avg, metrics=metrics, meta={"epochs": self.epoch})
        return Update(avg, metrics=metrics, meta={"learning_rate": self._lr()})

    def phase(self):
        return f"epoch {self.epoch + 1}/{self.epochs}"

    def total_supersteps(self):
        return self.epochs

    def state(self):
        return Update(meta={"epoch": self.epoch})

    def restore(self, state):
        self.epoch = state.meta["epoch"]
