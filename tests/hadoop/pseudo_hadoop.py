"""A real pseudo-distributed Hadoop (HDFS + YARN) on this machine, for tests.

Stdlib only.  ``tests/hadoop/pseudo-hadoop`` is the command-line wrapper::

    tests/hadoop/pseudo-hadoop start   # fetch jars (Maven), format, start, print env
    tests/hadoop/pseudo-hadoop env     # print the env of the running cluster
    tests/hadoop/pseudo-hadoop status  # exit 1 when a daemon is down
    tests/hadoop/pseudo-hadoop stop    # stop the daemons it started (by PID)
    tests/hadoop/pseudo-hadoop clean   # stop, then remove the working directory

The jars come from Maven Central through ``tests/hadoop/pom.xml`` (cached in
``~/.m2``); NameNode, DataNode, ResourceManager and NodeManager run as four
separate JVMs with their real main classes.  Everything binds to 127.0.0.1.

The configuration is built by :func:`cluster_config` so that other code (the
docker-compose consistency test) can import it.
"""

from __future__ import annotations

import argparse
import getpass
import glob
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from xml.sax.saxutils import escape

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
POM = os.path.join(HERE, "pom.xml")

DEFAULT_VERSION = "3.5.0"
HOST = "127.0.0.1"

#: Fixed ports (the Hadoop 3 defaults, except fs.defaultFS which uses 9000).
PORTS = {
    "namenode_rpc": 9000,
    "namenode_http": 9870,
    "datanode": 9866,
    "datanode_http": 9864,
    "datanode_ipc": 9867,
    "rm_scheduler": 8030,
    "rm_tracker": 8031,
    "rm": 8032,
    "rm_admin": 8033,
    "rm_http": 8088,
    "nm": 45454,
    "nm_localizer": 8040,
    "nm_http": 8042,
}

#: Which daemon listens on which of PORTS (docker/hadoop-compose.yml publishes
#: the same ports from the same services; tests/test_hadoop_compose.py checks).
DAEMON_PORTS = {
    "namenode": ["namenode_rpc", "namenode_http"],
    "datanode": ["datanode", "datanode_http", "datanode_ipc"],
    "resourcemanager": ["rm", "rm_scheduler", "rm_tracker", "rm_admin", "rm_http"],
    "nodemanager": ["nm", "nm_localizer", "nm_http"],
}

#: Keys whose values depend on the machine (paths, the JDK, the jar list):
#: docker/hadoop-compose.yml may set them differently or not at all.
HOST_SPECIFIC_KEYS = {
    "hadoop.tmp.dir",
    "dfs.namenode.name.dir",
    "dfs.datanode.data.dir",
    "yarn.nodemanager.local-dirs",
    "yarn.nodemanager.log-dirs",
    "yarn.nodemanager.admin-env",
    "yarn.application.classpath",
}

DAEMONS = {
    # name: (main class, heap)
    "namenode": ("org.apache.hadoop.hdfs.server.namenode.NameNode", "512m"),
    "datanode": ("org.apache.hadoop.hdfs.server.datanode.DataNode", "256m"),
    "resourcemanager": (
        "org.apache.hadoop.yarn.server.resourcemanager.ResourceManager", "768m"),
    "nodemanager": (
        "org.apache.hadoop.yarn.server.nodemanager.NodeManager", "512m"),
}
START_ORDER = ["namenode", "datanode", "resourcemanager", "nodemanager"]

#: JDK 17+ module openings Hadoop needs (HADOOP-19219 / HADOOP-19310; the
#: Hadoop 3.4.1+/3.5 launcher scripts add the same set).  Harmless on 3.5.0.
ADD_OPENS = [
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.math=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.text=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-opens=java.base/java.util.regex=ALL-UNNAMED",
    "--add-opens=java.base/java.util.zip=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.cs=ALL-UNNAMED",
    "--add-opens=java.base/sun.security.action=ALL-UNNAMED",
    "--add-opens=java.base/sun.security.util=ALL-UNNAMED",
    "--add-opens=java.base/sun.security.x509=ALL-UNNAMED",
    "--add-opens=java.base/sun.net.dns=ALL-UNNAMED",
    "--add-opens=java.base/sun.net.util=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.dns=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
]

#: Faster JVM start on a 2-core box; these are test daemons.
JVM_BASE = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Djava.net.preferIPv4Stack=true"]


class HarnessError(Exception):
    pass


