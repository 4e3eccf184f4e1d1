"""The job file: one typed object, loaded from YAML, validated before anything starts.

Both ``iterreduce run`` (local processes) and ``iterreduce submit`` (YARN) consume a
:class:`JobSpec`. Every error names the file and the field, in the style
``job.yaml: workers.count: must be at least 1, got 0``.

Example::

    name: logreg-mnist
    seed: 7
    workers: {count: 2, memory: 1 GiB, vcores: 1, max_restarts: 3}
    master: {memory: 1 GiB, vcores: 1}
    input: {paths: [data/mnist/train]}
    output: out/logreg
    checkpoint: {every: 5, keep: 2}          # path defaults to <output>/checkpoints
    heartbeat: {interval: 1, timeout: 30}     # seconds
    algorithm:
      master: examples.logreg:LogRegMaster
      worker: examples.logreg:LogRegWorker
      params: {learning_rate: 0.1}
    yarn: {queue: default, environment: venv:///opt/venvs/iterreduce}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = ["JobError", "JobSpec", "load_job", "parse_memory"]


class JobError(ValueError):
    """A job file that cannot run; the message names the file and the field. ``errors``: each
    error on its own (one, or all of a section's when it has several)."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = list(errors) if errors else [message]

    @classmethod
    def of(cls, errors: list[str]) -> "JobError":
        """One error for several, each kept once (a missing section is every field's error)."""
        unique = list(dict.fromkeys(errors))
        return cls("; ".join(unique), unique)


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|[kmgt]i?b?)?\s*$")
_UNITS_MB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def parse_memory(value: Any, where: str) -> int:
    """Memory in MiB from ``2048``, ``"512 MiB"``, ``"2 GiB"``, ``"2G"``."""
    if isinstance(value, bool):
        raise JobError(f"{where}: expected a memory size such as 1024 or '2 GiB', got {value!r}")
    if isinstance(value, int):
        mb = value
    elif isinstance(value, str) and (m := _MEMORY.match(value)):
        unit = (m.group(2) or "M")[0].lower()
        mb = int(float(m.group(1)) * _UNITS_MB[unit])
    else:
        raise JobError(f"{where}: expected a memory size such as 1024 (MiB) or '2 GiB', got {value!r}")
    if mb <= 0:
        raise JobError(f"{where}: must be positive, got {value!r}")
    return mb


def closest_match(word: str, candidates: Any) -> str | None:
    """The candidate ``word`` is most likely a misspelling of (the same but for case, else
    difflib's ratio >= 0.6), or None.
    Used for every did-you-mean hint, the job file's and algorithms' parameters alike."""
    names = sorted(str(c) for c in candidates)
    same = [c for c in names if c.casefold() == str(word).casefold()]  # 'X' for 'x': too short for difflib
    close = same or difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return close[0] if close else None


class _Reader:
    """Reads one mapping of the job file strictly: unknown keys, wrong types and
    missing fields raise :class:`JobError` naming ``where.field``."""

    def __init__(self, data: Any, where: str, parent: "_Reader | None" = None):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise JobError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
        self.data = dict(data)
        self.where = where
        self.parent = parent
        self.used: set[str] = set()
        self.suggested: set[str] = set()  # unknown keys already named as misspellings of a missing field

    def _misspelt(self, key: str) -> str:
        """`` (is 'cont' a misspelling of it?)`` when a key here that is not a field looks like ``key``."""
        close = closest_match(key, [k for k in self.data if k not in self.used])
        if close:
            self.suggested.add(close)
        return f" (is {close!r} a misspelling of it?)" if close else ""

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, types: type | tuple[type, ...], default: Any = dataclasses.MISSING) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if default is dataclasses.MISSING:
                section = self.where.rpartition(".")[2]
                if not self.data and self.parent is not None and section not in self.parent.data:
                    raise JobError(f"{self.where}: required section is missing{self.parent._misspelt(section)}")
                if key in self.data:  # `seed:` or `seed: null`
                    raise JobError(f"{self.path(key)}: required field is empty (null): give it a value")
                raise JobError(f"{self.path(key)}: required field is missing{self._misspelt(key)}")
            return default
        value = self.data[key]
        types_t = types if isinstance(types, tuple) else (types,)
        if float in types_t and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in types_t:
            ok = False
        else:
            ok = isinstance(value, types_t)
        if not ok:
            names = " or ".join(t.__name__ for t in types_t)
            raise JobError(f"{self.path(key)}: expected {names}, got {type(value).__name__} {value!r}")
        return value

    def int_at_least(self, key: str, low: int, default: Any = dataclasses.MISSING) -> int:
        value = self.get(key, int, default)
        if value < low:
            raise JobError(f"{self.path(key)}: must be at least {low}, got {value}")
        return value

    def positive(self, key: str, default: Any = dataclasses.MISSING) -> float:
        value = self.get(key, float, default)
        if value is None and default is None:
            return None
        if not 0 < value < float("inf"):
            raise JobError(f"{self.path(key)}: must be a positive number, got {value}")
        return value

    def sub(self, key: str) -> "_Reader":
        self.used.add(key)
        return _Reader(self.data.get(key), self.path(key), self)

    def fields(self, done: bool = True, **reads: Callable[[], Any]) -> dict[str, Any]:
        """Every one of ``reads`` (then :meth:`done`, unless not ``done``): their values by name.
        Their errors are collected, so that one look at a job file names all of a section's:
        one :class:`JobError` with them all."""
        values, errors = {}, []
        for name, read in reads.items():
            try:
                values[name] = read()
            except JobError as exc:
                errors.extend(exc.errors)
        if done:
            try:
                self.done()
            except JobError as exc:
                errors.extend(exc.errors)
        if errors:
            raise JobError.of(errors)
        return values

    def done(self) -> None:
        """Every key here that is not a field is an error (one each)."""
        errors, known = [], ", ".join(sorted(self.used))
        for key in sorted(set(self.data) - self.used - self.suggested, key=str):
            close = closest_match(key, self.used)
            hint = f"did you mean {close!r}? " if close else ""
            errors.append(f"{self.path(str(key))}: unknown field ({hint}known fields here: {known})")
        if errors:
            raise JobError.of(errors)


