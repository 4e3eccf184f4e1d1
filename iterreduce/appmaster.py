"""The ApplicationMaster: runs the algorithm's :class:`~iterreduce.api.Master`, serves the
Avro protocol to the workers, and drives barrier supersteps.

Superstep ``s``: every split's worker fetches broadcast ``s``, computes, and pushes its
update. When every split has pushed, the master combines the updates into broadcast
``s + 1`` (or a final result). Workers that die, fail, or fall silent are replaced by a
new container for the same split, which rejoins at the current superstep; since workers
draw randomness from ``(seed, split, superstep)`` the result does not change. Every
``checkpoint.every`` supersteps the master's state and the next broadcast are saved,
so a restarted master (``--resume``, or a new YARN attempt) continues from there.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import ipc
from .api import (Final, Master, MasterContext, Update, Worker, average_metrics, failed_when, json_text,
                  seed_global_generators, update_from_avro, update_to_avro)
from .containers import ENV_LOG_LEVEL, Launcher
from .fs import Checkpoints, FilePiece, InputError, Output, plan_splits
from .job import JobSpec, errors_text, is_uri

log = logging.getLogger("iterreduce.appmaster")

__all__ = ["AppMaster", "JobFailed", "load_class"]


class JobFailed(RuntimeError):
    """The job cannot finish; the message says why and where to look.

    ``retry`` says whether a new ApplicationMaster attempt, resuming from the last
    checkpoint, could end otherwise: True for lost containers and for errors of the
    ApplicationMaster itself or of the filesystem (the cluster may do better next time);
    False for what a new attempt would only repeat: a bad input record, the algorithm's
    own error in ``combine``, ``max_supersteps``. On YARN a failure with ``retry`` False
    ends the application: the next attempt fails at once with the same reason
    (:data:`FAILURE_MARKER`) instead of running the job again up to the same point.
    """

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry
        self.errors: list[str] | None = None  # see of()

    @classmethod
    def of(cls, source: str, errors: list[str]) -> "JobFailed":
        """The job file ``source`` has these ``errors`` (each without the ``source:``
        prefix), kept in ``errors`` for whoever adds them to others (``validate``)."""
        exc = cls(errors_text(source, errors))
        exc.errors = list(errors)
        return exc


RECENT = 20
"""How many of the last supersteps done the live status carries (:meth:`AppMaster.live_status`)."""

_ASK = object()  # AppMaster._publish: no total given


class StopRequested(KeyboardInterrupt):
    """:meth:`AppMaster.request_stop` was called: the job stops as if interrupted (its
    checkpoints stay, metrics.json says FAILED with ``reason``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.signal_name = reason


class AlgorithmImportError(JobFailed):
    """The algorithm's module cannot be imported here."""


def load_class(path: str, kind: type, job_dir: str | None = None, extra: Sequence[str] = (),
               field: str = "algorithm") -> type:
    """Import ``package.module:ClassName`` and check it subclasses ``kind``. Modules are
    found on ``sys.path``, in the working directory (as ``python -m`` does), in
    ``job_dir``, the job file's directory, and in the ``extra`` directories. Errors begin
    with ``field``, the job-file field that names ``path``."""
    module_name, _, cls_name = path.partition(":")
    places = [os.getcwd()] + [d for d in [job_dir, *extra] if d and os.path.isdir(d)]
    for place in places:
        if place in sys.path:
            continue
        if place != places[0]:
            sys.path.append(place)
        else:
            sys.path.insert(0, place)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and missing and not (
                module_name == missing or module_name.startswith(missing + ".")):
            # the module is there, but something it imports is not (here: perhaps on the cluster)
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
            at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
            raise AlgorithmImportError(f"{field}: importing module {module_name!r} for {path!r} raised "
                                       f"ModuleNotFoundError{at}: {exc} (a module it imports is not installed "
                                       "here)") from None
        where = " and ".join(dict.fromkeys(places))
        raise AlgorithmImportError(f"{field}: cannot import module {module_name!r} for {path!r}: {exc} "
                                   f"(looked on sys.path, in {where}; PYTHONPATH adds places; on YARN, "
                                   "yarn.files ships modules into the containers)") from None
    except Exception as exc:  # noqa: BLE001 - a SyntaxError, or the module's own code failing as it loads
        frames = traceback.extract_tb(exc.__traceback__)
        at = (f" at {exc.filename}:{exc.lineno}" if isinstance(exc, SyntaxError) and exc.filename
              else f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else "")
        raise JobFailed(f"{field}: importing module {module_name!r} for {path!r} raised "
                        f"{type(exc).__name__}{at}: {exc}") from None
    if not cls_name:
        raise JobFailed(f"{field}: {path!r} names no class: write module:ClassName")
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, kind)
                       and v is not kind)
        hint = f"; its {kind.__name__} subclasses: {', '.join(found)}" if found else ""
        raise JobFailed(f"{field}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                        f"{cls_name!r}{hint}")
    if not isinstance(cls, type) or not issubclass(cls, kind):
        what = (f"the class {cls.__module__}.{cls.__qualname__}" if isinstance(cls, type)
                else f"a {type(cls).__name__}")
        raise JobFailed(f"{field}: {path!r} is {what}, not a subclass of iterreduce.{kind.__name__}")
    return cls


def _shipped_dirs(job: JobSpec) -> list[str]:
    """Where modules that ``yarn.files`` ships are found here: what it ships lands in each
    container's directory, so here in the shipped paths' parent directories."""
    return [os.path.dirname(os.path.abspath(p.rstrip("/"))) for p in job.yarn.files if not is_uri(p)]


def check_algorithm(job: JobSpec, must_import: bool = True, check_paths: bool = True) -> None:
    """Import the job's master and worker classes and let the master check the job's
    ``algorithm.params`` (:meth:`Master.check_params`); raises :class:`JobFailed` naming the
    job file and the field. With ``must_import=False`` (submitting to YARN, where the
    algorithm may exist only in the cluster's environment) a module that cannot be imported
    here is logged and its params are left to the ApplicationMaster. With ``check_paths``
    the paths the master reads (:meth:`Master.input_paths`) must exist."""
    shipped = _shipped_dirs(job)
    found: dict[str, Any] = {}
    errors: list[JobFailed] = []
    for role, base in (("master", Master), ("worker", Worker)):  # both said at once
        try:
            found[role] = load_class(getattr(job.algorithm, role), base, job.base_dir, shipped,
                                     field=f"algorithm.{role}")
        except JobFailed as exc:
            errors.append(exc)
    if errors:
        if not must_import and all(isinstance(e, AlgorithmImportError) for e in errors):
            for exc in errors:
                log.warning("%s: %s; its params will be checked by the ApplicationMaster", job.source, exc)
            return
        failed = JobFailed.of(job.source, [str(e) for e in errors])
        failed.params_not_accepted = True  # not checked at all
        raise failed
    master = found["master"]
    try:
        master.check_params(job.algorithm.params)
    except Exception as exc:  # noqa: BLE001 - refused (ValueError, TypeError), or a bug in check_params
        if isinstance(exc, (ValueError, TypeError)):
            msg = str(exc) if str(exc).startswith("algorithm.params") else f"algorithm.params: {exc}"
            refused = JobFailed(f"{job.source}: {msg}")
        else:
            refused = JobFailed(f"{job.source}: algorithm.params: {master.__qualname__}.check_params raised "
                                f"{type(exc).__name__}: {exc} (it should raise ValueError naming the field)\n"
                                f"{traceback.format_exc()}")
        refused.params_not_accepted = True  # input_columns is not asked of such params
        raise refused from None
    from .fs import InputError, list_input_files

    params = job.algorithm.params

    def field(path: str) -> str:  # "algorithm.params.test" when the path is that key's value
        for key, value in (params.items() if isinstance(params, dict) else ()):
            if value == path or (isinstance(value, list) and path in value):
                return f"algorithm.params.{key}"
        return "algorithm.params"

    for path in master.input_paths(params) if check_paths else ():
        try:
            list_input_files([job.resolve(path)])
        except InputError as exc:
            raise JobFailed(f"{job.source}: {field(path)}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a filesystem that does not answer
            raise JobFailed(f"{job.source}: {field(path)}: cannot read {path}: {type(exc).__name__}: {exc}") from None


@dataclass
class _WorkerInfo:
    worker_id: str
    container_id: str
    split: int
    host: str
    last_seen: float
    superstep: int = 0
    progress: float = 0.0
    message: str = ""
    working_since: float = 0.0  # registration, then each time it is given a superstep's broadcast


_PROGRAMMING_ERRORS = {
    "ArithmeticError", "AssertionError", "AttributeError", "FloatingPointError", "ImportError",
    "IndexError", "KeyError", "LinAlgError", "LookupError", "ModuleNotFoundError", "NameError",
    "NotImplementedError", "OverflowError", "RecursionError", "RuntimeError", "TypeError", "UnboundLocalError",
    "ValueError", "ZeroDivisionError"}
"""Exception names in a worker's failure that say the code or its data is wrong, so that
the same failure twice in a row (the lost worker's and its replacement's, at the same
superstep) ends the job. Others (the network, a filesystem, memory, an algorithm's own
exception classes) get the usual ``workers.max_restarts`` replacements."""


@dataclass
class _Split:
    pieces: list[FilePiece]
    container: str | None = None  # the container started for this split
    owner: str | None = None  # worker id currently holding it
    launched_at: float = 0.0
    last_failure: tuple[Any, str] | None = None  # ("setup" or superstep, error) its last worker reported


class AppMaster:
    """Runs one job. ``run()`` returns the final status; it never hangs on lost workers.

    ``launcher`` starts the worker containers (local processes or YARN containers).
    ``status_hook(status: dict)`` is called after every superstep (for progress/YARN).
    """

    def __init__(self, job: JobSpec, launcher: Launcher, token: str | None = None, resume: bool = False,
                 host: str = "127.0.0.1", status_hook: Any = None, application: str | None = None,
                 resume_asked: bool | None = None):
        self.job = job
        self.application = application  # the YARN application id (None for a local run)
        self.launcher = launcher
        self.token = token or secrets.token_urlsafe(32)
        self.resume = resume
        # the user asked for the resume (`run --resume`, `submit --resume`), not YARN's next attempt:
        # then another application's finished result of the same job counts as done
        self.resume_asked = resume if resume_asked is None else resume_asked
        self._stop_asked: str | None = None  # request_stop's reason
        self.host = host
        self.status_hook = status_hook
        self.output = Output(job.output)
        self.checkpoints = Checkpoints(job.checkpoint_path, keep=job.checkpoint.keep)
        self._cond = threading.Condition()
        self._state = "STARTING"
        self._message = ""
        self._superstep = 0
        self._broadcast: dict[str, Any] | None = None  # Avro record of broadcast _superstep
        self._catch_up: dict[str, Any] | None = None
        self._resumed_at: int | None = None  # the superstep a resume started at
        self._checkpoints_logged = False
        self._pushes: dict[int, Update] = {}
        self._splits: list[_Split] = []
        self._workers: dict[str, _WorkerInfo] = {}
        self._containers: dict[str, int] = {}  # container -> split
        self._replacements = 0  # in the whole job (resumed from the checkpoint): reported
        self._replaced_here = 0  # by this run of the master: held to workers.max_restarts
        self._failure: str | None = None
        self._history: list[dict[str, Any]] = []
        self._last_metrics: dict[str, float] = {}
        self._metrics_phase = ""
        self._phase = "starting"
        # (container, reason, fatal) lost containers, from IPC threads; fatal (why no replacement would
        # do better): fail the job at once
        self._events: list[tuple[str, str, str]] = []
        self._result_files: list[str] = []
        self._metrics_lines: list[str] = []  # metrics.jsonl lines not written yet
        self._metrics_flushed = 0.0
        self._step_started = self._waiting_logged = time.monotonic()
        self._started = False
        self._owner = False  # OWNER_FILE written: removed at the end
        self._waiting_published = 0.0
        self.server: ipc.IPCServer | None = None
        self.master: Master | None = None

    # ------------------------------------------------------------------ life cycle
    def run(self) -> str:
        """Run the job to the end. Returns "SUCCEEDED"; raises :class:`JobFailed` otherwise."""
        if self.resume and self._finished_before():
            self._release_output()
            return self._state
        try:
            self._start()
            self._loop()
            return self._state
        except JobFailed as exc:
            self._fail(str(exc))
            raise
        except KeyboardInterrupt as exc:
            how = getattr(exc, "signal_name", "Ctrl-C")
            try:
                saved = bool(self.checkpoints.supersteps())
            except Exception:  # noqa: BLE001 - only for the message
                saved = True
            how_resume = "`iterreduce submit --resume`" if self.application else "a run with --resume"
            then = (f"{how_resume} continues from the last checkpoint" if saved else
                    "no checkpoint had been written: a new run starts from the beginning")
            self._fail(f"interrupted ({how}); {then}", interrupted=True)
            raise
        except BaseException as exc:
            self._fail(f"ApplicationMaster error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            if isinstance(exc, Exception):
                raise JobFailed(f"ApplicationMaster error: {type(exc).__name__}: {exc}\n"
                                f"{traceback.format_exc()}", retry=True) from exc
            raise
        finally:
            self._shutdown()

    def request_stop(self, reason: str) -> None:
        """Stop the job (from any thread) as a Ctrl-C would: at the end of the wait for the
        current superstep its workers are stopped, metrics.json says why, and ``run()`` raises
        :class:`StopRequested`; the checkpoints stay for a resume. ``iterreduce kill`` asks
        a YARN ApplicationMaster for this."""
        with self._cond:
            self._stop_asked = reason
            self._cond.notify_all()

    def _finished_before(self) -> bool:
        """A resume of a job that already succeeded (its metrics.json says so, for these
        settings): nothing to do, and its results stay as they are."""
        done = earlier_success(self.output, self.job)
        if done is None or (done.get("application") != self.application and not self.resume_asked):
            return False  # a new YARN attempt: only this application's own result is its result
        with self._cond:
            self._state, self._superstep = "SUCCEEDED", max(int(done.get("supersteps", 1)) - 1, 0)
            self._message = ("had already succeeded: nothing to resume" if not self.resume_asked else
                             "had already succeeded: nothing to resume (run without --resume to run it again)")
            self._replacements = int(done.get("replacements", 0))
        log.info("job %s %s; results in %s", self.job.name, self._message, self.job.output)
        return True

    def _start(self) -> None:
        job = self.job
        self.output.create()
        master_cls = load_class(job.algorithm.master, Master, job.base_dir)
        from .api import Worker

        load_class(job.algorithm.worker, Worker, job.base_dir)  # fail now, not in every container
        # what the client checked before submitting, again here: on YARN the algorithm may exist
        # only in the cluster's environment, and the input may have changed since
        check_algorithm(job, check_paths=False)
        try:
            splits = plan_splits(job.input.paths, job.workers.count, input_columns(master_cls, job),
                                 input_check(master_cls, job))
        except InputError as exc:  # refused, the output left as it was (a filesystem's hiccup: the next attempt)
            if exc.transient:
                raise
            raise JobFailed(f"the input: {exc}; fix the input or the job file and run the job again") from None
        restored = resumable_checkpoint(self.checkpoints, job) if self.resume else None
        # the point of no return: what an earlier run left that is not this run's goes (nothing
        # before here, so a job refused above leaves the output as it was); a failure from here
        # on, in the master's setup say, is this run's and is written to metrics.json
        if restored is None and not self.resume:
            for old in self.checkpoints.supersteps():
                self.checkpoints.dir.delete(f"ckpt-{old:08d}.npz")
        if restored is not None:  # what the checkpoint knows of the run so far (metrics.json says it too)
            step, arrays, meta = restored
            self._superstep = self._resumed_at = step
            self._replacements = meta.get("replacements", 0)
            self._history = meta.get("history", [])
        if self.output.exists("metrics.json"):  # an earlier run's result: until this one writes its own
            self._delete_earlier_results()
            self.output.delete("metrics.json")
        if self.output.exists(FAILURE_MARKER):  # an earlier application's, or a retry=True attempt's
            self.output.delete(FAILURE_MARKER)
        # metrics.jsonl may hold supersteps after the checkpoint: keep what the checkpoint knows
        self.output.write_bytes("metrics.jsonl", "".join(json_text(h) + "\n" for h in self._history).encode())
        self.output.write_json(OWNER_FILE, {"application": self.application, "job": self.job.name,
                                            "host": socket.gethostname(), "pid": os.getpid()})
        self._owner = True
        self._started = True
        self.master = self._hook(f"{job.algorithm.master}()", master_cls)
        ctx = MasterContext(params=job.algorithm.params, seed=job.seed, num_workers=job.workers.count,
                            output=self.output, log=logging.getLogger("iterreduce.master"),
                            base_dir=job.base_dir)
        try:
            self._hook("setup", self.master.setup, ctx)
        except InputError as exc:  # the master's own input (test data, say): every attempt reads it
            if exc.transient:
                raise
            raise JobFailed(f"the master's input: {exc}; fix the input or the job file and run the job again") from None
        if restored is not None:
            step, arrays, meta = restored
            self._hook("restore", self.master.restore, _unpack(arrays, meta, "state"))
            broadcast = _unpack(arrays, meta, "broadcast")
            log.info("resumed from checkpoint %s at superstep %d", self.checkpoints.dir.uri_of(
                f"ckpt-{step:08d}.npz"), step)
        else:
            if self.resume:
                log.warning("no checkpoint under %s: starting from the beginning", job.checkpoint_path)
            broadcast = self._hook("initial_update", self.master.initial_update, returns="an Update")
        self._set_broadcast(broadcast)
        self._phase = self._hook("phase", self.master.phase)
        self._splits = [_Split(p) for p in splits]
        for i, s in enumerate(self._splits):
            log.info("split %d: %d rows, %d bytes in %d file(s)", i, sum(p.num_rows for p in s.pieces),
                     sum(p.nbytes for p in s.pieces), len(s.pieces))
        # two connections per worker (its calls, its heartbeats), room for replacements' and lost ones'
        self.server = ipc.IPCServer(self, self.token, host=self.host, port=0,
                                    max_connections=4 * job.workers.count + 64).start()
        self.launcher.bind(self.server.url, self.token)
        log.info("serving the iterreduce protocol at %s", self.server.url)
        with self._cond:
            self._state = "RUNNING"
        for i in range(len(self._splits)):
            self._launch(i)

    def _publish(self, total: Any = _ASK) -> None:
        """The live status to ``status_hook``, with ``total`` (the master's total_supersteps,
        asked of it when not given)."""
        if self.status_hook:
            if total is _ASK:
                total = self._hook("total_supersteps", self.master.total_supersteps)
            self.status_hook({**self.live_status(), "total": total})

    def _hook(self, name: str, fn: Callable[..., Any], *args: Any, returns: str = "") -> Any:
        """``fn(*args)``, one of the algorithm's Master methods (``name``): an exception in it
        fails the job naming the method, with its traceback (a transient error of the network
        or a filesystem lets YARN's next attempt try again; anything else would only repeat).
        With ``returns`` (its description), the result must be an :class:`Update`."""
        if name.split()[0] in ("setup", "initial_update", "combine"):  # np.random, random: as ctx.rng
            seed_global_generators(self.job.seed, 0x6D61, *([self._superstep] if name.startswith("combine")
                                                            else [0, 1]))  # not combine(0)'s: padded alike
        try:
            out = fn(*args)
        except JobFailed:
            raise
        except InputError as exc:
            if name == "setup":  # _start says what the master's own input is
                raise
            raise JobFailed(f"Master.{name} failed: {exc}", retry=exc.transient) from None
        except Exception as exc:
            from .fs import _transient

            what = name if name.endswith(")") else f"Master.{name}"  # the class itself: "pkg.mod:Cls()"
            hint = ""
            if name.startswith("combine") and self._resumed_at == self._superstep:
                hint = (f" (this run resumed from the checkpoint of superstep {self._resumed_at} just before: a master "
                        "that keeps anything across supersteps returns it from state() and takes it back in "
                        "restore())")
            raise JobFailed(f"{what} failed: {type(exc).__name__}: {exc}{hint}\n{traceback.format_exc()}",
                            retry=_transient(exc)) from exc
        if returns and not isinstance(out, Update) and not (out is None and "None" in returns):
            raise JobFailed(f"Master.{name.split()[0]} must return {returns}, got {type(out).__name__}")
        if returns and out is not None:
            try:  # changed after it was made, say: named as when it is made
                out.check()
            except (TypeError, ValueError) as exc:
                raise JobFailed(f"Master.{name.split()[0]} returned an Update that cannot be used: {exc}") from None
        return out

    def _launch(self, split: int) -> None:
        cid = self.launcher.launch(split)
        with self._cond:
            s = self._splits[split]
            s.container, s.owner, s.launched_at = cid, None, time.monotonic()
            self._containers[cid] = split

    def _loop(self) -> None:
        started = time.monotonic()
        step_started = self._step_started = self._waiting_logged = time.monotonic()
        total = self._hook("total_supersteps", self.master.total_supersteps)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._pushes) == len(self._splits) or self._events
                                    or self._stop_asked, timeout=0.2)
                if self._stop_asked:
                    raise StopRequested(self._stop_asked)
            self._handle_events()
            self._check_liveness()
            with self._cond:  # after the losses: a lost worker's push is done again by its replacement
                if len(self._pushes) != len(self._splits):
                    continue
                step = self._superstep
                updates = [self._pushes[i] for i in range(len(self._splits))]
            self._check_layouts(updates, step)
            t0 = time.monotonic()
            nxt = self._hook(f"combine at superstep {step}", self.master.combine, updates, step,
                             returns="an Update or Final")
            combine_s = time.monotonic() - t0
            record = {
                "superstep": step, "phase": self._phase, "seconds": round(time.monotonic() - step_started, 4),
                "combine_seconds": round(combine_s, 4),
                "bytes_in": sum(u.nbytes() for u in updates),
                "bytes_out": (self._broadcast_nbytes * len(self._splits)),
                "workers": average_metrics(updates), "master": {k: float(v) for k, v in nxt.metrics.items()},
                "replacements": self._replacements, "elapsed": round(time.monotonic() - started, 3),
            }
            self._history.append(record)
            self._last_metrics = {**record["workers"], **record["master"]}
            self._metrics_phase = record["phase"]  # the live view's metrics are this phase's, not the next's
            self._metrics_lines.append(json_text(record) + "\n")
            self._flush_metrics(force=isinstance(nxt, Final))
            _log_superstep(record, total)
            if isinstance(nxt, Final):
                mark = len(self.output.written)
                self._hook("save", self.master.save, nxt, self.output)
                self._result_files = [n for n in self.output.written[mark:] if n != "metrics.json"]
                self._finish(nxt)
                return
            if step + 1 >= self.job.max_supersteps:
                raise JobFailed(f"the job reached max_supersteps ({self.job.max_supersteps}) without a final result "
                                "(Master.combine returns a Final to end the job)")
            with self._cond:
                self._pushes = {}
                self._superstep = step + 1
                self._set_broadcast(nxt)
                self._phase = self._hook("phase", self.master.phase)
                # the workers start now: the superstep's time includes the checkpoint written meanwhile
                step_started = self._step_started = time.monotonic()
                self._cond.notify_all()
            if self.job.checkpoint.every and (step + 1) % self.job.checkpoint.every == 0:
                self._checkpoint(step + 1, nxt)
            self._publish(total)

    def _flush_metrics(self, force: bool = False) -> None:
        """Append to metrics.jsonl: at once on a local disk; on a remote filesystem (where an
        append rewrites the file) at most every 10 s, at checkpoints and at the end."""
        if not self._metrics_lines:
            return
        if force or self.output.is_local or time.monotonic() - self._metrics_flushed > 10:
            self.output.append_text("metrics.jsonl", "".join(self._metrics_lines))
            self._metrics_lines = []
            self._metrics_flushed = time.monotonic()

    def _set_broadcast(self, update: Update) -> None:
        """Encode the broadcast once; the master may not change its arrays afterwards."""
        self._broadcast = update_to_avro(update, self._superstep)
        self._broadcast_nbytes = update.nbytes()
        cu = self._hook("catch_up", self.master.catch_up, returns="an Update or None")
        self._catch_up = update_to_avro(_copy(cu), self._superstep) if cu is not None else None

    def _checkpoint(self, step: int, broadcast: Update) -> None:
        state = self._hook("state", self.master.state, returns="an Update")
        arrays = {f"state/{k}": v for k, v in state.arrays.items()}
        arrays.update({f"broadcast/{k}": v for k, v in broadcast.arrays.items()})
        meta = {
            "superstep": step, "job": self.job.name, "replacements": self._replacements,
            "fingerprint": job_fingerprint(self.job),
            "history": self._history,
            "state": {"meta": state.meta, "metrics": state.metrics, "num_samples": state.num_samples},
            "broadcast": {"meta": broadcast.meta, "metrics": broadcast.metrics,
                          "num_samples": broadcast.num_samples},
        }
        uri = self.checkpoints.save(step, arrays, meta)
        self._flush_metrics(force=True)
        if self._checkpoints_logged:  # one line to say where they go, then only with -v
            log.debug("checkpoint %s", uri)
        else:
            log.info("checkpoint %s (every %d superstep(s); keeping the last %d)", uri, self.job.checkpoint.every,
                     self.job.checkpoint.keep)
            self._checkpoints_logged = True

    def _finish(self, final: Final) -> None:
        with self._cond:
            self._state = "SUCCEEDED"
            replaced = self._replacements
            self._message = ("succeeded" if not replaced else
                             f"succeeded after {replaced} worker replacement{'s' if replaced > 1 else ''}")
            self._cond.notify_all()
        self._write_metrics(final)
        log.info("job %s succeeded after %d superstep%s%s", self.job.name, self._superstep + 1,
                 "" if self._superstep == 0 else "s",
                 f" and {replaced} worker replacement{'s' if replaced > 1 else ''}" if replaced else "")
        # let workers learn DONE and exit by themselves
        deadline = time.monotonic() + max(3 * self.job.heartbeat.interval, 3.0)
        while time.monotonic() < deadline:
            for cid in self.launcher.poll():
                self._containers.pop(cid, None)
            if not self._containers:
                break
            time.sleep(0.05)
        self._publish()

    def _delete_earlier_results(self) -> None:
        """Remove the files an earlier run's ``Master.save`` wrote (its metrics.json lists them), so
        a run that fails leaves no result of another beside its own FAILED metrics.json."""
        try:
            earlier = json.loads(self.output.read_bytes("metrics.json"))
            files = earlier.get("files") or []
        except (OSError, ValueError, AttributeError):
            return
        removed = [n for n in files if isinstance(n, str) and n and ".." not in n.split("/")
                   and not n.startswith("/") and self.output.exists(n)]
        if removed:  # the run starts from the beginning: say what it replaces
            log.warning("%s: removing them; this run writes its own", results_text(self.output.uri, earlier, removed))
        for name in removed:
            self.output.delete(name)

    def _write_metrics(self, final: Final | None) -> None:
        self.output.write_json("metrics.json", {
            "job": self.job.name, "state": self._state, "message": self._message,
            "fingerprint": job_fingerprint(self.job), "application": self.application,
            "replacements": self._replacements, "supersteps": len(self._history),
            "final": {"metrics": final.metrics, "meta": final.meta} if final else None,
            "files": self._result_files if final else [],  # what Master.save wrote: the next run removes it
            "history": self._history,
        })

    def _fail(self, reason: str, interrupted: bool = False) -> None:
        with self._cond:
            if self._state in ("SUCCEEDED", "FAILED"):
                return
            self._state, self._message, self._failure = "FAILED", reason.splitlines()[0], reason
            self._cond.notify_all()
        if interrupted:
            log.warning("job %s stopped: %s", self.job.name, reason)
        else:
            log.error("job %s failed: %s", self.job.name, reason)
        if not self._started:  # refused before it began (a checkpoint it cannot resume, an algorithm it
            return             # cannot load): the output keeps what an earlier run wrote
        try:
            self._flush_metrics(force=True)
            self._write_metrics(None)
        except Exception:  # noqa: BLE001 - the reason above matters more
            log.exception("could not write metrics.json")

    def _shutdown(self) -> None:
        try:
            self.launcher.stop_all(grace=2.0)
        finally:
            if self.server is not None:
                self.server.stop()
            self._release_output()

    def _release_output(self) -> None:
        """Remove OWNER_FILE when it is this run's: written by this master, or by the client
        at submission for this application (a job refused before it starts left that one)."""
        try:
            mine = self._owner
            if not mine and self.application and self.output.exists(OWNER_FILE):
                owner = json.loads(self.output.read_bytes(OWNER_FILE))
                mine = isinstance(owner, dict) and owner.get("application") == self.application
            if mine:
                self.output.delete(OWNER_FILE)
        except Exception:  # noqa: BLE001 - a later run ignores a marker of a run that ended
            log.warning("could not remove %s", self.output.uri_of(OWNER_FILE))

    # ------------------------------------------------------------------ faults
    def _handle_events(self) -> None:
        with self._cond:
            events, self._events = self._events, []
        for cid, reason, fatal in events:
            if fatal:
                self._fatal(cid, reason, fatal)
            self._container_lost(cid, reason)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        hb = self.job.heartbeat
        exited = self.launcher.poll()
        # a worker reports its failure before it exits: that report, not the exit code, is the reason
        self._handle_events()
        for cid, code in exited.items():
            self._container_lost(cid, self.launcher.exit_reason(code))
        with self._cond:
            silent = [(w.container_id, now - w.last_seen) for w in self._workers.values()
                      if now - w.last_seen > hb.timeout]
            unregistered = [(s.container, now - s.launched_at) for s in self._splits
                            if s.owner is None and s.container and now - s.launched_at > hb.register_timeout]
            busy = [(w, now - w.working_since) for w in self._workers.values() if w.split not in self._pushes]
            step = self._superstep
        hung = [(w.container_id, age) for w, age in busy if hb.superstep_timeout and age > hb.superstep_timeout]
        if busy and now - self._step_started > 60 and now - self._waiting_logged > 60:
            self._waiting_logged = now
            log.info("superstep %d: after %.0f s still waiting for %s", step, now - self._step_started, "; ".join(
                f"split {w.split} (worker {w.worker_id}, {age:.0f} s in this superstep, progress {w.progress:.0%}"
                + (f" {w.message!r}" if w.message else "") + ")" for w, age in busy))
        for cid, age in hung:
            self.launcher.kill(cid)
            self._container_lost(cid, f"spent {age:.0f} s in superstep {step} without finishing it "
                                      f"(heartbeat.superstep_timeout is {hb.superstep_timeout:g} s)")
        for cid, age in silent:
            self.launcher.kill(cid)
            self._container_lost(cid, f"sent no heartbeat for {age:.0f} s (heartbeat.timeout is {hb.timeout:g} s)")
        with self._cond:
            pending = [s.container for s in self._splits if s.owner is None and s.container
                       and now - s.launched_at > 10]
        asked: list[set[str]] = []  # the launcher's answer, asked for at most once a tick

        def unallocated() -> set[str]:
            if not asked:
                asked.append(self.launcher.unallocated())
            return asked[0]

        if pending and now - self._waiting_published > 10:  # the live view says what it waits for
            self._waiting_published = now
            queued = unallocated() & set(pending)
            with self._cond:
                self._message = (f"waiting for YARN to allocate {len(queued)} worker container(s)" if queued
                                 else f"waiting for {len(pending)} worker(s) to register")
            self._publish()
        elif not pending and self._message.startswith("waiting for"):
            with self._cond:
                self._message = ""
        if unregistered:
            waiting = unallocated()
            for cid, age in unregistered:
                if cid in waiting:  # a replacement would wait in the same queue: say why and end the job
                    res = self.job.workers.resources
                    raise JobFailed(
                        f"YARN has not allocated the worker container {self.launcher.describe(cid)} in {age:.0f} s "
                        f"(heartbeat.register_timeout): the cluster has no room for workers of {res.memory_mb} MiB "
                        f"and {res.vcores} vcore(s) besides the others (or the queue is full); ask for less "
                        "(workers.memory, workers.count) or run when the cluster is quieter")
            for cid, age in unregistered:
                self.launcher.kill(cid)
                self._container_lost(cid, f"did not register within {age:.0f} s (heartbeat.register_timeout)")

    def _fatal(self, cid: str, reason: str, why: str) -> None:
        """A failure that every replacement would repeat (``why`` says so): the job ends."""
        with self._cond:
            split = self._containers.get(cid)
        raise JobFailed(f"worker container {self.launcher.describe(cid)} for split {split} {reason}; {why}")

    def _check_layouts(self, updates: list[Update], step: int) -> None:
        """All splits' updates must have the same arrays; the odd ones out are named (not the
        split that happened to push first)."""
        layouts = [tuple(sorted((k, a.dtype.str, a.shape) for k, a in u.arrays.items())) for u in updates]
        if len(set(layouts)) == 1:
            return
        common = max(layouts, key=lambda lay: (layouts.count(lay), -layouts.index(lay)))
        if layouts.count(common) * 2 <= len(layouts):  # no majority: no split can be called the odd one
            shown = "; ".join(f"split {i}: " + ", ".join(f"{k} {np.dtype(d)}{list(s)}" for k, d, s in lay)
                              for i, lay in enumerate(layouts))
            raise JobFailed(f"superstep {step}: the splits' updates do not hold the same arrays ({shown}); every "
                            "split's update must hold the same arrays (names, dtypes, shapes)")
        ref = updates[layouts.index(common)]
        same = [i for i, lay in enumerate(layouts) if lay == common]
        odd = [i for i, lay in enumerate(layouts) if lay != common]
        also = f" (so do split(s) {', '.join(map(str, odd[1:]))})" if len(odd) > 1 else ""
        raise JobFailed(f"superstep {step}: the update of split {odd[0]} does not match those of split(s) "
                        f"{', '.join(map(str, same))}: {_layout_mismatch(ref, updates[odd[0]])}{also}; every "
                        "split's update must hold the same arrays (names, dtypes, shapes)")

    def _container_lost(self, cid: str, reason: str) -> None:
        with self._cond:
            split = self._containers.pop(cid, None)
            if split is None or self._state != "RUNNING":
                return
            s = self._splits[split]
            for wid in [w for w, info in self._workers.items() if info.container_id == cid]:
                del self._workers[wid]
            if s.container != cid:
                return
            self._pushes.pop(split, None)  # its replacement computes this superstep again
            s.container, s.owner = None, None
            self._replacements += 1
            self._replaced_here += 1
            n = self._replaced_here
        where = self.launcher.describe(cid)
        if n > self.job.workers.max_restarts:
            raise JobFailed(f"worker container {where} for split {split} {reason}; the job already replaced "
                            f"{n - 1} worker(s), the limit of workers.max_restarts ({self.job.workers.max_restarts})",
                            retry=True)
        log.warning("worker container %s for split %d %s: starting a replacement (%d of at most %d)",
                    where, split, reason, n, self.job.workers.max_restarts)
        self._launch(split)

    # ------------------------------------------------------------------ protocol
    def _worker(self, worker_id: str) -> _WorkerInfo:
        info = self._workers.get(worker_id)
        if info is None:
            raise _refused("NOT_REGISTERED", f"worker {worker_id!r} is not registered (or was replaced)")
        info.last_seen = time.monotonic()
        return info

    def register(self, worker_id: str, container_id: str, host: str, split_hint: int) -> dict[str, Any]:
        with self._cond:
            if self._state != "RUNNING":
                raise _refused("REJECTED", f"register from worker {worker_id!r} (container {container_id!r}): "
                               f"the job is {self._state}", ended=True)
            if worker_id in self._workers:
                raise _refused("BAD_REQUEST", f"worker {worker_id!r} is already registered")
            split = self._containers.get(container_id)
            if split is None or self._splits[split].owner is not None:
                free = [i for i, s in enumerate(self._splits) if s.owner is None and s.container == container_id]
                if not free:
                    raise _refused("REJECTED", f"register from worker {worker_id!r}: container {container_id!r} was "
                               "not started for a free split")
                split = free[0]
            self._splits[split].owner = worker_id
            now = time.monotonic()
            self._workers[worker_id] = _WorkerInfo(worker_id, container_id, split, host, now,
                                                   superstep=self._superstep, working_since=now)
            log.info("worker %s (container %s on %s) registered for split %d at superstep %d",
                     worker_id, container_id, host, split, self._superstep)
            return {
                "split_index": split, "num_splits": len(self._splits),
                "split": [p.to_avro() for p in self._splits[split].pieces],
                "job": self.job.to_json(), "start_superstep": self._superstep,
                "catch_up": self._catch_up,
                "heartbeat_interval_ms": int(self.job.heartbeat.interval * 1000),
            }

    def fetch(self, worker_id: str, superstep: int, wait_ms: int) -> dict[str, Any]:
        deadline = time.monotonic() + min(max(wait_ms, 0), 30_000) / 1000
        with self._cond:
            info = self._worker(worker_id)
            while True:
                if self._state == "SUCCEEDED":
                    return {"status": "DONE", "update": None, "message": self._message}
                if self._state != "RUNNING":
                    return {"status": "ABORT", "update": None, "message": self._message}
                if superstep == self._superstep:
                    info.working_since = time.monotonic()
                    return {"status": "READY", "update": self._broadcast, "message": ""}
                if superstep < self._superstep:
                    raise _refused("STALE_SUPERSTEP", f"fetch from worker {worker_id!r}: superstep {superstep} is "
                                   f"over, the job is at superstep {self._superstep}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return {"status": "WAIT", "update": None, "message": f"the job is at superstep {self._superstep}"}
                self._cond.wait(remaining)
                if worker_id not in self._workers:
                    raise _refused("NOT_REGISTERED", f"fetch from worker {worker_id!r}: it was replaced")

    def push(self, worker_id: str, update: dict[str, Any]) -> dict[str, Any]:
        try:
            u = update_from_avro(update)
        except ValueError as exc:
            raise _refused("BAD_UPDATE", f"malformed update from worker {worker_id!r}: {exc}") from None
        step = update["superstep"]
        bad = _non_finite(u)
        with self._cond:
            info = self._worker(worker_id)
            where = f"worker {worker_id} (container {info.container_id}, split {info.split}) at superstep {step}"
            if self._state != "RUNNING":
                raise _refused("REJECTED", f"update from {where}: the job is {self._state}", ended=True)
            if info.superstep == step + 1 and step in (self._superstep, self._superstep - 1):
                # this worker's update for `step` was taken already: the same push again, its answer
                # lost on the way (the worker's client sends again), or not this worker's at all
                log.warning("a second update from %s: the first was taken and is kept; this one is answered "
                            "as accepted and dropped", where)
                return {"accepted": True, "message": "already taken", "stop": False}
            if step != self._superstep:
                when = "is over" if step < self._superstep else "has not begun"
                raise _refused("STALE_SUPERSTEP", f"update from {where}: superstep {step} {when}, the job "
                                      f"is at superstep {self._superstep}")
            if bad:  # the message only: the worker itself, told so, fails the job (fail, fatal)
                log.error("rejected the update from %s: %s", where, bad)
                raise ipc.RemoteError("BAD_UPDATE", f"update from {where} rejected: {bad}")
            self._pushes[info.split] = u
            info.superstep = step + 1
            log.debug("took the update of %s: %d samples, %d bytes, %d of %d splits in", where, u.num_samples,
                      u.nbytes(), len(self._pushes), len(self._splits))
            self._cond.notify_all()
        return {"accepted": True, "message": "", "stop": False}

    def heartbeat(self, worker_id: str, superstep: int, progress: float, message: str) -> dict[str, Any]:
        with self._cond:
            info = self._workers.get(worker_id)
            if info is None:
                return {"accepted": False, "message": "not registered (or replaced): exit", "stop": True}
            info.last_seen = time.monotonic()
            info.progress, info.message = float(progress), message[:200]
            stop = self._state not in ("RUNNING", "STARTING")
        return {"accepted": True, "message": self._message if stop else "", "stop": stop}

    def fail(self, worker_id: str, superstep: int, error: str, traceback: str, fatal: bool = False,
             stage: str = "compute") -> dict[str, Any]:
        when = failed_when(stage, superstep)
        # the same failure: in setup (whichever superstep the worker joined at), or at one superstep
        key, same = ("setup", error), "in setup"
        if stage != "setup":
            key, same = (superstep, error), "at the same superstep"
        with self._cond:
            info = self._workers.get(worker_id)
            if info is None:
                return {"accepted": False, "message": "not registered", "stop": True}
            if stage not in ("setup", "compute"):
                raise _refused("REJECTED", f"fail from worker {worker_id}: stage {stage[:40]!r} is neither "
                                           "setup nor compute")
            # a worker computes only the master's superstep, and sets up for it or an earlier one
            if self._state == "RUNNING" and not (0 <= superstep <= self._superstep
                                                 and (stage == "setup" or superstep == self._superstep)):
                raise _refused("STALE_SUPERSTEP", f"fail from worker {worker_id} {when}: the job is at superstep "
                                                  f"{self._superstep}")
            log.error("worker %s (container %s, split %d) failed %s: %s\n%s", worker_id,
                      info.container_id, info.split, when, _peer_text(error), _indented(traceback))
            why = ("this fails the job at once: a replacement worker would fail the same way (it reads the same "
                   "input with the same seed); fix the input, the job file or the algorithm and run the job "
                   "again") if fatal else ""
            split = self._splits[info.split]
            if (not why and split.last_failure == key
                    and error.split(":", 1)[0] in _PROGRAMMING_ERRORS):
                why = (f"this worker replaced one that failed the same way {same}, so a further replacement "
                       "would too (workers are deterministic given seed, split and superstep); this fails the "
                       "job; fix the algorithm or the input and run the job again")
            others = [i for i, o in enumerate(self._splits) if i != info.split and o.last_failure == key]
            if not why and others and error.split(":", 1)[0] in _PROGRAMMING_ERRORS:
                why = (f"the worker of split {others[0]} failed the same way {same}: an error of "
                       "the algorithm, not of one machine, which replacements would only repeat; this fails the "
                       "job; fix the algorithm or the input and run the job again")
            split.last_failure = key
            self._events.append((info.container_id, f"failed {when}: {_peer_text(error)}", why))
            self._cond.notify_all()
        return {"accepted": True, "message": "", "stop": True}

    def complete(self, worker_id: str) -> dict[str, Any]:
        with self._cond:
            if worker_id not in self._workers:
                return {"accepted": False, "message": "not registered", "stop": True}
            if self._state != "SUCCEEDED":  # a worker says so only once fetch has said DONE
                raise _refused("REJECTED", f"complete from worker {worker_id}: the job is {self._state}, "
                                      "not done")
            self._workers.pop(worker_id, None)
        return {"accepted": True, "message": "", "stop": True}

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "state": self._state, "superstep": self._superstep, "phase": self._phase,
                "workers_registered": len(self._workers), "workers_expected": len(self._splits),
                "replacements": self._replacements,
                "metrics": {k: float(v) for k, v in self._last_metrics.items() if math.isfinite(v)},
                "message": self._message,
            }

    def live_status(self) -> dict[str, Any]:
        """:meth:`status` and, for the live view, the phase its metrics are of (the last
        superstep done's, where ``phase`` is the superstep under way's) and the records of the
        last supersteps done (``recent``, as in ``metrics.jsonl``), so that a client that looks
        once a second still sees each of supersteps shorter than that."""
        with self._cond:
            recent = list(self._history[-RECENT:])
        return {**self.status(), "metrics_phase": self._metrics_phase, "recent": recent}

    @property
    def failure(self) -> str | None:
        return self._failure


def job_fingerprint(job: JobSpec) -> dict[str, Any]:
    """What a checkpoint's state depends on besides the superstep: a checkpoint is resumed
    only by a job that agrees on all of it (resources, paths of output, heartbeats may differ)."""
    return {"seed": job.seed, "workers.count": job.workers.count, "input.paths": list(job.input.paths),
            "algorithm.master": job.algorithm.master, "algorithm.worker": job.algorithm.worker,
            "algorithm.params": json.loads(json.dumps(job.algorithm.params))}


def _refused(code: str, text: str, ended: bool = False) -> ipc.RemoteError:
    """The error to answer a request with (``code``: the protocol's), logged: a refused
    request is a worker overtaken or replaced, or a peer that is not one of this job's; one
    refused because the job has ended (``ended``: its workers still on their way) only at INFO."""
    log.log(logging.INFO if ended else logging.WARNING, "refused: %s (%s)", _one_line(text), code)
    return ipc.RemoteError(code, text)


def _one_line(text: str, limit: int = 2000) -> str:
    """A peer's text for one line of a log: control characters escaped, at most ``limit`` characters."""
    text = text[:limit]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _peer_text(text: str, limit: int = 4000) -> str:
    """A peer's message (a worker's error) for the log and the job's messages: its lines after
    the first indented, control characters escaped, so that none reads as a line of the master's own."""
    return "\n    ".join(_one_line(line) for line in text[:limit].rstrip("\n").splitlines() or [""])


def _indented(text: str, limit: int = 20000) -> str:
    """A peer's traceback for the log: each of its lines indented."""
    return "\n".join("    " + _one_line(line) for line in text[:limit].rstrip("\n").splitlines())


def input_columns(master: type | None, job: JobSpec) -> list[str] | None:
    """The input columns ``master`` (the job's master class; None: imported here) says the
    workers of ``job`` read (:meth:`Master.input_columns`). None when it does not say, or cannot
    be imported here (:func:`check_algorithm` says why); :class:`JobFailed` when it says
    something else than column names."""
    if master is None:
        try:
            master = load_class(job.algorithm.master, Master, job.base_dir, _shipped_dirs(job))
        except JobFailed:
            return None
    try:
        columns = master.input_columns(job.algorithm.params)
    except Exception as exc:  # noqa: BLE001 - the algorithm's own code
        raise JobFailed(f"{job.source}: {master.__qualname__}.input_columns raised {type(exc).__name__}: {exc}"
                        ) from None
    if columns is not None and (isinstance(columns, str) or not all(isinstance(c, str) for c in columns)):
        raise JobFailed(f"{job.source}: {master.__qualname__}.input_columns returned {columns!r}: a list of "
                        "column names, or None, was expected")
    return None if columns is None else list(columns)


def input_check(master: type | None, job: JobSpec) -> Callable[[dict[str, Any]], None] | None:
    """``check(schemas)`` for :func:`~iterreduce.fs.plan_splits`: the job's master class's
    :meth:`Master.check_input` (``master``; None: imported here, and no check when it cannot be),
    its ``ValueError`` an :class:`InputError`, anything else it raises a :class:`JobFailed`."""
    if master is None:
        try:
            master = load_class(job.algorithm.master, Master, job.base_dir, _shipped_dirs(job))
        except JobFailed:
            return None
    if getattr(master.check_input, "__func__", None) is Master.check_input.__func__:
        return None  # the default accepts any

    def check(schemas: dict[str, Any]) -> None:
        try:
            master.check_input(job.algorithm.params, schemas)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the algorithm's own code
            raise JobFailed(f"{job.source}: {master.__qualname__}.check_input raised {type(exc).__name__}: {exc} "
                            f"(it should raise ValueError saying what is wrong)\n{traceback.format_exc()}") from None

    return check


def results_text(uri: str, earlier: dict[str, Any], files: list[str]) -> str:
    """``files``, the results an earlier run (``earlier``: its metrics.json) left in the output
    ``uri``, in words: "OUT holds the results of job J (SUCCEEDED, application A): model.avro, ..."."""
    from .fs import _some

    app = f", application {earlier['application']}" if earlier.get("application") else ""
    return f"{uri} holds the results of job {earlier.get('job')} ({earlier.get('state')}{app}): {_some(files, 5)}"


def earlier_success(output: Output, job: JobSpec) -> dict[str, Any] | None:
    """The metrics.json of a run of ``job`` (same settings: :func:`job_fingerprint`) that
    SUCCEEDED into ``output``; None when there is none (or it cannot be read)."""
    try:
        done = json.loads(output.read_bytes("metrics.json")) if output.exists("metrics.json") else None
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be read (%s: %s): taken as no earlier result", output.uri_of("metrics.json"),
                    type(exc).__name__, exc)
        return None
    if isinstance(done, dict) and done.get("state") == "SUCCEEDED" and \
            done.get("fingerprint") == job_fingerprint(job):
        return done
    return None


