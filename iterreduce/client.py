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
    """A one-line progress bar on a terminal: superstep, phase, latest metric."""

    def __init__(self, stream: TextIO | None = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.width = width
        self.total: int | None = None
        self.started = time.monotonic()

    def __call__(self, status: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = status["superstep"]
        if self.total:
            done = min(step / self.total, 1.0)
            bar = "#" * int(done * self.width) + "." * (self.width - int(done * self.width))
            head = f"[{bar}] {step}/{self.total}"
        else:
            head = f"superstep {step}"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in list(status["metrics"].items())[:3])
        line = f"{head} | {status['phase']} | {metrics} | {time.monotonic() - self.started:.0f}s"
        self.stream.write("\r\x1b[K" + line[:160])
        if status["state"] in ("SUCCEEDED", "FAILED"):
            self.stream.write("\n")
        self.stream.flush()


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
    if progress is not None:
        progress.total = None
    logging.getLogger("iterreduce").info("local run of %s with %d worker processes (logs in %s)", job.name,
                                         job.workers.count, log_dir)
    am.run()
    return am