@dataclass(frozen=True)
class Resources:
    """Memory (MiB) and virtual cores of one container."""

    memory_mb: int = 1024
    vcores: int = 1

    @classmethod
    def read(cls, r: _Reader) -> "Resources":
        return cls(**r.fields(done=False, memory_mb=lambda: parse_memory(r.get("memory", (int, str), 1024),
                                                                         r.path("memory")),
                              vcores=lambda: r.int_at_least("vcores", 1, 1)))


@dataclass(frozen=True)
class WorkersSpec:
    count: int
    resources: Resources = Resources()
    max_restarts: int = 3

    @classmethod
    def read(cls, r: _Reader) -> "WorkersSpec":
        return cls(**r.fields(count=lambda: r.int_at_least("count", 1), resources=lambda: Resources.read(r),
                              max_restarts=lambda: r.int_at_least("max_restarts", 0, 3)))


@dataclass(frozen=True)
class InputSpec:
    paths: tuple[str, ...]
    format: str = "parquet"

    @classmethod
    def read(cls, r: _Reader, base: Path | None) -> "InputSpec":
        def paths() -> tuple[str, ...]:
            given = r.get("paths", (list, str))
            if isinstance(given, str):
                given = [given]
            if not given:
                raise JobError(f"{r.path('paths')}: needs at least one path")
            bad = [f"{r.path('paths')}[{i}]: expected a path or URI, got {p!r}"
                   for i, p in enumerate(given) if not isinstance(p, str) or not p]
            if bad:
                raise JobError.of(bad)
            return tuple(_resolve(p, base) for p in given)

        def fmt() -> str:
            value = r.get("format", str, "parquet")
            if value != "parquet":
                raise JobError(f"{r.path('format')}: only 'parquet' is supported, got {value!r}")
            return value
        return cls(**r.fields(paths=paths, format=fmt))


@dataclass(frozen=True)
class CheckpointSpec:
    path: str | None = None
    every: int = 1
    keep: int = 2

    @classmethod
    def read(cls, r: _Reader, base: Path | None) -> "CheckpointSpec":
        def path() -> str | None:
            given = r.get("path", str, None)
            return _resolve(given, base) if given else None
        return cls(**r.fields(path=path, every=lambda: r.int_at_least("every", 0, 1),
                              keep=lambda: r.int_at_least("keep", 1, 2)))


