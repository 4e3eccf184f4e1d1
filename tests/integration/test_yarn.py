"""iterreduce on a real YARN (the pseudo-distributed Hadoop of tests/hadoop/pseudo-hadoop):
submit through skein, input and output on HDFS, workers and ApplicationMaster faults."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.algos import spoil_record, write_dataset
from tests.helpers import cli

pytestmark = pytest.mark.hadoop

ROOT = Path(__file__).resolve().parents[2]
PYTHON = f"python://{sys.executable}"


def rm_app(cluster, app_id: str) -> dict:
    return cluster.rm_get(f"/ws/v1/cluster/apps/{app_id}")["app"]


def wait_final(cluster, app_id: str, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app = rm_app(cluster, app_id)
        if app["state"] in ("FINISHED", "FAILED", "KILLED"):
            return app
        time.sleep(1)
    pytest.fail(f"{app_id} did not end within {timeout} s")


def app_ids(cluster) -> set[str]:
    apps = (cluster.rm_get("/ws/v1/cluster/apps").get("apps") or {}).get("app") or []
    return {a["id"] for a in apps}


@pytest.fixture(scope="session")
def hdfs_base(hadoop_cluster):
    base = f"/user/{hadoop_cluster.user}/iterreduce-it-{uuid.uuid4().hex[:8]}"
    fs = hadoop_cluster.webhdfs_fs()
    fs.mkdirs(base, exist_ok=True)
    yield base
    fs.rm(base, recursive=True)


def upload(cluster, local: Path, remote: str) -> str:
    fs = cluster.webhdfs_fs()
    fs.mkdirs(remote, exist_ok=True)
    for f in sorted(local.glob("*.parquet")):
        fs.put_file(str(f), f"{remote}/{f.name}")
    return f"{cluster.webhdfs_url}{remote}"


def read_hdfs(cluster, path: str) -> bytes:
    with cluster.webhdfs_fs().open(path, "rb") as f:
        return f.read()


def test_output_files_are_replaced_and_appended_on_webhdfs(hadoop_cluster, hdfs_base):
    from iterreduce.fs import Output

    out = Output(f"{hadoop_cluster.webhdfs_url}{hdfs_base}/overwrite").create()
    out.write_json("metrics.json", {"run": 1})
    out.write_json("metrics.json", {"run": 2})  # HDFS's rename would keep run 1
    assert json.loads(out.read_bytes("metrics.json")) == {"run": 2}
    out.append_text("metrics.jsonl", "line1\n")
    out.append_text("metrics.jsonl", "line2\n")
    assert out.read_bytes("metrics.jsonl") == b"line1\nline2\n"
    assert sorted(out.list()) == ["metrics.json", "metrics.jsonl"]  # no temp files left


@pytest.fixture(scope="session")
def linreg_on_hdfs(hadoop_cluster, hdfs_base, tmp_path_factory):
    local = write_dataset(tmp_path_factory.mktemp("linreg") / "train")
    return local, upload(hadoop_cluster, local, f"{hdfs_base}/linreg")


def container_env(cluster) -> dict[str, str]:
    """The containers' environment: the cluster's user, and this process's BLAS settings (an
    OPENBLAS_CORETYPE, say), which the NodeManager does not pass on: with another kernel a
    worker's floats differ in the last bit from the local run the tests compare with."""
    blas = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "MKL_", "OMP_", "NPY_"))}
    return {**blas, "HADOOP_USER_NAME": cluster.user}


