"""The job file is validated into one typed object; bad files are refused naming the field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from iterreduce.job import JobError, JobSpec, load_job, parse_memory

from .algos import write_dataset

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
name: test-job
seed: 3
workers: {count: 2, memory: 512 MiB, vcores: 1}
master: {memory: 1 GiB}
input: {paths: [data/train]}
output: out/run
checkpoint: {every: 2}
algorithm:
  master: tests.algos:LinRegMaster
  worker: tests.algos:LinRegWorker
  params: {supersteps: 4}
"""


def default_signals() -> None:
    """In a child: the signals a terminal sends act as they would there, even when the tests
    run under nohup or in a background job (which ignore SIGHUP, SIGINT)."""
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_job_file_loads_with_defaults_and_relative_paths(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    assert job.workers.count == 2
    assert job.workers.resources.memory_mb == 512
    assert job.master.memory_mb == 1024
    assert job.input.paths == (str(tmp_path / "data" / "train"),)
    assert job.checkpoint_path == str(tmp_path / "out" / "run") + "/checkpoints"
    assert job.heartbeat.timeout == 30.0
    # round trip through JSON, as the job travels to the workers
    assert JobSpec.from_json(job.to_json()) == job.replace(source="<job json>")


@pytest.mark.parametrize("change, field, words", [
    ("workers: {count: 0}", "workers.count", "at least 1"),
    ("workers: {count: two}", "workers.count", "expected int"),
    ("workers: {count: 2, memory: -5}", "workers.memory", "must be positive"),
    ("workers: {count: 2, memory: lots}", "workers.memory", "memory size"),
    ("workers: {count: 2, colour: red}", "workers.colour", "unknown field"),
    ("seed: -1", "seed", "at least 0"),
    ("seed: true", "seed", "expected int"),
    ("output: [a, b]", "output", "expected str"),
    ("input: {paths: []}", "input.paths", "at least one"),
    ("input: {paths: [x], format: csv}", "input.format", "parquet"),
    ("heartbeat: {interval: 5, timeout: 2}", "heartbeat.timeout", "must exceed"),
    ("checkpoint: {every: 1, keep: 0}", "checkpoint.keep", "at least 1"),
    ("algorithm: {master: 'not a path', worker: 'a:B'}", "algorithm.master", "package.module:ClassName"),
    ("unknown_top: 1", "unknown_top", "unknown field"),
])
def test_bad_values_are_refused_naming_the_field(tmp_path, change, field, words):
    key = change.split(":")[0]
    lines = [line for line in GOOD.strip().splitlines()
             if not line.startswith(key + ":") and not (key == "algorithm" and line.startswith("  "))]
    p = write(tmp_path, "\n".join(lines) + "\n" + change + "\n")
    with pytest.raises(JobError) as err:
        load_job(p)
    msg = str(err.value)
    assert str(p) in msg and f"{field}:" in msg and words in msg, msg


@pytest.mark.parametrize("missing", ["name", "seed", "workers", "input", "output", "algorithm"])
def test_missing_required_field_is_named(tmp_path, missing):
    lines = GOOD.strip().splitlines()
    kept, skipping = [], False
    for line in lines:
        if line.startswith(missing + ":"):
            skipping = True
            continue
        if skipping and line.startswith("  "):
            continue
        skipping = False
        kept.append(line)
    with pytest.raises(JobError, match=rf"{missing}(\.\w+)?: required (field|section) is missing"):
        load_job(write(tmp_path, "\n".join(kept)))


@pytest.mark.parametrize("change, words", [
    (("workers:", "worker:"), "workers: required section is missing (is 'worker' a misspelling of it?)"),
    (("count: 2", "cont: 2"), "workers.count: required field is missing (is 'cont' a misspelling of it?)"),
    (("output:", "outptu:"), "output: required field is missing (is 'outptu' a misspelling of it?)"),
    (("checkpoint: {every: 2}", "chekpoint: {every: 2}"), "chekpoint: unknown field (did you mean 'checkpoint'?"),
    (("count: 2,", "count: 2, count: 3,"), "not valid YAML at line 4, column 21: the key 'count' is given twice "
                                           "(first at line 4)"),
])
def test_misspelt_and_repeated_keys_are_named(tmp_path, change, words):
    with pytest.raises(JobError) as err:
        load_job(write(tmp_path, GOOD.replace(*change)))
    assert words in str(err.value)


def test_every_error_of_a_section_is_named_and_a_misspelling_once(tmp_path):
    bad = (GOOD.replace("workers: {count: 2, memory: 512 MiB, vcores: 1}",
                        "workers: {count: 0, memory: lots, vcores: 0, max_restart: 1, cpus: 2}")
           + "heartbeat: {interval: -1, timeout: x}\nyarn: {tags: [1, ok, 2], max_attempts: 0}\n")
    with pytest.raises(JobError) as err:
        load_job(write(tmp_path, bad))
    assert err.value.errors == [
        "workers.count: must be at least 1, got 0",
        "workers.memory: expected a memory size such as 1024 (MiB) or '2 GiB', got 'lots'",
        "workers.vcores: must be at least 1, got 0",
        "workers.cpus: unknown field (known fields here: count, max_restarts, memory, vcores)",
        "workers.max_restart: unknown field (did you mean 'max_restarts'? known fields here: count, "
        "max_restarts, memory, vcores)",
        "heartbeat.interval: must be a positive number, got -1.0",
        "heartbeat.timeout: expected float, got str 'x'",
        "yarn.tags[0]: expected a string, got 1",
        "yarn.tags[2]: expected a string, got 2",
        "yarn.max_attempts: must be at least 1, got 0",
    ], err.value.errors
    assert str(err.value).startswith(f"{tmp_path / 'job.yaml'}: 10 errors:\n  workers.count: must be at least 1")
    # a key that is offered as the misspelling of a missing field is not also an unknown field
    with pytest.raises(JobError) as err:
        load_job(write(tmp_path, GOOD.replace("count: 2", "cont: 2")))
    assert err.value.errors == ["workers.count: required field is missing (is 'cont' a misspelling of it?)"]


def test_yaml_merge_keys_still_work_and_odd_keys_are_refused(tmp_path):
    merged = GOOD.replace("workers: {count: 2, memory: 512 MiB, vcores: 1}\nmaster: {memory: 1 GiB}",
                          "master: &res {memory: 1 GiB}\nworkers:\n  <<: *res\n  count: 2\n  memory: 768 MiB")
    assert "<<: *res" in merged
    job = load_job(write(tmp_path, merged))  # a merge key with an override is not "given twice"
    assert job.workers.count == 2 and job.workers.resources.memory_mb == 768 and job.master.memory_mb == 1024
    with pytest.raises(JobError, match=r"line \d+, column \d+: a key must be a plain value"):
        load_job(write(tmp_path, GOOD + "? [x, y]\n: 1\n"))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(JobError, match=r"not valid YAML at line 3, column 6"):
        load_job(write(tmp_path, "name: a\nworkers: [count: 2\n  - x: {\n"))
    # an unclosed quote is found at the end of the file: the message says where it opened
    with pytest.raises(JobError, match=r"not valid YAML at line 3, column 1: found unexpected end of stream "
                                       r"\(while scanning a quoted scalar at line 1, column 7\)"):
        load_job(write(tmp_path, 'name: "abc\nseed: 1\n'))
    with pytest.raises(JobError, match=r"job\.yaml: the job file is empty \(it needs name, seed, workers"):
        load_job(write(tmp_path, ""))
    with pytest.raises(JobError, match=r"seed: required field is empty \(null\): give it a value"):
        load_job(write(tmp_path, GOOD.replace("seed: 3", "seed:")))


def test_memory_units():
    assert parse_memory("2 GiB", "m") == 2048
    assert parse_memory("512M", "m") == 512
    assert parse_memory(300, "m") == 300
    with pytest.raises(JobError, match="m: expected a memory size"):
        parse_memory("lots", "m")


def iterreduce(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iterreduce.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_validate_accepts_good_and_refuses_bad(tmp_path):
    good = write(tmp_path, GOOD)
    missing = iterreduce("validate", str(good))  # as submit does: the input must exist
    assert missing.returncode != 0
    assert f"{good}: input: path {tmp_path / 'data' / 'train'}: does not exist" in missing.stderr
    assert "a local path" not in missing.stderr
    meant_for_yarn = tmp_path / "yarn.yaml"  # a job for YARN: the path was read here, and said so
    meant_for_yarn.write_text(GOOD + "yarn: {environment: 'python:///usr/bin/python3'}\n")
    res = iterreduce("validate", str(meant_for_yarn))
    assert res.returncode == 1 and "does not exist (a local path, read on this machine; a path on HDFS is a URI: " \
        "webhdfs://NAMENODE:9870/...)" in res.stderr, res.stderr
    write_dataset(tmp_path / "data" / "train")  # 4 files, 8 row groups
    ok = iterreduce("validate", str(good))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{good}: OK (test-job: 2 workers, algorithm tests.algos:LinRegMaster; input: 4000 "
                                "rows in 4 file(s), splits of 2000..2000 rows)"), ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("count: 2", "count: 0"))
    res = iterreduce("validate", str(bad))
    assert res.returncode != 0
    assert "workers.count: must be at least 1, got 0" in res.stderr
    several = tmp_path / "several.yaml"  # every section is checked: one run of validate names all
    several.write_text(GOOD.replace("count: 2", "count: 0").replace("seed: 3", "seed: -1")
                       .replace("checkpoint: {every: 2}", "checkpoint: {evry: 2}") + "extra: 1\n")
    res = iterreduce("validate", str(several))
    assert res.returncode != 0
    assert f"{several}: 4 errors:\n  seed: must be at least 0, got -1\n  workers.count: must be at least 1, got 0\n" \
           "  checkpoint.evry: unknown field" in res.stderr, res.stderr
    assert "\n  extra: unknown field" in res.stderr, res.stderr
    assert "\n(the input and the algorithm are checked once the fields are right)" in res.stderr
    many = tmp_path / "many.yaml"
    many.write_text(GOOD.replace("count: 2", "count: 9"))
    res = iterreduce("validate", str(many))
    assert res.returncode != 0 and "9 splits" in res.stderr, res.stderr


def test_cli_validate_names_an_output_that_cannot_be_made_and_asks_no_columns_of_refused_params(tmp_path):
    write_dataset(tmp_path / "data" / "train")
    (tmp_path / "afile").write_text("")
    for out, ck, words in (("afile", None, "output: {p}/afile is a file, not a directory"),
                           ("out/run", "afile/ck", "checkpoint.path: {p}/afile/ck cannot be made: {p}/afile is a "
                                                   "file, not a directory")):
        job = write(tmp_path, GOOD.replace("output: out/run", f"output: {out}").replace(
            "checkpoint: {every: 2}", f"checkpoint: {{every: 2, path: {ck}}}" if ck else "checkpoint: {every: 2}"))
        res = iterreduce("validate", str(job))
        assert res.returncode == 1 and words.format(p=tmp_path) in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data", "job.yaml"]  # nothing made
    # an algorithm whose params are refused is not asked which columns they make it read
    (tmp_path / "cols.py").write_text(textwrap.dedent("""
        from tests.algos import LinRegMaster

        class ColsMaster(LinRegMaster):
            @classmethod
            def check_params(cls, params):
                if "columns" not in params:
                    raise ValueError("algorithm.params.columns: missing")

            @classmethod
            def input_columns(cls, params):
                return params["columns"]
        """))
    job = write(tmp_path, GOOD.replace("tests.algos:LinRegMaster", "cols:ColsMaster"))
    res = iterreduce("validate", str(job))
    assert res.returncode == 1 and "algorithm.params.columns: missing" in res.stderr, res.stderr
    assert "input_columns" not in res.stderr and "KeyError" not in res.stderr, res.stderr
    job = write(tmp_path, GOOD.replace("tests.algos:LinRegMaster", "cols:ColsMaster").replace(
        "{supersteps: 4}", "{supersteps: 4, columns: [X, y]}"))
    res = iterreduce("validate", str(job))
    assert res.returncode == 1 and "input: column 'X' (is it 'x'?), which the algorithm reads, is in none of the 4 " \
        "input file(s); their columns: x, y" in res.stderr, res.stderr


def test_master_check_input_refuses_input_files_from_their_schemas_before_anything_starts(tmp_path):
    write_dataset(tmp_path / "data" / "train")
    (tmp_path / "schemas.py").write_text(textwrap.dedent("""
        from tests.algos import LinRegMaster

        class FloatYMaster(LinRegMaster):
            @classmethod
            def check_input(cls, params, schemas):
                want = params.get("y_type", "float")
                odd = sorted(f.rsplit("/", 1)[-1] for f, s in schemas.items() if str(s.field("y").type) != want)
                if odd:
                    raise ValueError(f"column 'y' is not {want} in {', '.join(odd)} ({len(schemas)} files seen)")

        class BuggyMaster(LinRegMaster):
            @classmethod
            def check_input(cls, params, schemas):
                return schemas["no such file"]
        """))
    job = write(tmp_path, GOOD.replace("tests.algos:LinRegMaster", "schemas:FloatYMaster").replace(
        "{supersteps: 4}", "{supersteps: 4, y_type: double}"))
    for cmd in ("validate", "run"):
        res = iterreduce(cmd, str(job))
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert (f"{job}: input: column 'y' is not double in part-00000.parquet, part-00001.parquet, "
                "part-00002.parquet, part-00003.parquet (4 files seen)") in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was made
    job = write(tmp_path, GOOD.replace("tests.algos:LinRegMaster", "schemas:FloatYMaster"))
    res = iterreduce("validate", str(job))
    assert res.returncode == 0, res.stderr  # params that accept the files' types
    job = write(tmp_path, GOOD.replace("tests.algos:LinRegMaster", "schemas:BuggyMaster"))
    res = iterreduce("validate", str(job))
    assert res.returncode == 1 and f"{job}: BuggyMaster.check_input raised KeyError: 'no such file' (it should " \
        "raise ValueError saying what is wrong)" in res.stderr, res.stderr


def test_cli_run_names_a_bad_output_takes_output_from_the_working_directory_and_explains_ctrl_c(tmp_path):
    write_dataset(tmp_path / "data" / "train")
    job = write(tmp_path, GOOD)
    (tmp_path / "afile").write_text("")
    res = iterreduce("run", str(job), "--output", str(tmp_path / "afile"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{job} (with command-line overrides): output: {tmp_path / 'afile'} is a file, not a directory" \
        in res.stderr, res.stderr
    # a checkpoint.path below a file: refused before superstep 0, not after it
    ck = tmp_path / "ck.yaml"
    ck.write_text(textwrap.dedent(GOOD.replace("checkpoint: {every: 2}", "checkpoint: {every: 2, path: afile/ck}")))
    res = iterreduce("run", str(ck))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{ck}: checkpoint.path: {tmp_path / 'afile' / 'ck'} cannot be made: {tmp_path / 'afile'} is a file, " \
        "not a directory" in res.stderr, res.stderr
    assert not (tmp_path / "out" / "run" / "metrics.jsonl").exists()  # no superstep ran
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = iterreduce("run", str(job), "--output", "mine", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert (elsewhere / "mine" / "result.npz").exists()  # not next to the job file
    slow = tmp_path / "slow.yaml"
    slow.write_text(GOOD.replace("{supersteps: 4}", "{supersteps: 40, sleep: 0.5}"))
    proc = subprocess.Popen([sys.executable, "-m", "iterreduce.cli", "run", str(slow)], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=default_signals)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "out" / "run" / "checkpoints").glob("ckpt-*.npz")):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"interrupted. `iterreduce run --resume {slow}` continues it" in err and "Traceback" not in err
    # `kill` (SIGTERM) stops it the same way, as does a closed terminal (SIGHUP)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "iterreduce.cli", "run", "--resume", str(slow)], cwd=ROOT,
                                text=True, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                preexec_fn=default_signals)
        deadline = time.monotonic() + 60
        while not [p for p in (tmp_path / "out" / "run" / "checkpoints").glob("ckpt-*.npz")
                   if p.stat().st_mtime >= started]:
            assert time.monotonic() < deadline and proc.poll() is None, "no new checkpoint"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert f"interrupted by {sig.name}. `iterreduce run --resume {slow}` continues it" in err, err
        assert "Traceback" not in err
        metrics = json.loads((tmp_path / "out" / "run" / "metrics.json").read_text())
        assert metrics["state"] == "FAILED" and f"interrupted ({sig.name})" in metrics["message"]


def test_an_interrupt_before_the_first_checkpoint_says_the_job_starts_again(tmp_path):
    write_dataset(tmp_path / "data" / "train")
    job = tmp_path / "nockpt.yaml"
    job.write_text(GOOD.replace("{supersteps: 4}", "{supersteps: 40, sleep: 0.3}").replace(
        "checkpoint: {every: 2}", "checkpoint: {every: 1000}"))
    proc = subprocess.Popen([sys.executable, "-m", "iterreduce.cli", "run", str(job)], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=default_signals)
    lines = tmp_path / "out" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (lines.exists() and lines.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "no superstep done"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"interrupted. It had written no checkpoint yet: `iterreduce run {job}` starts it again" in err, err
    assert "ERROR" not in err and "WARNING iterreduce.appmaster: job test-job stopped: interrupted (Ctrl-C)" in err


DBN_BAD = GOOD.replace("tests.algos:LinRegMaster", "dbn.distributed:DBNMaster").replace(
    "tests.algos:LinRegWorker", "dbn.distributed:DBNWorker").replace(
    "params: {supersteps: 4}", "params: {layers: [20], finetune: {dropout_hidden: 1.5}}")


def test_cli_refuses_bad_algorithm_params_naming_file_and_field_before_running(tmp_path):
    job = write(tmp_path, DBN_BAD)
    for command in ("validate", "run"):
        res = subprocess.run([sys.executable, "-m", "iterreduce.cli", command, str(job)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0, command
        wrong = "algorithm.params.finetune.dropout_hidden: expected a number >= 0 and < 1, got 1.5"
        if command == "run":
            assert f"{job}: {wrong}" in res.stderr, res.stderr
        else:  # validate says the input is missing too, in the same run
            assert f"{job}: 2 errors:\n  {wrong}\n  input: path {tmp_path / 'data' / 'train'}: does not exist" \
                in res.stderr, res.stderr
    assert not (tmp_path / "out").exists(), "run started although the job file is bad"


def test_an_algorithm_module_that_fails_as_it_loads_is_named_with_its_line(tmp_path):
    for name, body, words in [("syntaxbad", "def f(:\n", "raised SyntaxError at "),
                              ("loadbad", "x = 1\nraise RuntimeError('no config here')\n",
                               "raised RuntimeError at "),
                              ("depbad", "import os\nimport no_such_dependency_here\n",  # the module is there
                               "raised ModuleNotFoundError at ")]:
        (tmp_path / f"{name}.py").write_text(body)
        job = write(tmp_path, GOOD.replace("tests.algos:LinRegMaster", f"{name}:Master"))
        res = subprocess.run([sys.executable, "-m", "iterreduce.cli", "validate", str(job)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert f"importing module '{name}' for '{name}:Master' {words}{tmp_path / name}.py:" in res.stderr, res.stderr
        if name == "depbad":
            assert f"{name}.py:2: No module named 'no_such_dependency_here' (a module it imports" in res.stderr


@pytest.mark.parametrize("path, words", [
    ("nosuch.module:Master", "cannot import module 'nosuch.module'"),
    ("tests.algos:LinRegWorker", "'tests.algos:LinRegWorker' is the class tests.algos.LinRegWorker, not a "
                                 "subclass of iterreduce.Master"),
    ("tests.algos:LinRegMastr", "module 'tests.algos' ("),  # misspelt: the module's Master classes are listed
    ("tests.algos:np", "'tests.algos:np' is a module, not a subclass of iterreduce.Master"),
    ("tests.algos", "algorithm.master: expected 'package.module:ClassName', got 'tests.algos'"),
])
def test_cli_validate_refuses_a_bad_algorithm_class(tmp_path, path, words):
    job = write(tmp_path, GOOD.replace("tests.algos:LinRegMaster", path))
    res = subprocess.run([sys.executable, "-m", "iterreduce.cli", "validate", str(job)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and words in res.stderr and str(job) in res.stderr, res.stderr
    if path.endswith("Mastr"):
        assert "has no 'LinRegMastr'; its Master subclasses: " in res.stderr and "LinRegMaster" in res.stderr


@pytest.mark.parametrize("params, words", [
    ("{layers: [20], finetune: {learning_rate: .nan}}", "finetune.learning_rate: expected a number > 0, got nan"),
    ("{layers: [20], pretrain: {weight_cost: .inf}}", "pretrain.weight_cost: expected a number >= 0, got inf"),
    ("{layers: [20]}", "algorithm.params.train: the path of the labelled training data is needed for "
                       "finetune.where: master"),
])
def test_dbn_params_that_cannot_train_are_refused(tmp_path, params, words):
    job = write(tmp_path, DBN_BAD.replace("params: {layers: [20], finetune: {dropout_hidden: 1.5}}",
                                          f"params: {params}"))
    res = iterreduce("validate", str(job))
    assert res.returncode != 0 and words in res.stderr, res.stderr


def test_submit_checks_algorithm_params_before_anything_else(tmp_path):
    from iterreduce.client import SubmitError, check_submission

    with pytest.raises(SubmitError, match=r"algorithm\.params\.finetune\.dropout_hidden: expected a number"):
        check_submission(load_job(write(tmp_path, DBN_BAD)))


def test_containers_get_blas_threads_from_their_vcores_unless_yarn_env_says_and_record_their_exit(tmp_path,
                                                                                                   monkeypatch):
    from iterreduce.client import build_spec

    text = GOOD.replace("vcores: 1}", "vcores: 2}") + \
        "yarn: {environment: 'python:///opt/my python/bin/python3', env: {OPENBLAS_NUM_THREADS: '8', A: b}}\n"
    (tmp_path / "token").write_text("t")
    (tmp_path / "job.json").write_text("{}")
    spec = build_spec(load_job(write(tmp_path, text)), str(tmp_path / "token"), str(tmp_path / "job.json"))
    worker, master = spec.services["worker"], spec.master
    assert "ITERREDUCE_LOG_LEVEL" not in worker.env and "ITERREDUCE_LOG_LEVEL" not in master.env
    monkeypatch.setenv("ITERREDUCE_LOG_LEVEL", "DEBUG")  # submit -v: the containers log debug lines too
    verbose = build_spec(load_job(write(tmp_path, text)), str(tmp_path / "token"), str(tmp_path / "job.json"))
    assert verbose.master.env["ITERREDUCE_LOG_LEVEL"] == verbose.services["worker"].env["ITERREDUCE_LOG_LEVEL"] \
        == "DEBUG"
    assert (worker.env["OPENBLAS_NUM_THREADS"], worker.env["OMP_NUM_THREADS"], worker.env["MKL_NUM_THREADS"]) == \
        ("8", "2", "2")  # yarn.env wins; the rest follow workers.vcores
    assert (master.env["OPENBLAS_NUM_THREADS"], master.env["OMP_NUM_THREADS"]) == ("8", "1") and worker.env["A"] == "b"
    # the worker's exit code reaches the master even when a signal ends it (skein only says "failed")
    python = "'/opt/my python/bin/python3'"
    assert worker.script == (f"{python} -m iterreduce.worker\nrc=$?\n"
                             f"if [ $rc -gt 3 ]; then {python} -m iterreduce.worker --exited $rc; fi\nexit $rc")
    # run it with a python that SIGKILLs itself, and shows how it is called the second time
    fake = "python3 -c 'import os, sys; print(sys.argv[1:]) if \"--exited\" in sys.argv else os.kill(os.getpid(), 9)'"
    run = subprocess.run(["bash", "-c", worker.script.replace(python, fake)], capture_output=True, text=True)
    assert run.returncode == 137 and run.stdout == "['-m', 'iterreduce.worker', '--exited', '137']\n", run


def test_submit_refuses_shipped_files_that_would_replace_others(tmp_path):
    from iterreduce.client import SubmitError, check_submission

    write_dataset(tmp_path / "data" / "train")
    for d in ("a/utils", "b/utils", "cfg"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "cfg" / "job.json").write_text("{}")
    base = GOOD + "yarn: {environment: 'python:///usr/bin/python3', files: %s}\n"
    for files, words in (("[a/utils, b/utils]", r"yarn.files\[1\]: .*b/utils and .*a/utils would both be shipped"),
                         ("[cfg/job.json]", r"yarn.files\[0\]: .*job.json would be shipped as 'job.json', a name "
                                            "iterreduce uses itself")):
        with pytest.raises(SubmitError, match=words):
            check_submission(load_job(write(tmp_path, base % files)))
    check_submission(load_job(write(tmp_path, base % "[a/utils, cfg]")))  # distinct names: fine


def test_submit_leaves_an_algorithm_it_cannot_import_to_the_cluster(tmp_path, caplog):
    # on YARN the algorithm may exist only in the cluster's environment
    from iterreduce.client import SubmitError, check_submission

    job = load_job(write(tmp_path, GOOD.replace("tests.algos:LinRegMaster", "cluster_only.algo:Master")))
    with pytest.raises(SubmitError) as err:  # the next check: GOOD names no yarn.environment
        check_submission(job)
    assert "cannot import" not in str(err.value)
    assert str(err.value).startswith(f"{job.source}: yarn.environment is not set.")  # names the file
    assert "cannot import module 'cluster_only.algo'" in caplog.text


def test_submit_refuses_containers_the_cluster_can_never_run_together(tmp_path, caplog):
    from iterreduce.client import SubmitError, check_resources

    base = load_job(write(tmp_path, GOOD)).to_dict()

    def job(workers: dict, master: dict | None = None) -> JobSpec:
        d = {**base, "workers": {**base["workers"], **workers}, "master": {**base["master"], **(master or {})}}
        return JobSpec.from_dict(d, source="job.yaml")

    one = {"max_mb": 8192, "max_vcores": 8, "min_mb": 1024, "nodes": [8192]}
    for spec, cluster, words in [
        (job({"memory": "9 GiB"}), one, r"job.yaml: workers\.memory: 9216 MiB is more than this cluster's "
                                        r"largest container \(yarn\.scheduler\.maximum-allocation-mb = 8192\)"),
        (job({}, {"memory": 10000}), one, r"master\.memory: 10000 MiB is more"),
        (job({"vcores": 9}), one, r"workers\.vcores: 9 is more .*maximum-allocation-vcores = 8\)"),
        (job({"count": 2, "memory": "5 GiB"}), one,
         r"1 running node\(s\) of 8192 MiB; the master takes 1024 MiB, each worker 5120 MiB \(requests are "
         r"rounded up to multiples of 1024 MiB\), and they hold the master and 1 of the 2 workers"),
        (job({"count": 8, "memory": 600}), one, r"they hold the master and 7 of the 8 workers"),  # 600 -> 1024
    ]:
        with pytest.raises(SubmitError, match=words):
            check_resources(spec, cluster)
    check_resources(job({"count": 7, "memory": 600}), one)  # the master and 7 workers fill 8192 MiB exactly
    check_resources(job({"count": 2, "memory": "5 GiB"}), {**one, "nodes": [8192, 8192]})  # a worker a node
    check_resources(job({"count": 3, "memory": "5 GiB"}), {**one, "nodes": [2048, 5120, 5120, 5120]})
    with pytest.raises(SubmitError, match=r"hold the master and 3 of the 4 workers"):
        check_resources(job({"count": 4, "memory": "5 GiB"}), {**one, "nodes": [2048, 5120, 5120, 5120]})
    check_resources(job({}), {**one, "nodes": []})  # none registered yet (the RM restarted): YARN waits
    assert "lists no RUNNING NodeManager now; the application waits" in caplog.text
    # a queue that may use a tenth of the cluster: the master and three workers of 1 GiB do not fit in it
    small = {"state": "RUNNING", "max_share": 0.1, "am_limit_mb": 4096, "am_used_mb": 0, "active": 0}
    with pytest.raises(SubmitError, match=r"job\.yaml: yarn\.queue: a user's applications in the queue 'default' "
                                          r"may use at most 10% of this cluster's 32768 MiB \(3276 MiB: its "
                                          r"maximum capacity, or its capacity times its user-limit-factor\); the "
                                          r"master and 3 workers take 4096 MiB at once"):
        check_resources(job({"count": 3, "memory": 1024}), {**one, "nodes": [8192] * 4}, small)
    check_resources(job({"count": 2, "memory": 1024}), {**one, "nodes": [8192] * 4}, small)
    assert "waits in ACCEPTED" not in caplog.text
    busy = {"state": "RUNNING", "max_share": 1.0, "am_limit_mb": 2048, "am_used_mb": 2048, "active": 2}
    check_resources(job({}), one, busy)  # its AM share is taken: it waits, which is not refused
    assert "queue 'default': its ApplicationMasters may take 2048 MiB" in caplog.text
    assert "its 2 running application(s) take 2048: this one waits in ACCEPTED until one ends" in caplog.text

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_job_file_validates(path, monkeypatch):
    from iterreduce.appmaster import check_algorithm

    monkeypatch.chdir(path.parents[1])  # examples.logreg is imported from the repository root
    job = load_job(path)
    check_algorithm(job, check_paths=False)  # their data comes from `mnist_dbn.py prepare`
    others = [load_job(p) for p in EXAMPLES if p != path]
    assert job.output not in {o.output for o in others}, f"{path.name} writes where another example does"


def test_the_readmes_algorithm_runs_as_written_from_another_directory(tmp_path):
    """README "Writing an algorithm": its Python and its job file, copied literally."""
    import re

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    section = (ROOT / "README.md").read_text().split("## Writing an algorithm", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    job = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "mean.py").write_text(code)
    (tmp_path / "mean.yaml").write_text(job)
    (tmp_path / "data").mkdir()
    x = np.arange(40, dtype=np.float64)
    for i in range(4):
        pq.write_table(pa.table({"x": x[i * 10:(i + 1) * 10]}), tmp_path / "data" / f"part-{i}.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-m", "iterreduce.cli", "run", str(tmp_path / "mean.yaml")], cwd=elsewhere,
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert float(np.load(tmp_path / "out" / "result.npz")["mean"]) == pytest.approx(x.mean())


def test_with_deadline_returns_raises_or_gives_up():
    import threading

    from iterreduce.client import with_deadline

    assert with_deadline(lambda: 42, 5) == 42
    with pytest.raises(KeyError):
        with_deadline(lambda: {}["x"], 5)
    never = threading.Event()
    with pytest.raises(TimeoutError, match="no answer within 0.5 s"):
        with_deadline(never.wait, 0.5)  # a call that blocks, as skein's on a vanished host


def test_a_relative_base_dir_is_taken_from_the_job_file_not_the_working_directory(tmp_path, monkeypatch):
    from iterreduce.job import load_job

    (tmp_path / "sub").mkdir()
    (tmp_path / "elsewhere").mkdir()
    job = tmp_path / "sub" / "j.yaml"
    job.write_text(GOOD.replace("name:", "base_dir: ..\nname:", 1))
    for cwd in (tmp_path / "sub", tmp_path / "elsewhere"):
        monkeypatch.chdir(cwd)
        spec = load_job(job)
        assert spec.base_dir == str(tmp_path)
        assert spec.output == str(tmp_path / "out" / "run") and list(spec.input.paths) == [str(tmp_path / "data" / "train")]


def test_an_output_inside_the_input_is_refused(tmp_path):
    from iterreduce.job import JobError, load_job

    for change, what in [("output: out/run", "output: data/train/out"),
                         ("checkpoint: {every: 2}", "checkpoint: {every: 2, path: data/train/ck}")]:
        job = write(tmp_path, GOOD.replace(change, what))
        with pytest.raises(JobError, match=r"is inside the input path .*data/train: the next run would read"):
            load_job(job)
    assert load_job(write(tmp_path, GOOD.replace("output: out/run", "output: data/train-out"))).output.endswith(
        "data/train-out")  # a sibling whose name starts alike is not inside


def test_dbn_test_set_that_is_training_data_is_accepted_with_a_warning(tmp_path):
    from dbn.data import write_parquet_shards

    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        write_parquet_shards(rng.integers(0, 256, (40, 8), dtype=np.uint8), rng.integers(0, 10, 40),
                             tmp_path / "data" / name, 4)
    params = "params: {layers: [20], n_visible: 8, train: data/train, test: %s}"
    for test, warned in (("data/train", True), ("data/./train/", True), ("data/test", False)):
        job = write(tmp_path, DBN_BAD.replace("params: {layers: [20], finetune: {dropout_hidden: 1.5}}",
                                              params % test))
        res = iterreduce("validate", str(job))
        assert res.returncode == 0, res.stderr
        said = f"algorithm.params.test: {test} is also training data (algorithm.params.train)" in res.stderr
        assert said is warned, res.stderr


def test_validate_imports_what_yarn_files_ships_and_checks_the_yarn_section(tmp_path):
    write_dataset(tmp_path / "data" / "train")
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "shippedalgo.py").write_text(
        "from tests.algos import LinRegMaster, LinRegWorker\n\n\nclass M(LinRegMaster):\n    pass\n\n\n"
        "class W(LinRegWorker):\n    pass\n")
    algo = GOOD.replace("tests.algos:LinRegMaster", "shippedalgo:M").replace("tests.algos:LinRegWorker",
                                                                               "shippedalgo:W")
    res = iterreduce("validate", str(write(tmp_path, algo)))
    assert res.returncode != 0 and "cannot import module 'shippedalgo'" in res.stderr
    assert "on YARN, yarn.files ships modules into the containers" in res.stderr
    yarn = "yarn: {environment: 'python:///usr/bin/python3', files: [%s]}\n"
    res = iterreduce("validate", str(write(tmp_path, algo + yarn % "pkgs/shippedalgo.py")))
    assert res.returncode == 0, res.stderr  # in the containers it lands beside the job: importable
    assert "its yarn section is OK too" in res.stdout and "is not on this machine" not in res.stdout
    res = iterreduce("validate", str(write(tmp_path, algo + "yarn: {environment: 'venv:///opt/nope/venv', "
                                                         "files: [pkgs/shippedalgo.py]}\n")))
    assert res.returncode == 0 and "yarn.environment venv:///opt/nope/venv: /opt/nope/venv/bin/activate is not on " \
        "this machine: it must be on every node" in res.stdout, res.stdout + res.stderr
    res = iterreduce("validate", str(write(tmp_path, GOOD + yarn % "pkgs/nosuch.py")))
    assert res.returncode != 0 and f"yarn.files[0]: {tmp_path / 'pkgs' / 'nosuch.py'} does not exist" in res.stderr
    res = iterreduce("validate", str(write(tmp_path, GOOD + "yarn: {environment: /nowhere/env.tar.gz}\n")))
    assert res.returncode != 0 and "yarn.environment: the archive /nowhere/env.tar.gz does not exist" in res.stderr