# --------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------
class Layout:
    def __init__(self, home: str | None = None):
        home = home or os.environ.get("PSEUDO_HADOOP_HOME") or os.path.join(
            REPO, ".hadoop")
        self.home = os.path.abspath(home)
        self.conf = os.path.join(self.home, "conf")
        self.logs = os.path.join(self.home, "logs")
        self.data = os.path.join(self.home, "data")
        self.bin = os.path.join(self.home, "bin")
        self.run = os.path.join(self.home, "run")
        self.webapps = os.path.join(self.home, "webapps-stub")
        self.state = os.path.join(self.home, "state.json")

    def lib(self, version: str) -> str:
        return os.path.join(self.home, "lib", version)

    def pidfile(self, name: str) -> str:
        return os.path.join(self.run, name + ".pid")

    def logfile(self, name: str) -> str:
        return os.path.join(self.logs, name + ".log")

    def outfile(self, name: str) -> str:
        return os.path.join(self.logs, name + ".out")


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------
def addr(port_name: str) -> str:
    return "%s:%d" % (HOST, PORTS[port_name])


def default_java_home() -> str:
    env = os.environ.get("PSEUDO_HADOOP_JAVA_HOME") or os.environ.get("JAVA_HOME")
    if env and os.path.exists(os.path.join(env, "bin", "java")):
        return env
    java = shutil.which("java")
    if java:
        return os.path.dirname(os.path.dirname(os.path.realpath(java)))
    for cand in sorted(glob.glob("/usr/lib/jvm/*17*")):
        if os.path.exists(os.path.join(cand, "bin", "java")):
            return cand
    raise HarnessError("no java found: install a JDK (apt-get install "
                       "openjdk-17-jdk-headless) or set JAVA_HOME")


