"""Shared fixtures for tests that need the pseudo-distributed Hadoop.

Start the cluster and load its environment first::

    tests/hadoop/pseudo-hadoop start > /tmp/env.sh && . /tmp/env.sh
    pytest -m hadoop tests/integration
    tests/hadoop/pseudo-hadoop stop

Without that environment (HADOOP_CONF_DIR unset) or when the ResourceManager's
REST API does not answer, every test that uses ``hadoop_cluster`` is skipped
with the reason.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import shutil
import urllib.parse
import xml.etree.ElementTree as ET

import pytest


@dataclasses.dataclass(frozen=True)
class HadoopCluster:
    conf_dir: str
    rm_url: str            # http://127.0.0.1:8088
    webhdfs_host: str      # 127.0.0.1
    webhdfs_port: int      # 9870
    fs_url: str            # hdfs://127.0.0.1:9000
    user: str
    site: dict             # merged *-site.xml properties

    @property
    def webhdfs_url(self) -> str:
        return "webhdfs://%s:%d" % (self.webhdfs_host, self.webhdfs_port)

    def rm_get(self, path: str, timeout: float = 10) -> dict:
        import requests

        r = requests.get(self.rm_url + path, timeout=timeout,
                         headers={"Accept": "application/json"})
        r.raise_for_status()
        return r.json()

    def webhdfs_fs(self):
        import fsspec

        return fsspec.filesystem("webhdfs", host=self.webhdfs_host,
                                 port=self.webhdfs_port, user=self.user,
                                 skip_instance_cache=True)


def _read_site(conf_dir: str) -> dict:
    props = {}
    for name in ("core-site.xml", "hdfs-site.xml", "yarn-site.xml"):
        path = os.path.join(conf_dir, name)
        if not os.path.exists(path):
            continue
        for prop in ET.parse(path).getroot().iter("property"):
            key, value = prop.findtext("name"), prop.findtext("value")
            if key:
                props[key] = value or ""
    return props


def _cluster_from_env() -> HadoopCluster | str:
    """The cluster described by the environment, or the reason to skip."""
    conf_dir = os.environ.get("HADOOP_CONF_DIR")
    if not conf_dir:
        return ("HADOOP_CONF_DIR is unset: start the cluster with "
                "`tests/hadoop/pseudo-hadoop start > /tmp/env.sh && . /tmp/env.sh`")
    if not os.path.isdir(conf_dir):
        return "HADOOP_CONF_DIR=%s is not a directory" % conf_dir
    site = _read_site(conf_dir)
    rm_url = os.environ.get("PSEUDO_HADOOP_RM") or "http://" + site.get(
        "yarn.resourcemanager.webapp.address", "127.0.0.1:8088")
    webhdfs = os.environ.get("PSEUDO_HADOOP_WEBHDFS") or "webhdfs://" + site.get(
        "dfs.namenode.http-address", "127.0.0.1:9870")
    parsed = urllib.parse.urlparse(webhdfs)
    user = (os.environ.get("PSEUDO_HADOOP_USER") or os.environ.get("HADOOP_USER_NAME")
            or getpass.getuser())
    cluster = HadoopCluster(
        conf_dir=conf_dir, rm_url=rm_url.rstrip("/"),
        webhdfs_host=parsed.hostname or "127.0.0.1",
        webhdfs_port=parsed.port or 9870,
        fs_url=os.environ.get("PSEUDO_HADOOP_FS") or site.get("fs.defaultFS", ""),
        user=user, site=site)
    try:
        info = cluster.rm_get("/ws/v1/cluster/info", timeout=5)
    except Exception as e:  # noqa: BLE001 - any failure means "not running"
        return "ResourceManager REST API at %s does not answer: %s" % (rm_url, e)
    if info.get("clusterInfo", {}).get("state") != "STARTED":
        return "ResourceManager at %s is not STARTED: %r" % (rm_url, info)
    return cluster


@pytest.fixture(scope="session")
def hadoop_cluster() -> HadoopCluster:
    """The running pseudo-distributed cluster (skips the test when absent)."""
    found = _cluster_from_env()
    if isinstance(found, str):
        if os.environ.get("PSEUDO_HADOOP_REQUIRED"):  # CI started a cluster: its absence is a failure
            pytest.fail(found)
        pytest.skip(found)
    return found


@pytest.fixture(scope="session")
def skein_client(hadoop_cluster, tmp_path_factory):
    """A skein client (its Java driver) talking to the pseudo cluster."""
    skein = pytest.importorskip("skein")
    if shutil.which("yarn") is None:
        pytest.skip("no `yarn` on PATH (skein's driver runs `yarn classpath --glob`)")
    if not os.environ.get("JAVA_HOME"):
        pytest.skip("JAVA_HOME is unset")
    log = tmp_path_factory.mktemp("skein") / "driver.log"
    client = skein.Client(log=str(log))
    try:
        yield client
    finally:
        client.close()