def resumable_checkpoint(checkpoints: Checkpoints, job: JobSpec, arrays: bool = True
                         ) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
    """The newest readable checkpoint ``job`` can resume from (:meth:`Checkpoints.latest`; its
    metadata only when not ``arrays``), None when there is none. :class:`JobFailed` when none
    can be read, or when a job with other settings wrote it (naming what differs): resuming it
    would not give this job's model."""
    try:
        restored = checkpoints.latest(arrays)
    except InputError as exc:  # every checkpoint there is damaged: resuming cannot work
        raise JobFailed(f"{job.source}: cannot resume: {exc}; start the job again without resuming (no --resume)"
                        ) from None
    if restored is not None:
        step, _, meta = restored
        _check_same_job(meta, job, checkpoints.dir.uri_of(f"ckpt-{step:08d}.npz"))
    return restored


def _flat(prefix: str, v: Any) -> dict[str, Any]:
    if isinstance(v, dict) and v:
        return {k2: v2 for k, x in v.items() for k2, v2 in _flat(f"{prefix}.{k}", x).items()}
    return {prefix: v}


def _check_same_job(meta: dict[str, Any], job: JobSpec, where: str) -> None:
    """Refuse to resume ``job`` from a checkpoint another job wrote, naming what differs."""
    old = meta.get("fingerprint")
    if old is None:  # written before checkpoints carried one
        log.warning("checkpoint %s does not say which job wrote it: resuming it as this job's", where)
        return
    mine, theirs = {}, {}
    for key, value in job_fingerprint(job).items():
        mine.update(_flat(key, value))
    for key, value in old.items():
        theirs.update(_flat(key, value))
    unset = object()

    def show(d: dict[str, Any], k: str) -> str:
        return "(not set)" if d.get(k, unset) is unset else json.dumps(d[k])
    diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k, unset) != theirs.get(k, unset)]
    if diff:
        shown = "; ".join(f"{k}: {show(theirs, k)} there, {show(mine, k)} here" for k in diff[:5])
        more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
        raise JobFailed(f"{job.source}: cannot resume from {where}: a job with other settings wrote it "
                        f"({shown}{more}); resuming would not give this job's model. Run without --resume "
                        "to start again, or resume with the job file that wrote it")


