"""Data input for the DBN: IDX files (MNIST), checksums, download, Parquet shards.

IDX format (LeCun): a 4-byte magic ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 dimension sizes, then the data in C order, big-endian.
Type codes: 0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int, 0x0D float, 0x0E double.
Files may be gzip-compressed; this is detected from the gzip magic bytes
(``1f 8b``), not from the file name.

Parquet shards written by :func:`write_parquet_shards` have two columns:

* ``x``: ``fixed_size_list<uint8>[d]`` -- one example's d features (784 pixels
  for MNIST, row-major 28x28, 0..255);
* ``y``: ``int64`` -- the label.

They are named ``<prefix>-00000.parquet``, ``<prefix>-00001.parquet`` ...
and written with row groups of about 10000 rows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iterreduce.fs import InputError, RecordError

__all__ = [
    "IDXError",
    "ChecksumError",
    "MNIST_FILES",
    "MNIST_SHA256",
    "MNIST_MIRRORS",
    "read_idx",
    "read_mnist_file",
    "verify_sha256",
    "load_mnist",
    "download_mnist",
    "write_parquet_shards",
    "check_examples",
    "table_to_arrays",
    "read_parquet_dir",
    "prepare_mnist",
]

# type code -> big-endian numpy dtype
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

#: sha256 of the *uncompressed* content of each MNIST file.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

ROW_GROUP_SIZE = 10000


class IDXError(ValueError):
    """Malformed IDX file; the message names the file and the byte position."""


class ChecksumError(ValueError):
    """Content does not match the expected sha256; the message names the file."""


# --------------------------------------------------------------------------- IDX


def _read_raw(path: str | os.PathLike) -> bytes:
    """Return the file's bytes, gunzipped if it starts with the gzip magic."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise IDXError(f"{path}: corrupt gzip stream: {e}") from e
    return raw


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse uncompressed IDX content ``raw``; ``name`` is used in errors.

    Returns an array of the file's shape in native byte order.
    """
    if len(raw) < 4:
        raise IDXError(f"{name}: truncated header at byte {len(raw)}: need 4 magic bytes")
    if raw[0] != 0 or raw[1] != 0:
        raise IDXError(
            f"{name}: bad magic at byte 0: expected 0x00 0x00, got 0x{raw[0]:02x} 0x{raw[1]:02x}"
        )
    tcode, ndim = raw[2], raw[3]
    if tcode not in _IDX_TYPES:
        raise IDXError(f"{name}: unknown data type code 0x{tcode:02x} at byte 2")
    dtype = _IDX_TYPES[tcode]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise IDXError(
            f"{name}: truncated header at byte {len(raw)}: "
            f"{ndim} dimensions need {header_end} header bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = math.prod(shape)  # exact: an int64 product could wrap and pass the size checks
    end = header_end + count * dtype.itemsize
    if len(raw) < end:
        raise IDXError(
            f"{name}: truncated data at byte {len(raw)}: shape {shape} of {dtype.name} "
            f"needs {end} bytes"
        )
    if len(raw) > end:
        raise IDXError(f"{name}: {len(raw) - end} unexpected trailing bytes at byte {end}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header_end).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array.

    Returns an array with the file's shape and dtype (uint8, int8, int16,
    int32, float32 or float64, native byte order). Raises :class:`IDXError`
    naming the file and byte position on bad magic or truncated content.
    """
    return parse_idx(_read_raw(path), str(path))


def verify_sha256(raw: bytes, expected: str, name: str) -> None:
    """Raise :class:`ChecksumError` naming ``name`` if sha256(raw) != expected."""
    got = hashlib.sha256(raw).hexdigest()
    if got != expected:
        raise ChecksumError(
            f"{name}: sha256 of the uncompressed content is {got}, expected {expected}"
        )