def cluster_config(home: str = "/hadoop", user: str = "root",
                   java_home: str = "/usr/lib/jvm/java-17-openjdk-amd64",
                   classpath: list[str] | None = None) -> dict[str, dict[str, str]]:
    """The site files the harness writes: ``{filename: {key: value}}``.

    ``home`` is the working directory (conf/ and data/ live under it),
    ``classpath`` the value of ``yarn.application.classpath``.
    """
    data = os.path.join(home, "data")
    conf = os.path.join(home, "conf")
    if classpath is None:
        classpath = [conf, os.path.join(home, "lib", DEFAULT_VERSION, "*.jar")]
    core = {
        "fs.defaultFS": "hdfs://" + addr("namenode_rpc"),
        "hadoop.tmp.dir": os.path.join(data, "tmp"),
        "hadoop.security.authentication": "simple",
        "hadoop.security.authorization": "false",
        "hadoop.http.staticuser.user": user,
        "hadoop.proxyuser.%s.hosts" % user: "*",
        "hadoop.proxyuser.%s.groups" % user: "*",
        "hadoop.proxyuser.%s.users" % user: "*",
    }
    hdfs = {
        "dfs.replication": "1",
        "dfs.permissions.enabled": "false",
        "dfs.webhdfs.enabled": "true",
        "dfs.namenode.name.dir": "file://" + os.path.join(data, "namenode"),
        "dfs.datanode.data.dir": "file://" + os.path.join(data, "datanode"),
        "dfs.namenode.rpc-address": addr("namenode_rpc"),
        "dfs.namenode.http-address": addr("namenode_http"),
        "dfs.namenode.secondary.http-address": HOST + ":0",
        "dfs.datanode.address": addr("datanode"),
        "dfs.datanode.http.address": addr("datanode_http"),
        "dfs.datanode.ipc.address": addr("datanode_ipc"),
        "dfs.datanode.hostname": HOST,
        "dfs.namenode.datanode.registration.ip-hostname-check": "false",
        "dfs.namenode.safemode.extension": "0",
        "dfs.namenode.safemode.min.datanodes": "0",
        "dfs.heartbeat.interval": "1",
        "dfs.namenode.heartbeat.recheck-interval": "10000",
        "dfs.datanode.du.reserved": "0",
        "dfs.namenode.resource.du.reserved": str(64 * 1024 * 1024),
        "dfs.blocksize": str(16 * 1024 * 1024),
        "dfs.namenode.fs-limits.min-block-size": "1024",
    }
    admin_env = "JAVA_HOME=%s,MALLOC_ARENA_MAX=4" % java_home
    yarn = {
        "yarn.resourcemanager.hostname": HOST,
        "yarn.resourcemanager.address": addr("rm"),
        "yarn.resourcemanager.scheduler.address": addr("rm_scheduler"),
        "yarn.resourcemanager.resource-tracker.address": addr("rm_tracker"),
        "yarn.resourcemanager.admin.address": addr("rm_admin"),
        "yarn.resourcemanager.webapp.address": addr("rm_http"),
        "yarn.resourcemanager.scheduler.class": "org.apache.hadoop.yarn.server."
        "resourcemanager.scheduler.capacity.CapacityScheduler",
        "yarn.resourcemanager.am.max-attempts": "2",
        "yarn.resourcemanager.recovery.enabled": "false",
        "yarn.resourcemanager.nodemanager-connect-retries": "10",
        "yarn.resourcemanager.max-completed-applications": "200",
        "yarn.nodemanager.hostname": HOST,
        "yarn.nodemanager.address": addr("nm"),
        "yarn.nodemanager.localizer.address": addr("nm_localizer"),
        "yarn.nodemanager.webapp.address": addr("nm_http"),
        "yarn.nodemanager.resource.memory-mb": "8192",
        "yarn.nodemanager.resource.cpu-vcores": "8",
        "yarn.nodemanager.resource.detect-hardware-capabilities": "false",
        "yarn.scheduler.minimum-allocation-mb": "64",
        "yarn.scheduler.maximum-allocation-mb": "8192",
        "yarn.scheduler.minimum-allocation-vcores": "1",
        "yarn.scheduler.maximum-allocation-vcores": "8",
        "yarn.nodemanager.vmem-check-enabled": "false",
        "yarn.nodemanager.pmem-check-enabled": "false",
        "yarn.nodemanager.disk-health-checker.enable": "false",
        "yarn.nodemanager.disk-health-checker.max-disk-utilization-per-disk-percentage": "99.9",
        "yarn.nodemanager.disk-health-checker.min-free-space-per-disk-mb": "0",
        "yarn.nodemanager.local-dirs": os.path.join(data, "nm-local"),
        "yarn.nodemanager.log-dirs": os.path.join(data, "nm-logs"),
        "yarn.nodemanager.container-executor.class": "org.apache.hadoop.yarn."
        "server.nodemanager.DefaultContainerExecutor",
        "yarn.nodemanager.env-whitelist": "JAVA_HOME,HADOOP_COMMON_HOME,"
        "HADOOP_HDFS_HOME,HADOOP_CONF_DIR,CLASSPATH_PREPEND_DISTCACHE,"
        "HADOOP_YARN_HOME,HADOOP_HOME,PATH,LANG,TZ,HADOOP_MAPRED_HOME",
        "yarn.nodemanager.admin-env": admin_env,
        "yarn.nodemanager.delete.debug-delay-sec": "600",
        "yarn.nodemanager.log.retain-seconds": "3600",
        "yarn.log-aggregation-enable": "false",
        "yarn.nodemanager.recovery.enabled": "false",
        "yarn.nodemanager.sleep-delay-before-sigkill.ms": "250",
        "yarn.nodemanager.process-kill-wait.ms": "2000",
        "yarn.application.classpath": ",".join(classpath),
        "yarn.timeline-service.enabled": "false",
        "yarn.webapp.ui2.enable": "false",
    }
    capacity = {
        "yarn.scheduler.capacity.maximum-applications": "1000",
        "yarn.scheduler.capacity.maximum-am-resource-percent": "0.5",
        "yarn.scheduler.capacity.resource-calculator": "org.apache.hadoop.yarn."
        "util.resource.DefaultResourceCalculator",
        # "small": a queue that may use a tenth of the cluster, for the tests of queue limits
        "yarn.scheduler.capacity.root.queues": "default,small",
        "yarn.scheduler.capacity.root.default.capacity": "90",
        "yarn.scheduler.capacity.root.default.maximum-capacity": "100",
        "yarn.scheduler.capacity.root.small.capacity": "10",
        "yarn.scheduler.capacity.root.small.maximum-capacity": "10",
        "yarn.scheduler.capacity.root.small.user-limit-factor": "1",
        "yarn.scheduler.capacity.root.small.state": "RUNNING",
        "yarn.scheduler.capacity.root.small.acl_submit_applications": "*",
        "yarn.scheduler.capacity.root.small.acl_administer_queue": "*",
        "yarn.scheduler.capacity.root.default.user-limit-factor": "1",
        "yarn.scheduler.capacity.root.default.state": "RUNNING",
        "yarn.scheduler.capacity.root.default.acl_submit_applications": "*",
        "yarn.scheduler.capacity.root.default.acl_administer_queue": "*",
        "yarn.scheduler.capacity.node-locality-delay": "-1",
    }
    return {
        "core-site.xml": core,
        "hdfs-site.xml": hdfs,
        "yarn-site.xml": yarn,
        "capacity-scheduler.xml": capacity,
    }


LOG4J = """\
# Written by tests/hadoop/pseudo-hadoop.  Daemons run with
# -Dhadoop.root.logger=INFO,RFA -Dhadoop.log.dir=... -Dhadoop.log.file=...;
# clients (FsShell, skein's driver and AM) default to the console.
hadoop.root.logger=INFO,console
hadoop.log.dir=.
hadoop.log.file=hadoop.log
log4j.rootLogger=${hadoop.root.logger}
log4j.threshold=ALL

log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.target=System.err
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%d{ISO8601} %p %c{2}: %m%n

log4j.appender.RFA=org.apache.log4j.RollingFileAppender
log4j.appender.RFA.File=${hadoop.log.dir}/${hadoop.log.file}
log4j.appender.RFA.MaxFileSize=32MB
log4j.appender.RFA.MaxBackupIndex=2
log4j.appender.RFA.layout=org.apache.log4j.PatternLayout
log4j.appender.RFA.layout.ConversionPattern=%d{ISO8601} %p %c: %m%n

log4j.logger.org.apache.hadoop.util.NativeCodeLoader=ERROR
log4j.logger.org.apache.hadoop.conf.Configuration.deprecation=WARN
log4j.logger.org.eclipse.jetty=WARN
log4j.logger.org.apache.hadoop.hdfs.StateChange=WARN
log4j.logger.org.apache.hadoop.hdfs.server.namenode.FSNamesystem.audit=WARN
log4j.logger.org.apache.hadoop.yarn.server.resourcemanager.RMAuditLogger=WARN
log4j.logger.org.apache.hadoop.yarn.server.nodemanager.NMAuditLogger=WARN
"""