def linreg_job(tmp_path: Path, cluster, input_uri: str, output: str, **params) -> Path:
    spec = {
        "name": "yarn-linreg", "seed": 11,
        "workers": {"count": 2, "memory": 256, "max_restarts": 2},
        "master": {"memory": 256},
        "input": {"paths": [input_uri]},
        "output": output,
        "checkpoint": {"every": 1},
        "heartbeat": {"interval": 0.5, "timeout": 30},
        "algorithm": {"master": "tests.algos:LinRegMaster", "worker": "tests.algos:LinRegWorker",
                      "params": {"supersteps": params.pop("supersteps", 6), **params}},
        "yarn": {"environment": PYTHON, "files": [str(ROOT / "tests")], "max_attempts": 2,
                 "env": container_env(cluster)},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def local_result(tmp_path: Path, local_data: Path, **params) -> np.ndarray:
    """The same linreg job run locally: YARN must give the same model."""
    spec = {
        "name": "local-linreg", "seed": 11, "workers": {"count": 2}, "input": {"paths": [str(local_data)]},
        "output": str(tmp_path / "local"), "checkpoint": {"every": 0},
        "algorithm": {"master": "tests.algos:LinRegMaster", "worker": "tests.algos:LinRegWorker",
                      "params": {"supersteps": params.pop("supersteps", 6), **params}},
    }
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = cli("run", str(path))
    assert res.returncode == 0, res.stderr
    return np.load(tmp_path / "local" / "result.npz")["w"]


def hdfs_result(cluster, path: str) -> np.ndarray:
    return np.load(io.BytesIO(read_hdfs(cluster, path)))["w"]


def submit(job: Path) -> str:
    res = cli("submit", str(job))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def live_status(skein_client, app_id: str) -> dict | None:
    try:
        raw = skein_client.connect(app_id, wait=False).kv.get("iterreduce.status")
    except Exception:  # noqa: BLE001 - not up yet, or between attempts
        return None
    return json.loads(raw) if raw else None


def wait_superstep(skein_client, app_id: str, step: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = live_status(skein_client, app_id)
        if st and st["superstep"] >= step:
            return st
        time.sleep(0.5)
    pytest.fail(f"{app_id} did not reach superstep {step} within {timeout} s")


@pytest.fixture(scope="session")
def packed_env(tmp_path_factory):
    """A venv-pack archive of a fresh environment with iterreduce installed (not editable)."""
    tmp = tmp_path_factory.mktemp("packed")
    venv = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "venv-pack", f"{ROOT}[webhdfs]"], check=True, timeout=900)
    out = tmp / "environment.tar.gz"
    subprocess.run([str(venv / "bin" / "venv-pack"), "-p", str(venv), "-o", str(out), "-q"], check=True,
                   timeout=600)
    return out


@pytest.fixture(scope="session")
def mnist_on_hdfs(hadoop_cluster, hdfs_base, mnist_parquet):
    return {name: upload(hadoop_cluster, mnist_parquet / name, f"{hdfs_base}/mnist/{name}")
            for name in ("train", "validation", "test")}