@dataclass(frozen=True)
class HeartbeatSpec:
    """Seconds. A worker silent for ``timeout`` is declared lost and replaced; a worker
    that cannot reach the master for ``master_timeout`` exits; a worker that spends more
    than ``superstep_timeout`` (off when null) in one superstep, or in its setup, is taken
    for hung (a read blocked on a dead DataNode, say) and replaced."""

    interval: float = 1.0
    timeout: float = 30.0
    register_timeout: float = 120.0
    master_timeout: float = 30.0
    superstep_timeout: float | None = None

    @classmethod
    def read(cls, r: _Reader) -> "HeartbeatSpec":
        out = cls(**r.fields(
            interval=lambda: r.positive("interval", 1.0),
            timeout=lambda: r.positive("timeout", 30.0),
            register_timeout=lambda: r.positive("register_timeout", 120.0),
            master_timeout=lambda: r.positive("master_timeout", 30.0),
            superstep_timeout=lambda: r.positive("superstep_timeout", None),
        ))
        if out.timeout <= out.interval:
            raise JobError(f"{r.path('timeout')}: must exceed heartbeat.interval ({out.interval}), got {out.timeout}")
        return out


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class AlgorithmSpec:
    master: str
    worker: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, r: _Reader) -> "AlgorithmSpec":
        def role(name: str) -> str:
            value = r.get(name, str)
            if not _IMPORT_PATH.match(value):
                raise JobError(f"{r.path(name)}: expected 'package.module:ClassName', got {value!r}")
            return value

        def params() -> dict[str, Any]:
            value = r.get("params", dict, {})
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise JobError(f"{r.path('params')}: must be plain YAML values (numbers, strings, lists, maps): "
                               f"{exc}") from None
            return value
        return cls(**r.fields(master=lambda: role("master"), worker=lambda: role("worker"), params=params))


@dataclass(frozen=True)
class YarnSpec:
    queue: str = "default"
    tags: tuple[str, ...] = ()
    environment: str | None = None
    max_attempts: int = 2
    user: str | None = None
    files: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def read(cls, r: _Reader, base: Path | None = None) -> "YarnSpec":
        def strings(key: str, what: str, empty_ok: bool) -> list[str]:
            given = r.get(key, list, [])
            bad = [f"{r.path(key)}[{i}]: expected {what}, got {v!r}" for i, v in enumerate(given)
                   if not isinstance(v, str) or not (v or empty_ok)]
            if bad:
                raise JobError.of(bad)
            return given

        def env() -> tuple[tuple[str, str], ...]:
            given = r.get("env", dict, {})
            bad = [f"{r.path('env')}.{k}: expected a string value, got {v!r}" for k, v in given.items()
                   if not isinstance(k, str) or not isinstance(v, (str, int, float)) or isinstance(v, bool)]
            if bad:
                raise JobError.of(bad)
            return tuple(sorted((k, str(v)) for k, v in given.items()))
        return cls(**r.fields(
            tags=lambda: tuple(strings("tags", "a string", True)),
            files=lambda: tuple(_resolve(f, base) for f in strings("files", "a path", False)),
            env=env,
            queue=lambda: r.get("queue", str, "default"),
            environment=lambda: r.get("environment", str, None),
            max_attempts=lambda: r.int_at_least("max_attempts", 1, 2),
            user=lambda: r.get("user", str, None),
        ))