def read_mnist_file(path: str | os.PathLike, verify: bool = True) -> np.ndarray:
    """Read one MNIST IDX file, verifying the sha256 of its uncompressed content
    against :data:`MNIST_SHA256` (looked up by file name, with or without
    ``.gz``) unless not ``verify`` (another dataset in MNIST's format and file names, such
    as Fashion-MNIST); raises :class:`IDXError` for a file that is not valid IDX (truncated,
    or images where labels belong) and :class:`ChecksumError` for valid IDX of other
    content, naming the file."""
    path = Path(path)
    key = path.name if path.name.endswith(".gz") else path.name + ".gz"
    key = key.replace(".idx", "-idx")  # train-images.idx3-ubyte, as some mirrors name it
    if key not in MNIST_SHA256:
        raise ValueError(f"{path}: not a standard MNIST file name ({', '.join(MNIST_SHA256)})")
    raw = _read_raw(path)
    want = 3 if "images" in key else 1
    if len(raw) >= 4 and raw[:2] == b"\0\0" and raw[3] != want:  # before its sizes make no sense
        raise IDXError(f"{path}: an IDX file of {raw[3]} dimension(s) (magic 0x{raw[2]:02x}{raw[3]:02x} at byte 2), "
                       f"where MNIST's {'images' if want == 3 else 'labels'} file has {want}: images and labels "
                       "swapped?")
    arr = parse_idx(raw, str(path))  # first: a truncated file is reported as truncated
    if verify:
        verify_sha256(raw, MNIST_SHA256[key], str(path))
    return arr


