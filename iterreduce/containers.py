"""Starting worker containers: the one thing that differs between ``run`` and ``submit``.

The ApplicationMaster asks a :class:`Launcher` for a container per split and polls it
for containers that ended. :class:`LocalLauncher` starts worker processes on this
machine; the YARN launcher (``iterreduce.client``) asks skein for containers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["Launcher", "LocalLauncher", "YarnLauncher", "exit_reason", "yarn_exit_code", "KV_MASTER_URL",
           "KV_STATUS", "KV_EXIT", "KV_STOP", "ENV_MASTER", "ENV_CONTAINER", "ENV_SPLIT", "ENV_TOKEN_FILE"]

log = logging.getLogger("iterreduce")

ENV_MASTER = "ITERREDUCE_MASTER_URL"
ENV_CONTAINER = "ITERREDUCE_CONTAINER_ID"
ENV_SPLIT = "ITERREDUCE_SPLIT"
ENV_TOKEN_FILE = "ITERREDUCE_TOKEN_FILE"  # a file holding the token; '-' means: read one line from stdin
KV_MASTER_URL = "iterreduce.master_url"  # where, on YARN, the master publishes its endpoint
KV_STOP = "iterreduce.stop"  # set by `iterreduce kill` (its value: who asked): the master stops the job
KV_STATUS = "iterreduce.status"  # the live view: JSON of the master's status after every superstep
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # set per worker
KV_EXIT = "iterreduce.exit."  # + skein's container id: the exit code of a worker process that died (YARN)


# ContainerExitStatus: YARN's own codes for a container it ended (negative, not signals)
YARN_EXIT_STATUS = {-100: "YARN aborted it (its node was lost, or the application released it)",
                    -101: "its node's disks failed", -102: "YARN preempted it for another queue",
                    -103: "YARN killed it for using more virtual memory than workers.memory allows",
                    -104: "YARN killed it for using more physical memory than workers.memory allows",
                    -105: "the ApplicationMaster killed it", -106: "the ResourceManager killed it",
                    -107: "YARN killed it when the application finished",
                    -108: "the NodeManager killed it to make room for another container"}


def exit_reason(code: int, yarn: bool = False) -> str:
    """How a worker container ended, in words: ``exited with code 3``; a signal named (a
    negative code from a local process, 128 + the signal from a shell on YARN: 137 is SIGKILL,
    the kernel's out-of-memory killer among others); YARN's own negative codes explained."""
    if yarn and code in YARN_EXIT_STATUS:
        return f"ended with YARN exit status {code}: {YARN_EXIT_STATUS[code]}"
    sig = -code if code < 0 and not yarn else code - 128 if yarn and 128 < code < 128 + 65 else None
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        how = f"exited with code {code} (killed by {name})" if code > 0 else f"was killed by {name}"
        return how + (": out of memory (the kernel's OOM killer), or killed by hand"
                      if sig == signal.SIGKILL else "")
    return f"exited with code {code}" + _WORKER_CODES.get(code, "")


# the worker's own codes (iterreduce.worker's EXIT_MASTER_LOST, EXIT_ABORTED), in words
_WORKER_CODES = {2: " (it lost the master: no answer from it)",
                 3: " (it stopped itself: the job was ending, or the master no longer knew it)"}


# YARN's words (ContainersMonitorImpl, the schedulers) and skein's (which gives YARN's text for
# the codes < 0 it does not rewrite) for the codes in YARN_EXIT_STATUS
_YARN_PHRASES = [("beyond the 'PHYSICAL' memory limit", -104), ("beyond the 'VIRTUAL' memory limit", -103),
                 ("physical memory used", -104), ("virtual memory used", -103),
                 ("exceeding memory limits", -104), ("preempted", -102), ("*lost* node", -100)]
_EXIT_CODE = re.compile(r"[Ee]xit (?:code|status)(?: is|:|=)?\s*(-?\d+)")


def yarn_exit_code(state: str, message: str) -> int:
    """A YARN container's exit code, as its diagnostics (skein's ``exit_message``) give it:
    0 for SUCCEEDED, otherwise the last code they name, 1 when they name none."""
    if state == "SUCCEEDED":
        return 0
    for phrase, code in _YARN_PHRASES:  # YARN's reason, which its code alone (143) does not give
        if phrase in (message or ""):
            return code
    codes = _EXIT_CODE.findall(message or "")
    return int(codes[-1]) if codes else 1


class Launcher:
    """Starts and stops worker containers for the ApplicationMaster."""

    def bind(self, master_url: str, token: str) -> None:
        """Called once the master serves: containers started later must reach it."""
        raise NotImplementedError

    def launch(self, split_index: int) -> str:
        """Start a worker container for ``split_index``; returns its container id."""
        raise NotImplementedError

    def poll(self) -> dict[str, int]:
        """Containers that ended since the last call, with their exit codes."""
        raise NotImplementedError

    def kill(self, container_id: str) -> None:
        """Stop a container (it will be reported by :meth:`poll`)."""
        raise NotImplementedError

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every container still running, waiting up to ``grace`` seconds."""
        raise NotImplementedError

    def describe(self, container_id: str) -> str:
        """Where to read a container's logs, for error messages."""
        return container_id

    def exit_reason(self, code: int) -> str:
        """How a container that :meth:`poll` reported with ``code`` ended, in words."""
        return exit_reason(code)

    def unallocated(self) -> set[str]:
        """Containers asked for that the cluster has not given yet (none for local processes)."""
        return set()


