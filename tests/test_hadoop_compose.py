"""docker/hadoop-compose.yml must describe the same cluster as the harness
tests/hadoop/pseudo-hadoop writes (same services, ports, configuration).
No Hadoop and no Docker needed."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

yaml = pytest.importorskip("yaml")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPOSE = os.path.join(ROOT, "docker", "hadoop-compose.yml")
HARNESS = os.path.join(ROOT, "tests", "hadoop", "pseudo_hadoop.py")
COMPOSE_USER = "hadoop"  # the apache/hadoop image's user
FILES = ("core-site.xml", "hdfs-site.xml", "yarn-site.xml", "capacity-scheduler.xml")
WILDCARD_HOSTS = {"0.0.0.0", "localhost"}


def _load_harness():
    spec = importlib.util.spec_from_file_location("pseudo_hadoop", HARNESS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ph = _load_harness()


@pytest.fixture(scope="module")
def compose():
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def harness_config():
    return ph.cluster_config(home="/pseudo", user=COMPOSE_USER)


def compose_config(env: dict) -> dict[str, dict[str, str]]:
    """{file: {key: value}} from the image's FILE.XML_key=value variables."""
    out: dict[str, dict[str, str]] = {}
    for var, value in env.items():
        m = re.match(r"^([A-Z-]+\.XML)_(.+)$", var)
        if m:
            out.setdefault(m.group(1).lower(), {})[m.group(2)] = str(value)
    return out


def port_of_owner() -> dict[int, str]:
    return {ph.PORTS[name]: daemon
            for daemon, names in ph.DAEMON_PORTS.items() for name in names}


def test_services_are_the_harness_daemons(compose):
    assert set(compose["services"]) == set(ph.START_ORDER) == set(ph.DAEMON_PORTS)
    for name, svc in compose["services"].items():
        assert svc["hostname"] == name
        assert "apache/hadoop" in svc["image"]


def test_published_ports_match_harness_ports(compose):
    for name, svc in compose["services"].items():
        published = set()
        for entry in svc["ports"]:
            host_ip, host_port, container_port = str(entry).split(":")
            assert host_ip == "127.0.0.1", "%s publishes %s beyond loopback" % (name, entry)
            assert host_port == container_port, entry
            published.add(int(container_port))
        expected = {ph.PORTS[p] for p in ph.DAEMON_PORTS[name]}
        assert published == expected, name


def test_all_services_share_one_configuration(compose):
    configs = [compose_config(svc["environment"]) for svc in compose["services"].values()]
    assert all(c == configs[0] for c in configs)
    assert set(configs[0]) == set(FILES)


def test_configuration_keys_and_values_agree(compose, harness_config):
    conf = compose_config(compose["services"]["nodemanager"]["environment"])
    services = set(compose["services"])
    owners = port_of_owner()
    assert set(conf) == set(harness_config)
    for fname, props in harness_config.items():
        theirs = conf[fname]
        expected_keys = set(props) - ph.HOST_SPECIFIC_KEYS
        assert expected_keys <= set(theirs), (fname, sorted(expected_keys - set(theirs)))
        assert set(theirs) <= set(props), (fname, sorted(set(theirs) - set(props)))
        for key in sorted(expected_keys):
            ours, value = props[key], theirs[key]
            m = re.match(r"^(hdfs://)?127\.0\.0\.1:(\d+)$", ours)
            if m:
                scheme, port = m.group(1) or "", int(m.group(2))
                assert value.startswith(scheme), (key, value)
                host, _, vport = value[len(scheme):].rpartition(":")
                assert int(vport) == port, (key, value, ours)
                assert host in services | WILDCARD_HOSTS, (key, value)
                if host in services and port:
                    assert owners[port] == host, (key, value)
            elif ours == ph.HOST:
                assert value in services | WILDCARD_HOSTS, (key, value)
            else:
                assert value == ours, (fname, key, value, ours)


def test_key_settings_for_skein_present(harness_config):
    """The settings the brief relies on are in the harness (and so, by the
    test above, in the compose file)."""
    yarn = harness_config["yarn-site.xml"]
    hdfs = harness_config["hdfs-site.xml"]
    assert hdfs["dfs.replication"] == "1"
    assert hdfs["dfs.permissions.enabled"] == "false"
    assert int(yarn["yarn.resourcemanager.am.max-attempts"]) >= 2
    assert yarn["yarn.scheduler.minimum-allocation-mb"] == "64"
    assert yarn["yarn.nodemanager.vmem-check-enabled"] == "false"
    assert yarn["yarn.nodemanager.pmem-check-enabled"] == "false"
    assert int(yarn["yarn.nodemanager.delete.debug-delay-sec"]) > 0
    assert harness_config["core-site.xml"]["hadoop.proxyuser.%s.hosts" % COMPOSE_USER] == "*"


def test_harness_binds_loopback_only(harness_config):
    for props in harness_config.values():
        for key, value in props.items():
            for host in re.findall(r"(?:^|//)([A-Za-z0-9_.-]+):\d+", value):
                assert host == "127.0.0.1", (key, value)