def _copy(u: Update) -> Update:
    return Update({k: np.array(v, copy=True) for k, v in u.arrays.items()}, u.num_samples, dict(u.metrics),
                  json.loads(json.dumps(u.meta)))


def _unpack(arrays: dict[str, np.ndarray], meta: dict[str, Any], prefix: str) -> Update:
    cut = len(prefix) + 1
    m = meta[prefix]
    return Update({k[cut:]: v for k, v in arrays.items() if k.startswith(prefix + "/")},
                  num_samples=m["num_samples"], metrics=m["metrics"], meta=m["meta"])


def _non_finite(u: Update) -> str:
    for name, a in u.arrays.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            return f"array {name!r} holds {n_nan} NaN and {n_inf} Inf value(s)"
    for name, v in u.metrics.items():
        if not math.isfinite(v):
            return f"metric {name!r} is {v}"
    return ""


def _layout_mismatch(ref: Update, u: Update) -> str:
    if set(ref.arrays) != set(u.arrays):
        return f"it has arrays {sorted(u.arrays)} where the others have {sorted(ref.arrays)}"
    for name, a in u.arrays.items():
        r = ref.arrays[name]
        if a.shape != r.shape or a.dtype != r.dtype:
            return f"array {name!r} is {a.dtype}{list(a.shape)} where the others have {r.dtype}{list(r.shape)}"
    return ""


