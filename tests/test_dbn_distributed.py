"""The distributed DBN (dbn.distributed) end to end: real worker processes via the CLI.

* the CI-sized job (examples/dbn-quick.yaml) reaches < 5% test error and writes the model,
  the pictures and the metrics;
* a worker SIGKILLed in the middle of the second layer, a master killed and resumed from a
  checkpoint, and a worker killed during fine-tuning on the workers all give a model
  identical to the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import dbn
from dbn import network as N
from dbn import rbm as R
from dbn.data import read_parquet_dir
from dbn.distributed import DBNConfig, DBNMaster, DBNWorker
from dbn.network import param_keys
from dbn.plots import read_png
from iterreduce import MasterContext, Update, WorkerContext
from iterreduce.fs import Output, plan_splits

from .helpers import cli, run_and_kill_after_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def with_data(spec: dict, data: Path, out: Path) -> dict:
    spec["input"]["paths"] = [str(data / "train")]
    p = spec["algorithm"]["params"]
    p["train"], p["validation"], p["test"] = (str(data / s) for s in ("train", "validation", "test"))
    spec["output"] = str(out)
    return spec


def write_job(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_same_model(a: Path, b: Path) -> None:
    ma, mb = dbn.load(a / "model.avro"), dbn.load(b / "model.avro")
    assert sorted(ma.params) == sorted(mb.params)
    for k in ma.params:
        np.testing.assert_array_equal(ma.params[k], mb.params[k], err_msg=k)
    fa, fb = metrics(a)["final"]["metrics"], metrics(b)["final"]["metrics"]
    assert fa == fb


# ------------------------------------------------------------------ the quick job


def test_quick_job_reaches_under_5_percent_and_writes_everything(tmp_path, mnist_parquet):
    spec = yaml.safe_load((ROOT / "examples" / "dbn-quick.yaml").read_text())
    assert spec["workers"]["count"] == 2
    out = tmp_path / "out"
    job = write_job(tmp_path / "quick.yaml", with_data(spec, mnist_parquet, out))
    res = cli("run", str(job))
    assert res.returncode == 0, res.stderr
    m = metrics(out)
    final = m["final"]["metrics"]
    assert final["test_error"] < 0.05, f"test error {final['test_error']:.4f}"
    assert 0 <= final["best_epoch"] < spec["algorithm"]["params"]["finetune"]["epochs"]
    assert final["validation_error"] < 0.06
    p = spec["algorithm"]["params"]
    n_pre = len(p["layers"]) * p["pretrain"]["epochs"]
    assert len(m["history"]) == n_pre + p["finetune"]["epochs"] == m["supersteps"]
    assert m["history"][0]["phase"] == f"pretrain layer 1/{len(p['layers'])} epoch 1/{p['pretrain']['epochs']}"
    assert m["history"][-1]["phase"].startswith("finetune epoch")
    # the model file: loadable, and its predictions give the reported error
    model = dbn.load(out / "model.avro")
    assert model.sizes == [784, *p["layers"], 10]
    x, y = read_parquet_dir(mnist_parquet / "test")
    assert model.error_rate(x, y) == pytest.approx(final["test_error"], abs=1e-12)
    for name in ("filters.png", "pretrain.png", "finetune.png"):
        img = read_png(out / name)
        assert img.size > 0 and img.max() > img.min(), name
    # README "Using a trained model", as written (paths of this test's files)
    import re

    snippet = re.search(r"## Using a trained model.*?```python\n(.*?)```", (ROOT / "README.md").read_text(),
                        re.S).group(1)
    snippet = (snippet.replace('"out/dbn-quick/', f'"{out}/').replace('"data/mnist/test"', f'"{mnist_parquet / "test"}"')
               .replace('"out/features"', f'"{tmp_path / "features"}"'))
    scope = {"x": x}
    exec(snippet, scope)
    np.testing.assert_array_equal(scope["labels"], model.predict(x))
    assert np.mean(scope["labels"] != y) == pytest.approx(final["test_error"], abs=1e-12)
    assert scope["probs"].shape == (len(x), 10) and scope["h"].shape == (len(x), p["layers"][-1])
    feats = pq.read_table(tmp_path / "features")
    assert feats.num_rows == len(x) and feats.column("y").to_numpy().tolist() == y.tolist()


# ------------------------------------------------------------------ faults (tiny nets)


def tiny_spec(data: Path, out: Path, where: str = "master", worker: str = "dbn.distributed:DBNWorker",
              checkpoint_every: int = 0, **extra) -> dict:
    spec = {
        "name": "dbn-tiny", "seed": 3,
        "workers": {"count": 2, "max_restarts": 2},
        "input": {"paths": [str(data / "train")]},
        "output": str(out),
        "checkpoint": {"every": checkpoint_every, "keep": 2},
        "heartbeat": {"interval": 0.2, "timeout": 20.0, "master_timeout": 5},
        "algorithm": {
            "master": "dbn.distributed:DBNMaster", "worker": worker,
            "params": {
                "layers": [48, 32], "max_examples_per_worker": 600,
                "pretrain": {"epochs": 3, "batch_size": 50},
                "finetune": {"where": where, "epochs": 3, "batch_size": 50, "learning_rate": 0.3},
                "extra": extra,
            },
        },
    }
    return with_data(spec, data, out)


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory, mnist_parquet):
    tmp = tmp_path_factory.mktemp("dbn-baseline")
    out = tmp / "out"
    res = cli("run", str(write_job(tmp / "job.yaml", tiny_spec(mnist_parquet, out))))
    assert res.returncode == 0, res.stderr
    return out


def test_without_fine_tuning_the_model_is_the_pre_trained_stack(tmp_path, mnist_parquet):
    import subprocess
    import sys

    spec = tiny_spec(mnist_parquet, tmp_path / "out")
    spec["algorithm"]["params"]["finetune"]["epochs"] = 0
    res = cli("run", str(write_job(tmp_path / "job.yaml", spec)))
    assert res.returncode == 0, res.stderr
    assert "the model is the pre-trained stack, a feature extractor without a classifier" in res.stderr
    model = dbn.load(tmp_path / "out" / "model.avro")
    assert model.kind == "stack" and model.sizes == [784, 48, 32]  # not a softmax that was never trained
    final = json.loads((tmp_path / "out" / "metrics.json").read_text())["final"]["metrics"]
    assert "test_error" not in final and "validation_error" not in final, final  # no softmax measured
    dbn_cli = [sys.executable, "-m", "dbn.cli"]
    res = subprocess.run([*dbn_cli, "evaluate", str(tmp_path / "out" / "model.avro"), str(mnist_parquet / "test")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "a pre-trained stack without an output layer" in res.stderr, res.stderr
    assert model.features(np.zeros((2, 784), np.uint8)).shape == (2, 32)


def test_a_label_outside_the_classes_fails_the_job_naming_its_file_and_row(tmp_path, mnist_parquet):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(mnist_parquet, data)
    shard = sorted((data / "train").glob("*.parquet"))[-1]
    t = pq.read_table(shard)
    y = t.column("y").to_numpy().copy()
    y[123] = 10
    pq.write_table(t.set_column(t.schema.get_field_index("y"), "y", pa.array(y)), shard)
    out = tmp_path / "out"
    res = cli("run", str(write_job(tmp_path / "job.yaml", tiny_spec(data, out, where="workers"))))
    assert res.returncode != 0
    assert f"input file {shard}, row 123: label 10 is not a class of 0..9" in res.stderr
    assert metrics(out)["replacements"] == 0
    # the same record read by the master (its test data): one line, not a traceback, and final
    test_shard = sorted((data / "test").glob("*.parquet"))[0]
    shutil.copy(shard, test_shard)
    spec = tiny_spec(mnist_parquet, tmp_path / "out2")
    spec["algorithm"]["params"]["test"] = str(data / "test")
    res = cli("run", str(write_job(tmp_path / "job2.yaml", spec)))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert (f"the master's input: input file {test_shard}, row 123: label 10 is not a class of 0..9 "
            "(algorithm.params.classes is 10); fix the input or the job file and run the job again") in res.stderr
    from iterreduce.appmaster import AppMaster, JobFailed
    from iterreduce.containers import LocalLauncher
    from iterreduce.job import load_job

    job = load_job(tmp_path / "job2.yaml")
    with pytest.raises(JobFailed) as err:
        AppMaster(job, LocalLauncher(tmp_path / "logs")).run()
    assert err.value.retry is False  # on YARN: no second attempt reading it again
    # a test path that does not exist is refused before anything starts
    spec["algorithm"]["params"]["test"] = str(data / "tset")
    res = cli("validate", str(write_job(tmp_path / "job3.yaml", spec)))
    assert res.returncode != 0
    assert f"algorithm.params.test: input path {data / 'tset'}: does not exist" in res.stderr
    # a misspelt parameter: named, with the likely one
    spec["algorithm"]["params"]["test"] = str(data / "test")
    spec["algorithm"]["params"]["finetune"]["epoch"] = 3
    res = cli("validate", str(write_job(tmp_path / "job4.yaml", spec)))
    assert res.returncode != 0
    assert "algorithm.params.finetune.epoch: unknown parameter; did you mean 'epochs'?" in res.stderr, res.stderr


def test_tiny_run_learns(tiny_baseline):
    m = metrics(tiny_baseline)
    assert m["state"] == "SUCCEEDED" and m["replacements"] == 0
    assert len(m["history"]) == 2 * 3 + 3
    assert m["final"]["metrics"]["test_error"] < 0.5  # 1200 examples, 3 epochs: better than chance (0.9)


def test_worker_killed_mid_second_layer_gives_the_same_model(tmp_path, mnist_parquet, tiny_baseline):
    marker = tmp_path / "died"
    out = tmp_path / "out"
    # supersteps 0-2: layer 1; 3-5: layer 2. Die at 4: the replacement must rebuild layer 1's output
    spec = tiny_spec(mnist_parquet, out, worker="tests.dbn_faults:FaultyDBNWorker",
                     die_at=4, die_split=1, die_marker=str(marker))
    res = cli("run", str(write_job(tmp_path / "job.yaml", spec)))
    assert res.returncode == 0, res.stderr
    assert marker.exists(), "the worker never reached its SIGKILL"
    assert metrics(out)["replacements"] == 1
    assert_same_model(out, tiny_baseline)


def test_master_killed_and_resumed_gives_the_same_model(tmp_path, mnist_parquet, tiny_baseline):
    out = tmp_path / "out"
    spec = tiny_spec(mnist_parquet, out, worker="tests.dbn_faults:FaultyDBNWorker", checkpoint_every=1, sleep=0.4)
    job = write_job(tmp_path / "job.yaml", spec)
    run_and_kill_after_checkpoint(job, out / "checkpoints", 4)  # in the middle of layer 2 (supersteps 3-5)
    assert not (out / "model.avro").exists()
    res = cli("run", "--resume", str(job))
    assert res.returncode == 0, res.stderr
    assert "resumed from checkpoint" in res.stderr
    assert_same_model(out, tiny_baseline)
    assert [h["superstep"] for h in metrics(out)["history"]] == list(range(9))


def test_finetuning_on_workers_survives_a_lost_worker(tmp_path, mnist_parquet):
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    res = cli("run", str(write_job(tmp_path / "plain.yaml", tiny_spec(mnist_parquet, plain, where="workers"))))
    assert res.returncode == 0, res.stderr
    m = metrics(plain)
    assert m["final"]["metrics"]["test_error"] < 0.75  # averaging halves the steps: slower, but learning
    assert m["history"][-1]["phase"] == "finetune epoch 3/3 (workers)"
    assert m["history"][-1]["workers"]["train_error"] < 0.85  # the workers did the fine-tuning (chance: 0.9)
    marker = tmp_path / "died"
    spec = tiny_spec(mnist_parquet, killed, where="workers", worker="tests.dbn_faults:FaultyDBNWorker",
                     die_at=7, die_split=0, die_marker=str(marker))
    res = cli("run", str(write_job(tmp_path / "killed.yaml", spec)))
    assert res.returncode == 0, res.stderr
    assert marker.exists() and metrics(killed)["replacements"] == 1
    assert_same_model(killed, plain)


# ------------------------------------------------------------------ in process (no runtime)


class InProcessJob:
    """A DBN master and its workers driven by hand in this process (no runtime, no sockets).

    ``splits``: one per worker (by default the training path cut in two); ``same_index``
    gives every worker split index 0, so that workers on the same split draw the same
    random numbers. ``master()`` is a set-up master, ``workers(start, catch_up)`` one set-up
    worker per split, ``step`` one superstep, ``snapshot`` a deep copy of ``master.state()``."""

    def __init__(self, params, seed, out_dir, splits, same_index=False):
        self.params, self.seed, self.out_dir, self.splits = params, seed, out_dir, splits
        self.same_index = same_index
        self.log = logging.getLogger("test")

    def master(self):
        m = DBNMaster()
        m.setup(MasterContext(params=self.params, seed=self.seed, num_workers=len(self.splits),
                              output=Output(str(self.out_dir)).create(), log=self.log))
        return m

    def workers(self, start=0, catch_up=None):
        out = []
        for i, sp in enumerate(self.splits):
            ctx = WorkerContext(params=self.params, seed=self.seed, split_index=0 if self.same_index else i,
                                num_splits=len(self.splits), split=sp, catch_up=catch_up, start_superstep=start,
                                log=self.log)
            w = DBNWorker()
            w.setup(ctx)
            out.append((w, ctx))
        return out

    @staticmethod
    def step(m, ws, b, s):
        return m.combine([w.compute(b, s, ctx) for w, ctx in ws], s)

    @staticmethod
    def snapshot(m):
        st = m.state()
        return Update({k: v.copy() for k, v in st.arrays.items()}, meta=json.loads(json.dumps(st.meta)))


def halves(mnist_parquet):
    return plan_splits([str(mnist_parquet / "train")], 2)


def test_in_process_phases_catch_up_and_restore_mid_finetuning(tmp_path, mnist_parquet):
    """Master and workers driven by hand: phases, total supersteps, catch-up contents, and a
    master restored from state() in the middle of fine-tuning finishing with the same model."""
    params = {"layers": [24, 16], "max_examples_per_worker": 300, "train": str(mnist_parquet / "train"),
              "validation": str(mnist_parquet / "validation"), "test": str(mnist_parquet / "test"),
              "pretrain": {"epochs": [2, 1], "batch_size": 50},
              "finetune": {"where": "master", "epochs": 3, "batch_size": 50, "learning_rate": 0.3}}
    job = InProcessJob(params, 5, tmp_path, halves(mnist_parquet))
    master, workers, step = job.master, job.workers, job.step
    m, ws = master(), workers()
    assert m.total_supersteps() == 3 + 3
    b = m.initial_update()
    phases = [m.phase()]
    saved = None
    for s in range(6):
        if s == 2:  # layer 2 starts: the broadcast carries layer 1, the catch-up too
            assert set(b.arrays) >= {"prev/W", "prev/b"} and m.catch_up().meta["finished"] == 1
            # a replacement joining now rebuilds layer 1's output from the catch-up alone
            late = workers(2, m.catch_up())
            r1, r2 = ws[1][0].compute(b, 2, ws[1][1]), late[1][0].compute(
                Update({k: v for k, v in b.arrays.items() if not k.startswith("prev/")}, meta=b.meta), 2, late[1][1])
            for k in r1.arrays:
                np.testing.assert_array_equal(r1.arrays[k], r2.arrays[k])
        if s == 4:
            saved = (job.snapshot(m), b)
        b = step(m, ws, b, s)
        phases.append(m.phase())
    assert phases[:6] == ["pretrain layer 1/2 epoch 1/2", "pretrain layer 1/2 epoch 2/2",
                          "pretrain layer 2/2 epoch 1/1",
                          "finetune epoch 1/3 (master)", "finetune epoch 2/3 (master)", "finetune epoch 3/3 (master)"]
    assert type(b).__name__ == "Final" and set(b.metrics) >= {"test_error", "validation_error", "best_epoch"}
    m2 = master()
    m2.restore(saved[0])
    assert m2.phase() == "finetune epoch 2/3 (master)"
    b2 = saved[1]
    for s in (4, 5):
        b2 = step(m2, ws, b2, s)
    assert b2.metrics == b.metrics
    for k in b.arrays:
        np.testing.assert_array_equal(b.arrays[k], b2.arrays[k])
    m2.save(b2, Output(str(tmp_path)))
    assert {"model.avro", "filters.png", "pretrain.png", "finetune.png"} <= set(Output(str(tmp_path)).list())


# ------------------------------------------------------------------ averaging vs. serial training


def test_one_worker_equals_serial_training(tmp_path, mnist_parquet):
    """A job with one worker process (fine-tuning on the workers too) gives exactly the model of
    plain serial training with dbn.rbm / dbn.network and the same random streams: the runtime,
    the transport and the averaging of a single update change nothing."""
    out = tmp_path / "out"
    spec = tiny_spec(mnist_parquet, out, where="workers")
    spec["workers"]["count"] = 1
    res = cli("run", str(write_job(tmp_path / "job.yaml", spec)))
    assert res.returncode == 0, res.stderr

    seed, p = spec["seed"], spec["algorithm"]["params"]
    master_rng = lambda s: np.random.default_rng([seed, 0x6D61, s])  # noqa: E731  (MasterContext.rng)
    worker_rng = lambda s: np.random.default_rng([seed, 0, s])       # noqa: E731  (WorkerContext.rng, split 0)
    x, y = read_parquet_dir(mnist_parquet / "train")
    n = p["max_examples_per_worker"]
    x, y = x[:n], y[:n]
    rs = R.RBMSettings(batch_size=p["pretrain"]["batch_size"])
    fs = N.FinetuneSettings(**{k: v for k, v in p["finetune"].items() if k != "where"})
    step, data, finished = 0, x, []
    sizes = [784, *p["layers"]]
    params = R.init_rbm(sizes[0], sizes[1], master_rng(0), rs)
    recon = []
    for layer in range(len(p["layers"])):
        if layer:
            data = R.transform(data, finished[-1])
            params = R.init_rbm(sizes[layer], sizes[layer + 1], master_rng(step), rs)
        for epoch in range(p["pretrain"]["epochs"]):
            recon.append(R.train_epoch(params, data, epoch, worker_rng(step), rs))
            step += 1
        finished.append({k: params[k] for k in R.PARAM_KEYS})
    net = N.init_classifier(N.stack(finished), 10, master_rng(step))
    xv, yv = read_parquet_dir(mnist_parquet / "validation")
    best, best_val = None, np.inf
    for epoch in range(fs.epochs):
        N.finetune_epoch(net, x, y, epoch, worker_rng(step), fs)
        step += 1
        val = N.error_rate(net, xv, yv)
        if val < best_val:
            best, best_val = {k: net[k].copy() for k in N.param_keys(net)}, val

    model = dbn.load(out / "model.avro")
    assert sorted(model.params) == sorted(best)
    for k in best:
        np.testing.assert_array_equal(model.params[k], best[k], err_msg=k)
    m = metrics(out)
    assert [h["master"]["recon_error"] for h in m["history"][:step - fs.epochs]] == pytest.approx(recon, rel=1e-12)
    assert m["final"]["metrics"]["validation_error"] == best_val


def test_identical_splits_averaged_equal_one_worker(tmp_path, mnist_parquet):
    """K workers that hold the same split and draw the same random numbers send the same
    update; the master's weighted average of them (parameters and momentum, pre-training and
    fine-tuning on the workers) must equal what one worker alone gives, bit for bit."""
    params = {"layers": [24, 16], "max_examples_per_worker": 250, "train": str(mnist_parquet / "train"),
              "validation": str(mnist_parquet / "validation"),
              "pretrain": {"epochs": 2, "batch_size": 50},
              "finetune": {"where": "workers", "epochs": 2, "batch_size": 50, "learning_rate": 0.3}}
    split = plan_splits([str(mnist_parquet / "train")], 1)[0]

    def run(k: int, out: Path):
        # the same split and split index: the same data and the same random streams
        job = InProcessJob(params, 9, out, [split] * k, same_index=True)
        m, ws = job.master(), job.workers()
        b, history = m.initial_update(), []
        for s in range(m.total_supersteps()):
            b = job.step(m, ws, b, s)
            history.append(b.metrics)
        return b, history

    one, h1 = run(1, tmp_path / "one")
    for k in (2, 4):
        many, hk = run(k, tmp_path / f"k{k}")
        assert hk == h1
        assert sorted(many.arrays) == sorted(one.arrays)
        for name in one.arrays:
            np.testing.assert_array_equal(many.arrays[name], one.arrays[name], err_msg=f"{k} workers: {name}")
    # and the workers' updates really differ from the broadcast: averaging was not a no-op
    assert h1[0]["recon_error"] > h1[1]["recon_error"] > 0


def test_master_fine_tunes_on_several_training_paths(tmp_path, mnist_parquet):
    """``train`` may list several paths (e.g. train + validation for a final fit on all the
    labelled data); anything but a path or a list of paths is refused, naming the field."""
    paths = [str(mnist_parquet / "train"), str(mnist_parquet / "validation")]
    m = InProcessJob({"layers": [8], "train": paths, "finetune": {"epochs": 1}}, 1, tmp_path,
                     halves(mnist_parquet)).master()
    n = sum(len(read_parquet_dir(p)[1]) for p in paths)
    assert len(m.train[0]) == len(m.train[1]) == n
    for bad in (3, [], ["a", 4]):
        with pytest.raises(ValueError, match="algorithm.params.train"):
            DBNConfig.from_params({"train": bad})


def test_weight_averaging_keeps_the_mean_of_the_epoch_end_parameters(tmp_path, mnist_parquet):
    """``finetune.average_from: 1``: the model is the mean of the parameters at the end of
    epochs 1 and 2 (not the last epoch's), a master restored between the two averaged
    epochs ends with the same model, and the setting is range-checked."""

    params = {"layers": [16], "max_examples_per_worker": 200, "train": str(mnist_parquet / "train"),
              "test": str(mnist_parquet / "test"),
              "pretrain": {"epochs": 1, "batch_size": 50},
              "finetune": {"where": "master", "epochs": 3, "batch_size": 50, "learning_rate": 0.3,
                           "average_from": 1}}
    job = InProcessJob(params, 3, tmp_path, halves(mnist_parquet))
    ws, m = job.workers(), job.master()
    b = m.initial_update()
    ends, saved = [], None
    for s in range(4):  # 1 pre-training + 3 fine-tuning supersteps
        if s == 3:
            saved = (job.snapshot(m), b)
        b = job.step(m, ws, b, s)
        if s >= 1:
            ends.append({k: m.net[k].copy() for k in param_keys(m.net)})
    assert type(b).__name__ == "Final" and set(b.metrics) >= {"test_error"}
    keys = param_keys(ends[0])
    assert set(b.arrays) == set(keys)
    for k in keys:
        np.testing.assert_allclose(b.arrays[k], (ends[1][k] + ends[2][k]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(b.arrays["W0"], ends[2]["W0"])  # not simply the last epoch's
    # restored after the first averaged epoch: the same model
    m2 = job.master()
    m2.restore(saved[0])
    b2 = job.step(m2, ws, saved[1], 3)
    for k in keys:
        np.testing.assert_array_equal(b.arrays[k], b2.arrays[k])
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValueError, match="algorithm.params.finetune.average_from"):
            DBNConfig.from_params({"finetune": {"average_from": bad}})
    with pytest.raises(ValueError, match=r"average_from: 50 is not an epoch of fine-tuning \(epochs 0..49\)"):
        DBNConfig.from_params({"finetune": {"epochs": 50, "average_from": 50}})
    assert DBNConfig.from_params({"finetune": {"average_from": None}}).finetune.average_from is None


# ------------------------------------------------------------------ features that are not pixels


def _tabular(directory: Path, rng: np.random.Generator, rows: int, shards: int, centres: np.ndarray,
             x_type=None) -> None:
    """Float features in [0, 1] (not images): noisy copies of one centre per class."""
    y = rng.integers(0, len(centres), rows)
    x = np.clip(centres[y] + rng.normal(0, 0.15, (rows, centres.shape[1])), 0, 1)
    directory.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        col = pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel(), x_type or pa.float64()), x.shape[1])
        pq.write_table(pa.table({"x": col, "y": y[part]}), directory / f"part-{i:05d}.parquet", row_group_size=100)


def test_a_dbn_trains_on_float_features_in_0_1_and_validate_refuses_what_their_schemas_show(tmp_path):
    rng = np.random.default_rng(11)
    centres = rng.random((3, 16))
    data = tmp_path / "data"
    for name, rows, shards in (("train", 1200, 4), ("validation", 300, 1), ("test", 300, 1)):
        _tabular(data / name, rng, rows, shards, centres)
    spec = tiny_spec(data, tmp_path / "out")
    p = spec["algorithm"]["params"]
    p.update(n_visible=16, classes=3, layers=[24, 12])
    p["pretrain"].update(epochs=5, batch_size=20)
    p["finetune"].update(epochs=10, batch_size=20, learning_rate=0.5)
    del p["max_examples_per_worker"], p["extra"]
    job = write_job(tmp_path / "job.yaml", spec)
    res = cli("validate", str(job))
    assert res.returncode == 0, res.stderr
    res = cli("run", str(job))
    assert res.returncode == 0, res.stderr
    final = metrics(tmp_path / "out")["final"]["metrics"]
    assert final["test_error"] < 0.1, final  # three well-separated classes
    pretrained = metrics(tmp_path / "out")["history"][9]  # the last pre-training epoch: no untrained softmax measured
    assert pretrained["phase"] == "pretrain layer 2/2 epoch 5/5" and set(pretrained["master"]) == {"recon_error"}
    x, y = read_parquet_dir(data / "test")
    assert x.dtype == np.float32 and x.shape == (300, 16)
    model = dbn.load(tmp_path / "out" / "model.avro")
    assert model.error_rate(x, y) == final["test_error"]
    res = subprocess.run([sys.executable, "-m", "dbn.cli", "evaluate", str(tmp_path / "out" / "model.avro"),
                          str(data / "test")], capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["error_rate"] == final["test_error"], res.stderr

    # what the files' schemas show is refused by validate, naming the files, with nothing made
    cases = {
        "labels": lambda t: t.set_column(t.schema.get_field_index("y"), "y", t.column("y").cast(pa.float64())),
        "pixels": lambda t: t.set_column(t.schema.get_field_index("x"), "x", pc_pixels(t)),
        "width": lambda t: t.set_column(t.schema.get_field_index("x"), "x", pa.FixedSizeListArray.from_arrays(
            t.column("x").combine_chunks().values.slice(0, len(t) * 8), 8)),
    }
    expected = {
        "labels": "column 'y' is double in {f}: expected integer labels",
        "pixels": "column 'x' holds integer pixels 0..255 in {f} but floats in [0, 1] in {others}: give data of "
                  "one kind",
        "width": "column 'x' has 8 values per example in {f}, 16 are expected (algorithm.params.n_visible is 16)",
    }
    for case, spoil in cases.items():
        train = tmp_path / case
        shutil.copytree(data / "train", train)
        f = train / "part-00002.parquet"
        pq.write_table(spoil(pq.read_table(f)), f)
        bad = write_job(tmp_path / f"{case}.yaml", {**spec, "input": {"paths": [str(train)]},
                                                    "output": str(tmp_path / f"out-{case}")})
        res = cli("validate", str(bad))
        others = ", ".join(str(train / f"part-0000{i}.parquet") for i in (0, 1, 3))
        words = expected[case].format(f=f, others=others)
        assert res.returncode == 1 and f"{bad}: input: {words}" in res.stderr, (case, res.stderr)
        assert not (tmp_path / f"out-{case}").exists()
    # n_visible left out of the job file: its default is named as such
    del p["n_visible"]
    res = cli("validate", str(write_job(tmp_path / "default.yaml", spec)))
    assert res.returncode == 1 and "column 'x' has 16 values per example in " in res.stderr, res.stderr
    assert "784 are expected (algorithm.params.n_visible is 784, its default: set it to the width of the input)" \
        in res.stderr, res.stderr


def pc_pixels(t):
    """Column x of ``t`` as integer pixels 0..255 (what prepare writes for images)."""
    v = t.column("x").combine_chunks()
    return pa.FixedSizeListArray.from_arrays(pa.array(np.round(v.values.to_numpy() * 255).astype(np.uint8)),
                                             v.type.list_size)