def site_xml(props: dict[str, str]) -> str:
    out = ['<?xml version="1.0"?>',
           "<!-- written by tests/hadoop/pseudo-hadoop; do not edit -->",
           "<configuration>"]
    for k, v in props.items():
        out.append("  <property><name>%s</name><value>%s</value></property>"
                   % (escape(k), escape(v)))
    out.append("</configuration>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# jars
# --------------------------------------------------------------------------
def fetch_jars(lay: Layout, version: str) -> list[str]:
    """Resolve the Hadoop jars with Maven and link them into lib/<version>.

    Returns the jars in Maven's classpath order, which is kept (rather than a
    ``lib/*`` wildcard, whose order is the directory's) because some versions
    carry two copies of a package (Hadoop 2.10: asm 3.1 for Jersey 1 and asm
    5 for json-smart) and only Maven's order picks the right one first.
    """
    lib = lay.lib(version)
    done = os.path.join(lib, ".complete")
    with open(POM, "rb") as f:
        stamp = hashlib.sha256(f.read()).hexdigest()
    if os.path.exists(done):
        with open(done) as f:
            same = f.read().strip() == stamp
        jars = read_jars(lay, version)
        if same and jars and all(os.path.exists(j) for j in jars):
            return jars
    mvn = shutil.which("mvn")
    if not mvn:
        raise HarnessError("Maven (mvn) not found: apt-get install maven")
    os.makedirs(lay.run, exist_ok=True)
    cpfile = os.path.join(lay.run, "classpath-%s.txt" % version)
    cmd = [mvn, "-q", "-B", "-f", POM, "dependency:build-classpath",
           "-Dhadoop.version=%s" % version, "-Dmdep.outputFile=%s" % cpfile]
    log("resolving Hadoop %s jars with Maven (cached in ~/.m2) ..." % version)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    if res.returncode != 0:
        raise HarnessError("Maven failed (%s):\n%s" % (
            " ".join(cmd), res.stdout[-4000:]))
    with open(cpfile) as f:
        entries = [e for e in f.read().strip().split(os.pathsep) if e]
    if not entries:
        raise HarnessError("Maven returned an empty classpath")
    shutil.rmtree(lib, ignore_errors=True)
    os.makedirs(lib)
    jars = []
    for i, e in enumerate(entries):
        link = os.path.join(lib, os.path.basename(e))
        if os.path.lexists(link):
            link = os.path.join(lib, "%d-%s" % (i, os.path.basename(e)))
        os.symlink(e, link)
        jars.append(link)
    with open(os.path.join(lib, "classpath.txt"), "w") as f:
        f.write("\n".join(jars) + "\n")
    with open(done, "w") as f:
        f.write(stamp + "\n")
    return jars


def read_jars(lay: Layout, version: str) -> list[str]:
    try:
        with open(os.path.join(lay.lib(version), "classpath.txt")) as f:
            return [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return []


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------
def log(msg: str) -> None:
    print("pseudo-hadoop: " + msg, file=sys.stderr, flush=True)


def proc_start_time(pid: int) -> str | None:
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    # field 22 (starttime), counted after the ")" that ends the comm field
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] == "Z":
        return None
    return rest[19]


def read_pid(lay: Layout, name: str) -> tuple[int, str] | None:
    try:
        with open(lay.pidfile(name)) as f:
            pid_s, start = f.read().split()
        return int(pid_s), start
    except (OSError, ValueError):
        return None


def running_pid(lay: Layout, name: str) -> int | None:
    """The daemon's PID if the process we recorded is still alive."""
    rec = read_pid(lay, name)
    if rec is None:
        return None
    pid, start = rec
    if proc_start_time(pid) == start:
        return pid
    return None


def load_state(lay: Layout) -> dict:
    try:
        with open(lay.state) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_state(lay: Layout, state: dict) -> None:
    tmp = lay.state + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, lay.state)