def _log_superstep(rec: dict[str, Any], total: int | None) -> None:
    log.info("%s", superstep_line(rec, total, 6))


def superstep_line(rec: dict[str, Any], total: int | None = None, n: int | None = None) -> str:
    """A superstep done (a record of ``metrics.jsonl``) in one line, as the master's log,
    ``submit --wait`` and ``iterreduce status -f`` say it: where, phase, time, bytes exchanged,
    the first ``n`` metrics (None: all), replacements so far."""
    shown = metrics_text({**(rec.get("workers") or {}), **(rec.get("master") or {})}, n)
    step = int(rec.get("superstep") or 0)
    mb = ((rec.get("bytes_in") or 0) + (rec.get("bytes_out") or 0)) / 1e6
    parts = [superstep_text(step + 1, total, step), str(rec.get("phase") or ""), f"{rec.get('seconds') or 0:.2f} s",
             f"{mb:.1f} MB exchanged", shown]
    if rec.get("replacements"):
        parts.append(f"{rec['replacements']} worker(s) replaced")
    return " | ".join(p for p in parts if p)


def metrics_text(metrics: dict[str, Any], n: int | None = 3) -> str:
    """The first ``n`` metrics (None: all), and how many more there are; a metric that is not
    a number (null: NaN in a file) is left out."""
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]
    more = f" (+{len(items) - n} more)" if n is not None and len(items) > n else ""
    return " ".join(f"{k}={v:.4g}" for k, v in items[:n]) + more


