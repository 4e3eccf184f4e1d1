"""Files: URIs to pyarrow filesystems, input splits, the output directory, checkpoints.

Paths are local paths, ``file://``, ``hdfs://`` (pyarrow's HadoopFileSystem, needs
libhdfs) or ``webhdfs://host:port/path`` (fsspec's WebHDFS, wrapped for pyarrow).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .api import json_text

log = logging.getLogger(__name__)

__all__ = ["FilePiece", "Output", "Checkpoints", "InputError", "RecordError", "filesystem", "plan_splits",
           "read_split", "concat_tables"]



class InputError(ValueError):
    """Input that cannot be read: names the path (and row group or record where known).

    ``transient``: the filesystem failed (an I/O error), so reading again may work; else
    the input itself is wrong (a missing column, a corrupt file, a bad record) and every
    reader would fail the same way: a worker that meets it fails the job at once."""

    transient = False


class MissingInput(InputError):
    """An input path (``path``, as the job gives it) that does not exist."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(f"input path {path}: does not exist")


class RecordError(InputError):
    """A bad record, raised by a ``check`` given to :func:`read_split`: ``row`` is the
    record's index in the table the check was given (one row group), ``reason`` what
    is wrong with it. :func:`read_split` raises it again with ``where`` (the file) and
    the record's row in that file."""

    def __init__(self, row: int, reason: str, where: str = ""):
        self.row, self.reason, self.where = int(row), reason, where
        super().__init__(f"{where}, row {row}: {reason}" if where else f"row {row}: {reason}")


_FS_CACHE: dict[str, pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    parsed = urlparse(uri)
    scheme = parsed.scheme if re.match(r"^[a-zA-Z][\w+.-]*://", uri) else ""
    if scheme in ("", "file"):
        path = parsed.path if scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    key = f"{scheme}://{parsed.netloc}"
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = _make_fs(scheme, parsed)
            _FS_CACHE[key] = fs
    return fs, parsed.path or "/"


def _make_fs(scheme: str, parsed: Any) -> pafs.FileSystem:
    if scheme == "hdfs":
        try:
            return pafs.HadoopFileSystem(parsed.hostname or "default", parsed.port or 8020,
                                         user=os.environ.get("HADOOP_USER_NAME"))
        except (OSError, RuntimeError) as exc:
            raise InputError(
                f"hdfs://{parsed.netloc}: pyarrow's HadoopFileSystem could not start ({exc}). It needs "
                "libhdfs.so (ARROW_LIBHDFS_DIR or $HADOOP_HOME/lib/native), a JVM (JAVA_HOME) and the "
                "Hadoop jars on CLASSPATH (`hadoop classpath --glob`). Where libhdfs is not installed, "
                f"use webhdfs://{parsed.hostname}:9870/... instead (the NameNode's HTTP port)."
            ) from None
    if scheme in ("webhdfs", "swebhdfs"):
        import fsspec

        try:
            import requests  # noqa: F401 - fsspec's WebHDFS needs it
        except ImportError:
            raise InputError(f"{scheme}://{parsed.netloc}: WebHDFS access needs the `requests` package: "
                             "pip install 'iterreduce[webhdfs]'") from None

        user = os.environ.get("HADOOP_USER_NAME") or os.environ.get("USER") or None
        fs = fsspec.filesystem("webhdfs", host=parsed.hostname, port=parsed.port or 9870,
                               user=user, use_https=scheme == "swebhdfs")
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{parsed.netloc}/")
        return fs
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{scheme}://{parsed.netloc}: unsupported filesystem ({exc}); "
                         "use a local path, file://, hdfs:// or webhdfs://") from None


def _with_scheme(uri: str, path: str) -> str:
    """Rebuild a URI of the same filesystem as ``uri`` for ``path``."""
    parsed = urlparse(uri)
    if re.match(r"^[a-zA-Z][\w+.-]*://", uri) and parsed.scheme != "file":
        return f"{parsed.scheme}://{parsed.netloc}{path}"
    return path


