"""Integration tests of the pseudo-distributed Hadoop harness itself
(tests/hadoop/pseudo-hadoop): HDFS through WebHDFS, YARN through skein."""

from __future__ import annotations

import glob
import os
import subprocess
import time
import uuid

import pytest

pytestmark = pytest.mark.hadoop

FINAL_STATES = {"FINISHED", "FAILED", "KILLED"}


def test_webhdfs_write_read_roundtrip(hadoop_cluster):
    fs = hadoop_cluster.webhdfs_fs()
    base = "/user/%s/harness-%s" % (hadoop_cluster.user, uuid.uuid4().hex[:8])
    payload = b"hello from pseudo-hadoop\n" + bytes(range(256)) * 64
    try:
        fs.mkdirs(base, exist_ok=True)
        with fs.open(base + "/data.bin", "wb") as f:
            f.write(payload)
        assert fs.info(base + "/data.bin")["size"] == len(payload)
        with fs.open(base + "/data.bin", "rb") as f:
            assert f.read() == payload
        assert [os.path.basename(p) for p in fs.ls(base, detail=False)] == ["data.bin"]
    finally:
        fs.rm(base, recursive=True)
    assert not fs.exists(base)


def test_tmp_is_world_writable_and_home_exists(hadoop_cluster):
    fs = hadoop_cluster.webhdfs_fs()
    assert fs.info("/tmp")["permission"] == "1777"
    assert fs.isdir("/user/%s" % hadoop_cluster.user)


def test_fsshell_shim_lists_root(hadoop_cluster):
    out = subprocess.run(["hdfs", "dfs", "-ls", "/"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "/tmp" in out.stdout and "/user" in out.stdout


def test_yarn_classpath_glob_shim(hadoop_cluster):
    out = subprocess.run(["yarn", "classpath", "--glob"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    entries = out.split(":")
    assert entries[0] == hadoop_cluster.conf_dir
    jars = [e for e in entries if e.endswith(".jar")]
    assert any("hadoop-yarn-client" in os.path.basename(j) for j in jars)
    assert all(os.path.exists(j) for j in jars)
    assert not any("*" in e for e in entries)


def test_client_configures_a_cluster_it_does_not_start(hadoop_cluster, tmp_path):
    """`pseudo-hadoop client` (for docker/hadoop-compose.yml's cluster): the configuration,
    shims and export lines only; with them the FsShell and the YARN CLI reach the cluster
    that runs on those ports (here the harness's own)."""
    harness = os.path.join(os.path.dirname(__file__), "..", "hadoop", "pseudo-hadoop")
    home = tmp_path / "client"
    env = {**os.environ, "PSEUDO_HADOOP_HOME": str(home)}
    res = subprocess.run([harness, "client", "--version", os.environ.get("PSEUDO_HADOOP_VERSION", "3.5.0")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in res.stdout.splitlines())
    assert exports["HADOOP_CONF_DIR"] == str(home / "conf") and (home / "bin" / "yarn").exists()
    assert not list(home.glob("run/*.pid")) and not (home / "data").exists()  # nothing started
    client_env = {**os.environ, "HADOOP_CONF_DIR": str(home / "conf"), "YARN_CONF_DIR": str(home / "conf")}
    ls = subprocess.run([str(home / "bin" / "hdfs"), "dfs", "-ls", "/"], env=client_env, capture_output=True,
                        text=True, timeout=120)
    assert ls.returncode == 0 and "/tmp" in ls.stdout, ls.stderr
    nodes = subprocess.run([str(home / "bin" / "yarn"), "node", "-list"], env=client_env, capture_output=True,
                           text=True, timeout=120)
    assert nodes.returncode == 0 and "RUNNING" in nodes.stdout, nodes.stdout + nodes.stderr


def wait_for_final_state(cluster, app_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    app = {}
    while time.time() < deadline:
        app = cluster.rm_get("/ws/v1/cluster/apps/%s" % app_id)["app"]
        if app["state"] in FINAL_STATES:
            return app
        time.sleep(1)
    pytest.fail("application %s not finished after %ds: %r" % (app_id, timeout, app))


def test_skein_application_succeeds(hadoop_cluster, skein_client):
    import skein

    marker = "hello-" + uuid.uuid4().hex[:8]
    spec = skein.ApplicationSpec(
        name="pseudo-hadoop-harness",
        queue="default",
        max_attempts=1,
        services={
            "hello": skein.Service(
                script="echo %s\npython3 -c 'import sys; print(sys.version)'" % marker,
                resources=skein.Resources(memory=128, vcores=1),
            )
        },
    )
    app_id = skein_client.submit(spec)
    app = wait_for_final_state(hadoop_cluster, app_id)
    assert (app["state"], app["finalStatus"]) == ("FINISHED", "SUCCEEDED"), app

    # delete.debug-delay-sec keeps the container logs in the NodeManager's
    # log dirs after the application ends: the service's stdout is there.
    log_dirs = hadoop_cluster.site.get("yarn.nodemanager.log-dirs", "")
    logs = []
    for d in log_dirs.split(","):
        logs += glob.glob(os.path.join(d, app_id, "container_*", "hello.log"))
    assert logs, "no hello.log for %s under %s" % (app_id, log_dirs)
    assert any(marker in open(p).read() for p in logs)
