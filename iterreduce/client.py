"""What a user calls: run a job on this machine, or (``submit``) on YARN.

``run_local(job)`` is the embedded default: the ApplicationMaster logic runs in this
process and the workers are local processes, the same modules YARN runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, TextIO

from .appmaster import AppMaster, JobFailed
from .containers import BLAS_THREAD_VARS, ENV_LOG_LEVEL, LocalLauncher
from .job import JobSpec, is_uri

log = logging.getLogger(__name__)

__all__ = ["run_local", "Progress", "JobFailed"]


class Progress:
    """A progress bar on a terminal (superstep, phase, latest metrics) kept below the log
    lines. Elsewhere it draws nothing (the master's one log line per superstep remains),
    or, with ``lines`` (following a YARN application, whose log lines are on the cluster),
    writes one line per superstep it sees."""

    def __init__(self, stream: TextIO | None = None, width: int = 30, lines: bool = False):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.lines = lines and not self.enabled
        self.width = width
        self.started = time.monotonic()
        self.bar = ""
        self._last_line: tuple[Any, ...] | None = None
        self._done = -1  # the last superstep done that a line has shown
        if self.enabled:  # log lines go above the bar
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                    handler.setStream(_AboveBar(self))

    def note(self, text: str) -> None:
        """A line of news that is no superstep (an application waiting for YARN, say)."""
        try:
            if self.lines:
                self.stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            elif self.enabled:
                self.stream.write("\r\x1b[K" + text + "\n" + self.bar)
            self.stream.flush()
        except OSError:
            self.enabled = self.lines = False

    def __call__(self, status: dict[str, Any]) -> None:
        try:
            self._show(status)
        except OSError:  # the terminal went away (a closed window, SIGHUP ignored): the job goes on
            self.enabled = self.lines = False
            self.bar = ""

    def _records(self, status: dict[str, Any]) -> bool:
        """Write a line for each superstep done that ``status["recent"]`` holds and no line
        has shown yet, saying how many fell between two looks; whether it wrote any."""
        from .appmaster import superstep_line

        recent = [r for r in status.get("recent") or [] if isinstance(r, dict)
                  and isinstance(r.get("superstep"), int) and r["superstep"] > self._done]
        if recent and self._done >= 0 and recent[0]["superstep"] > self._done + 1:
            missed = recent[0]["superstep"] - self._done - 1
            self.stream.write(f"{time.strftime('%H:%M:%S')} ({missed} superstep{'s' if missed > 1 else ''} "
                              "done between two looks)\n")
        for r in recent:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {superstep_line(r, status.get('total'))}\n")
            self._done = r["superstep"]
        if recent:
            self.stream.flush()
        return bool(recent)

    def _show(self, status: dict[str, Any]) -> None:
        if self.lines:
            key = (status["superstep"], status["state"], status.get("attempt") or 1)
            shown = self._records(status)  # then a line of the state only where it says more
            if key != self._last_line and not (shown and status["state"] == "RUNNING" and self._last_line
                                               and self._last_line[2] == key[2]):
                parts = [f"{status['state']} {status_text(status)}", status["phase"],
                         live_metrics_text(status, None)]
                if status.get("replacements"):
                    parts.append(f"{status['replacements']} worker(s) replaced")
                if (status.get("attempt") or 1) > 1:  # YARN's next ApplicationMaster attempt, resumed
                    parts.append(f"attempt {status['attempt']}")
                self.stream.write(f"{time.strftime('%H:%M:%S')} {' | '.join(p for p in parts if p)}\n")
                self.stream.flush()
            self._last_line = key
            return
        if not self.enabled:
            return
        step, total = status["superstep"], status.get("total")
        if status["state"] == "SUCCEEDED" and total:  # ended: the last superstep is done, however
            step = total = status["superstep"] + 1  # far short of its total_supersteps() it converged
        if total:
            filled = int(min(step / total, 1.0) * self.width)
            head = f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{total}"
        else:
            head = f"superstep {step}"
        parts = [head, status["phase"], live_metrics_text(status), f"{time.monotonic() - self.started:.0f}s"]
        self.bar = " | ".join(p for p in parts if p)[:150]
        self.stream.write("\r\x1b[K" + self.bar)
        if status["state"] in ("SUCCEEDED", "FAILED", "KILLED"):
            self.stream.write("\n")
            self.bar = ""
        self.stream.flush()


def status_text(status: dict[str, Any]) -> str:
    """"superstep S (D/T done)" for a live status: S is the superstep under way (numbered
    from 0), D the supersteps done; an ended job has done S + 1."""
    from .appmaster import superstep_text

    step = status["superstep"]
    done = step + 1 if status["state"] == "SUCCEEDED" else step
    return superstep_text(done, status.get("total"), step)


def live_metrics_text(status: dict[str, Any], n: int | None = 3) -> str:
    """A live status's metrics, which are the last superstep done's: with its phase where the
    superstep under way has another (``loss=0.3 (after epoch 1/5)`` beside ``epoch 2/5``)."""
    from .appmaster import metrics_text

    text = metrics_text(status.get("metrics") or {}, n)
    of = status.get("metrics_phase")
    return f"{text} (after {of})" if text and of and of != status.get("phase") else text


class _AboveBar:
    def __init__(self, progress: Progress):
        self.progress = progress

    def write(self, text: str) -> None:
        out = self.progress.stream
        out.write("\r\x1b[K" + text)
        if text.endswith("\n") and self.progress.bar:
            out.write(self.progress.bar)

    def flush(self) -> None:
        self.progress.stream.flush()


def run_local(job: JobSpec, resume: bool = False, log_dir: str | None = None,
              progress: Progress | None = None) -> AppMaster:
    """Run ``job`` with its workers as processes on this machine.

    Returns the finished :class:`AppMaster` (its ``status()`` and the output directory hold
    the results); raises :class:`JobFailed` with the reason when the job fails.
    """
    if log_dir is None:
        log_dir = (os.path.join(job.output, "logs") if not is_uri(job.output)
                   else tempfile.mkdtemp(prefix=f"iterreduce-{job.name}-"))
    launcher = LocalLauncher(log_dir, num_workers=job.workers.count)
    am = AppMaster(job, launcher, resume=resume, status_hook=progress)
    am.run()  # the launcher says where the workers' logs are once the job has passed its checks
    return am


# ---------------------------------------------------------------------------- YARN

ENVIRONMENT_FORMS = """\
yarn.environment says which Python runs the ApplicationMaster and the workers. Accepted forms:
  - a packed environment archive, made with venv-pack or conda-pack, shipped with the job:
      environment: /path/to/environment.tar.gz
  - a virtual environment that exists at the same path on every node:
      environment: venv:///opt/venvs/iterreduce
  - a Python interpreter that exists on every node (with iterreduce installed):
      environment: python:///usr/bin/python3
Each must have iterreduce and its dependencies installed."""


class SubmitError(ValueError):
    """The job cannot be submitted; nothing was submitted."""


def python_command(environment: str | None) -> tuple[str, dict[str, Any]]:
    """The shell prefix that runs Python in a container, and the files it needs shipped."""
    import skein

    if not environment:
        raise SubmitError("yarn.environment is not set.\n" + ENVIRONMENT_FORMS)
    if environment.startswith("venv://"):
        path = environment[len("venv://"):]
        return f"source {_quote(path)}/bin/activate && python", {}
    if environment.startswith("python://"):
        return _quote(environment[len("python://"):]), {}
    if environment.endswith((".tar.gz", ".tgz", ".zip", ".tar")):
        if not is_uri(environment) and not os.path.exists(environment):
            raise SubmitError(f"yarn.environment: the archive {environment} does not exist.\n" + ENVIRONMENT_FORMS)
        files = {"environment": skein.File(source=environment, type="archive")}
        return "source environment/bin/activate && python", files
    raise SubmitError(f"yarn.environment: {environment!r} is none of the accepted forms.\n" + ENVIRONMENT_FORMS)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


_OWN_FILES = {"environment", "iterreduce.token", "job.json"}


def _check_file_names(job: JobSpec, reserved: set[str] = _OWN_FILES) -> None:
    """``yarn.files`` land in each container's directory under their base names: refuse
    one that would replace iterreduce's own (the job, the token, the environment) or an
    earlier entry."""
    seen: dict[str, str] = {}
    for i, path in enumerate(job.yarn.files):
        name = os.path.basename(path.rstrip("/"))
        if name in reserved:
            raise SubmitError(f"{job.source}: yarn.files[{i}]: {path} would be shipped as {name!r}, a name "
                              f"iterreduce uses itself ({', '.join(sorted(reserved))}); rename it")
        if name in seen:
            raise SubmitError(f"{job.source}: yarn.files[{i}]: {path} and {seen[name]} would both be shipped as "
                              f"{name!r} (each lands in the container's directory under its base name)")
        seen[name] = path


def check_yarn_section(job: JobSpec) -> None:
    """What needs no cluster to check in ``yarn:``: an environment of an accepted form (an
    archive that exists), ``yarn.files`` that exist under names that do not clash."""
    try:
        python_command(job.yarn.environment)
    except SubmitError as exc:
        raise SubmitError(f"{job.source}: {exc}") from None
    _check_file_names(job)
    for i, path in enumerate(job.yarn.files):
        if not is_uri(path) and not os.path.exists(path):
            raise SubmitError(f"{job.source}: yarn.files[{i}]: {path} does not exist")


def build_spec(job: JobSpec, token_file: str, job_file: str, resume: bool = False) -> Any:
    """The skein ApplicationSpec for ``job`` (its ApplicationMaster resuming from the last
    checkpoint with ``resume``). The token travels as a private file, never on a command
    line or in the environment."""
    import skein

    python, files = python_command(job.yarn.environment)
    files = {**files, "iterreduce.token": skein.File(source=token_file, type="file"),
             "job.json": skein.File(source=job_file, type="file")}
    _check_file_names(job, set(files))
    for path in job.yarn.files:  # the algorithm's own code, shipped into each container's directory
        name = os.path.basename(path.rstrip("/"))
        if os.path.isdir(path):  # YARN unpacks an archive into a directory of the same name
            archive = shutil.make_archive(os.path.join(os.path.dirname(token_file), name), "zip", path)
            files[name] = skein.File(source=archive, type="archive")
        elif is_uri(path) or os.path.exists(path):
            files[name] = skein.File(source=path, type="file")
        else:
            raise SubmitError(f"{job.source}: yarn.files: {path} does not exist")
    user_env = dict(job.yarn.env)
    env = {**user_env, "ITERREDUCE_TOKEN_FILE": "iterreduce.token", "PYTHONUNBUFFERED": "1"}
    if os.environ.get(ENV_LOG_LEVEL) and ENV_LOG_LEVEL not in user_env:  # submit -v: debug lines in the containers
        env[ENV_LOG_LEVEL] = os.environ[ENV_LOG_LEVEL]
    if os.environ.get("HADOOP_USER_NAME"):
        env["HADOOP_USER_NAME"] = os.environ["HADOOP_USER_NAME"]

    def threads(vcores: int) -> dict[str, str]:
        # a BLAS uses as many threads as the container has vcores, not every core of its node
        # (the others are other containers'), as locally the cores are shared among the workers
        return {var: str(vcores) for var in BLAS_THREAD_VARS if var not in user_env}

    master = skein.Master(
        resources=skein.Resources(memory=job.master.memory_mb, vcores=job.master.vcores),
        files=files, env={**env, **threads(job.master.vcores)},
        script=f"{python} -m iterreduce.appmaster --job job.json --token-file iterreduce.token"
               f" --source {_quote(os.path.basename(job.source))}" + (" --resume" if resume else ""),
    )
    worker = skein.Service(
        instances=0, max_restarts=0, allow_failures=True,  # the master replaces workers itself
        resources=skein.Resources(memory=job.workers.resources.memory_mb, vcores=job.workers.resources.vcores),
        # skein tells a container's exit code to no one ("Container failed during execution"): a
        # worker killed by a signal (or exiting with a code of its own) has it recorded for the
        # master; 1-3 are the worker's own (a failure it reported, master lost, stopped by the
        # master or replaced): the master has stopped caring for such a worker, none is recorded
        files=files, env={**env, **threads(job.workers.resources.vcores)},
        script=f"{python} -m iterreduce.worker\nrc=$?\n"
               f"if [ $rc -gt 3 ]; then {python} -m iterreduce.worker --exited $rc; fi\nexit $rc",
    )
    return skein.ApplicationSpec(
        name=job.name, queue=job.yarn.queue, tags=set(job.yarn.tags) | {"iterreduce"},
        user=job.yarn.user or "", max_attempts=job.yarn.max_attempts, master=master,
        services={"worker": worker},
    )


def check_submission(job: JobSpec, resources: bool = True) -> None:
    """Refuse, before anything is submitted, a job with bad algorithm classes or params,
    without a usable environment, whose containers the cluster cannot hold (unless
    ``resources`` is false), or whose input cannot make its splits."""
    from .appmaster import check_algorithm

    try:
        check_algorithm(job, must_import=False)
    except JobFailed as exc:
        raise SubmitError(str(exc)) from None
    check_yarn_section(job)
    local = [f"{what} {path}" for what, path in [("output", job.output), ("checkpoint.path", job.checkpoint.path),
                                                 *(("input", p) for p in job.input.paths)] if path and not is_uri(path)]
    if local:  # right on a one-node cluster; on more, each container sees its own node's disk
        logging.getLogger("iterreduce").warning(
            "%s: %s: local path(s): every container reads and writes them on the node it runs on; use "
            "URIs every node reaches (webhdfs://, hdfs://) on a cluster of more than one node",
            job.source, "; ".join(local))
    if resources:
        queue = check_queue(job)
        cluster = cluster_resources()
        check_resources(job, cluster, queue)
    check_input(job)
    check_output(job)


def check_input(job: JobSpec, columns: bool = True) -> list:
    """The input exists and makes ``workers.count`` splits, and holds the columns the master
    says its workers read, of types its ``check_input`` accepts (when it can be imported here;
    not asked without ``columns``: when its params were refused), or :class:`SubmitError`.
    Returns the splits
    (:func:`~iterreduce.fs.plan_splits`)."""
    from .appmaster import input_check, input_columns
    from .fs import InputError, MissingInput, plan_splits

    try:
        read = input_columns(None, job) if columns else None
        check = input_check(None, job) if columns else None
    except JobFailed as exc:
        raise SubmitError(str(exc)) from None
    try:
        return plan_splits(job.input.paths, job.workers.count, read, check)
    except InputError as exc:
        # "input: path /data: does not exist", not "input: input path /data: ..." ("input file" stays,
        # as in the workers' messages about a record)
        text = str(exc)
        text = text.removeprefix("input ") if not text.startswith("input file") else text
        if job.yarn.environment and isinstance(exc, MissingInput) and not is_uri(exc.path):
            text += " (a local path, read on this machine; a path on HDFS is a URI: webhdfs://NAMENODE:9870/...)"
        raise SubmitError(f"{job.source}: input: {text}") from None
    except JobFailed as exc:  # Master.check_input raised something else than a ValueError
        raise SubmitError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a filesystem that does not answer
        raise SubmitError(f"{job.source}: input: cannot read {', '.join(job.input.paths)}: "
                          f"{type(exc).__name__}: {_first_line(exc)}") from None


def check_output(job: JobSpec) -> None:
    """The output directory, and the checkpoint directory when ``checkpoint.path`` puts it
    elsewhere, can be made and listed, or :class:`SubmitError`."""
    from .fs import Output

    check_output_place(job)  # a file in the way is named as such
    places = [("output", job.output)]
    if job.checkpoint.path:
        places.append(("checkpoint.path", job.checkpoint.path))
    for what, uri in places:
        try:
            out = Output(uri)
            out.create()
            out.list()
        except Exception as exc:  # noqa: BLE001 - OSError locally, requests' errors through WebHDFS
            raise SubmitError(f"{job.source}: {what}: cannot create {uri}: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from None
    check_not_in_use(job)


def check_output_place(job: JobSpec) -> None:
    """What :func:`check_output` checks without making anything (for ``validate``): the output
    directory, and the checkpoint directory, are directories or can be made (no file there or
    above them), or :class:`SubmitError`."""
    import posixpath

    import pyarrow.fs as pafs

    from .fs import filesystem

    places = [("output", job.output)] + ([("checkpoint.path", job.checkpoint.path)] if job.checkpoint.path else [])
    for what, uri in places:
        try:
            fs, path = filesystem(uri)
            at = path.rstrip("/") or "/"
            while True:
                kind = fs.get_file_info(at).type
                if kind == pafs.FileType.Directory:
                    break
                if kind != pafs.FileType.NotFound:
                    where = "is a file" if at == (path.rstrip("/") or "/") else f"cannot be made: {at} is a file"
                    raise SubmitError(f"{job.source}: {what}: {uri} {where}, not a directory")
                parent = posixpath.dirname(at)
                if not parent or parent == at:
                    break
                at = parent
        except SubmitError:
            raise
        except Exception as exc:  # noqa: BLE001 - a filesystem that does not answer
            raise SubmitError(f"{job.source}: {what}: cannot look at {uri}: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None


def check_not_in_use(job: JobSpec) -> None:
    """Refuse a job whose output another run is writing now (its ApplicationMaster left
    :data:`~iterreduce.appmaster.OWNER_FILE` there): a YARN application the
    ResourceManager lists as running, or a local run whose process is alive on this host.
    A marker a run that died left behind is ignored."""
    import socket

    from .appmaster import OWNER_FILE
    from .fs import Output

    try:
        out = Output(job.output)
        owner = json.loads(out.read_bytes(OWNER_FILE)) if out.exists(OWNER_FILE) else None
    except Exception:  # noqa: BLE001 - unreadable: written as it was read, or a run that died
        return
    if not isinstance(owner, dict):
        return
    app = owner.get("application")
    if app:
        rm = rm_web_url()
        try:
            state = _get_json(f"{rm}/ws/v1/cluster/apps/{app}")["app"]["state"]
        except Exception:  # noqa: BLE001 - no ResourceManager to ask: YARN's own checks still apply
            return
        if state in ("NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING"):
            raise SubmitError(f"{job.source}: output: application {app} (job {owner.get('job')}) is running with "
                              f"{job.output} as its output: `iterreduce kill {app}` stops it, or give this job "
                              "another output")
        return
    pid, host = owner.get("pid"), owner.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and pid != os.getpid() and _alive(pid):
        raise SubmitError(f"{job.source}: output: a local run of job {owner.get('job')} (process {pid}) is "
                          f"writing to {job.output}: stop it, or give this job another output")


def run_in(uri: str) -> dict[str, Any]:
    """What the output directory ``uri`` says of the run that writes there, or wrote there last:
    ``owner`` (its :data:`~iterreduce.appmaster.OWNER_FILE`, while it runs: a YARN
    ``application`` or a local ``pid`` and ``host``), ``alive`` (a local owner's process is
    alive on this host; None for an application or another host), ``records`` (the supersteps
    of ``metrics.jsonl``) and ``final`` (``metrics.json``, once the run has ended).
    :class:`~iterreduce.fs.InputError` when it holds none of them."""
    import socket

    from .appmaster import OWNER_FILE
    from .fs import InputError, Output

    out = Output(uri)

    def read(name: str) -> Any:
        try:
            return json.loads(out.read_bytes(name)) if out.exists(name) else None
        except ValueError:  # being rewritten, or cut short by a crash
            return None
    owner, final = read(OWNER_FILE), read("metrics.json")
    records = []
    if out.exists("metrics.jsonl"):
        for line in out.read_bytes("metrics.jsonl").decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    if owner is None and final is None and not records:
        raise InputError(f"{uri}: not an output directory of an iterreduce run (it holds no {OWNER_FILE}, "
                         "metrics.json or metrics.jsonl)")
    owner = owner if isinstance(owner, dict) else None
    alive = None
    if owner and not owner.get("application") and owner.get("host") == socket.gethostname():
        alive = isinstance(owner.get("pid"), int) and _alive(owner["pid"])
    return {"owner": owner, "alive": alive, "records": records, "final": final if isinstance(final, dict) else None}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a pid reused by another program is not a run
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"iterreduce" in f.read()
    except OSError:
        return True


def check_something_to_resume(job: JobSpec) -> None:
    """A resume whose output and checkpoint directories do not exist at all (a mistyped
    ``--output``, say) is a :class:`SubmitError`: it would start the whole job from the
    beginning. One that left an output without checkpoints (stopped early) starts again."""
    import pyarrow.fs as pafs

    from .fs import filesystem

    for uri in (job.output, job.checkpoint_path):
        try:
            fs, path = filesystem(uri)
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                return
        except Exception:  # noqa: BLE001 - a filesystem that does not answer: the run will say
            return
    raise SubmitError(f"{job.source}: nothing to resume: {job.output} does not exist, nor "
                      f"{job.checkpoint_path} (a mistyped output?); run without --resume to start the job")


def check_resume(job: JobSpec) -> tuple[str, int | None]:
    """What ``submit --resume`` would do, found before anything is submitted:
    ``("done", supersteps)`` when the output holds this job's SUCCEEDED result (nothing to
    resume), ``("resume", step)`` from the checkpoint of superstep ``step``, ``("start",
    None)`` when there is none. A checkpoint another job (other settings) wrote, or none that
    can be read, is a :class:`SubmitError` naming the difference."""
    from .appmaster import earlier_success, resumable_checkpoint
    from .fs import Checkpoints, Output

    done = earlier_success(Output(job.output), job)
    if done is not None:
        return "done", int(done.get("supersteps") or 0)
    try:
        checkpoints = Checkpoints(job.checkpoint_path, keep=job.checkpoint.keep)
        restored = resumable_checkpoint(checkpoints, job, arrays=False)  # the metadata: no model's worth of bytes
    except JobFailed as exc:
        raise SubmitError(str(exc)) from None
    return ("start", None) if restored is None else ("resume", restored[0])


def cluster_resources() -> dict[str, Any] | None:
    """What the ResourceManager (its REST API, at ``yarn.resourcemanager.webapp.address``)
    says of container sizes and nodes: ``max_mb``, ``max_vcores`` (the scheduler's limits),
    ``min_mb`` (the multiple requests are rounded up to: the minimum allocation, or the
    FairScheduler's increment) and ``nodes`` (the total MiB of each RUNNING node); ``None``
    when it does not answer (a secured web UI, say), and then nothing is checked."""
    import xml.etree.ElementTree as ET
    import urllib.request

    rm = rm_web_url()
    try:
        with urllib.request.urlopen(f"{rm}/conf", timeout=10) as r:  # every daemon serves its configuration
            root = ET.fromstring(r.read())
        conf = {p.findtext("name"): (p.findtext("value") or "").strip() for p in root.iter("property")}
        nodes = (_get_json(f"{rm}/ws/v1/cluster/nodes?states=RUNNING").get("nodes") or {}).get("node") or []
        step = conf.get("yarn.scheduler.minimum-allocation-mb") or 1024  # the CapacityScheduler's rounding
        if "FairScheduler" in conf.get("yarn.resourcemanager.scheduler.class", ""):
            step = (conf.get("yarn.resource-types.memory-mb.increment-allocation")
                    or conf.get("yarn.scheduler.increment-allocation-mb") or 1024)
        return {
            "max_mb": int(conf.get("yarn.scheduler.maximum-allocation-mb") or 8192),
            "max_vcores": int(conf.get("yarn.scheduler.maximum-allocation-vcores") or 4),
            "min_mb": max(int(step), 1),
            "nodes": [int(n.get("usedMemoryMB", 0)) + int(n.get("availMemoryMB", 0)) for n in nodes
                      if n.get("state", "RUNNING") == "RUNNING"],
        }
    except Exception:  # noqa: BLE001 - only a check before submitting; YARN itself still decides
        return None


def yarn_queues() -> dict[str, dict[str, Any]] | None:
    """The leaf queues of the ResourceManager's scheduler (its REST API), each under its short
    and its full name (``default``, ``root.default``): ``{name: {"state": ..., ...}}`` with,
    where the CapacityScheduler says them, ``max_share`` (the fraction of the cluster one
    user's applications in the queue may ever use: its absolute maximum capacity, or its
    capacity times its user-limit-factor if less), ``am_limit_mb`` and ``am_used_mb``
    (its limit for ApplicationMasters, and what its running ones take) and ``active`` (its
    running applications). None when the API does not answer."""
    rm = rm_web_url()
    try:
        info = _get_json(f"{rm}/ws/v1/cluster/scheduler")["scheduler"]["schedulerInfo"]
    except Exception:  # noqa: BLE001 - only a check before submitting; YARN itself still decides
        return None
    leaves: dict[str, dict[str, Any]] = {}

    def limits(q: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"state": str(q.get("state", "RUNNING"))}
        try:
            if "absoluteMaxCapacity" in q:
                share = float(q["absoluteMaxCapacity"])
                if "absoluteCapacity" in q and "userLimitFactor" in q:
                    share = min(share, float(q["absoluteCapacity"]) * float(q["userLimitFactor"]))
                out["max_share"] = share / 100
            if isinstance(q.get("AMResourceLimit"), dict):
                out["am_limit_mb"] = int(q["AMResourceLimit"]["memory"])
                out["am_used_mb"] = int((q.get("usedAMResource") or {}).get("memory", 0))
                out["active"] = int(q.get("numActiveApplications", 0))
        except (TypeError, ValueError, KeyError):  # another scheduler's or version's fields: state only
            pass
        return out

    def walk(q: dict[str, Any]) -> None:
        kids = (q.get("queues") or q.get("childQueues") or {})  # CapacityScheduler, FairScheduler
        kids = kids.get("queue", []) if isinstance(kids, dict) else kids
        kids = [kids] if isinstance(kids, dict) else kids
        if not kids:
            for name in (q.get("queueName"), q.get("queuePath")):
                if name:
                    leaves[str(name)] = found = limits(q)
                    leaves.setdefault(str(name).rpartition(".")[2], found)
        for kid in kids:
            if isinstance(kid, dict):
                walk(kid)

    walk(info.get("rootQueue", info))  # the FairScheduler nests its tree under rootQueue
    return leaves or None


def check_queue(job: JobSpec, queues: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Refuse a job for a queue this cluster's scheduler does not have (or has stopped);
    returns what :func:`yarn_queues` says of its queue (None when it cannot tell)."""
    queues = queues if queues is not None else yarn_queues()
    if queues is None:
        return None
    queue = job.yarn.queue
    if queue not in queues:
        known = sorted(q for q in queues if "." not in q) or sorted(queues)
        raise SubmitError(f"{job.source}: yarn.queue: this cluster has no queue {queue!r} to submit to "
                          f"(its leaf queues: {', '.join(known)})")
    state = queues[queue]["state"]
    if state != "RUNNING":
        raise SubmitError(f"{job.source}: yarn.queue: the queue {queue!r} is {state}: it takes no applications")
    return queues[queue]


def check_resources(job: JobSpec, cluster: dict[str, Any] | None, queue: dict[str, Any] | None = None) -> None:
    """Refuse a job whose containers this YARN cluster can never run together: a worker or
    the master larger than its largest container (``yarn.scheduler.maximum-allocation-*``),
    more workers than its running nodes hold beside the master, or more than its queue may
    ever use (``queue``: see :func:`yarn_queues`) — every superstep waits for all of them,
    so a part is no use. Memory is rounded up as the scheduler rounds it (see
    :func:`cluster_resources`). Vcores are checked against the maximum only: the default
    resource calculator schedules by memory. A queue whose limit for ApplicationMasters its
    running applications take is warned of (the application waits in ACCEPTED). ``cluster``
    None (the ResourceManager did not say, see :func:`cluster_resources`): nothing is
    checked. Node labels are not known here: YARN may still refuse what passes."""
    if cluster is None:
        return
    w, m = job.workers.resources, job.master
    for what, mb, vcores in (("workers", w.memory_mb, w.vcores), ("master", m.memory_mb, m.vcores)):
        if mb > cluster["max_mb"]:
            raise SubmitError(f"{job.source}: {what}.memory: {mb} MiB is more than this cluster's largest "
                              f"container (yarn.scheduler.maximum-allocation-mb = {cluster['max_mb']})")
        if vcores > cluster["max_vcores"]:
            raise SubmitError(f"{job.source}: {what}.vcores: {vcores} is more than this cluster's largest "
                              f"container (yarn.scheduler.maximum-allocation-vcores = {cluster['max_vcores']})")
    nodes = cluster["nodes"]
    if not nodes:  # just after a restart NodeManagers may not have registered yet: YARN will say
        logging.getLogger("iterreduce").warning(
            "the ResourceManager lists no RUNNING NodeManager now; the application waits until one joins "
            "(`yarn node -list -all` shows the nodes and their states)")
        return
    step = cluster["min_mb"]
    wmb, mmb = -(-w.memory_mb // step) * step, -(-m.memory_mb // step) * step
    fits = [cap // wmb for cap in nodes]  # workers per node; the master costs the node it lands on
    lose = [f - (cap - mmb) // wmb for f, cap in zip(fits, nodes) if cap >= mmb]
    best = sum(fits) - min(lose) if lose else -1
    if best < job.workers.count:
        held = ("no node holds the master" if best < 0 else
                f"they hold the master and {best} of the {job.workers.count} workers")
        raise SubmitError(
            f"{job.source}: this cluster cannot run the job's containers at once: {len(nodes)} running "
            f"node(s) of {', '.join(f'{c} MiB' for c in nodes)}; the master takes {mmb} MiB, each worker "
            f"{wmb} MiB (requests are rounded up to multiples of {step} MiB), and {held}. Every superstep "
            "waits for all workers: ask for fewer or smaller workers (workers.count, workers.memory).")
    if not queue:
        return
    need, total = mmb + job.workers.count * wmb, sum(nodes)
    if "max_share" in queue and need > queue["max_share"] * total:
        raise SubmitError(
            f"{job.source}: yarn.queue: a user's applications in the queue {job.yarn.queue!r} may use at most "
            f"{queue['max_share']:.0%} of this cluster's {total} MiB ({int(queue['max_share'] * total)} MiB: its "
            "maximum capacity, or its capacity times its user-limit-factor); the master and "
            f"{job.workers.count} workers take {need} MiB at once, and every superstep waits for all workers: "
            "ask for fewer or smaller workers, or another queue")
    if "am_limit_mb" in queue and queue.get("active") and queue["am_used_mb"] + mmb > queue["am_limit_mb"]:
        logging.getLogger("iterreduce").warning(
            "queue %r: its ApplicationMasters may take %d MiB (yarn.scheduler.capacity.maximum-am-resource-"
            "percent) and its %d running application(s) take %d: this one waits in ACCEPTED until one ends",
            job.yarn.queue, queue["am_limit_mb"], queue["active"], queue["am_used_mb"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def submit(job: JobSpec, client: Any = None, check: bool = True, resume: bool = False) -> str:
    """Submit ``job`` to YARN through skein (after :func:`check_submission`, unless the
    caller did it); returns the application id. With ``resume`` the job continues from its
    last checkpoint (one a killed or failed earlier application left), as ``run --resume``."""
    import secrets

    import skein

    if check:
        check_submission(job)
    if not resume:
        note = earlier_results(job)
        if note:
            log.warning("%s; the application replaces them as it starts (another output keeps them)", note)
    with tempfile.TemporaryDirectory(prefix="iterreduce-submit-") as tmp:
        token_file = os.path.join(tmp, "token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        job_file = os.path.join(tmp, "job.json")
        with open(job_file, "w") as f:
            f.write(job.to_json())
        spec = build_spec(job, token_file, job_file, resume=resume)
        client = client or skein.Client()
        try:
            app_id = client.submit(spec)
        except skein.exceptions.DriverError as exc:  # YARN refused it: a queue, an ACL, a limit
            text = " ".join(str(exc).split())
            raise SubmitError(f"{job.source}: YARN refused the application: {text}") from None
    claim_output(job, app_id)
    return app_id


def earlier_results(job: JobSpec) -> str | None:
    """What an earlier run left as its results in ``job.output`` (its ``metrics.json`` lists
    them), in words ("OUT holds the results of job J (SUCCEEDED, application A): model.avro,
    ..."); None when there are none or they cannot be read."""
    from .appmaster import results_text
    from .fs import Output

    try:
        out = Output(job.output)
        earlier = json.loads(out.read_bytes("metrics.json")) if out.exists("metrics.json") else None
        files = [f for f in earlier.get("files") or [] if isinstance(f, str)] if isinstance(earlier, dict) else []
    except Exception:  # noqa: BLE001 - unreadable: the master says what it removes
        return None
    return results_text(job.output, earlier, files) if files else None


def claim_output(job: JobSpec, app_id: str) -> None:
    """Mark ``job.output`` as the output of the application just submitted, before its
    ApplicationMaster starts (which may take a while on a busy cluster) and writes the same:
    a second submission into that output meanwhile is refused by :func:`check_not_in_use`."""
    from .appmaster import OWNER_FILE
    from .fs import Output

    try:
        Output(job.output).write_json(OWNER_FILE, {"application": app_id, "job": job.name, "submitted": True})
    except Exception as exc:  # noqa: BLE001 - the application runs all the same; its master writes it
        log.warning("could not mark %s as %s's output: %s", job.output, app_id, _first_line(exc))


def logs_command(app_id: str) -> str:
    return f"iterreduce logs {app_id}"


def with_deadline(fn: Any, seconds: float) -> Any:
    """``fn()``, or ``TimeoutError`` after ``seconds`` (the call goes on in a daemon thread).
    skein's calls to an ApplicationMaster have no deadline: one whose host vanished without
    a reset would block the caller for as long as TCP retries."""
    import threading

    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True, name="iterreduce-deadline")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def wait(app_id: str, client: Any, progress: Progress | None = None, poll: float = 1.0,
         kv_timeout: float = 10.0) -> tuple[str, str]:
    """Follow ``app_id`` until it ends; returns (final status, diagnostics). Reports a failed
    application as soon as YARN knows, never waits on a dead one: the live status from the
    ApplicationMaster is read with a deadline of ``kv_timeout`` seconds, the state from the
    ResourceManager decides."""

    from .containers import KV_STATUS

    app = None
    last = None
    told: str | None = None
    unanswered_since = None
    while True:
        try:
            report = client.application_report(app_id)
        except ValueError:  # skein: unknown application id
            raise
        except Exception as exc:  # noqa: BLE001 - the ResourceManager restarting, a network hiccup
            now = time.monotonic()
            unanswered_since = unanswered_since or now
            if now - unanswered_since > 120:
                raise
            logging.getLogger("iterreduce").warning("the ResourceManager did not answer (%s: %s); asking again",
                                                    type(exc).__name__, exc)
            time.sleep(min(5.0, max(poll, 1.0)))
            continue
        unanswered_since = None
        state = str(report.state)
        if progress is not None and last is None and state != told and state not in ("FINISHED", "FAILED", "KILLED"):
            told = state  # until the master's first status: each state YARN gives the application, once
            first = (report.diagnostics or "").strip().splitlines()[:1]
            progress.note(f"{app_id} {state}" + (f": {first[0]}" if first else ""))
        if state in ("FINISHED", "FAILED", "KILLED"):
            final = str(report.final_status)
            if progress is not None and last is not None:
                progress({**last, "state": final if final in ("SUCCEEDED", "KILLED") else "FAILED"})
            return final, report.diagnostics or ""
        if state == "RUNNING":
            try:
                if app is None:
                    app = with_deadline(lambda: client.connect(app_id, wait=False), kv_timeout)
                raw = with_deadline(lambda: app.kv.get(KV_STATUS), kv_timeout)
                if raw:
                    status = json.loads(raw)
                    if status != last:
                        last = status
                        if progress is not None:
                            progress(status)
            except Exception:  # noqa: BLE001 - the AM may be between attempts; the report decides
                app = None
        time.sleep(poll)


def driver_log_tail(app_id: str, lines: int = 6) -> str:
    """The last lines of the ApplicationMaster's own log (skein's ``application.driver.log``)
    of the latest attempt, where YARN's diagnostics say only that the driver exited (a wrong
    ``yarn.environment``, iterreduce missing from it); "" when the NodeManager holds none."""
    try:
        found = container_logs(app_id)
    except Exception:  # noqa: BLE001 - this is only a hint
        return ""
    drivers = [(cid, text) for cid, name, text in found if name == "application.driver.log" and text.strip()]
    if not drivers:
        return ""
    cid, text = max(drivers)  # the latest attempt's container
    noise = ("LogType:", "LogLastModifiedTime:", "LogLength:", "LogContents:", "End of LogType:", "Container:",
             "LogAggregationType:", "***", "====")
    tail = [line for line in text.strip().splitlines()
            if line.strip() and not line.strip().startswith(noise)][-lines:]  # the NodeManager's framing out
    return f"the end of {cid}'s application.driver.log:\n" + "\n".join("  " + line for line in tail)


def rm_web_url() -> str:
    """The ResourceManager's web address (``yarn.resourcemanager.webapp.address``), whose REST
    API the checks before submitting, ``kill`` and ``logs`` use."""
    return "http://" + _yarn_conf("yarn.resourcemanager.webapp.address", "localhost:8088")


def _yarn_conf(key: str, default: str) -> str:
    import xml.etree.ElementTree as ET

    conf_dir = os.environ.get("HADOOP_CONF_DIR") or os.path.join(os.environ.get("HADOOP_HOME", "/etc/hadoop"),
                                                                 "etc", "hadoop")
    try:
        root = ET.parse(os.path.join(conf_dir, "yarn-site.xml")).getroot()
    except (OSError, ET.ParseError):
        return default
    for prop in root.iter("property"):
        if prop.findtext("name") == key:
            return (prop.findtext("value") or default).strip()
    return default


def _get_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "application/json"}),
                                timeout=30) as r:
        return json.loads(r.read())


def kill_application(client: Any, app_id: str, diagnostics: str) -> None:
    """Kill ``app_id`` through the ResourceManager, leaving ``diagnostics`` as the reason YARN
    (and `iterreduce status`, and the web UI) shows for it: its REST API takes one (Hadoop 3),
    skein's kill does not ("Application killed by user."), so that is the fallback (a secured
    web UI, an older ResourceManager)."""
    import urllib.parse
    import urllib.request

    rm = rm_web_url()
    user = os.environ.get("HADOOP_USER_NAME") or login_name("dr.who")
    url = f"{rm}/ws/v1/cluster/apps/{app_id}/state?" + urllib.parse.urlencode({"user.name": user})
    body = json.dumps({"state": "KILLED", "diagnostics": diagnostics[:4000]}).encode()
    try:
        req = urllib.request.Request(url, data=body, method="PUT",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
        return
    except Exception as exc:  # noqa: BLE001 - refused (ACLs, SPNEGO) or not there: skein kills it
        log.debug("the ResourceManager's REST API did not kill %s (%s): killing it through skein", app_id, exc)
    client.kill_application(app_id)


def login_name(default: str) -> str:
    """This process's user name; ``default`` where the environment has none."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in this environment
        return default


def container_logs(app_id: str, max_gap: int = 5) -> list[tuple[str, str, str]]:
    """(container id, file name, text) of every container of ``app_id`` whose logs a
    NodeManager still holds (log aggregation off, or not done yet), through the REST APIs
    of the ResourceManager (attempts, nodes) and of the NodeManagers (logs). Container ids
    of an attempt are numbered from its ApplicationMaster's; ``max_gap`` missing numbers in
    a row end the search."""
    import urllib.error
    import urllib.request

    rm = rm_web_url()
    attempts = _get_json(f"{rm}/ws/v1/cluster/apps/{app_id}/appattempts")["appAttempts"]["appAttempt"]
    nodes = [n["nodeHTTPAddress"] for n in
             ((_get_json(f"{rm}/ws/v1/cluster/nodes").get("nodes") or {}).get("node") or [])]

    def log_files(node: str, cid: str) -> list[str] | None:
        try:
            info = _get_json(f"http://{node}/ws/v1/node/containers/{cid}/logs")
        except (urllib.error.URLError, ValueError):
            return None
        groups = info if isinstance(info, list) else [info]
        names = []
        for g in groups:
            g = g.get("containerLogsInfo", g)
            names += [f["fileName"] for f in g.get("containerLogInfo") or []]
        return names or None  # NodeManagers answer 200 with no files for containers they never ran

    out = []
    for attempt in attempts:
        prefix, _, first = attempt["containerId"].rpartition("_")
        am_node = attempt["nodeHttpAddress"]
        number, gap = int(first), 0
        while gap < max_gap:
            cid = f"{prefix}_{number:0{len(first)}d}"
            number += 1
            for node in [am_node] + [n for n in nodes if n != am_node]:
                names = log_files(node, cid)
                if names is not None:
                    break
            else:
                gap += 1
                continue
            gap = 0
            for name in names:
                if name in ("launch_container.sh", "directory.info", "prelaunch.out", "prelaunch.err"):
                    continue
                try:
                    with urllib.request.urlopen(f"http://{node}/ws/v1/node/containers/{cid}/logs/{name}",
                                                timeout=30) as r:
                        out.append((cid, name, r.read().decode(errors="replace")))
                except urllib.error.URLError:
                    continue
    return out