ENV_LOG_LEVEL = "ITERREDUCE_LOG_LEVEL"  # DEBUG: a local worker logs iterreduce's debug lines (`run -v`)
ENV_PARENT = "ITERREDUCE_PARENT_PID"  # local workers: die when this process (the master) dies


def die_with_parent() -> None:
    """In a local worker: exit when the master process dies, so a killed master leaves no
    orphans, and say so in the worker's log (exit code 2, the master lost). Done by the worker
    itself (not in a fork hook: the master may run threads, gRPC's among them, that a Python
    hook between fork and exec can deadlock or crash).

    The kernel sends SIGUSR2 when the master dies (PR_SET_PDEATHSIG); its C-level handler
    writes to a wakeup pipe at once, which a thread waits on: the worker then ends even while
    its main thread is in a long numpy call (which releases the GIL), which a Python signal
    handler would wait for. A SIGUSR2 while the master lives is ignored. Algorithm code that
    takes SIGUSR2 or the wakeup fd for itself (asyncio, faulthandler.register) turns this
    off; the worker then finds the master gone by its heartbeats
    (``heartbeat.master_timeout``), as it does where prctl is missing (not Linux)."""
    parent = os.environ.get(ENV_PARENT)
    if not parent:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.signal(signal.SIGUSR2, lambda *_: None)  # the pipe does the work
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            got = os.read(r, 64)
            if not got:
                break
            if signal.SIGUSR2 in got and os.getppid() != int(parent):  # a SIGUSR2 of someone else's: not this
                break
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%S")
            os.write(2, f"{when} ERROR iterreduce: the master (pid {parent}) died: this worker exits\n".encode())
        finally:  # a log that cannot be written (a full disk) does not keep the worker alive
            os._exit(2)

    threading.Thread(target=watch, name="master-death", daemon=True).start()
    if libc.prctl(1, signal.SIGUSR2) != 0:  # PR_SET_PDEATHSIG
        libc.prctl(1, signal.SIGKILL)
    if os.getppid() != int(parent):  # the master died before prctl
        os.write(2, f"iterreduce: the master (pid {parent}) died before this worker started: exiting\n".encode())
        os._exit(2)


class LocalLauncher(Launcher):
    """Worker processes on this machine: ``python -m iterreduce.worker``, logs in ``log_dir``.

    The token reaches the process on its stdin, never on a command line or in its environment.
    """

    def __init__(self, log_dir: str | os.PathLike[str], extra_env: dict[str, str] | None = None,
                 num_workers: int = 1):
        self.log_dir = Path(log_dir)
        self.num_workers = num_workers
        self.threads = max(1, (os.cpu_count() or 1) // max(1, num_workers))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(extra_env or {})
        self._procs: dict[str, subprocess.Popen] = {}
        # a resumed run's workers are numbered after the earlier run's: their logs stay
        self._counter = max((int(m.group(1)) for f in self.log_dir.glob("local_*.log")
                             if (m := re.fullmatch(r"local_(\d+)\.log", f.name))), default=0)
        self._lock = threading.Lock()
        self._url: str | None = None
        self._token: str | None = None

    def bind(self, master_url: str, token: str) -> None:
        self._url, self._token = master_url, token
        log.info("local run: %d worker processes, their logs in %s", self.num_workers, self.log_dir)

    def launch(self, split_index: int) -> str:
        assert self._url and self._token, "bind() first"
        with self._lock:
            self._counter += 1
            cid = f"local_{self._counter:04d}"
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update({ENV_MASTER: self._url, ENV_CONTAINER: cid, ENV_SPLIT: str(split_index), ENV_TOKEN_FILE: "-",
                    ENV_PARENT: str(os.getpid())})
        # the worker imports algorithm classes by path: make the current directory importable, as `python -m` does
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        # share the cores among the workers instead of every BLAS using all of them
        for var in BLAS_THREAD_VARS:
            env.setdefault(var, str(self.threads))
        log = open(self.log_dir / f"{cid}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "iterreduce.worker", f"--container={cid}", f"--split={split_index}"],  # for ps
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, close_fds=True,
        )
        log.close()
        assert proc.stdin is not None
        proc.stdin.write(self._token.encode() + b"\n")
        proc.stdin.close()
        with self._lock:
            self._procs[cid] = proc
        return cid

    def pid(self, container_id: str) -> int | None:
        proc = self._procs.get(container_id)
        return proc.pid if proc else None

    def poll(self) -> dict[str, int]:
        ended = {}
        with self._lock:
            for cid, proc in list(self._procs.items()):
                code = proc.poll()
                if code is not None:
                    ended[cid] = code
                    del self._procs[cid]
        return ended

    def kill(self, container_id: str) -> None:
        proc = self._procs.get(container_id)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self, grace: float = 5.0) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    def describe(self, container_id: str) -> str:
        return f"{container_id} (log: {self.log_dir / (container_id + '.log')})"


