"""Helpers shared by the tests that run real jobs."""

from __future__ import annotations

import os
import signal
import threading
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``iterreduce ARGS`` in a new process, from the repository root."""
    return subprocess.run([sys.executable, "-m", "iterreduce.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def run_and_kill_after_checkpoint(job: Path, checkpoint_dir: Path, superstep: int, timeout: float = 90) -> int:
    """Start ``iterreduce run JOB``, SIGKILL it once it has written a checkpoint at
    ``superstep`` or later (an earlier run's do not count); returns the killed master's PID."""
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "iterreduce.cli", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = []
        for p in checkpoint_dir.glob("ckpt-*.npz") if checkpoint_dir.exists() else []:
            try:
                if p.stat().st_mtime >= started:
                    steps.append(int(p.stem.split("-")[1]))
            except FileNotFoundError:  # deleted meanwhile (keep)
                pass
        if any(s >= superstep for s in steps):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"no checkpoint at superstep {superstep} within {timeout} s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def misbehave(params: dict[str, Any], superstep: int, split_index: int) -> None:
    """Test switches for workers: ``die_at`` (superstep) with ``die_split`` (default 0)
    SIGKILLs the worker at the start of that superstep, once if ``die_marker`` names a file
    (the replacement then lives), every time otherwise; ``kill_soon_at`` SIGKILLs it (the same
    way) 0.3 s after that superstep's compute starts, so after it pushed; ``sleep`` waits that
    many seconds every superstep, ``slow_at`` ``slow_for`` seconds (2) in split ``slow_split`` (once
    if ``slow_marker`` names a file)."""
    marker = params.get("die_marker")
    if superstep == params.get("die_at") and split_index == params.get("die_split", 0):
        if not marker or not os.path.exists(marker):
            if marker:
                Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    if params.get("sleep"):
        time.sleep(float(params["sleep"]))
    if superstep == params.get("kill_soon_at") and split_index == params.get("die_split", 0):
        # SIGKILL 0.3 s after this compute starts: after its push, while the others still compute
        if not marker or not os.path.exists(marker):
            if marker:
                Path(marker).write_text(str(os.getpid()))
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
    if superstep == params.get("slow_at") and split_index == params.get("slow_split", 0):
        slow_marker = params.get("slow_marker")  # once, if given: the replacement is quick
        if not slow_marker or not os.path.exists(slow_marker):
            if slow_marker:
                Path(slow_marker).write_text(str(os.getpid()))
            time.sleep(float(params.get("slow_for", 2.0)))
