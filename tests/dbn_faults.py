"""Test-only DBN worker that misbehaves on request (settings in ``algorithm.params.extra``):

* ``die_at`` (superstep), ``die_split`` (default 0), ``die_marker`` (file): SIGKILL this
  worker once at the start of that superstep; the marker file makes the replacement live.
* ``sleep``: seconds to wait in every superstep (to give a test time to act).

Neither changes what the worker computes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from dbn.distributed import DBNWorker


class FaultyDBNWorker(DBNWorker):
    def compute(self, update, superstep, ctx):
        extra = ctx.params.get("extra") or {}
        marker = extra.get("die_marker")
        if superstep == extra.get("die_at") and ctx.split_index == extra.get("die_split", 0):
            if not marker or not os.path.exists(marker):
                if marker:
                    Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        if extra.get("sleep"):
            time.sleep(float(extra["sleep"]))
        return super().compute(update, superstep, ctx)