@dataclass(frozen=True)
class FilePiece:
    """A whole Parquet file, or some of its row groups. ``path`` is a full URI."""

    path: str
    row_groups: tuple[int, ...] = ()
    nbytes: int = field(default=0, compare=False)
    num_rows: int = field(default=0, compare=False)

    def to_avro(self) -> dict[str, Any]:
        return {"path": self.path, "offset": 0, "length": -1, "row_groups": list(self.row_groups)}

    @classmethod
    def from_avro(cls, rec: dict[str, Any]) -> "FilePiece":
        return cls(path=rec["path"], row_groups=tuple(rec["row_groups"]))


def list_input_files(paths: Sequence[str]) -> list[str]:
    """Expand directories to the data files below them (sorted); names missing paths, and a
    file that two of ``paths`` reach (it would be read twice)."""
    files: list[str] = []
    by: dict[str, str] = {}  # a file (its filesystem and normalised path) -> the input path that gave it
    for uri in paths:
        fs, path = filesystem(uri)
        found_before = len(files)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise MissingInput(uri)
        if info.type == pafs.FileType.Directory:
            # as Hadoop's input formats: a name (of the file or a directory under the path) that
            # starts with _ or . is not data (_SUCCESS, .crc, _temporary/, .staging/)
            found = [
                i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File
                and not any(part.startswith(("_", ".")) for part in _below(path, i.path))
            ]
            if not found:
                raise InputError(f"input path {uri}: the directory holds no data files")
            files.extend(_with_scheme(uri, p) for p in sorted(found))
        else:
            files.append(uri)
        for f in files[found_before:]:
            parsed = urlparse(f)
            key = f"{parsed.netloc}{os.path.normpath(filesystem(f)[1])}" if "://" in f else os.path.abspath(f)
            if key in by and by[key] == uri:
                raise InputError(f"input path {uri} is given twice: its files would be read twice")
            if key in by:
                raise InputError(f"input file {f} is given by both input path {by[key]} and input path {uri}: "
                                 "it would be read twice")
            by[key] = uri
    return files


def _below(root: str, path: str) -> list[str]:
    """The names of ``path`` below the directory ``root``."""
    rest = path[len(root):] if path.startswith(root) else os.path.basename(path)
    return [p for p in rest.split("/") if p]


def plan_splits(paths: Sequence[str], num_splits: int, columns: Sequence[str] | None = None,
                check: Callable[[dict[str, pa.Schema]], None] | None = None) -> list[list[FilePiece]]:
    """Divide the input into ``num_splits`` contiguous shares of about equal bytes.

    Every Parquet row group is one piece; consecutive pieces of a file that land in the
    same split are merged. Raises :class:`InputError` when there are fewer row groups
    than splits, or a file is not Parquet, or (given the ``columns`` the workers read) a
    file lacks one of them or holds one with a type that cannot be read with the others',
    or ``check(schemas)`` (``{file: its Arrow schema}`` of the non-empty files) raises it.
    """
    pieces: list[tuple[str, int, int, int]] = []  # (uri, row group, bytes, rows)
    schemas: dict[str, pa.Schema] = {}
    for uri in list_input_files(paths):
        fs, path = filesystem(uri)
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                md = pf.metadata
                if md.num_rows:  # an empty file's schema may be a placeholder
                    schemas[uri] = pf.schema_arrow
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"input file {uri}: not a readable Parquet file: {exc}") from None
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            if g.num_rows:  # an empty row group (Spark's empty partition) would make an empty split
                pieces.append((uri, rg, max(g.total_byte_size, 1), g.num_rows))
    _check_columns(schemas, columns)
    if check is not None:
        check(schemas)
    if len(pieces) < num_splits:
        raise InputError(f"input {', '.join(paths)}: {len(pieces)} non-empty row group(s) cannot make {num_splits} "
                         "splits; write smaller row groups or use fewer workers")
    total = sum(p[2] for p in pieces)
    splits: list[list[tuple[str, int, int, int]]] = [[] for _ in range(num_splits)]
    k, acc = 0, 0
    for i, p in enumerate(pieces):
        if splits[k] and k < num_splits - 1:
            share_full = acc + p[2] / 2 >= (k + 1) * total / num_splits
            needed_later = len(pieces) - i <= num_splits - 1 - k  # one piece for each later split
            if share_full or needed_later:
                k += 1
        splits[k].append(p)
        acc += p[2]
    out = []
    for share in splits:
        merged: dict[str, list[tuple[int, int, int]]] = {}
        for uri, rg, nbytes, rows in share:
            merged.setdefault(uri, []).append((rg, nbytes, rows))
        out.append([FilePiece(uri, tuple(r[0] for r in rgs), sum(r[1] for r in rgs), sum(r[2] for r in rgs))
                    for uri, rgs in merged.items()])
    return out