def load_mnist(data_dir: str | os.PathLike, verify: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST from the four standard IDX files in ``data_dir``.

    Each file's uncompressed content is checked against :data:`MNIST_SHA256`, unless not
    ``verify``: another dataset in MNIST's format and file names (Fashion-MNIST, say).
    Files may be stored gzipped (standard ``.gz`` names) or uncompressed
    (the same name without ``.gz``).

    Returns ``(x_train uint8 [60000, 784], y_train int64 [60000],
    x_test uint8 [10000, 784], y_test int64 [10000])``.
    """
    d = Path(data_dir)
    out = {}
    for key, fname in MNIST_FILES.items():
        raw = fname[:-3]  # without .gz; also as some mirrors name them: train-images.idx3-ubyte
        names = [fname, raw, raw.replace("-idx", ".idx"), raw.replace("-idx", ".idx") + ".gz"]
        p = next((d / n for n in names if (d / n).exists()), d / fname)
        if not p.exists():
            raise FileNotFoundError(
                f"MNIST file {p} not found; pass the directory holding the four MNIST files "
                f"(--data DIR on the command line), or leave --data out to download them "
                f"(from Python: dbn.data.download_mnist(DIR))"
            )
        out[key] = read_mnist_file(p, verify)
    x_tr = out["train_images"].reshape(out["train_images"].shape[0], -1)
    x_te = out["test_images"].reshape(out["test_images"].shape[0], -1)
    return x_tr, out["train_labels"].astype(np.int64), x_te, out["test_labels"].astype(np.int64)


def download_mnist(
    data_dir: str | os.PathLike,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 30.0,
) -> Path:
    """Download the four MNIST files into ``data_dir`` (skipping valid ones).

    Tries each mirror in turn, verifies the sha256 of the uncompressed content
    and writes the file atomically. Raises ``RuntimeError`` naming the directory
    (to pass as ``--data DIR``) when no mirror works. Returns the directory.
    """
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    for fname, sha in MNIST_SHA256.items():
        target = d / fname
        if target.exists():
            try:
                verify_sha256(_read_raw(target), sha, str(target))
                continue
            except (ChecksumError, IDXError):
                pass
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + fname
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    blob = r.read()
                raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
                verify_sha256(raw, sha, url)
            except (urllib.error.URLError, OSError, ValueError, EOFError, zlib.error) as e:
                errors.append(f"{url}: {e}")
                continue
            tmp = target.with_suffix(".part")
            tmp.write_bytes(blob)
            os.replace(tmp, target)
            break
        else:
            raise RuntimeError(
                f"could not download {fname} into {d.resolve()}: "
                + "; ".join(errors)
                + f". Without internet access, copy the four MNIST files "
                f"({', '.join(MNIST_SHA256)}) into a directory and pass it with --data DIR "
                f"(e.g. --data {d.resolve()})."
            )
    return d


# ----------------------------------------------------------------------- Parquet


def _to_table(x: np.ndarray, y: np.ndarray | None) -> pa.Table:
    x = np.ascontiguousarray(x, dtype=np.uint8)
    n, d = x.shape
    col_x = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.uint8()), d)
    cols = {"x": col_x}
    if y is not None:
        cols["y"] = pa.array(np.asarray(y, dtype=np.int64))
    return pa.table(cols)


def write_parquet_shards(
    x: np.ndarray,
    y: np.ndarray | None,
    out_dir: str | os.PathLike,
    num_shards: int,
    prefix: str = "part",
    row_group_size: int = ROW_GROUP_SIZE,
) -> list[Path]:
    """Write ``x`` uint8 [n, d] and ``y`` int64 [n] as ``num_shards`` Parquet files.

    Rows are split into contiguous, nearly equal shards
    ``out_dir/<prefix>-00000.parquet`` ... with columns ``x``
    (``fixed_size_list<uint8>[d]``) and ``y`` (``int64``; omitted if ``y`` is
    None). Returns the list of paths written. ``x`` of another dtype must hold
    integers 0..255 (an IDX file of floats, say, would be scaled by the user first);
    ``ValueError`` names the first row that does not, before anything is written.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        x = x.reshape(x.shape[0], -1)
    if x.dtype != np.uint8 and x.size:
        with np.errstate(invalid="ignore"):  # NaN compares unequal to itself: caught below
            bad = (x < 0) | (x > 255)
            if x.dtype.kind == "f":
                bad |= x != np.round(x)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(f"x row {row}, value {col} is {x[row, col].item()!r}: pixels must be integers 0..255 "
                             f"(x is {x.dtype}); scale the data to 0..255 first")
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"x has {len(x)} rows but y has shape {y.shape}: one label per row")
        if y.dtype.kind in "iu":
            bad = y < 0
        elif y.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(y) | (y != np.round(y)) | (y < 0)
        else:
            bad = np.ones(len(y), bool)
        if bad.any():
            row = _first(bad)
            raise ValueError(f"y row {row} is {y[row].item()!r}: labels must be class numbers 0, 1, 2, ... "
                             f"(y is {y.dtype})")
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    if num_shards > max(len(x), 1):
        raise ValueError(f"{num_shards} shards of {len(x)} rows would leave some shards empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(x), num_shards + 1).round().astype(np.int64)
    paths = []
    for i in range(num_shards):
        lo, hi = bounds[i], bounds[i + 1]
        table = _to_table(x[lo:hi], None if y is None else y[lo:hi])
        p = out / f"{prefix}-{i:05d}.parquet"
        pq.write_table(table, p, row_group_size=row_group_size, write_page_checksum=True)  # damage is found
        paths.append(p)
    return paths


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _examples_type(t: pa.DataType) -> bool:
    """Whether ``t`` is a type of column ``x``: a list of integers (pixels) or of floats."""
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
        and (pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type))


def _expected(n_features: int | None, features_from: str, features_default: bool) -> str:
    """"N are expected (where N was set)", for a message about the width of the examples."""
    if not features_from:
        return f"{n_features} are expected"
    default = ", its default: set it to the width of the input" if features_default else ""
    return f"{n_features} are expected ({features_from} is {n_features}{default})"