class YarnLauncher(Launcher):
    """Worker containers of the skein service ``worker``, added and killed one by one by the
    ApplicationMaster, so that each carries its split (skein restarts none by itself)."""

    SERVICE = "worker"

    def __init__(self, app: "skein.ApplicationClient"):  # noqa: F821
        self.app = app
        self._running: set[str] = set()
        self._messages: dict[str, str] = {}

    def bind(self, master_url: str, token: str) -> None:
        # the token reached the containers as a private file; only the endpoint is published
        self.app.kv[KV_MASTER_URL] = master_url.encode()

    def launch(self, split_index: int) -> str:
        c = self.app.add_container(self.SERVICE, env={ENV_SPLIT: str(split_index)})
        self._running.add(c.id)
        return c.id

    def poll(self) -> dict[str, int]:
        ended = {}
        for c in self.app.get_containers(services=[self.SERVICE], states=["SUCCEEDED", "FAILED", "KILLED"]):
            if c.id in self._running:
                self._running.discard(c.id)
                self._messages[c.id] = (f"{c.yarn_container_id}, {c.state} on {c.yarn_node_http_address}: "
                                        f"{c.exit_message or ''}").strip().rstrip(":")
                ended[c.id] = self._exit_code(c)
        return ended

    def _exit_code(self, c) -> int:
        code = yarn_exit_code(str(c.state), c.exit_message or "")
        if code == 1 and str(c.state) == "FAILED":  # skein's words for any code > 0: the container said its own
            try:
                recorded = self.app.kv.get(KV_EXIT + c.id)
                if recorded:
                    return int(recorded)
            except Exception:  # noqa: BLE001 - not recorded (killed with its shell), or no answer: 1 it is
                pass
        return code

    def kill(self, container_id: str) -> None:
        try:
            self.app.kill_container(container_id)
        except Exception:  # noqa: BLE001 - it may have ended already
            pass

    def stop_all(self, grace: float = 5.0) -> None:
        deadline = time.monotonic() + grace
        while self._running and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.2)
        for cid in list(self._running):
            self.kill(cid)

    def exit_reason(self, code: int) -> str:
        return exit_reason(code, yarn=True)

    def unallocated(self) -> set[str]:
        try:
            return {c.id for c in self.app.get_containers(services=[self.SERVICE], states=["WAITING", "REQUESTED"])}
        except Exception:  # noqa: BLE001 - cannot tell: treat as allocated
            return set()

    def describe(self, container_id: str) -> str:
        """skein's id with YARN's (the one `iterreduce logs` prints logs under) and the node."""
        extra = self._messages.get(container_id)
        if extra is None:  # still running, or killed just now: ask where it runs
            try:
                for c in self.app.get_containers(services=[self.SERVICE],
                                                 states=["WAITING", "REQUESTED", "RUNNING", "SUCCEEDED",
                                                         "FAILED", "KILLED"]):
                    if c.id == container_id and c.yarn_container_id:
                        extra = f"{c.yarn_container_id} on {c.yarn_node_http_address}"
            except Exception:  # noqa: BLE001 - a description must not fail the caller
                pass
        return f"{container_id} ({extra})" if extra else container_id
