"""The worker container: ``python -m iterreduce.worker``.

It reads where the master is and which split it was started for from its environment
(``ITERREDUCE_MASTER_URL``, ``ITERREDUCE_CONTAINER_ID``, ``ITERREDUCE_SPLIT``) and the job
token from ``ITERREDUCE_TOKEN_FILE`` (a file, or ``-`` for one line on stdin), registers,
runs the algorithm's :class:`~iterreduce.api.Worker` superstep after superstep, and exits
0 when the master says the job is done. A heartbeat thread keeps the master informed while
the worker computes; a worker that cannot reach its master for ``heartbeat.master_timeout``
seconds exits, so nothing is left behind when a master dies.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Any

from . import ipc
from .api import (Final, Update, Worker, WorkerContext, failed_when, seed_global_generators, update_from_avro,
                  update_to_avro)
from .containers import (ENV_CONTAINER, ENV_LOG_LEVEL, ENV_MASTER, ENV_SPLIT, ENV_TOKEN_FILE, KV_MASTER_URL,
                         die_with_parent)
from .fs import FilePiece, InputError
from .job import JobSpec

log = logging.getLogger("iterreduce.worker")

EXIT_OK, EXIT_FAILED, EXIT_MASTER_LOST, EXIT_ABORTED = 0, 1, 2, 3


class MasterLost(RuntimeError):
    pass


class WorkerRunner:
    """Drives one :class:`Worker` against a master at ``url``."""

    def __init__(self, url: str, token: str, container_id: str, split_hint: int = -1):
        self.url = url
        self.token = token
        self.container_id = container_id
        self.split_hint = split_hint
        self.worker_id = f"{container_id}-{uuid.uuid4().hex[:8]}"
        self.client = ipc.IPCClient(url, token, timeout=60.0)
        self._hb_client = ipc.IPCClient(url, token, timeout=30.0)
        self._stop = threading.Event()
        self._stop_requested = False
        self._superstep = 0
        self._progress = (0.0, "")
        self.master_timeout = 30.0

    def _call(self, message: str, **request: Any) -> Any:
        """Call the master, retrying transport errors until ``master_timeout``."""
        deadline = time.monotonic() + self.master_timeout
        delay = 0.1
        while True:
            try:
                return self.client.call(message, **request)
            except ipc.TransportError as exc:
                if time.monotonic() > deadline:
                    raise MasterLost(f"cannot reach the master at {self.url} for {self.master_timeout:g} s: "
                                     f"{exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def run(self) -> int:
        a = self._call("register", worker_id=self.worker_id, container_id=self.container_id,
                       host=socket.gethostname(), split_hint=self.split_hint)
        step = a["start_superstep"]
        self._superstep = step
        hb = threading.Thread(target=self._heartbeats, args=(a["heartbeat_interval_ms"] / 1000,), daemon=True)
        hb.start()
        try:  # from here on a failure is reported to the master (fail) before this process exits
            try:  # the job, the algorithm's class, its setup: a failure "in setup", not of a superstep
                job = JobSpec.from_json(a["job"], source="job from the master")
                self.master_timeout = job.heartbeat.master_timeout
                from .appmaster import load_class

                worker: Worker = load_class(job.algorithm.worker, Worker, job.base_dir)()
                catch_up = update_from_avro(a["catch_up"]) if a["catch_up"] else None
                ctx = WorkerContext(params=job.algorithm.params, seed=job.seed, split_index=a["split_index"],
                                    num_splits=a["num_splits"], split=[FilePiece.from_avro(p) for p in a["split"]],
                                    catch_up=catch_up, start_superstep=a["start_superstep"],
                                    log=logging.getLogger("iterreduce.algorithm"), _progress=self._set_progress)
                log.info("registered as %s for split %d of %d, starting at superstep %d", self.worker_id,
                         ctx.split_index, ctx.num_splits, step)
                seed_global_generators(job.seed, ctx.split_index, 0, 1)  # not compute(0)'s: padded alike
                worker.setup(ctx)
            except Exception as exc:  # noqa: BLE001 - reported, as below, but as a failure of setup
                return self._failed(exc, step, stage="setup")
            waited = time.monotonic()
            while not self._stop_requested:
                r = self._call("fetch", worker_id=self.worker_id, superstep=step, wait_ms=2000)
                status = r["status"]
                if status == "WAIT":
                    continue
                if status == "DONE":
                    self._call("complete", worker_id=self.worker_id)
                    log.info("the job is done: exiting")
                    return EXIT_OK
                if status == "ABORT":
                    log.error("the master aborted the job: %s", r["message"])
                    return EXIT_ABORTED
                self._superstep = step
                self._progress = (0.0, "")
                t0 = time.monotonic()
                log.debug("superstep %d: the master's update (%d array(s)) after %.2f s of waiting", step,
                          len(r["update"]["arrays"]), t0 - waited)
                seed_global_generators(job.seed, ctx.split_index, step)
                out = worker.compute(update_from_avro(r["update"]), step, ctx)
                if not isinstance(out, Update) or isinstance(out, Final):
                    got = ("a Final (only Master.combine ends the job)" if isinstance(out, Final)
                           else type(out).__name__)
                    raise BadReturn(f"{type(worker).__name__}.compute must return an Update, got {got}")
                try:  # changed after it was made, say: named as when it is made
                    out.check()
                except (TypeError, ValueError) as exc:
                    raise BadReturn(f"{type(worker).__name__}.compute returned an Update that cannot be sent: "
                                    f"{exc}") from None
                if out.nbytes() > ipc.MAX_MESSAGE_BYTES - (1 << 20):  # the master would refuse it unread
                    raise RejectedUpdate(
                        f"the update's arrays hold {out.nbytes()} bytes; a message to the master carries at "
                        f"most {ipc.MAX_MESSAGE_BYTES >> 20} MiB: send smaller arrays (or aggregate part of "
                        "them on the worker)")
                try:
                    self._call("push", worker_id=self.worker_id, update=update_to_avro(out, step))
                except ipc.RemoteError as exc:
                    # NaN, a malformed update, a push the master cannot decode: computing it again gives
                    # it again (STALE_SUPERSTEP, NOT_REGISTERED: this worker was overtaken or replaced)
                    if exc.code in ("BAD_UPDATE", "BAD_REQUEST"):
                        raise RejectedUpdate(str(exc)) from None
                    raise
                log.info("superstep %d: computed in %.2f s on %d samples", step, time.monotonic() - t0,
                         out.num_samples)
                log.debug("superstep %d: pushed %d bytes in %d array(s)", step, out.nbytes(), len(out.arrays))
                step += 1
                waited = time.monotonic()
            log.warning("the master told this worker to stop")
            return EXIT_ABORTED
        except MasterLost:
            raise
        except ipc.RemoteError as exc:
            if exc.code != "REJECTED":
                return self._failed(exc, step)
            log.warning("the job has ended (%s): exiting", exc)  # stopped or failed elsewhere: nothing to report
            return EXIT_ABORTED
        except Exception as exc:  # report, then exit non-zero: the master replaces this worker
            return self._failed(exc, step)
        finally:
            self._stop.set()

    def _failed(self, exc: Exception, step: int, stage: str = "compute") -> int:
        """Report ``exc`` to the master (which replaces this worker, or fails the job at once when
        ``exc`` would only happen again) and return the exit code. ``stage``: ``setup`` (before
        superstep ``step``) or ``compute``."""
        tb = traceback.format_exc()
        log.error("worker failed %s: %s\n%s", failed_when(stage, step), exc, tb)
        # bad input (a record, a missing column, a corrupt file) fails the job: the
        # replacement would read the same input
        fatal = isinstance(exc, (RejectedUpdate, BadReturn)) or (isinstance(exc, InputError) and not exc.transient)
        try:
            self.client.call("fail", worker_id=self.worker_id, superstep=step,
                             error=f"{type(exc).__name__}: {exc}", traceback=tb, fatal=fatal, stage=stage)
        except Exception:  # noqa: BLE001 - the master may be gone too
            pass
        return EXIT_FAILED

    def _set_progress(self, fraction: float, message: str) -> None:
        self._progress = (float(fraction), str(message))

    def _heartbeats(self, interval: float) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                ack = self._hb_client.call("heartbeat", worker_id=self.worker_id, superstep=self._superstep,
                                           progress=self._progress[0], message=self._progress[1])
                last_ok = time.monotonic()
                if ack["stop"]:
                    self._stop_requested = True
                    if not ack["accepted"]:  # replaced or unknown: nothing of ours is wanted any more
                        log.error("the master no longer knows this worker (%s): exiting", ack["message"])
                        os._exit(EXIT_ABORTED)
            except ipc.RemoteError as exc:
                log.warning("heartbeat rejected: %s", exc)
            except ipc.TransportError:
                if time.monotonic() - last_ok > self.master_timeout:
                    log.error("no answer from the master at %s for %.0f s: exiting", self.url, self.master_timeout)
                    os._exit(EXIT_MASTER_LOST)
            except Exception:  # noqa: BLE001 - this thread must outlive any one bad heartbeat
                log.exception("heartbeat failed")


class BadReturn(TypeError):
    """``compute`` returned something other than an :class:`Update`: a replacement would too."""


class RejectedUpdate(RuntimeError):
    """The master refused this worker's update (NaN, say): a replacement would compute it again."""