def jvm_opts(lay: Layout, name: str | None, heap: str = "256m") -> list[str]:
    extra = shlex.split(os.environ.get("PSEUDO_HADOOP_JAVA_OPTS", ""))
    opts = ["-Xmx" + heap] + JVM_BASE + ADD_OPENS + extra + [
        "-Dhadoop.home.dir=" + lay.home,
        "-Dhadoop.conf.dir=" + lay.conf,
        "-Dlog4j.configuration=file:" + os.path.join(lay.conf, "log4j.properties"),
        "-Dhadoop.security.logger=INFO,NullAppender",
    ]
    if name:
        opts += [
            "-Dhadoop.log.dir=" + lay.logs,
            "-Dyarn.log.dir=" + lay.logs,
            "-Dhadoop.log.file=%s.log" % name,
            "-Dyarn.log.file=%s.log" % name,
            "-Dhadoop.root.logger=INFO,RFA",
            "-Dhadoop.id.str=" + getpass.getuser(),
            "-Dproc_" + name,
        ]
    return opts


def daemon_env(lay: Layout, java_home: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("CLASSPATH", "JAVA_TOOL_OPTIONS", "HADOOP_OPTS", "_JAVA_OPTIONS"):
        env.pop(k, None)
    env.update({
        "JAVA_HOME": java_home,
        "HADOOP_CONF_DIR": lay.conf,
        "YARN_CONF_DIR": lay.conf,
        "HADOOP_HOME": lay.home,
        "HADOOP_COMMON_HOME": lay.home,
        "HADOOP_HDFS_HOME": lay.home,
        "HADOOP_YARN_HOME": lay.home,
        "HADOOP_LOG_DIR": lay.logs,
        "PATH": os.path.join(java_home, "bin") + os.pathsep + env.get("PATH", ""),
        "MALLOC_ARENA_MAX": "4",
    })
    return env


def classpath_str(lay: Layout, version: str) -> str:
    return os.pathsep.join([lay.conf, lay.webapps] + read_jars(lay, version))


WEB_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!-- stub written by tests/hadoop/pseudo-hadoop: the Maven jars of hadoop-hdfs do
     not carry the HDFS web UI (only the binary tarball does); the REST APIs
     (/webhdfs/v1, /jmx, /conf) are registered in code and work without it. -->
<web-app xmlns="http://xmlns.jcp.org/xml/ns/javaee" version="3.1"/>
"""


def write_webapp_stubs(lay: Layout) -> None:
    """HttpServer2 needs a webapps/<name> resource on the classpath."""
    for name in ("hdfs", "datanode", "secondary", "journal"):
        d = os.path.join(lay.webapps, "webapps", name, "WEB-INF")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "web.xml"), "w") as f:
            f.write(WEB_XML)
        with open(os.path.join(d, "..", "index.html"), "w") as f:
            f.write("<html><body>pseudo-hadoop %s: no web UI, REST only "
                    "(<a href='/jmx'>/jmx</a>)</body></html>\n" % name)


def start_daemon(lay: Layout, name: str, version: str, java_home: str) -> int:
    cls, heap = DAEMONS[name]
    java = os.path.join(java_home, "bin", "java")
    cmd = [java] + jvm_opts(lay, name, heap) + [
        "-cp", classpath_str(lay, version), cls]
    out = open(lay.outfile(name), "ab")
    out.write(("\n==== %s starting: %s\n" % (time.ctime(), " ".join(cmd))).encode())
    out.flush()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT, cwd=lay.home,
                         env=daemon_env(lay, java_home), start_new_session=True)
    out.close()
    start = None
    for _ in range(50):
        start = proc_start_time(p.pid)
        if start:
            break
        time.sleep(0.02)
    with open(lay.pidfile(name), "w") as f:
        f.write("%d %s\n" % (p.pid, start or "0"))
    p.returncode = 0  # detach: do not warn about a still-running child
    return p.pid


def tail(path: str, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(ln if len(ln) <= 400 else ln[:400] + " [...]"
                         for ln in lines[-n:])
    except OSError:
        return "(no %s)" % path


def daemon_logs(lay: Layout, name: str, n: int = 40) -> str:
    return "---- %s ----\n%s\n---- %s ----\n%s" % (
        lay.outfile(name), tail(lay.outfile(name), 15),
        lay.logfile(name), tail(lay.logfile(name), n))


# --------------------------------------------------------------------------
# HTTP helpers (loopback only)
# --------------------------------------------------------------------------
def http(method: str, url: str, timeout: float = 5.0, data: bytes | None = None):
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("Accept", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


def rm_url() -> str:
    return "http://" + addr("rm_http")


def nn_url() -> str:
    return "http://" + addr("namenode_http")


def running_nodes() -> list[dict]:
    js = http("GET", rm_url() + "/ws/v1/cluster/nodes")
    nodes = ((js or {}).get("nodes") or {}).get("node") or []
    return [n for n in nodes if n.get("state") == "RUNNING"]


def hdfs_ready(user: str) -> bool:
    http("GET", nn_url() + "/webhdfs/v1/?op=GETFILESTATUS&user.name=" + user)
    js = http("GET", nn_url() + "/jmx?qry=Hadoop:service=NameNode,"
              "name=FSNamesystemState")
    beans = (js or {}).get("beans") or [{}]
    live = beans[0].get("NumLiveDataNodes", 0)
    js = http("GET", nn_url() + "/jmx?qry=Hadoop:service=NameNode,name=NameNodeInfo")
    safemode = ((js or {}).get("beans") or [{}])[0].get("Safemode", "?")
    return live >= 1 and safemode == ""


def webhdfs(method: str, path: str, user: str, **params) -> dict | None:
    q = {"op": params.pop("op"), "user.name": user}
    q.update({k: str(v) for k, v in params.items()})
    url = "%s/webhdfs/v1%s?%s" % (nn_url(), urllib.parse.quote(path),
                                  urllib.parse.urlencode(q))
    return http(method, url, data=b"" if method in ("PUT", "POST") else None)


def wait_for(what: str, check, timeout: float, lay: Layout, names: list[str]):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        for n in names:
            if running_pid(lay, n) is None:
                raise HarnessError("%s exited while waiting for %s\n%s" % (
                    n, what, daemon_logs(lay, n)))
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = e
        time.sleep(1)
    raise HarnessError("timed out after %ds waiting for %s (last error: %r)\n%s"
                       % (timeout, what, last,
                          "\n".join(daemon_logs(lay, n) for n in names)))


# --------------------------------------------------------------------------
# files: conf, shims
# --------------------------------------------------------------------------
def write_conf(lay: Layout, version: str, java_home: str, user: str) -> None:
    os.makedirs(lay.conf, exist_ok=True)
    cfg = cluster_config(lay.home, user, java_home,
                         [lay.conf] + read_jars(lay, version))
    for fname, props in cfg.items():
        with open(os.path.join(lay.conf, fname), "w") as f:
            f.write(site_xml(props))
    with open(os.path.join(lay.conf, "log4j.properties"), "w") as f:
        f.write(LOG4J)


SHIM = r"""#!/usr/bin/env bash
# Written by tests/hadoop/pseudo-hadoop: a minimal stand-in for Hadoop's
# launcher scripts that runs the real Java classes of the pseudo cluster.
export JAVA_HOME=${JAVA_HOME:-%(java_home)s}
export HADOOP_CONF_DIR=${HADOOP_CONF_DIR:-%(conf)s}
CONF=%(conf)s
# the jars in Maven's classpath order, one a line
LIB=$(paste -sd: %(jars)s)
prog=$(basename "$0")
classpath_cmd() {
  # the same with or without --glob: the list holds no wildcards
  echo "$HADOOP_CONF_DIR:$LIB"
}
run() {
  cls=$1; shift
  exec "$JAVA_HOME/bin/java" -Xmx512m %(opts)s $HADOOP_CLIENT_OPTS \
    -Dlog4j.configuration=file:$CONF/log4j.properties \
    -Dhadoop.root.logger=${HADOOP_ROOT_LOGGER:-WARN,console} \
    -cp "$HADOOP_CONF_DIR:$LIB${HADOOP_CLASSPATH:+:$HADOOP_CLASSPATH}" "$cls" "$@"
}
cmd=${1:-}; [ $# -gt 0 ] && shift
case "$prog:$cmd" in
  *:classpath) classpath_cmd "$@" ;;
  *:version) run org.apache.hadoop.util.VersionInfo "$@" ;;
  *:jar) run org.apache.hadoop.util.RunJar "$@" ;;
  hdfs:dfs|hadoop:fs|hadoop:dfs) run org.apache.hadoop.fs.FsShell "$@" ;;
  hdfs:dfsadmin) run org.apache.hadoop.hdfs.tools.DFSAdmin "$@" ;;
  hdfs:getconf) run org.apache.hadoop.hdfs.tools.GetConf "$@" ;;
  hdfs:fsck) run org.apache.hadoop.hdfs.tools.DFSck "$@" ;;
  yarn:application|yarn:app|yarn:applicationattempt|yarn:container)
    run org.apache.hadoop.yarn.client.cli.ApplicationCLI "$cmd" "$@" ;;
  yarn:node) run org.apache.hadoop.yarn.client.cli.NodeCLI "$@" ;;
  yarn:queue) run org.apache.hadoop.yarn.client.cli.QueueCLI "$@" ;;
  yarn:logs) run org.apache.hadoop.yarn.client.cli.LogsCLI "$@" ;;
  yarn:rmadmin) run org.apache.hadoop.yarn.client.cli.RMAdminCLI "$@" ;;
  *)
    echo "usage: hadoop fs|classpath [--glob]|jar|version ..." >&2
    echo "       hdfs dfs|dfsadmin|getconf|fsck|classpath ..." >&2
    echo "       yarn application|app|node|queue|logs|rmadmin|classpath [--glob] ..." >&2
    exit 1 ;;