def test_quick_dbn_on_hdfs_with_a_packed_environment_succeeds(hadoop_cluster, hdfs_base, mnist_on_hdfs,
                                                               packed_env, tmp_path):
    spec = yaml.safe_load((ROOT / "examples" / "dbn-quick.yaml").read_text())
    spec["input"]["paths"] = [mnist_on_hdfs["train"]]
    for name in ("train", "validation", "test"):
        spec["algorithm"]["params"][name] = mnist_on_hdfs[name]
    out = f"{hdfs_base}/dbn-quick-out"
    spec["output"] = f"{hadoop_cluster.webhdfs_url}{out}"
    spec["yarn"] = {"environment": str(packed_env), "env": container_env(hadoop_cluster)}
    assert spec["workers"]["count"] == 2
    job = tmp_path / "dbn-quick.yaml"
    job.write_text(yaml.safe_dump(spec))
    res = cli("submit", str(job), "--wait", timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    app_id = res.stdout.strip().splitlines()[0]
    app = rm_app(hadoop_cluster, app_id)
    assert (app["state"], app["finalStatus"]) == ("FINISHED", "SUCCEEDED"), app
    # while the packed environment is shipped and unpacked: what YARN says, not silence
    assert re.search(rf"^\d\d:\d\d:\d\d {app_id} ACCEPTED", res.stderr, re.M), res.stderr
    metrics = json.loads(read_hdfs(hadoop_cluster, f"{out}/metrics.json"))
    assert metrics["state"] == "SUCCEEDED" and metrics["replacements"] == 0
    test_error = metrics["final"]["metrics"]["test_error"]
    assert test_error < 0.05, test_error
    import dbn

    model = dbn.load(io.BytesIO(read_hdfs(hadoop_cluster, f"{out}/model.avro")))
    x, y = _test_set(mnist_on_hdfs["test"])
    assert abs(model.error_rate(x, y) - test_error) < 1e-9
    # the dbn command takes the model and the data where the job left them
    res = subprocess.run([sys.executable, "-m", "dbn.cli", "evaluate", spec["output"] + "/model.avro",
                          mnist_on_hdfs["test"]], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and abs(json.loads(res.stdout)["error_rate"] - test_error) < 1e-9, res.stderr


def _test_set(uri: str):
    from dbn.data import table_to_arrays
    from iterreduce.fs import FilePiece, list_input_files, read_split

    return table_to_arrays(read_split([FilePiece(f) for f in list_input_files([uri])]))


def test_logreg_reads_and_writes_hdfs_and_reaches_its_accuracy(hadoop_cluster, hdfs_base, mnist_on_hdfs, tmp_path):
    spec = yaml.safe_load((ROOT / "examples" / "logreg.yaml").read_text())
    spec["input"]["paths"] = [mnist_on_hdfs["train"]]
    spec["algorithm"]["params"]["test"] = mnist_on_hdfs["test"]
    spec["output"] = f"{hadoop_cluster.webhdfs_url}{hdfs_base}/logreg-out"
    spec["yarn"] = {"environment": PYTHON, "files": [str(ROOT / "examples")],
                    "env": container_env(hadoop_cluster)}
    job = tmp_path / "logreg.yaml"
    job.write_text(yaml.safe_dump(spec))
    res = cli("submit", str(job), "--wait", timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    metrics = json.loads(read_hdfs(hadoop_cluster, f"{hdfs_base}/logreg-out/metrics.json"))
    assert metrics["state"] == "SUCCEEDED"
    assert metrics["final"]["metrics"]["test_error"] < 0.09
    result = np.load(io.BytesIO(read_hdfs(hadoop_cluster, f"{hdfs_base}/logreg-out/result.npz")))
    assert result["W"].shape == (784, 10)


def test_killed_worker_container_is_replaced_on_yarn(hadoop_cluster, hdfs_base, linreg_on_hdfs, skein_client,
                                                     tmp_path):
    local_data, uri = linreg_on_hdfs
    out = f"{hdfs_base}/killed-worker"
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{out}", sleep=1.0, supersteps=14)
    app_id = submit(job)
    wait_superstep(skein_client, app_id, 2)
    status = cli("status", app_id)
    assert status.returncode == 0, status.stderr
    assert f"{app_id} yarn-linreg: RUNNING" in status.stdout and "| workers 2/2 |" in status.stdout
    shown = re.search(r"RUNNING / UNDEFINED, progress (\d+)%\n.*\((\d+)/(\d+) done\)", status.stdout)
    assert shown and f"{int(shown[2]) / int(shown[3]):.0%}" == f"{shown[1]}%", status.stdout  # the live view's
    app = skein_client.connect(app_id, wait=False)
    victims = [c for c in app.get_containers(services=["worker"]) if str(c.state) == "RUNNING"]
    assert victims, "no running worker container"
    app.kill_container(victims[0].id)
    follow = cli("status", "-f", app_id, timeout=600)  # a line per superstep to the end, as submit --wait
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert f"{app_id} yarn-linreg: RUNNING" in follow.stdout and f"{app_id} SUCCEEDED: " in follow.stdout, follow
    lines = [line.split(" ", 1)[1] for line in follow.stdout.splitlines() if "superstep " in line]
    done = [int(line.split()[1]) for line in lines if line.startswith("superstep ")]
    assert done == list(range(14)), follow.stdout  # each superstep once, those before it began too
    assert lines[-1].startswith("SUCCEEDED superstep 13 (14/14 done)"), follow.stdout
    assert "| 1 worker(s) replaced" in lines[-1], follow.stderr
    final = wait_final(hadoop_cluster, app_id)
    assert final["finalStatus"] == "SUCCEEDED", final
    assert "succeeded after 1 worker replacement" in final["diagnostics"]
    metrics = json.loads(read_hdfs(hadoop_cluster, f"{out}/metrics.json"))
    assert metrics["replacements"] == 1
    np.testing.assert_array_equal(hdfs_result(hadoop_cluster, f"{out}/result.npz"),
                                  local_result(tmp_path, local_data, sleep=1.0, supersteps=14))


def _am_jvm_pid(app_id: str) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if b"com.anaconda.skein.ApplicationMaster" in cmd and app_id in cwd:
            return int(pid)
    return None


def test_killed_application_master_resumes_from_checkpoint(hadoop_cluster, hdfs_base, linreg_on_hdfs,
                                                            skein_client, tmp_path):
    local_data, uri = linreg_on_hdfs
    out = f"{hdfs_base}/killed-am"
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{out}", sleep=1.0,
                     supersteps=8)
    app_id = submit(job)
    wait_superstep(skein_client, app_id, 3)
    pid = _am_jvm_pid(app_id)
    assert pid, "the ApplicationMaster's JVM was not found"
    os.kill(pid, signal.SIGKILL)  # the whole AM container dies; YARN starts attempt 2
    final = wait_final(hadoop_cluster, app_id, timeout=600)
    assert final["finalStatus"] == "SUCCEEDED", final
    attempts = hadoop_cluster.rm_get(f"/ws/v1/cluster/apps/{app_id}/appattempts")["appAttempts"]["appAttempt"]
    assert len(attempts) == 2
    metrics = json.loads(read_hdfs(hadoop_cluster, f"{out}/metrics.json"))
    assert [h["superstep"] for h in metrics["history"]] == list(range(8))
    np.testing.assert_array_equal(hdfs_result(hadoop_cluster, f"{out}/result.npz"),
                                  local_result(tmp_path, local_data, sleep=1.0, supersteps=8))


def test_bad_job_file_and_missing_input_are_refused_before_submitting(hadoop_cluster, hdfs_base, tmp_path):
    before = app_ids(hadoop_cluster)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseed: 1\nworkers: {count: 0}\ninput: {paths: [a]}\noutput: o\n"
                   "algorithm: {master: 'a:B', worker: 'a:C'}\n")
    res = cli("submit", str(bad))
    assert res.returncode != 0 and "workers.count: must be at least 1, got 0" in res.stderr
    missing = linreg_job(tmp_path, hadoop_cluster, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/no-such-dir",
                         f"{hadoop_cluster.webhdfs_url}{hdfs_base}/never")
    res = cli("submit", str(missing))
    assert res.returncode != 0 and "no-such-dir: does not exist" in res.stderr
    no_env = yaml.safe_load(missing.read_text())
    del no_env["yarn"]["environment"]
    missing.write_text(yaml.safe_dump(no_env))
    res = cli("submit", str(missing))
    assert res.returncode != 0 and "venv:///" in res.stderr and "python:///" in res.stderr
    bad_params = linreg_job(tmp_path, hadoop_cluster, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/no-such-dir",
                            f"{hadoop_cluster.webhdfs_url}{hdfs_base}/never")
    spec = yaml.safe_load(bad_params.read_text())
    spec["algorithm"] = {"master": "dbn.distributed:DBNMaster", "worker": "dbn.distributed:DBNWorker",
                         "params": {"layers": [20], "finetune": {"learning_rate": -1}}}
    bad_params.write_text(yaml.safe_dump(spec))
    res = cli("submit", str(bad_params))
    assert res.returncode != 0
    assert "algorithm.params.finetune.learning_rate: expected a number > 0, got -1" in res.stderr
    assert app_ids(hadoop_cluster) == before, "something was submitted"


def test_failing_application_is_reported_at_once_with_the_logs_command(hadoop_cluster, hdfs_base,
                                                                        linreg_on_hdfs, tmp_path):
    _, uri = linreg_on_hdfs
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/failing",
                     die_at=1)  # every worker of split 0 kills itself: the replacement limit ends the job
    spec = yaml.safe_load(job.read_text())
    spec["workers"]["max_restarts"] = 1
    job.write_text(yaml.safe_dump(spec))
    t0 = time.monotonic()
    res = cli("submit", str(job), "--wait", timeout=600)
    assert res.returncode != 0
    assert "ended FAILED" in res.stderr and "workers.max_restarts (1)" in res.stderr
    assert "exited with code 137 (killed by SIGKILL" in res.stderr  # recorded by the container: skein says "failed"
    app_id = res.stdout.strip().splitlines()[0]
    assert f"iterreduce logs {app_id}" in res.stderr
    assert time.monotonic() - t0 < 300
    logs = cli("logs", app_id)
    assert logs.returncode == 0 and "worker" in logs.stdout