def read_token(source: str | None) -> str:
    if not source:
        raise SystemExit(f"iterreduce worker: {ENV_TOKEN_FILE} is not set; the worker needs the job token")
    if source == "-":
        token = sys.stdin.readline().strip()
    else:
        with open(source) as f:
            token = f.read().strip()
    if not token:
        raise SystemExit(f"iterreduce worker: the job token from {ENV_TOKEN_FILE} is empty")
    return token


def _master_url() -> str:
    """From ``ITERREDUCE_MASTER_URL``, or on YARN from the application's key-value store."""
    url = os.environ.get(ENV_MASTER)
    if url:
        return url
    if os.environ.get("SKEIN_APPLICATION_ID"):
        import skein

        app = skein.ApplicationClient.from_current()
        return app.kv.wait(KV_MASTER_URL).decode()
    raise SystemExit(f"iterreduce worker: {ENV_MASTER} is not set and this is no YARN container; "
                     "workers are started by the master")


def _record_exit(code: int) -> None:
    """The worker process of this YARN container died with ``code`` (a signal, most often):
    say so in its log and tell the master, which skein would only tell that it failed."""
    from .containers import KV_EXIT, exit_reason

    log.error("the worker process %s", exit_reason(code, yarn=True))
    try:
        import skein

        skein.ApplicationClient.from_current().kv[KV_EXIT + os.environ["SKEIN_CONTAINER_ID"]] = str(code).encode()
    except Exception as exc:  # noqa: BLE001 - then the master says "exited with code 1"
        log.warning("could not tell the master the exit code: %s", exc)


