"""The second algorithm, written only with the public API, reaches its accuracy bar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_logreg_with_two_workers_reaches_under_9_percent_test_error(tmp_path, mnist_parquet):
    spec = yaml.safe_load((ROOT / "examples" / "logreg.yaml").read_text())
    spec["input"]["paths"] = [str(mnist_parquet / "train")]
    spec["algorithm"]["params"]["test"] = str(mnist_parquet / "test")
    spec["output"] = str(tmp_path / "out")
    assert spec["workers"]["count"] == 2
    job = tmp_path / "logreg.yaml"
    job.write_text(yaml.safe_dump(spec))
    res = subprocess.run([sys.executable, "-m", "iterreduce.cli", "run", str(job)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    test_error = metrics["final"]["metrics"]["test_error"]
    assert test_error < 0.09, f"test error {test_error:.4f}"
    assert len(metrics["history"]) == spec["algorithm"]["params"]["epochs"]


def test_logreg_misspelt_parameter_is_refused_before_anything_runs_with_a_hint(tmp_path):
    spec = yaml.safe_load((ROOT / "examples" / "logreg.yaml").read_text())
    spec["algorithm"]["params"]["learning_rat"] = spec["algorithm"]["params"].pop("learning_rate", 0.1)
    spec["output"] = str(tmp_path / "out")
    job = tmp_path / "logreg.yaml"
    job.write_text(yaml.safe_dump(spec))
    res = subprocess.run([sys.executable, "-m", "iterreduce.cli", "validate", str(job)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "algorithm.params.learning_rat: unknown parameter (did you mean 'learning_rate'?" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
    spec["algorithm"]["params"]["learning_rate"] = spec["algorithm"]["params"].pop("learning_rat")
    spec["algorithm"]["params"]["test"] = str(tmp_path / "tset")  # the master's own data: checked too
    job.write_text(yaml.safe_dump(spec))
    res = subprocess.run([sys.executable, "-m", "iterreduce.cli", "validate", str(job)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and f"algorithm.params.test: input path {tmp_path / 'tset'}: does not exist" \
        in res.stderr, res.stderr


def test_an_input_file_without_a_column_the_master_names_is_refused_before_running_others_may_differ(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    x = pa.array([[0] * 784] * 4, pa.list_(pa.uint8()))
    for i, note in enumerate([pa.array(["a", "b", "c", "d"]), pa.array([1, 2, 3, 4])]):  # a column none reads
        pq.write_table(pa.table({"x": x, "y": np.arange(4), "note": note}), data / f"part-{i}.parquet")
    spec = yaml.safe_load((ROOT / "examples" / "logreg.yaml").read_text())
    spec["input"]["paths"] = [str(data)]
    spec["algorithm"]["params"].pop("test")
    spec["output"] = str(tmp_path / "out")
    job = tmp_path / "logreg.yaml"
    job.write_text(yaml.safe_dump(spec))

    def validate():
        return subprocess.run([sys.executable, "-m", "iterreduce.cli", "validate", str(job)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    res = validate()
    assert res.returncode == 0, res.stderr  # 'note' differs from file to file, but LogRegWorker does not read it
    pq.write_table(pa.table({"x": x, "label": np.arange(4)}), data / "part-2.parquet")
    res = validate()
    assert res.returncode != 0
    assert (f"{job}: input: the input files' columns do not agree: column 'y', which the algorithm reads, is not in "
            f"{data / 'part-2.parquet'}") in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