def test_bad_input_record_ends_the_application_without_running_the_job_again(hadoop_cluster, hdfs_base,
                                                                            tmp_path):
    data = write_dataset(tmp_path / "badrecord")
    spoil_record(data)
    uri = upload(hadoop_cluster, data, f"{hdfs_base}/badrecord")
    out = f"{hdfs_base}/badrecord-out"
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{out}")  # max_attempts: 2
    res = cli("submit", str(job), "--wait", timeout=600)
    assert res.returncode != 0
    app_id = res.stdout.strip().splitlines()[0]
    assert "ended FAILED" in res.stderr
    assert "part-00003.parquet, row 742: x or y is not finite" in res.stderr
    assert ("attempt 1 failed for a reason a new attempt would only repeat, so attempt 2 did not run the job "
            "again") in res.stderr
    attempts = hadoop_cluster.rm_get(f"/ws/v1/cluster/apps/{app_id}/appattempts")["appAttempts"]["appAttempt"]
    assert len(attempts) == 2
    marker = json.loads(read_hdfs(hadoop_cluster, f"{out}/final-failure.json"))
    assert marker["application"] == app_id and marker["attempt"] == 1 and "row 742" in marker["reason"]
    assert json.loads(read_hdfs(hadoop_cluster, f"{out}/metrics.json"))["state"] == "FAILED"