def check_examples(table: pa.Table, n_features: int | None = None, classes: int | None = None,
                   classes_from: str = "", features_from: str = "", features_default: bool = False) -> None:
    """Refuse a table of examples that :func:`table_to_arrays` cannot turn into inputs
    and labels without losing something. An example ``x`` is a list of integer pixels
    0..255 (images), or of floats in [0, 1] (any features scaled to that range).

    Raises :class:`iterreduce.fs.RecordError` (``row`` counted in ``table``) for the
    first bad example: a null example, a null value (or NaN), a pixel outside 0..255 or a
    float outside [0, 1], an example
    with another number of values than the others (or than ``n_features``), a null
    label, a label outside ``0..classes-1`` (with ``classes``; ``classes_from`` says where
    that number was set, for the message; ``features_from`` the same for ``n_features``, and
    ``features_default`` that it was not set there, so is a default). Raises
    :class:`iterreduce.fs.InputError` when the columns themselves are wrong: no ``x``,
    an ``x`` that is not a list of integers or floats, a ``y`` that is not an integer, every
    example of a fixed width other than ``n_features``. Given as the ``check`` of
    :func:`iterreduce.fs.read_split`, the errors name the file and the row in it.
    """
    if "x" not in table.column_names:
        names = table.column_names
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise InputError(f"no column 'x' (the examples); its columns are {shown}")
    col = table.column("x")
    t = col.type
    if not _examples_type(t):
        raise InputError(f"column 'x': expected a list per example of integer pixels 0..255 "
                         f"(fixed_size_list<uint8>[d]) or of floats in [0, 1], got {t}")
    if col.null_count:
        raise RecordError(_first(col.is_null().to_numpy(zero_copy_only=False)), "the example x is null")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.int64)
    width = t.list_size if pa.types.is_fixed_size_list(t) else (int(lengths[0]) if len(lengths) else n_features)
    if n_features is not None and width is not None and width != n_features:
        expected = _expected(n_features, features_from, features_default)
        if pa.types.is_fixed_size_list(t):
            raise InputError(f"column 'x' has {width} values per example, {expected}")
        raise RecordError(0, f"x has {width} values, {expected}")
    if len(lengths) and (lengths != width).any():
        row = _first(lengths != width)
        raise RecordError(row, f"x has {lengths[row]} values, the examples before it have {width}")
    values = pc.list_flatten(col)
    floats = pa.types.is_floating(t.value_type)
    if values.null_count:
        raise RecordError(_first(values.is_null().to_numpy(zero_copy_only=False)) // max(width, 1),
                          f"x has a null {'value' if floats else 'pixel'}")
    if t.value_type != pa.uint8() and len(values):
        v = values.to_numpy(zero_copy_only=False)
        bad = ~((v >= 0) & (v <= 1)) if floats else (v < 0) | (v > 255)  # NaN too
        if bad.any():
            i = _first(bad)
            if floats and np.isnan(v[i]):
                raise RecordError(i // width, f"value {i % width} of x (counted from 0) is NaN")
            if floats:
                raise RecordError(i // width, f"value {i % width} of x (counted from 0) is {v[i]}, outside [0, 1] "
                                  "(float features are taken as they are: scale them to [0, 1])")
            raise RecordError(i // width, f"pixel {i % width} of x (counted from 0) is {v[i]}, outside 0..255")
    if "y" not in table.column_names:
        return
    y = table.column("y")
    if not pa.types.is_integer(y.type):
        raise InputError(f"column 'y': expected integer labels, got {y.type}")
    if y.null_count:
        raise RecordError(_first(y.is_null().to_numpy(zero_copy_only=False)), "the label y is null")
    if classes is not None and len(y):
        yv = y.to_numpy()
        bad = (yv < 0) | (yv >= classes)
        if bad.any():
            row = _first(bad)
            said = f" ({classes_from} is {classes})" if classes_from else ""
            raise RecordError(row, f"label {yv[row]} is not a class of 0..{classes - 1}{said}")


def examples_check(n_features: int | None = None, classes: int | None = None, classes_from: str = "",
                   features_from: str = "", labels: bool = False,
                   features_default: bool = False) -> Callable[[pa.Table], None]:
    """A ``check`` for :func:`iterreduce.fs.read_split` that reads examples: :func:`check_examples`
    on each row group (with a label column ``y`` required when ``labels``), and the same kind of
    ``x`` in all of them: integer pixels beside floats would be read as one float column, the
    pixels then counted as values 0..255 where features are in [0, 1]."""
    kinds: list[tuple[bool, str]] = []

    def check(table: pa.Table) -> None:
        if labels and "y" not in table.column_names:
            raise InputError("needs a label column 'y'")
        check_examples(table, n_features, classes, classes_from, features_from, features_default)
        floats = pa.types.is_floating(table.schema.field("x").type.value_type)
        if kinds and kinds[0][0] != floats:
            raise InputError(f"column 'x' holds {_KINDS[floats]} ({table.schema.field('x').type}), where the "
                             f"data before it holds {_KINDS[kinds[0][0]]} ({kinds[0][1]}): give data of one kind")
        kinds.append((floats, str(table.schema.field("x").type)))

    return check


_KINDS = {False: "integer pixels 0..255", True: "floats in [0, 1]"}


def check_example_schemas(schemas: dict[str, pa.Schema], n_features: int | None = None, features_from: str = "",
                          features_default: bool = False) -> None:
    """What :func:`check_examples` can tell of Parquet files from their schemas alone
    (``{file: schema}``), for all of them at once: an ``x`` that is not a list of integers or
    floats, a ``y`` that is not an integer, examples of a fixed width other than ``n_features``
    (``features_from`` says where that was set; ``features_default``: it was not, and is a
    default), and integer pixels in some files beside floats in others. Raises
    :class:`iterreduce.fs.InputError` naming the files."""
    from iterreduce.fs import _some as some

    bad_x: dict[str, list[str]] = {}
    bad_y: dict[str, list[str]] = {}
    widths: dict[int, list[str]] = {}
    kinds: dict[bool, list[str]] = {}
    for f, schema in schemas.items():
        if "x" in schema.names:
            t = schema.field("x").type
            if not _examples_type(t):
                bad_x.setdefault(str(t), []).append(f)
                continue
            kinds.setdefault(pa.types.is_floating(t.value_type), []).append(f)
            if pa.types.is_fixed_size_list(t) and n_features is not None and t.list_size != n_features:
                widths.setdefault(t.list_size, []).append(f)
        if "y" in schema.names and not pa.types.is_integer(schema.field("y").type):
            bad_y.setdefault(str(schema.field("y").type), []).append(f)
    problems = [f"column 'x' is {t} in {some(files)}: expected a list per example of integer pixels 0..255 "
                "(fixed_size_list<uint8>[d]) or of floats in [0, 1]" for t, files in bad_x.items()]
    problems += [f"column 'y' is {t} in {some(files)}: expected integer labels" for t, files in bad_y.items()]
    for width, files in widths.items():
        problems.append(f"column 'x' has {width} values per example in {some(files)}, "
                        f"{_expected(n_features, features_from, features_default)}")
    if len(kinds) > 1:
        problems.append(f"column 'x' holds {_KINDS[False]} in {some(kinds[False])} but {_KINDS[True]} in "
                        f"{some(kinds[True])}: give data of one kind")
    if problems:
        raise InputError("; ".join(problems))


def table_to_arrays(table: pa.Table, n_features: int | None = None,
                    classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert a table with ``x`` (a list of integer pixels 0..255 per example,
    ``fixed_size_list<uint8>[d]`` as written here, or of floats in [0, 1]) and optional ``y``.

    Returns ``(x uint8 [n, d] pixels, or float32 [n, d] for float features; y int64 [n] or
    None)`` without a per-row loop. The
    table is checked first with :func:`check_examples` (``n_features``, ``classes``).
    """
    check_examples(table, n_features, classes)
    return _to_arrays(table, n_features)


def _to_arrays(table: pa.Table, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`table_to_arrays` of a table :func:`check_examples` has already passed."""
    col = table.column("x").combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty table
        col = pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], type=col.type)
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
        if col.offset:  # flatten() honours the offset; values does not
            flat = col.flatten()
        else:
            flat = col.values.slice(0, len(col) * d)
    else:
        flat = col.flatten()
        d = len(flat) // len(col) if len(col) else (n_features or 0)
    dtype = np.float32 if pa.types.is_floating(col.type.value_type) else np.uint8
    x = flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(col), d)
    y = None
    if "y" in table.column_names:
        y = table.column("y").to_numpy().astype(np.int64, copy=False)
    return x, y