esac
"""


def write_shims(lay: Layout, version: str, java_home: str) -> None:
    os.makedirs(lay.bin, exist_ok=True)
    text = SHIM % {
        "java_home": shlex.quote(java_home),
        "conf": shlex.quote(lay.conf),
        "jars": shlex.quote(os.path.join(lay.lib(version), "classpath.txt")),
        "opts": " ".join(JVM_BASE + ADD_OPENS),
    }
    for prog in ("hadoop", "hdfs", "yarn"):
        path = os.path.join(lay.bin, prog)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)


# --------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------
def env_lines(lay: Layout, state: dict) -> list[str]:
    q = shlex.quote
    return [
        "export PSEUDO_HADOOP_HOME=%s" % q(lay.home),
        "export PSEUDO_HADOOP_VERSION=%s" % q(state["version"]),
        "export JAVA_HOME=%s" % q(state["java_home"]),
        "export HADOOP_CONF_DIR=%s" % q(lay.conf),
        "export YARN_CONF_DIR=%s" % q(lay.conf),
        'export PATH=%s:"$PATH"' % q(lay.bin),
        "export PSEUDO_HADOOP_FS=%s" % q("hdfs://" + addr("namenode_rpc")),
        "export PSEUDO_HADOOP_WEBHDFS=%s" % q("webhdfs://" + addr("namenode_http")),
        "export PSEUDO_HADOOP_RM=%s" % q(rm_url()),
        "export PSEUDO_HADOOP_USER=%s" % q(state["user"]),
        # skein's driver reads its extra JVM flags from here
        "export SKEIN_DRIVER_JAVA_OPTIONS=%s" % q(" ".join(ADD_OPENS)),
    ]


def port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def formatted(lay: Layout) -> bool:
    return os.path.exists(os.path.join(lay.data, "namenode", "current", "VERSION"))


def cmd_start(lay: Layout, version: str, timeout: float) -> int:
    user = getpass.getuser()
    state = load_state(lay)
    up = {n: running_pid(lay, n) for n in START_ORDER}
    if all(up.values()) and state:
        log("cluster already running (Hadoop %s)" % state.get("version"))
        print("\n".join(env_lines(lay, state)))
        return 0
    if any(up.values()):
        log("some daemons are down; restarting the cluster")
        cmd_stop(lay)
    busy = [name for name in PORTS if port_in_use(PORTS[name])]
    if busy:  # another cluster (another PSEUDO_HADOOP_HOME) would answer the readiness checks
        raise HarnessError(
            "port(s) %s already in use (%s): another Hadoop, perhaps under another "
            "PSEUDO_HADOOP_HOME, is running; stop it first" % (
                ", ".join(str(PORTS[n]) for n in busy), ", ".join(busy)))
    if formatted(lay) and state.get("version") and state["version"] != version:
        raise HarnessError(
            "%s holds a Hadoop %s file system; run `pseudo-hadoop clean` (or set "
            "PSEUDO_HADOOP_HOME) to start Hadoop %s" % (
                lay.home, state["version"], version))
    t0 = time.time()
    java_home = default_java_home()
    for d in (lay.conf, lay.logs, lay.data, lay.bin, lay.run):
        os.makedirs(d, exist_ok=True)
    fetch_jars(lay, version)
    t_jars = time.time() - t0
    write_conf(lay, version, java_home, user)
    write_shims(lay, version, java_home)
    write_webapp_stubs(lay)
    state = {"version": version, "java_home": java_home, "user": user}
    save_state(lay, state)

    if not formatted(lay):
        log("formatting HDFS")
        java = os.path.join(java_home, "bin", "java")
        cmd = [java] + jvm_opts(lay, "namenode-format", "256m") + [
            "-cp", classpath_str(lay, version), DAEMONS["namenode"][0],
            "-format", "-nonInteractive", "-clusterid", "pseudo-hadoop"]
        with open(lay.outfile("namenode-format"), "wb") as out:
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=lay.home,
                                 env=daemon_env(lay, java_home), timeout=300)
        if res.returncode != 0 or not formatted(lay):
            raise HarnessError("NameNode -format failed (rc=%s)\n%s" % (
                res.returncode, daemon_logs(lay, "namenode-format")))

    for name in START_ORDER:
        pid = start_daemon(lay, name, version, java_home)
        log("started %s (pid %d), log %s" % (name, pid, lay.logfile(name)))

    try:
        wait_for("WebHDFS and a live DataNode (%s)" % nn_url(),
                 lambda: hdfs_ready(user), timeout, lay, ["namenode", "datanode"])
        wait_for("a RUNNING NodeManager at %s/ws/v1/cluster/nodes" % rm_url(),
                 lambda: bool(running_nodes()), timeout, lay,
                 ["resourcemanager", "nodemanager"])
        webhdfs("PUT", "/tmp", user, op="MKDIRS", permission="1777")
        webhdfs("PUT", "/tmp", user, op="SETPERMISSION", permission="1777")
        webhdfs("PUT", "/user/" + user, user, op="MKDIRS", permission="755")
    except BaseException:
        log("start failed; stopping what was started")
        cmd_stop(lay)
        raise
    log("cluster up in %.1fs (jars %.1fs); Hadoop %s, RM %s, WebHDFS %s" % (
        time.time() - t0, t_jars, version, rm_url(), nn_url()))
    print("\n".join(env_lines(lay, state)))
    return 0


def descendants(pids: set[int]) -> set[int]:
    """``pids`` plus all their descendants (by /proc parent links)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def container_pids(lay: Layout) -> set[int]:
    """Processes running inside this cluster's NodeManager local dirs
    (YARN containers), with their descendants."""
    root = os.path.join(lay.data, "nm-local") + os.sep
    found = set()
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % d)
        except OSError:
            continue
        if cwd.startswith(root):
            found.add(int(d))
    return descendants(found) if found else set()