def test_containers_the_cluster_can_never_hold_together_are_refused_before_submitting(hadoop_cluster, hdfs_base,
                                                                                      linreg_on_hdfs, tmp_path):
    _, uri = linreg_on_hdfs
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/toobig")
    spec = yaml.safe_load(job.read_text())
    before = app_ids(hadoop_cluster)
    for memory, words in (("9 GiB", "workers.memory: 9216 MiB is more than this cluster's largest container "
                                    "(yarn.scheduler.maximum-allocation-mb = 8192)"),
                          ("5 GiB", "1 running node(s) of 8192 MiB; the master takes 256 MiB, each worker "
                                    "5120 MiB")):  # within the maximum, but two do not fit the one 8 GiB node
        spec["workers"]["memory"] = memory
        job.write_text(yaml.safe_dump(spec))
        res = cli("submit", str(job), "--wait", timeout=120)
        assert res.returncode != 0 and words in res.stderr, res.stderr
    assert "they hold the master and 1 of the 2 workers" in res.stderr
    assert app_ids(hadoop_cluster) == before  # nothing was submitted


def test_a_queue_the_scheduler_does_not_have_is_refused_before_submitting(hadoop_cluster, hdfs_base,
                                                                         linreg_on_hdfs, tmp_path):
    _, uri = linreg_on_hdfs
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/noqueue")
    spec = yaml.safe_load(job.read_text())
    spec["yarn"]["queue"] = "nosuch"
    job.write_text(yaml.safe_dump(spec))
    before = app_ids(hadoop_cluster)
    res = cli("submit", str(job), timeout=120)
    assert res.returncode != 0, res.stdout
    assert "yarn.queue: this cluster has no queue 'nosuch' to submit to (its leaf queues: default, small)" \
        in res.stderr
    assert app_ids(hadoop_cluster) == before  # nothing was submitted
    # past the check, YARN itself refuses it: said in one line naming the job file, no traceback
    res = cli("submit", "--skip-resource-check", str(job), timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert f"{job}: YARN refused the application: " in res.stderr and "unknown queue: nosuch" in res.stderr


def test_a_job_larger_than_its_queue_may_ever_use_is_refused_before_submitting(hadoop_cluster, hdfs_base,
                                                                            linreg_on_hdfs, tmp_path):
    _, uri = linreg_on_hdfs  # the queue "small" may use 10% of the one node's 8192 MiB: 819 MiB
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/smallqueue")
    spec = yaml.safe_load(job.read_text())
    spec["yarn"]["queue"] = "small"
    spec["workers"]["count"] = 3  # 256 MiB each, and the master's 256: 1024 MiB
    job.write_text(yaml.safe_dump(spec))
    before = app_ids(hadoop_cluster)
    res = cli("submit", str(job), timeout=120)
    assert res.returncode != 0, res.stdout
    assert (f"{job}: yarn.queue: a user's applications in the queue 'small' may use at most 10% of this "
            "cluster's 8192 MiB (819 MiB: its maximum capacity, or its capacity times its user-limit-factor); the "
            "master and 3 workers take 1024 MiB at once") in res.stderr, res.stderr
    assert app_ids(hadoop_cluster) == before  # nothing was submitted
    spec["workers"]["count"] = 2  # 768 MiB: it fits, and runs there
    job.write_text(yaml.safe_dump(spec))
    res = cli("submit", str(job), "--wait", timeout=600)
    assert res.returncode == 0, res.stderr
    app_id = res.stdout.strip().splitlines()[0]
    assert rm_app(hadoop_cluster, app_id)["queue"] in ("small", "root.small")


def test_a_worker_yarn_cannot_place_ends_the_application_with_the_reason(hadoop_cluster, hdfs_base, linreg_on_hdfs,
                                                                         tmp_path):
    # submitted without the check above (--skip-resource-check), as when the cluster shrinks or fills
    # after submission: the ApplicationMaster's own deadline ends it
    _, uri = linreg_on_hdfs
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/noroom")
    spec = yaml.safe_load(job.read_text())
    spec["workers"]["memory"] = "5 GiB"
    spec["heartbeat"]["register_timeout"] = 20
    job.write_text(yaml.safe_dump(spec))
    res = cli("submit", "--skip-resource-check", str(job), "--wait", timeout=600)
    assert res.returncode != 0
    assert "YARN has not allocated the worker container" in res.stderr, res.stderr
    assert "no room for workers of 5120 MiB and 1 vcore(s)" in res.stderr
    assert "attempt 2 did not run the job again" in res.stderr  # a second attempt would wait the same


def test_an_environment_the_containers_cannot_use_is_quoted_from_the_driver_log(hadoop_cluster, hdfs_base,
                                                                                linreg_on_hdfs, tmp_path):
    _, uri = linreg_on_hdfs
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/noenv")
    spec = yaml.safe_load(job.read_text())
    spec["yarn"]["environment"] = f"venv://{tmp_path / 'no-such-venv'}"  # exists on no node
    spec["yarn"]["max_attempts"] = 1
    job.write_text(yaml.safe_dump(spec))
    res = cli("submit", str(job), "--wait", timeout=600)
    assert res.returncode != 0 and "ended FAILED" in res.stderr
    assert "application.driver.log:" in res.stderr and "no-such-venv/bin/activate" in res.stderr
    app_id = res.stdout.strip().splitlines()[0]
    res = cli("status", app_id)  # later, too: the reason, not only "the driver failed"
    assert res.returncode == 0 and "no-such-venv/bin/activate" in res.stdout, res.stdout + res.stderr


def test_kill_now_ends_the_application_and_its_containers(hadoop_cluster, hdfs_base, linreg_on_hdfs, skein_client,
                                                      tmp_path):
    _, uri = linreg_on_hdfs
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{hdfs_base}/killed-app",
                     sleep=1.0, supersteps=100)
    app_id = submit(job)
    wait_superstep(skein_client, app_id, 1)
    res = cli("kill", "--now", app_id)
    assert res.returncode == 0 and f"{app_id} killed" in res.stdout
    final = wait_final(hadoop_cluster, app_id, timeout=120)
    assert final["state"] == "KILLED", final
    deadline = time.monotonic() + 60
    while _am_jvm_pid(app_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _am_jvm_pid(app_id) is None, "the ApplicationMaster outlived the kill"



def test_kill_falls_back_to_skein_when_the_resourcemanagers_rest_api_refuses(hadoop_cluster, hdfs_base,
                                                                             linreg_on_hdfs, skein_client,
                                                                             tmp_path, monkeypatch):
    _, uri = linreg_on_hdfs
    out = f"{hdfs_base}/stopped-by-skein"
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{out}", sleep=1.0, supersteps=100)
    app_id = submit(job)
    wait_superstep(skein_client, app_id, 1)
    conf = tmp_path / "conf"  # the cluster's configuration, but a web address where nothing listens
    shutil.copytree(hadoop_cluster.conf_dir, conf)
    site = (conf / "yarn-site.xml").read_text()
    assert "yarn.resourcemanager.webapp.address" in site
    site = re.sub(r"(<name>yarn\.resourcemanager\.webapp\.address</name>\s*<value>)[^<]*", r"\g<1>127.0.0.1:9",
                  site)
    (conf / "yarn-site.xml").write_text(site)
    monkeypatch.setenv("HADOOP_CONF_DIR", str(conf))
    res = cli("kill", app_id)
    assert res.returncode == 0, res.stderr
    assert f"{app_id} stopped: interrupted (iterreduce kill by" in res.stdout, res.stdout + res.stderr
    final = wait_final(hadoop_cluster, app_id, timeout=60)
    assert final["finalStatus"] == "KILLED", final
    # by skein: YARN has only its own words, not the master's reason the REST API would have left
    assert "iterreduce job yarn-linreg stopped" not in final["diagnostics"], final
    attempts = hadoop_cluster.rm_get(f"/ws/v1/cluster/apps/{app_id}/appattempts")["appAttempts"]["appAttempt"]
    assert len(attempts) == 1
    metrics = json.loads(read_hdfs(hadoop_cluster, f"{out}/metrics.json"))
    assert metrics["state"] == "FAILED" and "interrupted (iterreduce kill by" in metrics["message"], metrics


def test_kill_stops_the_job_saying_so_and_submit_resume_finishes_it(hadoop_cluster, hdfs_base, linreg_on_hdfs,
                                                                    skein_client, tmp_path):
    local_data, uri = linreg_on_hdfs
    out = f"{hdfs_base}/stopped-app"
    job = linreg_job(tmp_path, hadoop_cluster, uri, f"{hadoop_cluster.webhdfs_url}{out}", sleep=1.0, supersteps=30)
    app_id = submit(job)
    # the output is this application's from its submission, not only once its master starts
    owner = json.loads(read_hdfs(hadoop_cluster, f"{out}/running.json"))
    assert owner["application"] == app_id, owner
    wait_superstep(skein_client, app_id, 3)
    before = app_ids(hadoop_cluster)
    res = cli("submit", str(job))  # a second application into the same output: refused while this one runs
    assert res.returncode != 0 and f"application {app_id} (job yarn-linreg) is running with" in res.stderr, res.stderr
    assert app_ids(hadoop_cluster) == before
    res = cli("kill", app_id)
    assert res.returncode == 0, res.stderr
    assert f"{app_id} stopped: interrupted (iterreduce kill by" in res.stdout, res.stdout + res.stderr
    final = wait_final(hadoop_cluster, app_id, timeout=60)
    assert final["finalStatus"] == "KILLED", final
    deadline = time.monotonic() + 60
    while _am_jvm_pid(app_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _am_jvm_pid(app_id) is None, "the ApplicationMaster outlived the stop"
    res = cli("status", app_id)
    assert res.returncode == 0 and res.stdout.startswith(f"{app_id} yarn-linreg: KILLED / KILLED\n"), res.stdout
    followed = cli("status", "-f", app_id)  # followed to an end that is no success: exit status 1
    assert followed.returncode == 1 and followed.stdout.startswith(f"{app_id} yarn-linreg: KILLED"), followed
    version = hadoop_cluster.rm_get("/ws/v1/cluster/info")["clusterInfo"]["hadoopVersion"]
    if int(version.split(".")[0]) >= 3:  # the master's reason, not only "killed by user"
        assert "iterreduce job yarn-linreg stopped: interrupted (iterreduce kill by" in res.stdout, res.stdout
    else:  # Hadoop 2's REST kill takes no diagnostics
        assert "killed by user" in res.stdout, res.stdout
    attempts = hadoop_cluster.rm_get(f"/ws/v1/cluster/apps/{app_id}/appattempts")["appAttempts"]["appAttempt"]
    assert len(attempts) == 1  # a stop is not a failure: no second attempt
    metrics = json.loads(read_hdfs(hadoop_cluster, f"{out}/metrics.json"))
    assert metrics["state"] == "FAILED" and "`iterreduce submit --resume` continues" in metrics["message"], metrics
    stopped_at = len(metrics["history"])
    assert 3 <= stopped_at < 30
    other = tmp_path / "other-seed.yaml"  # a resume with other settings: refused before submitting
    other.write_text(job.read_text().replace("seed: 11", "seed: 12"))
    res = cli("submit", "--resume", str(other))
    assert res.returncode != 0 and "a job with other settings wrote it (seed: 11 there, 12 here)" in res.stderr
    assert str(other) in res.stderr and app_ids(hadoop_cluster) == before | {app_id}
    res = cli("submit", "--resume", "--wait", str(job))
    assert res.returncode == 0, res.stderr
    assert "resuming from the checkpoint at superstep" in res.stderr and "SUCCEEDED" in res.stdout
    done = app_ids(hadoop_cluster)
    res = cli("submit", "--resume", str(job))  # finished: nothing to resume, nothing submitted
    assert res.returncode == 0 and "had already succeeded after 30 supersteps: nothing to resume" in res.stdout
    assert app_ids(hadoop_cluster) == done
    metrics = json.loads(read_hdfs(hadoop_cluster, f"{out}/metrics.json"))
    assert metrics["state"] == "SUCCEEDED" and [h["superstep"] for h in metrics["history"]] == list(range(30))
    np.testing.assert_array_equal(hdfs_result(hadoop_cluster, f"{out}/result.npz"),
                                  local_result(tmp_path, local_data, sleep=1.0, supersteps=30))