def superstep_text(done: int, total: int | None, current: int) -> str:
    """How the log, ``submit --wait`` and ``iterreduce status`` name where a job is: the
    superstep's number (from 0, as in every message and checkpoint name) and how many of
    the total are done, so that the last reads "superstep 1149 (1150/1150 done)"."""
    return f"superstep {current} ({done}{f'/{total}' if total else ''} done)"


_LAST_LOOK = 2.0
"""Seconds a YARN ApplicationMaster keeps its last live status readable before it ends the
application: ``submit --wait`` (polling every second) and ``kill`` see how it ended."""

OWNER_FILE = "running.json"
"""In the output directory while a run writes there: which (application, or host and process);
``submit`` and ``run`` refuse a second job into the same output while that run lives."""

FAILURE_MARKER = "final-failure.json"
"""In the output directory: the failure of an attempt that a new attempt would only repeat."""


def record_final_failure(output: Output, app_id: str, attempt: int, reason: str, stopped: bool = False) -> None:
    """Leave ``reason`` for the next attempts of ``app_id`` (see :class:`JobFailed`);
    ``stopped``: the job was stopped on request (``iterreduce kill``), not failed."""
    output.write_json(FAILURE_MARKER, {"application": app_id, "attempt": attempt, "reason": reason,
                                       "stopped": stopped})