def main(argv: list[str] | None = None) -> None:
    import argparse

    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get(ENV_LOG_LEVEL, "").upper() == "DEBUG":
        logging.getLogger("iterreduce").setLevel(logging.DEBUG)
    # --container and --split repeat the environment's, so that `ps` shows which worker is which
    parser = argparse.ArgumentParser(prog="iterreduce-worker")
    parser.add_argument("--container", default=None)
    parser.add_argument("--split", type=int, default=None)
    parser.add_argument("--exited", type=int, default=None, metavar="CODE",
                        help="(YARN) record that this container's worker process exited with CODE, for the master")
    args = parser.parse_args(argv)
    if args.exited is not None:
        _record_exit(args.exited)
        return
    container = args.container or os.environ.get(ENV_CONTAINER) or os.environ.get("SKEIN_CONTAINER_ID")
    if not container:
        raise SystemExit(f"iterreduce worker: {ENV_CONTAINER} is not set; workers are started by the master")
    token = read_token(os.environ.get(ENV_TOKEN_FILE))
    split = args.split if args.split is not None else int(os.environ.get(ENV_SPLIT, "-1"))
    runner = WorkerRunner(_master_url(), token, container, split)
    try:
        code = runner.run()
    except MasterLost as exc:
        log.error("%s", exc)
        code = EXIT_MASTER_LOST
    except ipc.RemoteError as exc:
        log.error("the master refused this worker: %s", exc)
        code = EXIT_FAILED
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
