"""The local runtime end to end: real worker processes, real sockets, real files."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from iterreduce import ipc
from iterreduce.appmaster import FAILURE_MARKER, AppMaster, JobFailed, final_failure_of, record_final_failure
from iterreduce.containers import LocalLauncher, exit_reason, yarn_exit_code
from iterreduce.fs import Output
from iterreduce.job import InputSpec, load_job

from .algos import spoil_record, write_dataset
from .helpers import cli, run_and_kill_after_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("linreg") / "train")


def make_job(tmp_path: Path, dataset: Path, name: str = "run", workers: int = 2, **params) -> Path:
    spec = {
        "name": "linreg-test", "seed": 11,
        "workers": {"count": workers, "max_restarts": params.pop("max_restarts", 2)},
        "input": {"paths": [str(dataset)]},
        "output": str(tmp_path / name),
        "checkpoint": {"every": params.pop("checkpoint_every", 1), "keep": 2},
        "heartbeat": {"interval": 0.2, "timeout": params.pop("heartbeat_timeout", 10.0), "master_timeout": 5},
        "algorithm": {"master": "tests.algos:LinRegMaster", "worker": "tests.algos:LinRegWorker",
                      "params": {"supersteps": 6, **params}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def result(job_path: Path) -> dict[str, np.ndarray]:
    return Output(load_job(job_path).output).read_npz("result.npz")


def metrics(job_path: Path) -> dict:
    return json.loads(Output(load_job(job_path).output).read_bytes("metrics.json"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("baseline")
    job = make_job(tmp, dataset, "baseline")
    res = cli("run", str(job))
    assert res.returncode == 0, res.stderr
    (tmp / "run.stderr").write_text(res.stderr)
    return job


def test_run_writes_result_metrics_and_one_log_line_per_superstep(baseline):
    log = (baseline.parent / "run.stderr").read_text()
    shown = [line.split("iterreduce.appmaster: ")[1].split(" |")[0] for line in log.splitlines()
             if " done) | " in line]
    assert shown == [f"superstep {s} ({s + 1}/6 done)" for s in range(6)], log
    m = metrics(baseline)
    assert m["state"] == "SUCCEEDED" and m["replacements"] == 0 and m["message"] == "succeeded"
    assert [h["superstep"] for h in m["history"]] == list(range(6))
    assert all(h["bytes_in"] > 0 for h in m["history"])
    # training worked: the error fell
    assert m["history"][-1]["workers"]["mse"] < m["history"][0]["workers"]["mse"]
    w = result(baseline)["w"]
    assert w.shape == (8,) and np.isfinite(w).all()
    lines = (Path(load_job(baseline).output) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_submit_wait_writes_a_line_per_superstep_counting_those_done():
    import io

    from iterreduce.client import Progress

    out = io.StringIO()  # not a terminal: one line per superstep, as `submit --wait` prints
    progress = Progress(out, lines=True)
    status = {"state": "RUNNING", "superstep": 0, "total": 3, "phase": "epoch 1", "metrics": {}}
    for s in (0, 0, 1, 2):  # the same status twice gives one line
        progress({**status, "superstep": s, "phase": f"epoch {s + 1}", "metrics": {"mse": 1.0 / (s + 1)}})
    progress({**status, "superstep": 2, "state": "SUCCEEDED", "phase": "epoch 3", "metrics": {"mse": 0.25},
              "replacements": 1, "attempt": 2})
    progress({**status, "state": "FAILED", "phase": "starting"})  # no metrics yet: no empty field
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["RUNNING superstep 0 (0/3 done) | epoch 1 | mse=1",
                     "RUNNING superstep 1 (1/3 done) | epoch 2 | mse=0.5",
                     "RUNNING superstep 2 (2/3 done) | epoch 3 | mse=0.3333",
                     "SUCCEEDED superstep 2 (3/3 done) | epoch 3 | mse=0.25 | 1 worker(s) replaced | attempt 2",
                     "FAILED superstep 0 (0/3 done) | starting"]
    out = io.StringIO()  # the metrics are the last superstep done's: named so beside the next one's phase
    Progress(out, lines=True)({**status, "superstep": 1, "phase": "epoch 2", "metrics": {"mse": 0.5},
                               "metrics_phase": "epoch 1"})
    assert out.getvalue().rstrip().endswith("RUNNING superstep 1 (1/3 done) | epoch 2 | mse=0.5 (after epoch 1)")
    many = {f"m{i}": float(i) for i in range(5)}  # a line shows every metric; the bar three, and how many more
    out = io.StringIO()
    Progress(out, lines=True)({**status, "metrics": many})
    assert out.getvalue().rstrip().endswith("| m0=0 m1=1 m2=2 m3=3 m4=4"), out.getvalue()
    bar = Progress(io.StringIO())
    bar.enabled = True
    bar({**status, "metrics": many})
    assert "| m0=0 m1=1 m2=2 (+2 more) |" in bar.bar, bar.bar


def test_submit_wait_shows_each_superstep_done_even_several_between_two_looks():
    import io

    from iterreduce.appmaster import RECENT
    from iterreduce.client import Progress

    def rec(s):
        return {"superstep": s, "phase": f"epoch {s + 1}", "seconds": 0.01, "bytes_in": 2_000_000, "bytes_out": 0,
                "workers": {"mse": 1.0 / (s + 1)}, "master": {"nan": None}, "replacements": int(s >= 3)}

    out = io.StringIO()
    progress = Progress(out, lines=True)
    status = {"state": "RUNNING", "superstep": 0, "total": 40, "phase": "epoch 1", "metrics": {}, "recent": []}
    progress(status)  # nothing done yet: where it is
    progress({**status, "superstep": 3, "recent": [rec(s) for s in range(3)]})  # three done since
    progress({**status, "superstep": 3, "recent": [rec(s) for s in range(3)]})  # nothing new
    progress({**status, "superstep": 4, "recent": [rec(s) for s in range(4)]})
    progress({**status, "superstep": 30, "recent": [rec(s) for s in range(30 - RECENT, 30)]})  # more than it holds
    progress({**status, "superstep": 29, "state": "SUCCEEDED", "metrics": {"mse": 0.03},
              "recent": [rec(s) for s in range(30 - RECENT, 30)]})
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines[:5] == ["RUNNING superstep 0 (0/40 done) | epoch 1",
                         "superstep 0 (1/40 done) | epoch 1 | 0.01 s | 2.0 MB exchanged | mse=1",
                         "superstep 1 (2/40 done) | epoch 2 | 0.01 s | 2.0 MB exchanged | mse=0.5",
                         "superstep 2 (3/40 done) | epoch 3 | 0.01 s | 2.0 MB exchanged | mse=0.3333",
                         "superstep 3 (4/40 done) | epoch 4 | 0.01 s | 2.0 MB exchanged | mse=0.25 | "
                         "1 worker(s) replaced"], lines
    assert lines[5] == f"({30 - RECENT - 4} supersteps done between two looks)"
    assert [int(line.split()[1]) for line in lines[6:-1]] == list(range(30 - RECENT, 30))
    assert lines[-1] == "SUCCEEDED superstep 29 (30/40 done) | epoch 1 | mse=0.03"


def test_same_job_gives_the_same_model(tmp_path, dataset, baseline):
    again = make_job(tmp_path, dataset, "again")
    assert cli("run", str(again)).returncode == 0
    np.testing.assert_array_equal(result(again)["w"], result(baseline)["w"])


def test_verbose_shows_each_update_on_the_master_and_each_fetch_and_push_in_the_workers_logs(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "verbose", supersteps=2)
    res = cli("run", str(job), "-v")
    assert res.returncode == 0, res.stderr
    taken = re.findall(r"DEBUG iterreduce\.appmaster: took the update of worker \S+ \(container local_\d+, split "
                       r"(\d)\) at superstep (\d): \d+ samples, 32 bytes, [12] of 2 splits in", res.stderr)
    assert sorted(taken) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], res.stderr
    log = (tmp_path / "verbose" / "logs" / "local_0001.log").read_text()
    assert "DEBUG iterreduce.worker: superstep 1: pushed 32 bytes in 1 array(s)" in log, log
    assert "DEBUG" not in cli("run", str(job)).stderr  # without -v: none


def test_worker_killed_mid_superstep_is_replaced(tmp_path, dataset, baseline):
    marker = tmp_path / "died"
    job = make_job(tmp_path, dataset, "killed", die_at=2, die_split=1, die_marker=str(marker))
    res = cli("run", str(job))
    assert res.returncode == 0, res.stderr
    assert marker.exists(), "the worker never reached its SIGKILL"
    m = metrics(job)
    assert m["replacements"] == 1
    assert m["message"] == "succeeded after 1 worker replacement"
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])
    assert "was killed by SIGKILL: out of memory (the kernel's OOM killer), or killed by hand" in res.stderr


def test_exit_codes_are_told_in_words_as_yarn_and_local_processes_give_them():
    # diagnostics as the NodeManager writes them (ContainerExecutor, ContainersMonitorImpl)
    launch = "Exception from container-launch.\nContainer id: container_1_0001_01_000002\nExit code: 137\n"
    assert yarn_exit_code("FAILED", launch) == 137
    assert exit_reason(137, yarn=True) == ("exited with code 137 (killed by SIGKILL): out of memory (the "
                                           "kernel's OOM killer), or killed by hand")
    pmem = ("Container [pid=4242,containerID=container_1_0001_01_000003] is running 41943040B beyond the "
            "'PHYSICAL' memory limit. Current usage: 553 MB of 512 MB physical memory used.\nContainer killed "
            "on request. Exit code is 143\nContainer exited with a non-zero exit code 143. ")
    assert yarn_exit_code("FAILED", pmem) == -104
    assert "more physical memory than workers.memory allows" in exit_reason(-104, yarn=True)
    assert yarn_exit_code("KILLED", "Container killed on request. Exit code is 143") == 143
    assert exit_reason(143, yarn=True) == "exited with code 143 (killed by SIGTERM)"
    assert yarn_exit_code("FAILED", "") == 1 and yarn_exit_code("SUCCEEDED", "Exit code: 3") == 0
    assert exit_reason(1, yarn=True) == exit_reason(1) == "exited with code 1"
    assert exit_reason(2, yarn=True) == "exited with code 2 (it lost the master: no answer from it)"
    assert exit_reason(-15) == "was killed by SIGTERM" and exit_reason(-9).startswith("was killed by SIGKILL")
    # skein's words: its own for a memory kill (with YARN's figures when it finds them), YARN's for others
    assert yarn_exit_code("FAILED", "Container killed by YARN for exceeding memory limits") == -104
    assert yarn_exit_code("FAILED", "Container released on a *lost* node") == -100
    assert exit_reason(-100, yarn=True).startswith("ended with YARN exit status -100: YARN aborted it")


def test_replacement_limit_fails_the_job_with_the_reason(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "limit", die_at=1, max_restarts=1)  # no marker: dies every time
    res = cli("run", str(job))
    assert res.returncode != 0
    assert "workers.max_restarts (1)" in res.stderr and "split 0" in res.stderr
    assert metrics(job)["state"] == "FAILED"


def test_bad_record_fails_the_job_at_once_naming_its_file_and_row(tmp_path):
    data = write_dataset(tmp_path / "data")  # 4 files of 1000 rows, row groups of 500
    bad = spoil_record(data)
    job = make_job(tmp_path, data, "badrecord", max_restarts=3)
    res = cli("run", str(job))
    assert res.returncode != 0
    assert f"input file {bad}, row 742: x or y is not finite" in res.stderr
    assert "this fails the job at once: a replacement worker would fail the same way" in res.stderr
    m = metrics(job)
    assert m["state"] == "FAILED" and m["replacements"] == 0  # not retried max_restarts times
    assert "row 742" in m["message"]


def test_a_file_without_a_column_fails_the_job_at_once_naming_it(tmp_path):
    import pyarrow.parquet as pq

    data = write_dataset(tmp_path / "data")
    odd = data / "part-00002.parquet"
    pq.write_table(pq.read_table(odd).rename_columns(["x", "label"]), odd)
    job = make_job(tmp_path, data, "nocolumn", max_restarts=3)
    res = cli("run", str(job))
    assert res.returncode != 0
    assert f"input file {odd}: no column 'y' (its columns: x, label)" in res.stderr
    assert "failed in setup (before superstep 0): InputError: " in res.stderr  # reading its split
    assert metrics(job)["replacements"] == 0


def test_an_error_the_replacement_repeats_ends_the_job_one_that_it_does_not_is_survived(tmp_path, dataset,
                                                                                          baseline):
    job = make_job(tmp_path, dataset, "repeats", max_restarts=5, raise_at=2)
    res = cli("run", str(job))
    assert res.returncode != 0
    assert "failed at superstep 2: RuntimeError: compute broke at superstep 2" in res.stderr
    assert "this worker replaced one that failed the same way at the same superstep, so a further" in res.stderr
    assert metrics(job)["replacements"] == 1  # not max_restarts (5) replacements that all fail alike
    once = make_job(tmp_path, dataset, "once", raise_at=2, raise_marker=str(tmp_path / "raised"))
    res = cli("run", str(job := once))
    assert res.returncode == 0, res.stderr
    assert metrics(job)["replacements"] == 1
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])  # a replacement recomputes exactly


def test_the_same_error_in_several_splits_ends_the_job_before_the_restarts_run_out(tmp_path, dataset):
    # 4 splits, max_restarts 3: if each split's first failure counted as a lost machine, the
    # fourth would end the job as "replaced 3 workers" (retried by YARN) and hide the error
    job = make_job(tmp_path, dataset, "everywhere", workers=4, max_restarts=3, raise_at=2, raise_everywhere=True)
    res = cli("run", str(job))
    assert res.returncode != 0
    m = metrics(job)
    assert "RuntimeError: compute broke at superstep 2" in m["message"], m["message"]
    assert "failed the same way at the same superstep" in res.stderr
    assert "the limit of workers.max_restarts" not in res.stderr
    assert m["replacements"] <= 1


def test_compute_returning_no_update_fails_the_job_at_once(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "none", max_restarts=3, return_none_at=1)
    res = cli("run", str(job))
    assert res.returncode != 0
    assert "LinRegWorker.compute must return an Update, got NoneType" in res.stderr
    assert "this fails the job at once" in res.stderr and metrics(job)["replacements"] == 0


def test_an_update_changed_after_it_was_made_is_named_as_a_new_one_is(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "spoiled", max_restarts=3, spoil_metric_at=1)
    res = cli("run", str(job))
    assert res.returncode != 0 and metrics(job)["replacements"] == 0  # no replacement: it would do the same
    assert "LinRegWorker.compute returned an Update that cannot be sent: Update.metrics['col_var'] must be a " \
        "number, got ndarray" in res.stderr, res.stderr
    for hook, words in (("combine", "Master.combine returned an Update that cannot be used: Update.metrics['status'] "
                                    "must be a number, got str 'ok'"),
                        ("state", "Master.state returned an Update that cannot be used: Update.meta['done_steps'] is "
                                  "not JSON-serialisable"),
                        ("catch_up", "Master.catch_up must return an Update or None, got dict")):
        job = make_job(tmp_path, dataset, f"master-{hook}", master_spoils=hook)
        res = cli("run", str(job))
        assert res.returncode != 0 and words in res.stderr and "ApplicationMaster error" not in res.stderr, \
            (hook, res.stderr)


def test_numpy_s_and_python_s_global_generators_are_seeded_from_the_job(tmp_path, dataset):
    first, again = (make_job(tmp_path, dataset, name, global_rng=True) for name in ("rng1", "rng2"))
    for job in (first, again):
        assert cli("run", str(job)).returncode == 0
    results = [(Path(load_job(job).output) / "result.npz").read_bytes() for job in (first, again)]
    assert results[0] == results[1]  # the same job, the same result, though its code draws from np.random
    plain = Path(load_job(make_job(tmp_path, dataset, "plain")).output)
    assert cli("run", str(make_job(tmp_path, dataset, "plain"))).returncode == 0
    assert (plain / "result.npz").read_bytes() != results[0]  # the draws did change the result


@pytest.mark.parametrize("hook", ["setup", "initial_update", "state", "combine"])
def test_a_master_method_that_raises_fails_the_job_naming_it_with_its_traceback(tmp_path, dataset, hook,
                                                                                monkeypatch):
    job = make_job(tmp_path, dataset, hook, master_raises_in=hook)
    res = cli("run", str(job))
    assert res.returncode != 0
    named = "combine at superstep 2" if hook == "combine" else hook
    assert f"failed: Master.{named} failed: RuntimeError: {hook} broke" in res.stderr, res.stderr
    assert "Traceback (most recent call last)" in res.stderr and f"in {hook}" in res.stderr  # in the log
    monkeypatch.chdir(ROOT)  # the workers import tests.algos
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    spec = load_job(job)
    with pytest.raises(JobFailed) as info:
        AppMaster(spec, LocalLauncher(Path(spec.output) / "logs2")).run()
    assert info.value.retry is False  # on YARN, a new attempt would only repeat it


def test_a_rerun_whose_master_fails_in_setup_leaves_no_result_of_the_earlier_run(tmp_path, dataset, monkeypatch):
    job = make_job(tmp_path, dataset, "rerun")
    assert cli("run", str(job)).returncode == 0
    out = Path(load_job(job).output)
    assert (out / "result.npz").exists() and metrics(job)["state"] == "SUCCEEDED"
    spec = yaml.safe_load(job.read_text())
    spec["algorithm"]["params"]["master_raises_in"] = "setup"  # its own input, say: the run has begun
    job.write_text(yaml.safe_dump(spec))
    res = cli("run", str(job))
    assert res.returncode != 0
    assert not (out / "result.npz").exists()  # not the earlier run's result beside this run's failure
    m = metrics(job)
    assert m["state"] == "FAILED" and "Master.setup failed: RuntimeError: setup broke" in m["message"], m
    res = cli("status", str(out))
    assert f"{out}: job linreg-test: FAILED after 0 supersteps: " in res.stdout, res.stdout + res.stderr
    # a job refused for its input, by the master itself (the input went away after the checks, say),
    # leaves the output as it was: that is no run of it
    del spec["algorithm"]["params"]["master_raises_in"]
    job.write_text(yaml.safe_dump(spec))
    assert cli("run", str(job)).returncode == 0 and (out / "result.npz").exists()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    gone = load_job(job).replace(input=InputSpec(paths=(str(tmp_path / "moved"),)))
    with pytest.raises(JobFailed, match=rf"the input: input path {tmp_path / 'moved'}: does not exist") as info:
        AppMaster(gone, LocalLauncher(out / "logs2")).run()
    assert info.value.retry is False
    assert (out / "result.npz").exists() and metrics(job)["state"] == "SUCCEEDED"
    assert (out / "checkpoints").exists() and list((out / "checkpoints").glob("ckpt-*.npz"))


def test_a_corrupt_file_fails_the_job_at_once_naming_it(tmp_path):
    data = write_dataset(tmp_path / "data")
    odd = data / "part-00001.parquet"
    raw = bytearray(odd.read_bytes())
    for off in range(4, 24):  # the first page header: pyarrow says OSError (errno None), "Couldn't deserialize"
        raw[off] ^= 0xFF
    odd.write_bytes(bytes(raw))
    job = make_job(tmp_path, data, "corrupt", max_restarts=3)
    res = cli("run", str(job))
    assert res.returncode != 0
    assert f"input file {odd}, row group 0:" in res.stderr
    assert metrics(job)["replacements"] == 0  # every replacement would read the same bytes


def test_failures_a_new_attempt_would_only_repeat_are_final(tmp_path, dataset, monkeypatch):
    """On YARN such a failure ends the application at the next attempt (JobFailed.retry)."""
    monkeypatch.chdir(ROOT)  # the workers import tests.algos
    monkeypatch.setenv("PYTHONPATH", str(ROOT))

    def failure(job_path: Path) -> JobFailed:
        job = load_job(job_path)
        with pytest.raises(JobFailed) as info:
            AppMaster(job, LocalLauncher(Path(job.output) / "logs")).run()
        return info.value

    data = write_dataset(tmp_path / "data")
    spoil_record(data)
    bad_input = failure(make_job(tmp_path, data, "badrecord"))
    assert "row 742" in str(bad_input) and bad_input.retry is False
    lost = failure(make_job(tmp_path, dataset, "limit", die_at=1, max_restarts=1))
    assert "workers.max_restarts (1)" in str(lost) and lost.retry is True  # the cluster may do better

    out = Output(str(tmp_path / "out")).create()
    assert final_failure_of(out, "application_1_0001") is None
    record_final_failure(out, "application_1_0001", 1, str(bad_input))
    seen = final_failure_of(out, "application_1_0001")
    assert seen == {"application": "application_1_0001", "attempt": 1, "reason": str(bad_input), "stopped": False}
    assert final_failure_of(out, "application_1_0002") is None  # a later submission runs
    out.write_bytes(FAILURE_MARKER, b"{not json")
    assert final_failure_of(out, "application_1_0001") is None  # unreadable: the attempt runs


def test_nan_update_is_rejected_and_fails_the_job_clearly(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "nan", nan_at=1, max_restarts=3)
    res = cli("run", str(job))
    assert res.returncode != 0
    assert "holds 1 NaN and 0 Inf value(s)" in res.stderr
    assert "array 'w'" in res.stderr and "this fails the job at once" in res.stderr
    m = metrics(job)
    assert m["history"][-1]["superstep"] == 0  # superstep 1 never combined a NaN
    assert m["replacements"] == 0  # a replacement would compute the same NaN


def test_an_update_of_another_layout_names_its_split_whichever_pushes_first(tmp_path, dataset):
    for odd in (0, 2):
        job = make_job(tmp_path, dataset, f"wide{odd}", workers=3, wide_at=1, wide_split=odd, max_restarts=3)
        res = cli("run", str(job))
        assert res.returncode != 0
        others = ", ".join(str(i) for i in range(3) if i != odd)
        assert (f"superstep 1: the update of split {odd} does not match those of split(s) {others}: array 'w' "
                "is float32[9] where the others have float32[8]") in res.stderr
        assert metrics(job)["replacements"] == 0
    job = make_job(tmp_path, dataset, "wide-of-two", workers=2, wide_at=1, wide_split=0)
    res = cli("run", str(job))
    assert res.returncode != 0  # one against one: both named, neither blamed
    assert ("superstep 1: the splits' updates do not hold the same arrays (split 0: w float32[9]; split 1: w "
            "float32[8])") in res.stderr


def test_a_worker_lost_after_its_push_costs_one_replacement(tmp_path, dataset, baseline):
    marker = tmp_path / "died"
    job = make_job(tmp_path, dataset, "pushed", kill_soon_at=2, die_split=1, die_marker=str(marker),
                   slow_at=2, slow_split=0, max_restarts=1)
    res = cli("run", str(job))
    assert res.returncode == 0, res.stderr
    assert marker.exists()
    assert metrics(job)["replacements"] == 1
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])
    # the killed worker had pushed superstep 2 (else this was an ordinary loss): its log ends there
    logs = [p.read_text() for p in (Path(load_job(job).output) / "logs").glob("*.log")]
    assert any("superstep 2: computed" in text and "superstep 3: computed" not in text for text in logs)


def workers_of(master_pid: int) -> list[int]:
    """Live worker processes started by the master with this PID."""
    mark = f"ITERREDUCE_PARENT_PID={master_pid}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
                if state != "Z":
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_master_that_fails_right_after_a_resume_is_told_of_state_and_restore(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "forgetful", sleep=0.4, forgetful=True)
    out = Path(load_job(job).output)
    run_and_kill_after_checkpoint(job, out / "checkpoints", 3)
    res = cli("run", "--resume", str(job))
    assert res.returncode != 0
    step = int(re.search(r"resumed from checkpoint .* at superstep (\d+)", res.stderr)[1])
    assert f"Master.combine at superstep {step} failed: RuntimeError: done_steps is 0 at superstep {step} (this run " \
        f"resumed from the checkpoint of superstep {step} just before: a master that keeps anything across " \
        "supersteps returns it from state() and takes it back in restore())" in res.stderr, res.stderr


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, dataset, baseline):
    job = make_job(tmp_path, dataset, "resumed", sleep=0.4)
    out = Path(load_job(job).output)
    master_pid = run_and_kill_after_checkpoint(job, out / "checkpoints", 3)
    assert not (out / "result.npz").exists()
    deadline = time.monotonic() + 3  # less than heartbeat.master_timeout: they die with the master
    while workers_of(master_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not workers_of(master_pid), "workers outlived their killed master"
    first_logs = {p.name: p.read_bytes() for p in (out / "logs").glob("local_*.log")}
    assert sorted(first_logs) == ["local_0001.log", "local_0002.log"]
    for name, text in first_logs.items():  # each says why it ended (a line of its own may yet follow)
        assert f"ERROR iterreduce: the master (pid {master_pid}) died: this worker exits".encode() in \
            b"\n".join(text.rstrip().splitlines()[-3:]), (name, text[-300:])
    res = cli("status", str(out))  # its marker is there, its process is not: a state told (exit 0)
    assert res.returncode == 0 and f"{out}: the run after superstep " in res.stdout, res.stdout + res.stderr
    assert "ended without a result (its process was killed?); `iterreduce run --resume JOB_FILE` continues" \
        in res.stdout
    res = cli("status", "-f", str(out))  # followed: it did not succeed
    assert res.returncode == 1 and "ended without a result" in res.stderr, res.stdout + res.stderr
    res = cli("run", "--resume", str(job))
    assert res.returncode == 0, res.stderr
    assert "resumed from checkpoint" in res.stderr
    # the killed run's worker logs are kept; the resumed run's workers are numbered after them
    assert {n: (out / "logs" / n).read_bytes() for n in first_logs} == first_logs
    assert sorted(p.name for p in (out / "logs").glob("local_*.log"))[2:] == ["local_0003.log", "local_0004.log"]
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])
    assert [h["superstep"] for h in metrics(job)["history"]] == list(range(6))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["superstep"] for line in lines] == list(range(6))


def test_resume_refuses_a_checkpoint_of_other_settings_and_a_new_run_starts_clean(tmp_path, dataset, baseline):
    job = make_job(tmp_path, dataset, "fp")
    assert cli("run", str(job)).returncode == 0
    out = Path(load_job(job).output)
    spec = yaml.safe_load(job.read_text())
    spec["seed"] = 12
    spec["algorithm"]["params"]["lr"] = 0.25
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(spec))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    res = cli("run", "--resume", str(other))
    assert res.returncode != 0
    assert "cannot resume from" in res.stderr and "a job with other settings wrote it" in res.stderr
    assert "algorithm.params.lr: (not set) there, 0.25 here" in res.stderr and "seed: 11 there, 12 here" in res.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing lost
    # the same job, finished: nothing to resume, its results stay; a fresh run into the same
    # output does not keep the old supersteps
    stamp = (out / "result.npz").stat().st_mtime_ns
    res = cli("run", "--resume", str(job))
    assert res.returncode == 0 and "had already succeeded: nothing to resume" in res.stderr  # the log
    assert res.stdout == (f"job linreg-test had already succeeded after 6 supersteps: nothing to resume (run "
                          f"without --resume to run it again); results in {out}\n")
    assert (out / "result.npz").stat().st_mtime_ns == stamp
    assert cli("run", str(job)).returncode == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["superstep"] for line in lines] == list(range(6))
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])


def test_a_resume_with_nothing_at_all_to_resume_is_refused_not_started_from_scratch(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "typo")
    res = cli("run", "--resume", str(job), "--output", str(tmp_path / "tpyo"))
    assert res.returncode != 0
    assert (f"nothing to resume: {tmp_path / 'tpyo'} does not exist, nor {tmp_path / 'tpyo' / 'checkpoints'} "
            "(a mistyped output?); run without --resume to start the job") in res.stderr, res.stderr
    assert not (tmp_path / "tpyo").exists()


def test_resume_refuses_when_no_checkpoint_can_be_read_and_loses_nothing(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "damaged")
    assert cli("run", str(job)).returncode == 0
    out = Path(load_job(job).output)
    (out / "metrics.json").unlink()  # not a finished job: a resume would read the checkpoints
    for ckpt in (out / "checkpoints").iterdir():
        ckpt.write_bytes(ckpt.read_bytes()[:100])  # cut short
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert before
    res = cli("run", "--resume", str(job))
    assert res.returncode != 0
    assert f"{job}: cannot resume: no checkpoint can be read: " in res.stderr
    assert "start the job again without resuming (no --resume)" in res.stderr
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


def test_a_rerun_killed_midway_resumes_itself_not_the_earlier_success(tmp_path, dataset, baseline):
    job = make_job(tmp_path, dataset, "rerun", sleep=0.4)
    out = Path(load_job(job).output)
    assert cli("run", str(job)).returncode == 0  # succeeded once
    run_and_kill_after_checkpoint(job, out / "checkpoints", 3)  # run again, killed midway
    assert not (out / "metrics.json").exists()  # the earlier result is gone with the new run's start
    res = cli("run", "--resume", str(job))
    assert res.returncode == 0, res.stderr
    assert "resumed from checkpoint" in res.stderr and "nothing to resume" not in res.stdout + res.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["superstep"] for line in lines] == list(range(6))
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])


def test_a_resumed_master_has_its_own_replacement_budget(tmp_path, dataset, baseline):
    marker = tmp_path / "died"
    job = make_job(tmp_path, dataset, "budget", sleep=0.4, die_at=4, die_split=1, die_marker=str(marker),
                   max_restarts=1)
    out = Path(load_job(job).output)
    run_and_kill_after_checkpoint(job, out / "checkpoints", 3)
    assert not marker.exists()
    # as if the earlier master had used up workers.max_restarts and more
    ckpt = max((out / "checkpoints").glob("ckpt-*.npz"))
    with np.load(ckpt) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    meta["replacements"] = 5
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(ckpt, **arrays)
    res = cli("run", "--resume", str(job))
    assert res.returncode == 0, res.stderr  # one more loss after the resume: within this master's budget
    assert marker.exists() and "starting a replacement (1 of at most 1)" in res.stderr
    assert metrics(job)["replacements"] == 6  # the job's total is still reported
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])


class InProcessJob:
    """The AppMaster in a thread of the test, so the test can talk to it and its workers."""

    def __init__(self, job_path: Path):
        self.job = load_job(job_path)
        self.launcher = LocalLauncher(Path(self.job.output) / "logs")
        cwd = os.getcwd()
        os.chdir(ROOT)  # the workers import tests.algos
        try:
            self.am = AppMaster(self.job, self.launcher)
        finally:
            os.chdir(cwd)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.am.run()
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def __enter__(self):
        os.environ["PYTHONPATH"] = str(ROOT)
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.am.server is None or self.am.status()["workers_registered"] < self.job.workers.count:
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.thread.join(120)
        assert not self.thread.is_alive(), "the job did not end"


def test_bad_messages_are_rejected_without_harming_the_job(tmp_path, dataset, baseline):
    with InProcessJob(make_job(tmp_path, dataset, "badmsg", sleep=0.3)) as j:
        url = j.am.server.url
        wrong = ipc.IPCClient(url, "not-the-token")
        with pytest.raises(ipc.RemoteError) as err:
            wrong.call("status")
        assert err.value.code == "BAD_TOKEN"
        right = ipc.IPCClient(url, j.am.token)
        step = right.call("status")["superstep"]
        nan = {"superstep": step, "arrays": ipc.encode_arrays({"w": np.full(8, np.nan, np.float32)}),
               "num_samples": 1, "metrics": {}, "meta": "{}"}
        with pytest.raises(ipc.RemoteError) as err:  # not a registered worker
            right.call("push", worker_id="intruder", update=nan)
        assert err.value.code == "NOT_REGISTERED"
        wid = next(iter(j.am._workers))
        with pytest.raises(ipc.RemoteError) as err:
            right.call("push", worker_id=wid, update=nan)
        assert err.value.code == "BAD_UPDATE" and "NaN" in str(err.value)
        malformed = dict(nan, arrays=[{"name": "w", "dtype": "<f4", "shape": [9], "data": b"\0" * 32}])
        with pytest.raises(ipc.RemoteError) as err:
            right.call("push", worker_id=wid, update=malformed)
        assert err.value.code == "BAD_UPDATE" and "malformed update" in str(err.value)
        with pytest.raises(ipc.RemoteError) as err:
            right.call("fetch", worker_id=wid, superstep=-5, wait_ms=0)
        assert err.value.code == "STALE_SUPERSTEP"
    assert j.error is None
    np.testing.assert_array_equal(result(tmp_path / "badmsg.yaml")["w"], result(baseline)["w"])


def test_a_repeated_push_keeps_the_first_complete_waits_for_the_end_and_peer_text_stays_one_line(
        tmp_path, dataset, baseline, caplog):
    caplog.set_level(logging.INFO, logger="iterreduce")
    job = make_job(tmp_path, dataset, "repeat", slow_at=2, slow_split=1, slow_for=4)
    with InProcessJob(job) as j:
        right = ipc.IPCClient(j.am.server.url, j.am.token)
        deadline = time.monotonic() + 30
        while True:  # superstep 2: split 0 has pushed, split 1 sleeps 4 s
            with j.am._cond:
                by_split = {i.split: i for i in j.am._workers.values()}
                if j.am._superstep == 2 and len(by_split) == 2 and by_split[0].superstep == 3:
                    break
            assert time.monotonic() < deadline, "split 0 did not push superstep 2"
            time.sleep(0.02)
        w0, w1 = by_split[0].worker_id, by_split[1].worker_id

        def forged(step):
            return {"superstep": step, "arrays": ipc.encode_arrays({"w": np.full(8, 1e6, np.float32)}),
                    "num_samples": 10 ** 6, "metrics": {}, "meta": "{}"}
        # split 0 pushes superstep 2 again (other numbers): the first is kept
        assert right.call("push", worker_id=w0, update=forged(2)) == {"accepted": True, "message": "already taken",
                                                                      "stop": False}
        # split 1's push of superstep 1, sent again after it was combined (its answer lost): accepted
        assert right.call("push", worker_id=w1, update=forged(1))["message"] == "already taken"
        for worker, step, words in ((w1, 0, "superstep 0 is over"), (w0, 5, "superstep 5 has not begun")):
            with pytest.raises(ipc.RemoteError) as err:
                right.call("push", worker_id=worker, update=forged(step))
            assert err.value.code == "STALE_SUPERSTEP" and words in str(err.value)
        with pytest.raises(ipc.RemoteError) as err:  # not while the job runs: it would drop a live worker
            right.call("complete", worker_id=w0)
        assert err.value.code == "REJECTED" and "the job is RUNNING, not done" in str(err.value)
        assert right.call("complete", worker_id="intruder")["accepted"] is False
        assert w0 in j.am._workers
        # a failure where no worker can be: refused, the worker kept
        for step, stage, code, words in ((7, "compute", "STALE_SUPERSTEP", "fail from worker %s at superstep 7: the "
                                          "job is at superstep 2"), (1, "compute", "STALE_SUPERSTEP", "at superstep 1:"),
                                         (3, "setup", "STALE_SUPERSTEP", "in setup (before superstep 3)"),
                                         (2, "lunch", "REJECTED", "stage 'lunch' is neither setup nor compute")):
            with pytest.raises(ipc.RemoteError) as err:
                right.call("fail", worker_id=w0, superstep=step, error="RuntimeError: x", traceback="",
                           fatal=True, stage=stage)
            assert err.value.code == code and (words.replace("%s", w0) if "%s" in words else words) \
                in str(err.value), str(err.value)
        assert w0 in j.am._workers and j.am._state == "RUNNING"
        # a failure's text is the peer's: a newline in it does not make a log line of its own
        right.call("fail", worker_id=w0, superstep=2, error="RuntimeError: boom\nINFO job succeeded",
                   traceback="Traceback (most recent call last):\nINFO forged too\n", fatal=False, stage="compute")
    assert j.error is None, j.error
    assert "RuntimeError: boom\n    INFO job succeeded" in caplog.text and "\n    INFO forged too" in caplog.text
    assert not any(line.startswith(("INFO job", "INFO forged")) for line in caplog.text.splitlines())
    assert "a second update from worker" in caplog.text and "refused: complete from worker" in caplog.text
    assert metrics(job)["replacements"] == 1  # the worker that 'failed' was replaced
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])


def test_silent_worker_is_replaced_after_heartbeat_timeout(tmp_path, dataset, baseline):
    job = make_job(tmp_path, dataset, "silent", sleep=0.5, heartbeat_timeout=3.0)
    with InProcessJob(job) as j:
        cid = next(iter(j.launcher._procs))
        os.kill(j.launcher.pid(cid), signal.SIGSTOP)  # alive but silent
    assert j.error is None, j.error
    assert metrics(job)["replacements"] == 1
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])


def test_a_stray_sigusr2_does_not_stop_a_worker_whose_master_lives(tmp_path, dataset, baseline):
    job = make_job(tmp_path, dataset, "usr2", sleep=0.3)
    with InProcessJob(job) as j:  # SIGUSR2 is the worker's master-died signal (PR_SET_PDEATHSIG)
        deadline = time.monotonic() + 30
        while not (j.launcher._procs and all(p.returncode is None for p in j.launcher._procs.values())
                   and j.am.status()["superstep"] >= 1):
            assert time.monotonic() < deadline, "the job did not reach superstep 1"
            time.sleep(0.05)
        for cid in list(j.launcher._procs):
            os.kill(j.launcher.pid(cid), signal.SIGUSR2)
    assert j.error is None, j.error
    assert metrics(job)["replacements"] == 0
    logs = "".join(p.read_text() for p in (Path(load_job(job).output) / "logs").glob("local_*.log"))
    assert "died: this worker exits" not in logs
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])


def test_a_worker_hung_in_a_superstep_is_replaced_after_superstep_timeout(tmp_path, dataset, baseline):
    marker = tmp_path / "slept"
    job = make_job(tmp_path, dataset, "hung", slow_at=2, slow_split=1, slow_for=600, slow_marker=str(marker))
    spec = yaml.safe_load(job.read_text())
    spec["heartbeat"]["superstep_timeout"] = 10  # its heartbeats go on: only this notices
    job.write_text(yaml.safe_dump(spec))
    res = cli("run", str(job), timeout=120)
    assert res.returncode == 0, res.stderr
    assert marker.exists()
    assert "in superstep 2 without finishing it (heartbeat.superstep_timeout is 10 s)" in res.stderr
    assert metrics(job)["replacements"] == 1
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])


def test_unreadable_input_file_is_named_before_any_worker_starts(tmp_path, dataset):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "part-00002.parquet").write_bytes(b"PAR1 this is not parquet")
    job = make_job(tmp_path, data, "corrupt")
    res = cli("run", str(job))
    assert res.returncode != 0
    assert f"input file {data / 'part-00002.parquet'}: not a readable Parquet file" in res.stderr
    assert not (Path(load_job(job).output) / "logs" / "local_0001.log").exists()


def test_missing_input_path_is_named(tmp_path):
    job = make_job(tmp_path, tmp_path / "nowhere", "missing")
    res = cli("run", str(job))
    assert res.returncode != 0
    assert f"input: path {tmp_path / 'nowhere'}: does not exist" in res.stderr


def test_record_error_is_part_of_the_top_level_api_without_importing_pyarrow_up_front():
    import subprocess
    import sys

    code = ("import sys, iterreduce; assert 'pyarrow' not in sys.modules, 'import iterreduce pulled in pyarrow'; "
            "from iterreduce import RecordError; from iterreduce.fs import InputError, RecordError as R; "
            "assert RecordError is R and issubclass(R, InputError); print(R(3, 'bad', 'f.parquet'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "f.parquet, row 3: bad"


def test_update_meta_must_be_a_json_object():
    from iterreduce.api import Update

    for bad in ([1, 2], "text", {1: "int key"}):
        with pytest.raises(TypeError, match="Update.meta must be a dict with string keys"):
            Update(meta=bad)
    assert Update(meta={"a": [1, 2]}).meta == {"a": [1, 2]}
    with pytest.raises(TypeError, match=r"^Update\.arrays\['w'\]: list \[\[1, 2\], \[3\]\] is not an array \("):
        Update(arrays={"w": [[1, 2], [3]]})  # ragged
    # a metric that is one number in an array (x.mean(keepdims=True), np.array(1.)) is that number
    u = Update(metrics={"sse": np.array(2.5), "n": np.array([[3]], np.int64)})
    assert u.metrics == {"sse": 2.5, "n": 3.0} and all(type(v) is float for v in u.metrics.values())
    with pytest.raises(TypeError, match=r"Update\.metrics\['v'\] must be a number, got ndarray"):
        Update(metrics={"v": np.array([1.0, 2.0])})


def test_progress_that_loses_its_terminal_stops_drawing_and_the_job_goes_on():
    import os
    import signal as _signal

    from iterreduce.client import Progress

    r, w = os.pipe()
    os.close(r)  # nobody reads any more: every write fails, as on a closed terminal
    old = _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    try:
        with os.fdopen(w, "w", buffering=1) as stream:
            p = Progress(stream, lines=True)
            status = {"superstep": 1, "state": "RUNNING", "total": 4, "phase": "compute", "metrics": {}}
            p(status)  # BrokenPipeError inside: swallowed
            assert not p.lines and not p.enabled
            p({**status, "superstep": 2})  # and nothing is written again
            try:
                stream.close()
            except OSError:
                pass
    finally:
        _signal.signal(_signal.SIGPIPE, old)


def test_an_update_too_large_for_a_message_fails_the_job_at_once_saying_so(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "huge", max_restarts=3, huge_at=1)
    res = cli("run", str(job))
    assert res.returncode != 0
    assert "RejectedUpdate: the update's arrays hold 10737418" in res.stderr
    assert "bytes; a message to the master carries at most 1024 MiB" in res.stderr
    assert "this fails the job at once" in res.stderr and metrics(job)["replacements"] == 0


def test_a_failed_rerun_leaves_no_result_of_the_earlier_run(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "rerun")
    assert cli("run", str(job)).returncode == 0
    out = Path(load_job(job).output)
    assert metrics(job)["files"] == ["result.npz", "result.json"] and (out / "result.npz").exists()
    from iterreduce.client import earlier_results  # what submit warns of before it replaces them

    assert earlier_results(load_job(job)) == f"{out} holds the results of job linreg-test (SUCCEEDED): result.npz, " \
        "result.json"
    (out / "mine.txt").write_text("the user's own file")
    again = make_job(tmp_path, dataset, "rerun", raise_at=2, raise_everywhere=True)  # same output
    res = cli("run", str(again))
    assert res.returncode != 0
    assert f"{out} holds the results of job linreg-test (SUCCEEDED): result.npz, result.json: removing them; this " \
        "run writes its own" in res.stderr, res.stderr  # said, not done silently
    m = metrics(again)
    assert m["state"] == "FAILED" and m["files"] == [] and earlier_results(load_job(again)) is None
    assert not (out / "result.npz").exists() and not (out / "result.json").exists()
    assert (out / "mine.txt").read_text() == "the user's own file"  # only what the job wrote goes


def test_a_requested_stop_ends_the_job_saying_so_and_resume_finishes_it(tmp_path, dataset, baseline):
    job = make_job(tmp_path, dataset, "stopped", sleep=0.3)
    with InProcessJob(job) as j:
        deadline = time.monotonic() + 60
        while j.am.status()["superstep"] < 2:  # checkpoints of supersteps 1 and 2 written
            assert time.monotonic() < deadline, "the job did not reach superstep 2"
            time.sleep(0.05)
        # `ps` tells the workers apart: container and split are on their command lines
        argv = [Path(f"/proc/{j.launcher.pid(c)}/cmdline").read_bytes().split(b"\0") for c in list(j.launcher._procs)]
        assert sorted(a[a.index(b"iterreduce.worker") + 2] for a in argv) == [b"--split=0", b"--split=1"], argv
        j.am.request_stop("iterreduce kill by tester")
    assert isinstance(j.error, KeyboardInterrupt), j.error
    assert all(p.poll() is not None for p in j.launcher._procs.values()), "a worker outlived the stop"
    m = metrics(job)
    assert m["state"] == "FAILED", m
    assert m["message"] == "interrupted (iterreduce kill by tester); a run with --resume continues from the last checkpoint"
    assert not Output(load_job(job).output).exists("result.npz")
    res = cli("run", "--resume", str(job))
    assert res.returncode == 0, res.stderr
    assert "resumed from checkpoint" in res.stderr
    np.testing.assert_array_equal(result(job)["w"], result(baseline)["w"])


def run_in_background(job: Path, until: Callable[[Path], bool], what: str):
    """``iterreduce run JOB`` in a process of its own, returned once ``until(output)`` holds."""
    import subprocess
    import sys

    out = Path(load_job(job).output)
    proc = subprocess.Popen([sys.executable, "-m", "iterreduce.cli", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not until(out):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"the run did not get to {what}")
        time.sleep(0.05)
    return proc


def test_a_second_run_into_an_output_another_run_is_writing_is_refused(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "busy", sleep=0.3, supersteps=40)
    out = Path(load_job(job).output)
    proc = run_in_background(job, lambda out: (out / "running.json").exists(), "its start")
    try:
        res = cli("run", str(job))
        assert res.returncode != 0
        assert f"output: a local run of job linreg-test (process {proc.pid}) is writing to {out}" in res.stderr
        assert proc.poll() is None  # the first run goes on
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not (out / "running.json").exists()  # the stopped run took its marker away
    killed = run_and_kill_after_checkpoint(job, out / "checkpoints", 1)  # SIGKILL: the marker stays, dead
    assert json.loads((out / "running.json").read_text())["pid"] == killed
    res = cli("run", "--resume", str(job))
    assert res.returncode == 0, res.stderr


def test_status_of_an_output_directory_shows_a_local_run_live_then_how_it_ended(tmp_path, dataset):
    job = make_job(tmp_path, dataset, "watched", sleep=0.4, supersteps=12)
    out = Path(load_job(job).output)
    proc = run_in_background(job, lambda out: (out / "metrics.jsonl").exists()
                             and bool((out / "metrics.jsonl").read_text().strip()), "its first superstep")
    try:
        res = cli("status", str(out))
        assert res.returncode == 0, res.stderr
        assert f"{out}: job linreg-test: RUNNING (local run, process {proc.pid} on " in res.stdout, res.stdout
        assert re.search(r"\nsuperstep \d+ \(\d+ done\) \| sgd step \d+ \| [\d.]+ s \| [\d.]+ MB exchanged \| mse=",
                         res.stdout), res.stdout
        res = cli("status", "-f", str(out))  # a line per superstep, to the end
        assert res.returncode == 0, res.stderr
        shown = [line.split(" ", 1)[1].split(" | ")[0] for line in res.stdout.splitlines() if " done) | " in line]
        assert shown and shown[-1] == "superstep 11 (12 done)", res.stdout
        assert res.stdout.rstrip().endswith(f"{out}: job linreg-test: SUCCEEDED after 12 supersteps"), res.stdout
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    res = cli("status", str(out))
    assert res.returncode == 0 and f"{out}: job linreg-test: SUCCEEDED after 12 supersteps" in res.stdout
    res = cli("status", str(tmp_path))
    assert res.returncode != 0 and f"{tmp_path}: not an output directory of an iterreduce run" in res.stderr