def _parquet_files(path: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The files that ``path`` names: a directory's own ``*.parquet`` (sorted by name; not
    its subdirectories' or other files), a file, or a list of files; local paths or URIs
    alike, listed through :mod:`iterreduce.fs`."""
    import pyarrow.fs as pafs

    from iterreduce.fs import filesystem

    if not isinstance(path, (str, os.PathLike)):
        return [str(q) for q in path]
    name = str(path)
    name = name.rstrip("/") or name
    fs, where = filesystem(name)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{name} does not exist")
    if info.type != pafs.FileType.Directory:
        return [name]
    files = sorted(f"{name}/{i.base_name}" for i in fs.get_file_info(pafs.FileSelector(where))
                   if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no .parquet files in {name}")
    return files


def read_parquet_dir(
    path: str | os.PathLike | Iterable[str | os.PathLike],
    n_features: int | None = None,
    classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read all ``*.parquet`` shards of a directory (sorted by name), a file, or
    a list of files, local or at a URI (``webhdfs://``, ``hdfs://``, ...), through
    :mod:`iterreduce.fs` as a job reads its input. Returns ``(x uint8 [n, d] pixels, or
    float32 [n, d] for float features; y int64 [n] or None)``; a bad example
    (:func:`check_examples`, with ``n_features`` and ``classes``) is refused naming its file
    and row."""
    from iterreduce.fs import FilePiece, read_split

    pieces = [FilePiece(f) for f in _parquet_files(path)]
    # check_examples refuses null examples, pixels and labels in its own words
    return _to_arrays(read_split(pieces, None, check=examples_check(n_features, classes), nulls=True), n_features)


def prepare_mnist(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_shards: int = 4,
    validation: int = 10000,
    verify: bool = True,
) -> dict:
    """Turn the MNIST IDX files in ``data_dir`` into Parquet shards in ``out_dir``.

    Writes ``out_dir/train/`` (the first 60000-validation train images, split
    into ``num_shards`` shards), ``out_dir/validation/`` (the last ``validation``
    train images, one shard), ``out_dir/test/`` (the 10000 test images, one
    shard) and ``out_dir/meta.json`` (counts and source checksums). The order
    of the original files is kept, so the output is deterministic.
    Returns the metadata dict. ``verify``: as :func:`load_mnist`.
    """
    x_tr, y_tr, x_te, y_te = load_mnist(data_dir, verify)
    n_train = len(x_tr) - validation
    out = Path(out_dir)
    splits = {
        "train": (x_tr[:n_train], y_tr[:n_train], num_shards),
        "validation": (x_tr[n_train:], y_tr[n_train:], 1),
        "test": (x_te, y_te, 1),
    }
    meta: dict = {"dataset": "mnist" if verify else "idx (MNIST's format and names, not verified as MNIST)",
                  "n_features": int(x_tr.shape[1]), "splits": {},
                  "source_sha256": dict(MNIST_SHA256) if verify else None}
    for name, (x, y, shards) in splits.items():
        if len(x) == 0:
            continue
        d = out / name
        if d.exists():
            for old in d.glob("*.parquet"):
                old.unlink()
        paths = write_parquet_shards(x, y, d, shards)
        meta["splits"][name] = {
            "rows": int(len(x)),
            "files": [p.name for p in paths],
            "label_counts": np.bincount(y, minlength=10).tolist(),
        }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