@dataclass(frozen=True)
class JobSpec:
    """A validated job. Build it with :func:`load_job` or :meth:`from_dict`."""

    name: str
    seed: int
    workers: WorkersSpec
    input: InputSpec
    output: str
    algorithm: AlgorithmSpec
    master: Resources = Resources()
    checkpoint: CheckpointSpec = CheckpointSpec()
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    yarn: YarnSpec = YarnSpec()
    max_supersteps: int = 100_000
    base_dir: str | None = None
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", base: Path | None = None) -> "JobSpec":
        """Validate a mapping; relative local paths are taken relative to ``base``."""
        errors: list[str] = []

        def part(read: Callable[[], Any]) -> Any:  # every section, every field is checked: all errors at once
            try:
                return read()
            except JobError as exc:
                errors.extend(exc.errors)
                return None

        def master_section() -> Resources:
            m = r.sub("master")
            return m.fields(resources=lambda: Resources.read(m))["resources"]

        def job_name() -> str:
            name = r.get("name", str)
            if not re.match(r"^[\w.-]{1,100}$", name):
                raise JobError(f"name: use letters, digits, '.', '_' or '-' (at most 100), got {name!r}")
            return name

        try:
            r = _Reader(data, "")
            base_dir = r.get("base_dir", str, None)
            if base_dir is not None:  # a relative base_dir is relative to the job file, not the shell
                base = Path(base_dir) if Path(base_dir).is_absolute() or base is None else (base / base_dir)
                base = Path(os.path.normpath(base.absolute()))
        except JobError as exc:
            raise JobError(f"{source}: {exc}") from None
        fields = dict(
            name=part(job_name),
            seed=part(lambda: r.int_at_least("seed", 0)),
            workers=part(lambda: WorkersSpec.read(r.sub("workers"))),
            input=part(lambda: InputSpec.read(r.sub("input"), base)),
            output=part(lambda: _resolve(r.get("output", str), base)),
            algorithm=part(lambda: AlgorithmSpec.read(r.sub("algorithm"))),
            master=part(master_section),
            checkpoint=part(lambda: CheckpointSpec.read(r.sub("checkpoint"), base)),
            heartbeat=part(lambda: HeartbeatSpec.read(r.sub("heartbeat"))),
            yarn=part(lambda: YarnSpec.read(r.sub("yarn"), base)),
            max_supersteps=part(lambda: r.int_at_least("max_supersteps", 1, 100_000)),
        )
        part(r.done)
        if not errors:
            job = cls(**fields, base_dir=str(base) if base is not None else None, source=source)
            part(job._check_not_inside_input)
        if errors:
            errors = list(dict.fromkeys(errors))
            raise JobError(errors_text(source, errors), errors)
        return job

    def _check_not_inside_input(self) -> None:
        """The job writes nothing below its input: its checkpoints and results would be read
        as data by the next run (and refused as not Parquet)."""
        def inside(path: str, root: str) -> bool:
            root = root.rstrip("/")
            return path.rstrip("/") == root or path.startswith(root + "/")

        for what, path in (("output", self.output), ("checkpoint.path", self.checkpoint_path)):
            for src in self.input.paths:
                if inside(path, src):
                    raise JobError(f"{what}: {path} is inside the input path {src}: the next run would read "
                                   "this job's checkpoints and results as input; write them elsewhere")

    @property
    def checkpoint_path(self) -> str:
        return self.checkpoint.path or join_uri(self.output, "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        """The job as a plain mapping that :meth:`from_dict` accepts again."""
        d = {
            "name": self.name,
            "seed": self.seed,
            "workers": {
                "count": self.workers.count,
                "memory": self.workers.resources.memory_mb,
                "vcores": self.workers.resources.vcores,
                "max_restarts": self.workers.max_restarts,
            },
            "master": {"memory": self.master.memory_mb, "vcores": self.master.vcores},
            "input": {"paths": list(self.input.paths), "format": self.input.format},
            "output": self.output,
            "checkpoint": {"path": self.checkpoint.path, "every": self.checkpoint.every, "keep": self.checkpoint.keep},
            "heartbeat": dataclasses.asdict(self.heartbeat),
            "algorithm": {"master": self.algorithm.master, "worker": self.algorithm.worker,
                          "params": self.algorithm.params},
            "yarn": {"queue": self.yarn.queue, "tags": list(self.yarn.tags),
                     "environment": self.yarn.environment, "max_attempts": self.yarn.max_attempts,
                     "user": self.yarn.user, "files": list(self.yarn.files), "env": dict(self.yarn.env)},
            "max_supersteps": self.max_supersteps,
            "base_dir": self.base_dir,
        }
        return d

    def resolve(self, path: str) -> str:
        """A path from the algorithm's params, relative to the job file's directory."""
        return _resolve(path, Path(self.base_dir) if self.base_dir else None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<job json>") -> "JobSpec":
        return cls.from_dict(json.loads(text), source=source)

    def replace(self, **changes: Any) -> "JobSpec":
        return dataclasses.replace(self, **changes)


def errors_text(source: str, errors: list[str]) -> str:
    """One message for the ``errors`` found in the job file ``source`` (each without the
    ``source:`` prefix): ``source: error``, or ``source: N errors:`` and one per line."""
    if len(errors) == 1:
        return f"{source}: {errors[0]}"
    return f"{source}: {len(errors)} errors:\n" + "\n".join(f"  {e}" for e in errors)


def load_job(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a YAML job file. Raises :class:`JobError` naming the file and field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise JobError(f"{p}: cannot read the job file: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader that refuses repeated keys
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # what was open there (a quote, a {...}): often where the mistake is
        what = getattr(exc, "context", None)
        opened = f" ({what} at line {context.line + 1}, column {context.column + 1})" if context and what else ""
        raise JobError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}{opened}") from None
    if data is None:
        raise JobError(f"{p}: the job file is empty (it needs name, seed, workers, input, output, algorithm)")
    if not isinstance(data, dict):
        raise JobError(f"{p}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return JobSpec.from_dict(data, source=str(p), base=p.resolve().parent)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the last
    silently: ``{count: 2, count: 3}`` would be 3)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value (a name or a number), not a list or a mapping",
                    key_node.start_mark) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first at line {first.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def is_uri(path: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path))


def _resolve(path: str, base: Path | None) -> str:
    if is_uri(path) or base is None:
        return path
    return str((base / os.path.expanduser(path)).resolve()) if not os.path.isabs(path) else path


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])
