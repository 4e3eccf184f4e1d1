"""What a user calls: run a job on this machine, or (``submit``) on YARN.

``run_local(job)`` is the embedded default: the ApplicationMaster logic runs in this
process and the workers are local processes, the same modules YARN runs.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from typing import Any, TextIO

from .appmaster import AppMaster, JobFailed
from .containers import LocalLauncher
from .job import JobSpec, is_uri

__all__ = ["run_local", "Progress", "JobFailed"]


class Progress:
    """A progress bar on a terminal (superstep, phase, latest metrics) kept below the log
    lines; elsewhere it draws nothing and the one log line per superstep remains."""

    def __init__(self, stream: TextIO | None = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.width = width
        self.started = time.monotonic()
        self.bar = ""
        if self.enabled:  # log lines go above the bar
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                    handler.setStream(_AboveBar(self))

    def __call__(self, status: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step, total = status["superstep"], status.get("total")
        if total:
            filled = int(min(step / total, 1.0) * self.width)
            head = f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{total}"
        else:
            head = f"superstep {step}"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in list(status["metrics"].items())[:3])
        self.bar = f"{head} | {status['phase']} | {metrics} | {time.monotonic() - self.started:.0f}s"[:150]
        self.stream.write("\r\x1b[K" + self.bar)
        if status["state"] in ("SUCCEEDED", "FAILED", "KILLED"):
            self.stream.write("\n")
            self.bar = ""
        self.stream.flush()


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
    logging.getLogger("iterreduce").info("local run of %s with %d worker processes (logs in %s)", job.name,
                                         job.workers.count, log_dir)
    am.run()
    return am
