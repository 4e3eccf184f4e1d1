"""A small deterministic algorithm for the runtime tests: linear regression by
parameter-averaged SGD on synthetic Parquet data, with switches to misbehave
(die, hang, send NaN) at a chosen superstep."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iterreduce import Final, Master, RecordError, Update, Worker, weighted_average

from .helpers import misbehave

DIM = 8


def write_dataset(directory: Path, rows: int = 4000, files: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=DIM).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    per = rows // files
    for i in range(files):
        x = rng.normal(size=(per, DIM)).astype(np.float32)
        y = (x @ w_true + 0.1 * rng.normal(size=per)).astype(np.float32)
        t = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM), "y": y})
        pq.write_table(t, directory / f"part-{i:05d}.parquet", row_group_size=per // 2)
    return directory


def spoil_record(data: Path) -> Path:
    """Make row 742 of ``data``'s part-00003.parquet (its second row group) non-finite."""
    bad = data / "part-00003.parquet"
    t = pq.read_table(bad)
    y = t.column("y").to_numpy().copy()
    y[742] = np.inf
    pq.write_table(t.set_column(t.schema.get_field_index("y"), "y", pa.array(y)), bad, row_group_size=500)
    return bad


def finite_rows(table: pa.Table) -> None:
    """A ``read_table`` check: every x and y finite."""
    y = table.column("y").to_numpy()
    x = table.column("x").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    bad = ~(np.isfinite(y) & np.isfinite(x).all(axis=1))
    if bad.any():
        raise RecordError(int(np.flatnonzero(bad)[0]), "x or y is not finite")


class LinRegWorker(Worker):
    def setup(self, ctx):
        t = ctx.read_table(["x", "y"], check=finite_rows)
        self.x = t.column("x").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
        self.y = t.column("y").to_numpy()
        self.params = ctx.params

    def compute(self, update, superstep, ctx):
        p = self.params
        misbehave(p, superstep, ctx.split_index)
        w = update.arrays["w"].copy()
        rng = ctx.rng(superstep)
        order = rng.permutation(len(self.y))
        lr = p.get("lr", 0.05)
        for start in range(0, len(order), 50):
            idx = order[start:start + 50]
            xb, yb = self.x[idx], self.y[idx]
            grad = xb.T @ (xb @ w - yb) / len(idx)
            w -= lr * grad
        if superstep == p.get("raise_at") and (ctx.split_index == 1 or p.get("raise_everywhere")):
            # once with raise_marker, else every time
            marker = p.get("raise_marker")
            if not marker or not os.path.exists(marker):
                if marker:
                    Path(marker).write_text("raised")
                raise RuntimeError(f"compute broke at superstep {superstep}")
        if superstep == p.get("return_none_at") and ctx.split_index == 0:
            return None
        if superstep == p.get("nan_at") and ctx.split_index == 1:
            w[0] = np.nan
        mse = float(np.mean((self.x @ w - self.y) ** 2))
        if superstep == p.get("huge_at") and ctx.split_index == 0:  # 1 GiB of untouched zero pages
            return Update({"w": w, "huge": np.zeros(1 << 28, np.float32)}, num_samples=len(self.y))
        if superstep == p.get("wide_at") and ctx.split_index == p.get("wide_split", 0):
            w = np.append(w, np.float32(0))  # one array of another shape than the other splits'
        if p.get("global_rng"):  # numpy's and Python's global generators, not ctx.rng
            w = w + np.float32(1e-3 * random.random()) * np.random.standard_normal(DIM).astype(np.float32)
        out = Update({"w": w}, num_samples=len(self.y), metrics={"mse": mse})
        if superstep == p.get("spoil_metric_at"):  # changed after it was made
            out.metrics["col_var"] = self.x.var(axis=0)
        return out


class LinRegMaster(Master):
    def setup(self, ctx):
        super().setup(ctx)
        self.steps = ctx.params.get("supersteps", 6)
        self.done_steps = 0
        self._broken(ctx.params, "setup")

    @staticmethod
    def _broken(params, hook):
        if params.get("master_raises_in") == hook:
            raise RuntimeError(f"{hook} broke")

    def initial_update(self):
        self._broken(self.ctx.params, "initial_update")
        rng = self.ctx.rng(0)
        return Update({"w": rng.normal(scale=0.1, size=DIM).astype(np.float32)})

    def combine(self, updates, superstep):
        if superstep == 2:
            self._broken(self.ctx.params, "combine")
        if self.ctx.params.get("forgetful") and self.done_steps != superstep:  # its state() keeps nothing
            raise RuntimeError(f"done_steps is {self.done_steps} at superstep {superstep}")
        w = weighted_average(updates)["w"]
        self.done_steps = superstep + 1
        if self.done_steps >= self.steps:
            return Final({"w": w}, metrics={"supersteps": float(self.done_steps)})
        if self.ctx.params.get("global_rng"):
            w = w + np.float32(1e-3 * random.random()) * np.random.standard_normal(DIM).astype(np.float32)
        out = Update({"w": w}, meta={"superstep": self.done_steps})
        if self.ctx.params.get("master_spoils") == "combine":  # changed after it was made
            out.metrics["status"] = "ok"
        return out

    def phase(self):
        return f"sgd step {self.done_steps}"

    def total_supersteps(self):
        return self.steps

    def state(self):
        self._broken(self.ctx.params, "state")
        out = Update(meta={} if self.ctx.params.get("forgetful") else {"done_steps": self.done_steps})
        if self.ctx.params.get("master_spoils") == "state":
            out.meta["done_steps"] = np.int64(self.done_steps)
        return out

    def catch_up(self):
        return {"w": None} if self.ctx.params.get("master_spoils") == "catch_up" else None

    def restore(self, state):
        self.done_steps = state.meta.get("done_steps", 0)