def _check_columns(schemas: dict[str, pa.Schema], columns: Sequence[str] | None) -> None:
    """The ``columns`` the workers read (None: not known, then every column) must be in every
    input file, with types Arrow can read as one (int32 and int64 can; string and double
    cannot): the files that lack one, or whose type differs from most files', are named.
    With ``columns`` that is an :class:`InputError`; without, a warning, since the
    algorithm may not read that column (one that does is told which files differ)."""
    by_col: dict[str, dict[str, tuple[pa.DataType, list[str]]]] = {}
    for f, schema in schemas.items():
        for fld in schema:
            if columns is None or fld.name in columns:
                entry = by_col.setdefault(fld.name, {}).setdefault(str(fld.type), (fld.type, []))
                entry[1].append(f)
    problems = []
    nowhere = []  # a column no file has: a misnamed column, not files that differ
    for col in columns or ():
        lacking = [f for f, schema in schemas.items() if schema.get_field_index(col) < 0]
        if lacking and len(lacking) == len(schemas):
            nowhere.append(col)
        elif lacking:
            problems.append(f"column {col!r}, which the algorithm reads, is not in {_some(lacking)}")
    nowhere_text = ""
    if nowhere:
        from .job import closest_match

        have = list(dict.fromkeys(n for schema in schemas.values() for n in schema.names))
        hints = [f"{c!r} (is it {m!r}?)" if (m := closest_match(c, have)) else repr(c) for c in nowhere]
        shown = ", ".join(have[:12]) + (f" and {len(have) - 12} more" if len(have) > 12 else "")
        nowhere_text = (f"{'column' if len(nowhere) == 1 else 'columns'} {', '.join(hints)}, which the "
                        f"algorithm reads, {'is' if len(nowhere) == 1 else 'are'} in none of the "
                        f"{len(schemas)} input file(s); their columns: {shown}")
    for col, types in by_col.items():
        if len(types) < 2:
            continue
        groups: list[tuple[pa.DataType, list[str], list[str]]] = []  # (unified type, its types, files)
        for name, (ty, files) in sorted(types.items(), key=lambda kv: -len(kv[1][1])):
            for i, (gty, names, gfiles) in enumerate(groups):
                try:
                    merged = pa.unify_schemas([pa.schema([pa.field(col, gty)]), pa.schema([pa.field(col, ty)])],
                                              promote_options="permissive").field(col).type
                except (pa.ArrowTypeError, pa.ArrowInvalid):
                    continue
                groups[i] = (merged, names + [name], gfiles + files)
                break
            else:
                groups.append((ty, [name], list(files)))
        if len(groups) < 2:
            continue
        groups.sort(key=lambda g: -len(g[2]))
        (_, common, most), odd = groups[0], groups[1:]
        shown = "; ".join(f"{' or '.join(names)} in {_some(files)}" for _, names, files in odd)
        problems.append(f"column {col!r} is {shown}, where {len(most)} other file(s) have {' or '.join(common)}")
    if nowhere_text:  # first, and with whatever else is wrong
        raise InputError(nowhere_text + ("; and the input files' columns do not agree: " + "; ".join(problems)
                                         if problems else ""))
    if problems and columns is not None:
        raise InputError("the input files' columns do not agree: " + "; ".join(problems))
    if problems:
        log.warning("the input files' columns do not agree: %s. A worker that reads such a column fails when its "
                    "split holds files of both kinds, and reads another type than the others when its split holds "
                    "only the odd files; one that does not read it is not harmed (a master that names the columns "
                    "it reads, Master.input_columns, has this refused before the job starts)", "; ".join(problems))


