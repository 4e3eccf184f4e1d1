"""The whole contract an algorithm author needs: :class:`Master`, :class:`Worker`, :class:`Update`.

IterativeReduce in one paragraph: the master produces an initial :class:`Update` and
broadcasts it (superstep 0). Every worker turns the broadcast into its own update,
computed on its split of the input. When every split has answered, the master
:meth:`Master.combine`\\ s the workers' updates (ordered by split index) into the next
broadcast, or into a :class:`Final` result, which ends the job. A worker that dies is
replaced by a new process that gets the same split and rejoins at the current superstep,
so algorithms must be deterministic given ``(seed, split_index, superstep)``:
use :meth:`WorkerContext.rng` and :meth:`MasterContext.rng` (numpy's and Python's global
generators are seeded from the same numbers before ``Worker.setup``/``compute`` and
``Master.setup``/``initial_update``/``combine``, not the master's other methods:
:func:`seed_global_generators`).
In a superstep every split's update holds the same arrays (names, dtypes, shapes).

A minimal algorithm (the mean of a column, in one superstep)::

    class MeanWorker(Worker):
        def setup(self, ctx):
            self.x = ctx.read_table(["x"]).column("x").to_numpy()
        def compute(self, update, superstep, ctx):
            return Update({"mean": np.array(self.x.mean())}, num_samples=len(self.x))

    class MeanMaster(Master):
        def initial_update(self):
            return Update()
        def combine(self, updates, superstep):
            return Final(weighted_average(updates))

See ``examples/logreg.py`` for a complete one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from .fs import FilePiece, Output

__all__ = [
    "Final",
    "Master",
    "MasterContext",
    "Update",
    "Worker",
    "WorkerContext",
    "average_metrics",
    "weighted_average",
]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):  # numpy's float64 too
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, np.floating):
        return _finite(float(obj))
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_ok(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def seed_global_generators(*entropy: int) -> None:
    """Seed numpy's legacy global generator (``np.random.random`` and the rest) and Python's
    ``random`` from ``entropy`` (the job's seed, the split, the superstep: whole numbers >= 0).
    The framework calls it before every :meth:`Worker.setup` and :meth:`Worker.compute`, and
    before :meth:`Master.setup`, :meth:`Master.initial_update` and :meth:`Master.combine` (not
    the master's other methods), so algorithm code that draws from those generators gives the
    same result run after run, after a lost worker and after a resume, as the contexts'
    ``rng`` does (which is still the way: its streams do not depend on what else drew before)."""
    import random

    state = np.random.SeedSequence(list(entropy), spawn_key=(0x676C6F62,)).generate_state(4)  # not ctx.rng's
    np.random.seed(state)
    random.seed(int.from_bytes(state.tobytes(), "little"))


def failed_when(stage: str, superstep: int) -> str:
    """Where a worker failed, for messages: ``in setup (before superstep 3)`` or ``at superstep 3``."""
    return f"in setup (before superstep {superstep})" if stage == "setup" else f"at superstep {superstep}"


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` for files others read: NaN and infinities (a validation error where
    there is no validation set, say) become ``null``, since JSON has no such numbers and
    strict parsers (Java's, JavaScript's) refuse Python's ``NaN``."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


@dataclass
class Update:
    """What travels each superstep: named arrays plus small metadata.

    ``arrays`` hold the numbers (any numeric dtype, any shape; numpy scalars and lists
    become arrays); ``num_samples`` (a whole number >= 0) is how many examples produced
    them (the weight in :func:`weighted_average`); ``metrics`` are numbers (kept as
    floats) for logs and progress; ``meta`` is any JSON-serialisable mapping. Anything
    else is refused here, naming the field. A
    worker's update holding NaN or an infinity, in an array or a metric, is refused by the
    master and fails the job (a replacement would compute it again).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # made uniform here, or refused naming what is wrong
        self.check()

    def check(self) -> "Update":
        """Make the fields uniform again, or refuse what cannot travel, naming the field (as when
        the update was made): the framework calls it on every update it is handed, so one
        changed after it was made (``u.metrics["x"] = ...``) is checked too. Returns ``self``."""
        for what in ("arrays", "metrics"):
            d = getattr(self, what)
            if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
                raise TypeError(f"Update.{what} must be a dict with string keys (names), got "
                                f"{type(d).__name__} {d!r:.80}")
        for name, a in list(self.arrays.items()):
            if not isinstance(a, np.ndarray):  # a numpy scalar (x.sum()), a list
                try:
                    a = self.arrays[name] = np.asarray(a)
                except (ValueError, TypeError) as exc:  # a ragged list, say
                    raise TypeError(f"Update.arrays[{name!r}]: {type(a).__name__} {a!r:.60} is not an array "
                                    f"({exc})") from None
            if a.dtype.hasobject or a.dtype.kind not in "biufcmMSU" or a.dtype.fields is not None:
                raise TypeError(f"Update.arrays[{name!r}]: arrays of {a.dtype} cannot be sent (numbers, "
                                "booleans, dates and fixed-width strings can)")
        n = self.num_samples
        if isinstance(n, (float, np.floating)) and float(n).is_integer():
            n = int(n)
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"Update.num_samples must be a whole number >= 0 (the examples behind the update, "
                             f"its weight in weighted_average), got {self.num_samples!r}")
        self.num_samples = int(n)
        for name, v in list(self.metrics.items()):
            if isinstance(v, np.ndarray) and v.size == 1 and v.dtype.kind in "biuf":  # x.mean(keepdims)...
                v = v.reshape(()).item()
            if not isinstance(v, (int, float, np.integer, np.floating, np.bool_)):
                raise TypeError(f"Update.metrics[{name!r}] must be a number, got {type(v).__name__} {v!r}")
            self.metrics[name] = float(v)
        if not isinstance(self.meta, dict) or not all(isinstance(k, str) for k in self.meta):
            raise TypeError(f"Update.meta must be a dict with string keys (JSON object), got "
                            f"{type(self.meta).__name__} {self.meta!r:.80}")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as exc:
            bad = [k for k, v in self.meta.items() if not _json_ok(v)] if isinstance(self.meta, dict) else []
            where = f"[{bad[0]!r}]" if bad else ""
            raise TypeError(f"Update.meta{where} is not JSON-serialisable ({exc}); arrays go in Update.arrays"
                            ) from None
        return self

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class Final(Update):
    """Returned by :meth:`Master.combine` to end the job; saved by :meth:`Master.save`."""


def weighted_average(updates: Sequence[Update], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Average the named arrays of ``updates``, weighting each by its ``num_samples``.

    Accumulates in float64 and returns arrays of the first update's dtypes. Updates with
    ``num_samples == 0`` count once each when every update has zero samples.
    Raises ValueError naming the array when names or shapes disagree.
    """
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    names = list(updates[0].arrays) if names is None else list(names)
    weights = np.array([u.num_samples for u in updates], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones(len(updates))
    weights /= weights.sum()
    out: dict[str, np.ndarray] = {}
    for name in names:
        first = updates[0].arrays.get(name)
        if first is None:
            raise ValueError(f"weighted_average: array {name!r} is missing from the first update")
        acc = np.zeros(first.shape, dtype=np.float64)
        for i, (u, w) in enumerate(zip(updates, weights)):
            a = u.arrays.get(name)
            if a is None or a.shape != first.shape:
                got = "missing" if a is None else f"shape {a.shape}"
                raise ValueError(f"weighted_average: array {name!r} of update {i} is {got}, expected {first.shape}")
            acc += w * a
        out[name] = acc.astype(first.dtype, copy=False)
    return out


def average_metrics(updates: Sequence[Update]) -> dict[str, float]:
    """Sample-weighted mean of every metric present in all updates."""
    if not updates:
        return {}
    keys = set(updates[0].metrics).intersection(*(u.metrics for u in updates[1:]))
    total = sum(u.num_samples for u in updates)
    out = {}
    for k in sorted(keys):
        if total > 0:
            out[k] = float(sum(u.metrics[k] * u.num_samples for u in updates) / total)
        else:
            out[k] = float(np.mean([u.metrics[k] for u in updates]))
    return out


@dataclass
class MasterContext:
    """What the master is given: the algorithm's ``params`` from the job file, the job
    ``seed``, the number of workers, and ``output`` to write results to."""

    params: dict[str, Any]
    seed: int
    num_workers: int
    output: "Output"
    log: logging.Logger
    base_dir: str | None = None

    def resolve(self, path: str) -> str:
        """A path from ``params``, taken relative to the job file's directory."""
        from .job import _resolve

        return _resolve(path, Path(self.base_dir) if self.base_dir else None)

    def read_table(self, paths: str | Sequence[str], columns: Sequence[str] | None = None,
                   check: Callable[["pa.Table"], None] | None = None, nulls: bool = False) -> "pa.Table":
        """Read data of the master's own (a test set, say; not the job's input, which the
        workers read) as one Arrow table: Parquet files or directories, relative paths taken
        from the job file's directory. Errors name the file; ``check`` and ``nulls`` work as
        in :meth:`WorkerContext.read_table`. In ``setup`` an unreadable file fails the job
        without a second YARN attempt."""
        from .fs import FilePiece, list_input_files, read_split

        paths = [paths] if isinstance(paths, str) else list(paths)
        return read_split([FilePiece(f) for f in list_input_files([self.resolve(p) for p in paths])], columns, check,
                          nulls)

    def rng(self, superstep: int) -> np.random.Generator:
        """A generator that depends only on (seed, superstep): stable across restarts."""
        return np.random.default_rng([self.seed, 0x6D61, superstep])


@dataclass
class WorkerContext:
    """What a worker is given: its split, its index, the params and seed of the job, and,
    for a worker that joins late, ``catch_up`` (see :meth:`Master.catch_up`)."""

    params: dict[str, Any]
    seed: int
    split_index: int
    num_splits: int
    split: "list[FilePiece]"
    catch_up: Update | None
    start_superstep: int
    log: logging.Logger
    _progress: Any = None

    def read_table(self, columns: Sequence[str] | None = None,
                   check: Callable[["pa.Table"], None] | None = None, nulls: bool = False) -> "pa.Table":
        """Read this worker's split (Parquet files or row groups) as one Arrow table.

        ``check`` sees each row group and raises :class:`iterreduce.RecordError` for a
        bad record; the error then names the file and the record's row in it, and the
        job fails at once with it (a replacement worker would read the same record). A
        missing value in the columns read, or at any depth inside one, is such a bad record
        too: a null (numpy would turn it into a NaN without a word) or a floating-point NaN,
        unless ``nulls=True``: for an algorithm that handles them. Rows are counted from 0.
        """
        from .fs import read_split

        return read_split(self.split, columns, check, nulls)

    def rng(self, superstep: int) -> np.random.Generator:
        """A generator that depends only on (seed, split_index, superstep), so a replacement
        worker recomputes exactly what the lost one would have."""
        return np.random.default_rng([self.seed, self.split_index, superstep])

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress within the current superstep (sent with the next heartbeat)."""
        if self._progress is not None:
            self._progress(fraction, message)


class Worker:
    """Computes an update from the master's update on one split of the input."""

    def setup(self, ctx: WorkerContext) -> None:
        """Called once, before the first superstep: read and cache the split here."""

    def compute(self, update: Update, superstep: int, ctx: WorkerContext) -> Update:
        """Turn the master's broadcast for ``superstep`` into this worker's update."""
        raise NotImplementedError


class Master:
    """Combines the workers' updates into the next broadcast, superstep after superstep."""

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Refuse bad ``algorithm.params`` before anything starts: raise ``ValueError``
        naming the field (``algorithm.params.x: ...``). ``iterreduce validate``, ``run`` and
        ``submit`` call it on the job file, so a mistake there is reported before a container
        is asked for. The default accepts anything."""

    @classmethod
    def input_columns(cls, params: dict[str, Any]) -> list[str] | None:
        """The input columns the workers read (with ``ctx.read_table``), when the master knows
        them; ``params`` are ones :meth:`check_params` accepted (it is not asked of refused
        ones). ``validate``, ``run`` and ``submit`` then refuse, before anything starts, an input
        file that lacks one of them, or that holds one with a type the other files' cannot be
        read as (string beside double; int32 beside int64 is fine). Other columns may differ
        from file to file. The default, None, says nothing: a column whose types differ is
        then warned of, and a worker that reads it fails naming the files."""
        return None

    @classmethod
    def check_input(cls, params: dict[str, Any], schemas: dict[str, Any]) -> None:
        """Refuse input files that the workers cannot read, from their schemas alone (no data
        is read): raise ``ValueError`` saying what is wrong and naming the files. ``schemas`` is
        ``{file: pyarrow.Schema}`` of every non-empty input file; ``params`` are ones
        :meth:`check_params` accepted. ``validate``, ``run`` and ``submit`` call it before
        anything starts, after the check of :meth:`input_columns`, so a label column of the
        wrong type, say, is refused before a container is asked for instead of failing the
        job in its first superstep. The default accepts any."""

    @classmethod
    def input_paths(cls, params: dict[str, Any]) -> list[str]:
        """Paths in ``algorithm.params`` that the master reads (test data, say), relative to the
        job file where relative; ``validate``, ``run`` and ``submit`` check that they exist
        before anything starts. The default names none."""
        return []

    def setup(self, ctx: MasterContext) -> None:
        """Called once before the first superstep (and before :meth:`restore` on resume).
        The default keeps ``ctx`` as ``self.ctx``; an override should call it
        (``super().setup(ctx)``) or keep what it needs itself."""
        self.ctx = ctx

    def initial_update(self) -> Update:
        """The broadcast of superstep 0 (the ``update`` workers get in their first
        :meth:`Worker.compute`)."""
        raise NotImplementedError

    def combine(self, updates: list[Update], superstep: int) -> Update:
        """Turn the workers' updates (one per split, ordered by split index) into the next
        broadcast, or return a :class:`Final` to end the job."""
        raise NotImplementedError

    def phase(self) -> str:
        """A short description of where the algorithm is, for logs and progress."""
        return "training"

    def total_supersteps(self) -> int | None:
        """How many supersteps the job will take, when known (for the progress bar)."""
        return None

    def catch_up(self) -> Update | None:
        """What a worker joining now (a replacement, or after a resume) needs besides the
        current broadcast to rebuild its state. Called after every combine."""
        return None

    def state(self) -> Update:
        """The master's state for a checkpoint; :meth:`restore` must accept it back. A
        checkpoint holds the broadcast besides; the default keeps nothing else, which is
        right only when :meth:`combine` needs nothing but the updates. Anything the master
        keeps across supersteps (a counter, an accumulator) belongs here, or a resumed run
        goes on from the wrong place."""
        return Update()

    def restore(self, state: Update) -> None:
        """Restore the state saved by :meth:`state` (called after :meth:`setup`)."""

    def save(self, final: Final, output: "Output") -> None:
        """Write the result. By default: ``result.npz`` (the arrays) and ``result.json``."""
        output.write_npz("result.npz", final.arrays)
        output.write_json("result.json", {"metrics": final.metrics, "meta": final.meta,
                                          "num_samples": final.num_samples})


def update_to_avro(update: Update, superstep: int) -> dict[str, Any]:
    """The protocol's ``Update`` record for ``update`` (arrays are not copied)."""
    from .ipc import encode_arrays

    return {
        "superstep": int(superstep),
        "arrays": encode_arrays(update.arrays),
        "num_samples": int(update.num_samples),
        "metrics": {k: float(v) for k, v in update.metrics.items()},
        "meta": json.dumps(update.meta),
    }


def update_from_avro(record: dict[str, Any]) -> Update:
    """An :class:`Update` from the protocol's record; raises ValueError on malformed content."""
    from .ipc import decode_arrays

    try:
        meta = json.loads(record["meta"] or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"meta is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError("meta must be a JSON object")
    return Update(decode_arrays(record["arrays"]), int(record["num_samples"]), dict(record["metrics"]), meta)