def final_failure_of(output: Output, app_id: str) -> dict[str, Any] | None:
    """What an earlier attempt of ``app_id`` left with :func:`record_final_failure`, or None
    (nothing there, or a marker of another application: an earlier submission of the job)."""
    try:
        if not output.exists(FAILURE_MARKER):
            return None
        rec = json.loads(output.read_bytes(FAILURE_MARKER))
    except (OSError, ValueError) as exc:
        log.warning("could not read %s: %s", output.uri_of(FAILURE_MARKER), exc)
        return None
    return rec if isinstance(rec, dict) and rec.get("application") == app_id else None


def attempt_number() -> int:
    """The YARN application attempt of this container (1 outside YARN)."""
    cid = os.environ.get("CONTAINER_ID", "")
    parts = cid.split("_")
    try:
        return int(parts[-2]) if cid.startswith("container_") else 1
    except (IndexError, ValueError):
        return 1


def main(argv: list[str] | None = None) -> None:
    """The YARN ApplicationMaster: ``python -m iterreduce.appmaster --job job.json --token-file F``
    (skein's ``master.script``). A second attempt resumes from the last checkpoint."""
    import argparse

    import skein

    from .containers import KV_STATUS, KV_STOP, YarnLauncher

    parser = argparse.ArgumentParser(prog="iterreduce-appmaster")
    parser.add_argument("--job", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint (submit --resume)")
    parser.add_argument("--source", default=None, help="the job file's name, for messages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get(ENV_LOG_LEVEL, "").upper() == "DEBUG":  # submit -v, or yarn.env
        logging.getLogger("iterreduce").setLevel(logging.DEBUG)
    with open(args.job) as f:
        job = JobSpec.from_json(f.read(), source=args.source or args.job)
    with open(args.token_file) as f:
        token = f.read().strip()
    app = skein.ApplicationClient.from_current()
    attempt = attempt_number()
    total: list[int | None] = [None]

    def publish(status: dict[str, Any]) -> None:
        total[0] = status.get("total") or total[0]
        status = {**status, "total": total[0], "attempt": attempt}
        app.kv[KV_STATUS] = json_text(status).encode()
        if total[0]:
            app.set_progress(min(status["superstep"] / total[0], 1.0))

    host = os.environ.get("NM_HOST") or socket.getfqdn()
    try:
        am = AppMaster(job, YarnLauncher(app), token=token, resume=args.resume or attempt > 1, host=host,
                       status_hook=publish, application=app.id, resume_asked=args.resume)
    except Exception as exc:  # an output or checkpoint filesystem this container cannot use: say so to YARN
        log.exception("job %s: the ApplicationMaster cannot start", job.name)
        app.shutdown("FAILED", diagnostics=f"iterreduce job {job.name} failed: the ApplicationMaster cannot "
                                           f"start: {type(exc).__name__}: {exc}"[:8000])
        sys.exit(1)
    log.info("ApplicationMaster attempt %d for job %s", attempt, job.name)
    prior = final_failure_of(am.output, app.id) if attempt > 1 else None
    if prior is not None:  # attempt `prior["attempt"]` failed for good or was stopped: do not run the job again
        if prior.get("stopped"):  # skein starts the next attempt after any end but SUCCEEDED
            reason = f"attempt {prior['attempt']} was stopped, so attempt {attempt} did not run the job again: " \
                     f"{prior['reason']}"
        else:
            reason = (f"attempt {prior['attempt']} failed for a reason a new attempt would only repeat, "
                      f"so attempt {attempt} did not run the job again: {prior['reason']}")
        log.error("job %s: %s", job.name, reason)
        publish({**am.status(), "state": "FAILED", "message": reason.splitlines()[0]})
        app.shutdown("KILLED" if prior.get("stopped") else "FAILED",
                     diagnostics=f"iterreduce job {job.name} {'stopped' if prior.get('stopped') else 'failed'}: "
                                 f"{reason}"[:8000])
        sys.exit(1)

    def watch_stop() -> None:  # `iterreduce kill` sets KV_STOP: stop as Ctrl-C stops a local run
        try:
            reason = app.kv.wait(KV_STOP)
        except Exception:  # noqa: BLE001 - the application is ending: nothing to watch
            return
        log.warning("stop requested: %s", reason.decode(errors="replace"))
        am.request_stop(reason.decode(errors="replace") or "iterreduce kill")

    threading.Thread(target=watch_stop, name="stop-watch", daemon=True).start()
    try:
        am.run()
    except StopRequested:
        status = am.live_status()
        try:  # else YARN's next attempt would resume the job (`iterreduce kill` ends the application sooner)
            record_final_failure(am.output, app.id, attempt, status["message"], stopped=True)
        except Exception:  # noqa: BLE001
            log.exception("could not write %s", am.output.uri_of(FAILURE_MARKER))
        publish(status)  # state FAILED: `iterreduce kill` waits for this, then ends the application
        time.sleep(_LAST_LOOK)  # time to read it: else skein's next attempt, seeing the marker, ends it
        app.shutdown("KILLED", diagnostics=f"iterreduce job {job.name} stopped: {status['message']}"[:8000])
        sys.exit(1)
    except JobFailed as exc:
        publish(am.live_status())
        time.sleep(_LAST_LOOK)
        if not exc.retry:
            try:
                record_final_failure(am.output, app.id, attempt, str(exc))
            except Exception:  # noqa: BLE001 - then the next attempt runs the job again
                log.exception("could not write %s", am.output.uri_of(FAILURE_MARKER))
        app.shutdown("FAILED", diagnostics=f"iterreduce job {job.name} failed: {exc}"[:8000])
        sys.exit(1)
    status = am.status()
    time.sleep(_LAST_LOOK)  # the final status, published as the job ended: `submit --wait` shows it
    app.shutdown("SUCCEEDED", diagnostics=f"iterreduce job {job.name} {status['message']}")


if __name__ == "__main__":
    main()