def _some(files: list[str], n: int = 3) -> str:
    return ", ".join(files[:n]) + (f" and {len(files) - n} more" if len(files) > n else "")


def _input_error(message: str, cause: BaseException) -> InputError:
    err = InputError(message)
    err.transient = _transient(cause)
    return err


def _transient(exc: BaseException) -> bool:
    """Whether reading again may succeed: the filesystem failed (a connection, a timeout, an
    I/O error with an errno), not the bytes (pyarrow reports a corrupt page as a plain
    OSError without errno: "Corrupt snappy compressed data", "Couldn't deserialize thrift")."""
    if isinstance(exc, (pa.ArrowInvalid, FileNotFoundError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if type(exc).__module__.split(".")[0] in ("requests", "urllib3"):  # WebHDFS through fsspec
        return True
    return isinstance(exc, OSError) and exc.errno is not None


def read_split(pieces: Sequence[FilePiece], columns: Sequence[str] | None = None,
               check: Callable[[pa.Table], None] | None = None, nulls: bool = False) -> pa.Table:
    """Read the pieces of a split into one table; errors name the file and row group.

    ``check(table)``, when given, sees each row group as it is read and raises
    :class:`RecordError` for a bad record; that is raised again as a
    :class:`RecordError` whose message names the file and the record's row in the
    file, counted from 0 (``input file data/part-3.parquet, row 10017: label 12 is not a
    class of 0..9``). An :class:`InputError` it raises (columns that are wrong as a
    whole) is raised again naming the file.

    A null (a missing value in a column, or in a column's list of values) is a bad record too,
    reported the same way after ``check`` has seen the row group (numpy would make it a NaN,
    or a 0, without a word), unless ``nulls`` is true.
    """
    tables, sources = [], []
    for piece in pieces:
        fs, path = filesystem(piece.path)
        try:
            with fs.open_input_file(path) as f:
                # pages written with a CRC (write_page_checksum) are checked: damage is named, not read
                pf = pq.ParquetFile(f, page_checksum_verification=verify_checksums())
                names = pf.schema_arrow.names
                missing = [c for c in columns or () if c not in names]
                if missing:  # pyarrow would leave them out without a word
                    raise InputError(f"input file {piece.path}: no column {', '.join(map(repr, missing))} "
                                     f"(its columns: {', '.join(names)})")
                groups = list(piece.row_groups) or list(range(pf.metadata.num_row_groups))
                starts = np.concatenate([[0], np.cumsum([pf.metadata.row_group(i).num_rows
                                                         for i in range(pf.metadata.num_row_groups)])])
                for rg in groups:
                    try:
                        table = pf.read_row_group(rg, columns=list(columns) if columns else None)
                    except (pa.ArrowInvalid, OSError, KeyError) as exc:
                        raise _input_error(f"input file {piece.path}, row group {rg}: {exc}", exc) from None
                    if check is not None:
                        in_file(f"input file {piece.path}", int(starts[rg]), lambda: check(table))
                    if not nulls:
                        in_file(f"input file {piece.path}", int(starts[rg]), lambda: refuse_nulls(table))
                    tables.append(table)
                    sources.append(piece.path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise _input_error(f"input file {piece.path}: {exc}", exc) from None
    if not tables:
        raise InputError("empty split: no pieces to read")
    return concat_tables(tables, sources)


def verify_checksums() -> bool:
    """Whether Parquet pages written with a checksum are verified as they are read: yes, unless
    ``ITERREDUCE_VERIFY_CHECKSUMS=0`` (for files a writer gave wrong checksums; on YARN, set it
    in ``yarn.env``)."""
    return os.environ.get("ITERREDUCE_VERIFY_CHECKSUMS", "1").strip().lower() not in ("0", "false", "no", "off")


def refuse_nulls(table: pa.Table) -> None:
    """:class:`RecordError` for the first row of ``table`` with a missing value: a null, or a
    NaN in a floating-point column, in a column or anywhere inside one (a list's values, a
    struct's fields, a map's keys and items, at any depth), naming the column and where in
    it (``x[3].a``: field ``a`` of the fourth struct in the row's list ``x``)."""
    found = []
    for name in table.column_names:
        hit = _first_missing(table.column(name).combine_chunks(), name)
        if hit is not None:
            row, where, what = hit
            found.append((row, f"column {name!r} is {what}" if where == name else
                          f"column {name!r} holds a {what} value (at {where})"))
    if found:
        row, what = min(found, key=lambda f: f[0])
        raise RecordError(row, what + " (an algorithm that handles missing values reads with nulls=True)")


def _first_missing(arr: pa.Array, where: str) -> tuple[int, str, str] | None:
    """The first row of ``arr`` that is null or NaN, or holds one at any depth: ``(row, where
    that value is, "null" or "NaN")`` (``where`` names ``arr`` itself); None when there is none."""
    import pyarrow.compute as pc

    def first(mask: pa.Array) -> int:
        return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])

    hits = []
    if arr.null_count:
        hits.append((first(arr.is_null()), where, "null"))
    t = arr.type
    if pa.types.is_floating(t) and len(arr) and pc.any(pc.is_nan(arr)).as_py():
        hits.append((first(pc.fill_null(pc.is_nan(arr), False)), where, "NaN"))
    if pa.types.is_map(t):  # the same as a list of key/item structs
        t = pa.list_(pa.struct([t.key_field, t.item_field]))
        arr = arr.cast(t)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _first_missing(pc.list_flatten(arr), where + "[]")
        if inner is not None:  # the value's row -> its list's row, and its place in that list
            parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
            row = int(parents[inner[0]])
            at = inner[0] - int(np.searchsorted(parents, row))
            hits.append((row, f"{where}[{at}]{inner[1][len(where) + 2:]}", inner[2]))
    elif pa.types.is_struct(t):
        for i, values in enumerate(arr.flatten()):  # a null struct's fields are null: found above, first
            inner = _first_missing(values, f"{where}.{t.field(i).name}")
            if inner is not None:
                hits.append(inner)
    return min(hits, key=lambda h: h[0]) if hits else None


def in_file(where: str, first_row: int, fn: Callable[[], Any]) -> Any:
    """``fn()``, which checks a table that starts at row ``first_row`` of the file
    ``where``: a :class:`RecordError` it raises (its row counted in that table) is raised
    again naming ``where`` and the row in the file; an :class:`InputError`, naming ``where``."""
    try:
        return fn()
    except RecordError as exc:
        raise RecordError(first_row + exc.row, exc.reason, where) from None
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def concat_tables(tables: list[pa.Table], sources: Sequence[str]) -> pa.Table:
    """One table of ``tables`` (read from ``sources``, one per table), their types unified
    where Arrow can (``promote_options="permissive"``); files whose columns cannot be
    read as one are named (pyarrow names none), as an :class:`InputError`."""
    try:  # columns in another order, int32 beside int64, list<item> beside list<element>: read as one
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        first = tables[0].schema
        for table, src in zip(tables[1:], sources[1:]):
            if not table.schema.equals(first):
                raise InputError(f"input files {sources[0]} and {src} do not have the same columns: "
                                 f"{first.to_string(show_schema_metadata=False)} in the one, "
                                 f"{table.schema.to_string(show_schema_metadata=False)} in the other"
                                 .replace("\n", ", ")) from None
        raise


class Output:
    """The job's output directory on any supported filesystem."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem(self.uri)
        self.written: list[str] = []  # the names write_bytes wrote, in order, each once

    def create(self) -> "Output":
        self.fs.create_dir(self.path, recursive=True)
        return self

    def uri_of(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _p(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file atomically where the filesystem allows (temp file, then rename).

        HDFS's rename does not replace an existing file, and through WebHDFS it says so
        only with a ``false`` that fsspec ignores: there the old file is deleted first
        (so a reader may find no file for a moment, never a partial one), and the rename
        is checked."""
        tmp, dest = self._p(f".{name}.tmp"), self._p(name)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if not self.is_local and self.fs.get_file_info(dest).type != pafs.FileType.NotFound:
            self.fs.delete_file(dest)
        self.fs.move(tmp, dest)
        if not self.is_local and self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            raise OSError(f"could not rename {self.uri_of('.' + name + '.tmp')} to {self.uri_of(name)}")
        if name not in self.written:
            self.written.append(name)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def append_text(self, name: str, text: str) -> None:
        if self.is_local:
            with open(self._p(name), "a") as f:
                f.write(text)
        else:  # HDFS appends are fragile through WebHDFS: rewrite the small file
            self.write_bytes(name, (self.read_bytes(name) if self.exists(name) else b"") + text.encode())

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._p(name)) as f:
            return f.read()

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._p(name)).type != pafs.FileType.NotFound

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json_text(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_npz(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.write_bytes(name, buf.getvalue())

    def read_npz(self, name: str, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of an ``.npz`` file; with ``keys``, only those, read from the file in place
        (a zip is read from its end: only its directory and those members travel)."""
        if keys is None:
            with np.load(io.BytesIO(self.read_bytes(name)), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        with self.fs.open_input_file(self._p(name)) as f, np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in keys}

    def list(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(os.path.basename(i.path) for i in infos)

    def delete(self, name: str) -> None:
        self.fs.delete_file(self._p(name))


class Checkpoints:
    """``ckpt-<superstep>.npz`` files: the master's state and the broadcast for that superstep."""

    PATTERN = re.compile(r"^ckpt-(\d{8})\.npz$")
    PARTIAL = re.compile(r"^\.ckpt-(\d{8})\.npz\.tmp$")  # Output.write_bytes's temporary file

    def __init__(self, uri: str, keep: int = 2):
        self.dir = Output(uri)
        self.keep = keep

    def save(self, superstep: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
        self.dir.create()
        payload = dict(arrays)
        payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        name = f"ckpt-{superstep:08d}.npz"
        self.dir.write_npz(name, payload)
        names = self.dir.list()
        for old in self.supersteps(names)[: -self.keep]:
            self.dir.delete(f"ckpt-{old:08d}.npz")
        for left in names:  # half-written by a master killed while it wrote (kill --now)
            if self.PARTIAL.match(left):
                self.dir.delete(left)
        return self.dir.uri_of(name)

    def supersteps(self, names: list[str] | None = None) -> list[int]:
        """The supersteps of the checkpoints in the directory (or among ``names``, its listing)."""
        return sorted(int(m.group(1)) for n in (self.dir.list() if names is None else names)
                      if (m := self.PATTERN.match(n)))

    def latest(self, arrays: bool = True) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
        """The newest checkpoint that can be read: ``(superstep, arrays, meta)``; an unreadable one
        (cut short by a full disk, a crash while a filesystem without atomic rename wrote it) is
        skipped with a warning for the one before it. None when there is none; :class:`InputError`
        naming them when none can be read.

        ``arrays=False`` reads only the metadata (the arrays come back empty): what a check
        before submitting needs, without fetching a model's worth of bytes from HDFS. A file
        whose directory and metadata are whole but whose arrays are damaged passes that check;
        the master's full read skips it then."""
        steps = self.supersteps()
        if not steps:
            return None
        bad = []
        for step in reversed(steps):
            name = f"ckpt-{step:08d}.npz"
            try:
                got = self.dir.read_npz(name, None if arrays else ["__meta__"])
                meta = json.loads(got.pop("__meta__").tobytes().decode())
                if not isinstance(meta, dict):
                    raise ValueError("its __meta__ is not a JSON object")
            except Exception as exc:  # noqa: BLE001 - zipfile's, numpy's, json's errors for a damaged file
                if _transient(exc):
                    raise
                bad.append(f"{self.dir.uri_of(name)} ({type(exc).__name__}: {exc})")
                log.warning("checkpoint %s cannot be read (%s: %s)%s", self.dir.uri_of(name), type(exc).__name__,
                            exc, "; trying the one before it" if step != steps[0] else "")
                continue
            return step, got, meta
        raise InputError(f"no checkpoint can be read: {'; '.join(bad)}")
