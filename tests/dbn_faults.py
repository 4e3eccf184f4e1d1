"""Test-only DBN worker that misbehaves on request (settings in ``algorithm.params.extra``):

* ``die_at`` (superstep), ``die_split`` (default 0), ``die_marker`` (file): SIGKILL this
  worker once at the start of that superstep; the marker file makes the replacement live.
* ``sleep``: seconds to wait in every superstep (to give a test time to act).

Neither changes what the worker computes.
"""

from __future__ import annotations

from dbn.distributed import DBNWorker

from .helpers import misbehave


class FaultyDBNWorker(DBNWorker):
    def compute(self, update, superstep, ctx):
        misbehave(ctx.params.get("extra") or {}, superstep, ctx.split_index)
        return super().compute(update, superstep, ctx)