def alive(pid: int) -> bool:
    return proc_start_time(pid) is not None


def terminate(pids: set[int], grace: float) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.time() + 5
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)


def cmd_stop(lay: Layout) -> int:
    if not os.path.isdir(lay.home):
        log("nothing to stop (%s does not exist)" % lay.home)
        return 0
    # NodeManager first (it stops its containers), HDFS last.
    for name in reversed(START_ORDER):
        pid = running_pid(lay, name)
        if pid is not None:
            log("stopping %s (pid %d)" % (name, pid))
            terminate({pid}, 20)
        try:
            os.unlink(lay.pidfile(name))
        except OSError:
            pass
        if name == "nodemanager":
            left = container_pids(lay)
            if left:
                log("killing %d leftover YARN container processes: %s" % (
                    len(left), sorted(left)))
                terminate(left, 5)
    left = container_pids(lay)
    if left:
        terminate(left, 2)
    return 0


def cmd_status(lay: Layout) -> int:
    state = load_state(lay)
    bad = 0
    print("home: %s  version: %s" % (lay.home, state.get("version", "-")))
    for name in START_ORDER:
        pid = running_pid(lay, name)
        if pid:
            print("%-16s running (pid %d)" % (name, pid))
        else:
            print("%-16s DOWN" % name)
            bad += 1
    try:
        n = len(running_nodes())
        print("resourcemanager  %d RUNNING NodeManager(s) at %s" % (n, rm_url()))
        if n == 0:
            bad += 1
    except (OSError, urllib.error.URLError, ValueError) as e:
        print("resourcemanager  REST API not answering: %s" % e)
        bad += 1
    return 1 if bad else 0


def cmd_env(lay: Layout) -> int:
    state = load_state(lay)
    if not state or not all(running_pid(lay, n) for n in START_ORDER):
        log("cluster is not running (try: pseudo-hadoop start)")
        return 1
    print("\n".join(env_lines(lay, state)))
    return 0


def cmd_client(lay: Layout, version: str) -> int:
    """The client side only: the jars, the configuration (every address 127.0.0.1, the
    ports of ``PORTS``) and the bin/ shims, and the export lines, for a cluster this does not
    start: docker/hadoop-compose.yml's, which publishes the same ports on the host."""
    user = getpass.getuser()
    java_home = default_java_home()
    for d in (lay.conf, lay.bin, lay.run):
        os.makedirs(d, exist_ok=True)
    fetch_jars(lay, version)
    write_conf(lay, version, java_home, user)
    write_shims(lay, version, java_home)
    print("\n".join(env_lines(lay, {"version": version, "java_home": java_home, "user": user})))
    return 0


def cmd_clean(lay: Layout) -> int:
    cmd_stop(lay)
    if os.path.isdir(lay.home):
        shutil.rmtree(lay.home)
        log("removed %s" % lay.home)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pseudo-hadoop",
        description="Pseudo-distributed Hadoop (HDFS + YARN) on 127.0.0.1 for "
        "integration tests.  Working directory: $PSEUDO_HADOOP_HOME "
        "(default <repo>/.hadoop).")
    ap.add_argument("command", choices=["start", "stop", "status", "env", "client", "clean"],
                    help="client: only the configuration and shims, for a cluster started "
                    "otherwise (docker/hadoop-compose.yml)")
    ap.add_argument("--version", dest="hadoop_version",
                    default=os.environ.get("PSEUDO_HADOOP_VERSION", DEFAULT_VERSION),
                    help="Hadoop version from Maven Central (default: "
                    "$PSEUDO_HADOOP_VERSION or %s)" % DEFAULT_VERSION)
    ap.add_argument("--timeout", type=float, default=180,
                    help="seconds to wait for each readiness check on start")
    args = ap.parse_args(argv)
    lay = Layout()
    try:
        if args.command == "start":
            return cmd_start(lay, args.hadoop_version, args.timeout)
        if args.command == "stop":
            return cmd_stop(lay)
        if args.command == "status":
            return cmd_status(lay)
        if args.command == "env":
            return cmd_env(lay)
        if args.command == "client":
            return cmd_client(lay, args.hadoop_version)
        return cmd_clean(lay)
    except HarnessError as e:
        log("ERROR: %s" % e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
