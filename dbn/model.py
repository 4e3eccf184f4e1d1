"""The model file (``model.avro``): a trained DBN classifier as named arrays.

Format: an Avro object container file (written with fastavro, ``deflate``
codec) whose records are named numpy arrays::

    {"type": "record", "name": "NamedArray", "namespace": "dbn.model",
     "fields": [
       {"name": "name",  "type": "string"},
       {"name": "dtype", "type": "string"},
       {"name": "shape", "type": {"type": "array", "items": "long"}},
       {"name": "data",  "type": "bytes"}]}

* ``name``: the array's name (see below);
* ``dtype``: numpy dtype string with explicit byte order, always
  little-endian (``"<f4"`` for float32);
* ``shape``: the dimensions, C order;
* ``data``: the raw bytes (``prod(shape) * itemsize`` bytes, C order).

Array names (layer ``i`` = 0 .. L-1, bottom to top; layer L-1 is the softmax
output layer of a classifier):

* ``W{i}`` float32 [n_i, n_{i+1}]: weights; ``n_0`` is the input size (784);
* ``b{i}`` float32 [n_{i+1}]: biases;
* ``dW{i}``, ``db{i}``: momentum velocities, only when saved with
  ``include_velocities=True`` (to resume training).

Hidden units are logistic (sigmoid); the top layer is a softmax when
``meta["kind"] == "classifier"``; for ``"stack"`` (a pre-trained DBN without
output layer) every layer is sigmoid.

The container's header metadata key ``dbn.meta`` holds a JSON object:
``format`` ("dbn-model"), ``version`` (1), ``kind`` ("classifier" or
"stack"), ``sizes`` (layer widths ``[n_0, ..., n_L]``), ``input``
("pixels in [0,1]; uint8 inputs are divided by 255"), plus whatever the
caller passed as ``meta`` (settings, errors, timings ...); numbers that are not
finite (the validation error of a run without a validation set) are ``null``.
``sha256`` maps each array's name to the SHA-256 of its ``data`` bytes: Avro's
``deflate`` codec has no checksum, so :func:`load` checks these and refuses a
damaged file. The sync marker is derived from the contents, so the same model
gives the same bytes. :func:`load` also refuses a file whose arrays are missing,
do not chain (``W{i}`` is [n_i, n_{i+1}], ``b{i}`` is [n_{i+1}]) or disagree with
``sizes``, or whose ``version`` is newer than this code reads.

The forward pass: ``a_0 = x / 255`` (uint8 pixels) or ``x`` (floats in [0, 1]);
``a_{i+1} = sigmoid(a_i @ W{i} + b{i})``; for a classifier the top layer is
``softmax(a_{L-1} @ W{L-1} + b{L-1})`` and the label is its argmax. See also
``docs/model-format.md``.

Inputs to :meth:`Model.predict` / :meth:`Model.features` are uint8 pixels
(0..255, scaled by 1/255) or floats already in [0, 1], one example per row
(``[m, n_0]``; ``[m, 28, 28]`` images are flattened).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import fastavro
import numpy as np

from iterreduce.api import json_text
from iterreduce.fs import verify_checksums

from . import network as _net

__all__ = ["SCHEMA", "META_KEY", "Model", "save", "load", "export_features"]

SCHEMA = {
    "type": "record",
    "name": "NamedArray",
    "namespace": "dbn.model",
    "fields": [
        {"name": "name", "type": "string"},
        {"name": "dtype", "type": "string"},
        {"name": "shape", "type": {"type": "array", "items": "long"}},
        {"name": "data", "type": "bytes"},
    ],
}
META_KEY = "dbn.meta"
FORMAT_VERSION = 1
_PARSED = fastavro.parse_schema(SCHEMA)


class Model:
    """A loaded (or in-memory) DBN model: ``params`` dict and ``meta`` dict."""

    def __init__(self, params: dict[str, np.ndarray], meta: dict[str, Any] | None = None):
        self.params = params
        self.meta = dict(meta or {})
        self.kind = self.meta.get("kind", "classifier")

    def __repr__(self) -> str:
        return f"<dbn.Model {self.kind} {'-'.join(map(str, self.sizes))}>"

    @property
    def n_layers(self) -> int:
        """Weight layers (for a classifier: hidden layers + softmax)."""
        return _net.n_layers(self.params)

    @property
    def sizes(self) -> list[int]:
        return _net.layer_sizes(self.params)

    def _net(self) -> dict:
        if self.kind != "classifier":
            raise ValueError("this model is a pre-trained stack without an output layer: it gives features "
                             "(Model.features), not labels")
        return self.params

    def _input(self, x: Any) -> np.ndarray:
        """``x`` as the model takes it, or a ``ValueError`` saying what is wrong with it."""
        x = np.asarray(x)
        n0 = self.sizes[0]
        if x.ndim > 2 and int(np.prod(x.shape[1:])) == n0:  # images [m, 28, 28]: one row each
            x = x.reshape(len(x), n0)
        if x.ndim != 2 or x.shape[1] != n0:
            one = " (one example: x[None, :])" if x.shape == (n0,) else ""
            raise ValueError(f"the model takes examples as rows of {n0} values, an array [m, {n0}]; "
                             f"got shape {x.shape}{one}")
        if x.dtype == np.uint8:
            return x
        if x.dtype.kind in "iu":  # pixels in a wider integer type (np.array of Python ints, say)
            if x.size and (x.min() < 0 or x.max() > 255):
                raise ValueError(f"integer inputs are pixels 0..255; these are {x.min()} .. {x.max()}")
            return x.astype(np.uint8)
        if x.dtype.kind != "f":
            raise ValueError(f"the model takes uint8 pixels or floats in [0, 1], got {x.dtype}")
        if x.size and not np.isfinite(x).all():
            first = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise ValueError(f"float inputs must be in [0, 1] (pixels / 255); example {first} holds NaN or infinity")
        if x.size and not (x.min() >= 0 and x.max() <= 1):
            raise ValueError(f"float inputs must be in [0, 1] (pixels / 255); these are {float(x.min()):g} .. "
                             f"{float(x.max()):g}: pass uint8 pixels, or divide by 255")
        return x

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities float32 [m, n_classes]; ``x`` uint8 or float [m, n_0]."""
        return _net.predict_proba(self._net(), self._input(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels int64 [m]."""
        return _net.predict(self._net(), self._input(x))

    @property
    def n_hidden_layers(self) -> int:
        return self.n_layers - 1 if self.kind == "classifier" else self.n_layers

    def layer_index(self, layer: int) -> int:
        """Normalise a 1-based / negative hidden-layer index to 1..n_hidden_layers."""
        n_hidden = self.n_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layer must be an integer (1 = first hidden layer, -1 = last), got {layer!r}")
        layer = int(layer)
        k = layer if layer > 0 else n_hidden + 1 + layer
        if not 1 <= k <= n_hidden:
            raise ValueError(f"layer {layer} out of range: the model has {n_hidden} hidden layers")
        return k

    def features(self, x: np.ndarray, layer: int = -1) -> np.ndarray:
        """Activations of hidden layer ``layer``: float32 [m, n_layer].

        ``layer`` is 1-based (1 = first hidden layer); negative values count
        from the top hidden layer (-1 = last hidden layer, i.e. the input of
        the softmax for a classifier, the top of a stack).
        """
        k = self.layer_index(layer)
        x = self._input(x)
        if self.kind == "classifier":
            return _net.hidden_activations(self.params, x, k)
        out = np.empty((len(x), self.sizes[k]), np.float32)
        for lo in range(0, len(x), 10000):
            a = _net._scale_input(x[lo:lo + 10000])
            for i in range(k):
                a = _net.sigmoid(a @ self.params[f"W{i}"] + self.params[f"b{i}"])
            out[lo:lo + 10000] = a
        return out

    def error_rate(self, x: np.ndarray, y: np.ndarray) -> float:
        """The fraction of ``x`` whose predicted label is not ``y`` (one integer label per
        example, ``[m]``; ``[m, 1]`` is taken as ``[m]``; one-hot rows are refused)."""
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        m = len(np.asarray(x)) if np.ndim(x) else 0
        if y.ndim != 1 or len(y) != m:
            raise ValueError(f"error_rate: y must hold one label per example, shape [{m}]; got shape {y.shape}"
                             + (" (one-hot rows? pass y.argmax(axis=1))" if y.ndim == 2 else ""))
        if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.array_equal(y, np.round(y))):
            raise ValueError(f"error_rate: y must be integer class labels, got {y.dtype}")
        classes = self.sizes[-1]
        outside = np.flatnonzero((y < 0) | (y >= classes)) if self.kind == "classifier" else []
        if len(outside):  # it would count as an error, as if the model had got it wrong
            i = int(outside[0])
            raise ValueError(f"error_rate: label {y[i]} of example {i} is not a class of the model (0..{classes - 1})"
                             + (f"; {len(outside)} labels are outside" if len(outside) > 1 else ""))
        return float(np.mean(self.predict(x) != y))


def _params_of(obj: Any) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(obj, Model):
        return obj.params, obj.kind
    if isinstance(obj, _net.DBN):
        p = {}
        for i, (W, b) in enumerate(obj.layers):
            p[f"W{i}"], p[f"b{i}"] = W, b
        return p, "stack"
    if isinstance(obj, dict):
        return obj, "classifier"
    raise TypeError(f"cannot save {type(obj).__name__}: expected a net dict, DBN or Model")


def save(
    path_or_file: str | os.PathLike | BinaryIO,
    net: dict | _net.DBN | Model,
    meta: dict[str, Any] | None = None,
    include_velocities: bool = False,
) -> None:
    """Write ``net`` (classifier param dict, :class:`~dbn.network.DBN` stack or
    :class:`Model`) to an Avro model file; ``meta`` (JSON-serialisable) is
    merged into the header metadata. Paths with ``://`` go through fsspec."""
    params, kind = _params_of(net)
    L = _net.n_layers(params)
    names = [k for i in range(L) for k in (f"W{i}", f"b{i}")]
    if include_velocities:
        names += ["d" + k for k in names if "d" + k in params]
    m = dict(meta or {})
    base_meta = {"format": "dbn-model", "version": FORMAT_VERSION, "kind": kind,
                 "sizes": _net.layer_sizes(params),
                 "input": "pixels in [0,1]; uint8 inputs are divided by 255"}
    if isinstance(net, Model):
        base_meta = {**net.meta, **base_meta}
    m = {**base_meta, **m}
    m["kind"] = kind

    arrays = []
    for name in names:
        a = np.ascontiguousarray(params[name])
        arrays.append((name, a.astype(a.dtype.newbyteorder("<"), copy=False)))
    m["sha256"] = {name: hashlib.sha256(a.tobytes()).hexdigest() for name, a in arrays}
    header = {META_KEY: json_text(m, sort_keys=True)}  # NaN (no validation set) as null
    # the same model, the same bytes: fastavro's default sync marker is random
    sync = hashlib.sha256(header[META_KEY].encode()).digest()[:16]

    def write(f: BinaryIO) -> None:
        records = ({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
                   for name, a in arrays)
        fastavro.writer(f, _PARSED, records, codec="deflate", metadata=header, sync_marker=sync)

    if isinstance(path_or_file, (str, os.PathLike)):
        s = os.fspath(path_or_file)
        if "://" in s:
            import fsspec
            with fsspec.open(s, "wb") as f:
                write(f)
            return
        tmp = s + ".tmp"
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, s)
    else:
        write(path_or_file)


def _read(f: BinaryIO, where: str) -> Model:
    try:
        r = fastavro.reader(f)
        meta = json.loads(r.metadata.get(META_KEY, "{}"))
    except Exception as exc:  # noqa: BLE001 - fastavro's errors for non-Avro bytes are of many kinds
        raise ValueError(f"{where}: not a DBN model file (not an Avro container file: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "dbn-model":
        raise ValueError(f"{where}: not a DBN model file (missing '{META_KEY}' header metadata)")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: '{META_KEY}' has no valid format version (got {version!r}): the header "
                         "is damaged")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where}: model format version {version}; this dbn reads versions 1..{FORMAT_VERSION}: "
                         "a newer dbn wrote it, upgrade dbn to read it")
    kind = meta.get("kind", "classifier")
    if kind not in ("classifier", "stack"):
        raise ValueError(f"{where}: unknown model kind {kind!r} (expected 'classifier' or 'stack')")
    params: dict[str, np.ndarray] = {}
    i, name = 0, None
    try:
        for i, rec in enumerate(r):
            name = rec.get("name", f"record {i}")
            try:
                dt = np.dtype(rec["dtype"])
                a = np.frombuffer(rec["data"], dtype=dt).reshape(rec["shape"])
            except (KeyError, TypeError, ValueError) as exc:
                raise _Damaged(f"array {name!r} (record {i}) is damaged: {exc}") from None
            params[name] = a.astype(dt.newbyteorder("="), copy=True)
            digest = (meta.get("sha256") or {}).get(name)
            if digest is not None and hashlib.sha256(rec["data"]).hexdigest() != digest:
                raise _Damaged(f"array {name!r} (record {i}) is damaged: its bytes do not match the "
                               "checksum in the header")
    except _Damaged as exc:
        raise ValueError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - fastavro's EOFError, "sync marker not found", zlib ...
        after = f" after array {name!r}" if name is not None else ""
        raise ValueError(f"{where}: the model file is truncated or damaged{after} ({type(exc).__name__}: "
                         f"{exc})") from None
    _check_structure(params, meta, kind, where)
    return Model(params, meta)


class _Damaged(Exception):
    pass


def _check_structure(params: dict[str, np.ndarray], meta: dict[str, Any], kind: str, where: str) -> None:
    """Refuse a model whose arrays are missing, do not chain or disagree with ``meta``."""
    missing = sorted(set((meta.get("sha256") or {})) - set(params))
    if missing:
        raise ValueError(f"{where}: the model file lacks the arrays {missing} that its header lists "
                         "(truncated?)")
    L = 0
    while f"W{L}" in params:
        L += 1
    if L == 0:
        raise ValueError(f"{where}: the model file holds no weights (no array 'W0')")
    extra = sorted(k for k in params if k.lstrip("d")[:1] in "Wb" and k.lstrip("d")[1:].isdigit()
                   and int(k.lstrip("d")[1:]) >= L)
    if extra:
        raise ValueError(f"{where}: arrays {extra} have no W{L} below them: the file is damaged")
    for j in range(L):
        W = params[f"W{j}"]
        b = params.get(f"b{j}")
        if W.ndim != 2 or W.dtype.kind != "f":
            raise ValueError(f"{where}: W{j} must be a float matrix, it is {W.dtype} {list(W.shape)}")
        if b is None:
            raise ValueError(f"{where}: the model file has W{j} but no b{j}")
        if b.shape != (W.shape[1],):
            raise ValueError(f"{where}: b{j} has shape {list(b.shape)}, W{j} {list(W.shape)} needs [{W.shape[1]}]")
        if j and W.shape[0] != params[f"W{j - 1}"].shape[1]:
            raise ValueError(f"{where}: W{j} is {list(W.shape)} but W{j - 1} gives {params[f'W{j - 1}'].shape[1]} "
                             "units: the layers do not chain")
    sizes = [params["W0"].shape[0]] + [params[f"W{j}"].shape[1] for j in range(L)]
    if "sizes" in meta and meta["sizes"] != sizes:
        raise ValueError(f"{where}: the header says the layers are {meta['sizes']}, the arrays are {sizes}")


def load(path_or_file: str | os.PathLike | BinaryIO) -> Model:
    """Read a model file written by :func:`save`; returns a :class:`Model`. A file that is
    not one gives a ``ValueError`` naming it."""
    if isinstance(path_or_file, (str, os.PathLike)):
        s = os.fspath(path_or_file)
        if "://" in s:
            import fsspec
            with fsspec.open(s, "rb") as f:
                return _read(io.BytesIO(f.read()), s)
        with open(s, "rb") as f:
            return _read(f, s)
    return _read(path_or_file, getattr(path_or_file, "name", "<file object>"))


def _check_out_dir(out: Path, names: set[str]) -> None:
    """Refuse an ``out_dir`` that is a file or holds Parquet files other than ``names`` (a
    reader of the directory would mix them with the features)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"export_features: out_dir {out} is a file, not a directory")
    others = sorted(p.name for p in out.glob("*.parquet") if p.name not in names) if out.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(f"export_features: out_dir {out} already holds {len(others)} other Parquet file(s) "
                         f"({shown}), which a reader of the directory would mix with these features; write "
                         "them to an empty or new directory")


def export_features_arrays(
    model: Model | str | os.PathLike,
    x: np.ndarray,
    y: np.ndarray | None,
    layer: int,
    out_dir: str | os.PathLike,
    name: str = "features.parquet",
    batch_size: int = 10000,
) -> Path:
    """Write the features of the examples ``x`` (uint8 pixels or floats in [0, 1], one row
    each; an IDX images file as :func:`dbn.data.read_idx` reads it) and their labels ``y``
    (or None) to ``out_dir/name``: columns ``features`` and ``y``, as :func:`export_features`
    writes them, the file appearing when complete. The same ``out_dir`` refusals."""
    if not isinstance(model, Model):
        model = load(model)
    out = Path(out_dir)
    _check_out_dir(out, {name})
    k = model.layer_index(layer)
    x = np.asarray(x)
    x = x.reshape(len(x), math.prod(x.shape[1:]))  # 0 examples too
    if y is not None and len(y) != len(x):
        raise ValueError(f"export_features: {len(y)} labels for {len(x)} examples")
    if x.shape[1] != model.sizes[0]:  # before anything is made
        raise ValueError(f"export_features: the examples have {x.shape[1]} values each, the model takes "
                         f"{model.sizes[0]}")
    out.mkdir(parents=True, exist_ok=True)
    dst = out / name
    _write_features(model, k, ((x[i:i + batch_size], None if y is None else y[i:i + batch_size], {})
                               for i in range(0, len(x), batch_size)), dst, y is not None)
    return dst


def _write_features(model: Model, k: int, batches: Iterable[tuple[np.ndarray, np.ndarray | None, dict]],
                    dst: Path, has_y: bool, extra_fields: Iterable[Any] = ()) -> None:
    """Write the layer-``k`` features of ``batches`` (``(x, y or None, {column: values})``
    each, the columns carried along) to the Parquet file ``dst``, which appears when complete:
    a failure leaves none. No batch: an empty file of those columns (``extra_fields``: the
    carried columns' fields)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = dst.parent / f".{dst.name}.tmp"
    writer = None
    try:
        for x, y, extra in batches:
            f = np.ascontiguousarray(model.features(x, k), dtype=np.float32)
            cols = {"features": pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), f.shape[1])}
            if y is not None:
                cols["y"] = pa.array(np.asarray(y, dtype=np.int64))
            cols.update(extra)
            t = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema, write_page_checksum=True)
            writer.write_table(t)
        if writer is None:  # no examples
            fields = [pa.field("features", pa.list_(pa.float32(), model.sizes[k]))] + \
                ([pa.field("y", pa.int64())] if has_y else []) + list(extra_fields)
            pq.write_table(pa.schema(fields).empty_table(), tmp)
    except BaseException:
        if writer is not None:
            writer.close()
            writer = None
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, dst)


def export_features(
    model: Model | str | os.PathLike,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    layer: int,
    out_dir: str | os.PathLike,
    batch_size: int = 10000,
) -> list[Path]:
    """Map Parquet shards through the model and write hidden features.

    ``inputs``: a directory of ``*.parquet`` shards, a file or a list of files
    with column ``x`` (fixed_size_list<uint8>[d]) and optionally ``y``. For
    each input file an output file of the same name is written to ``out_dir``
    with columns ``features`` (fixed_size_list<float32>[n_layer]), ``y``
    (int64, when present in the input) and every other column of the input (ids and
    the like, unchanged, so the features can be joined back), processed ``batch_size`` rows at a
    time; each file appears when it is complete (a bad record leaves none). Returns the
    output paths. Inputs whose names coincide (the
    ``part-00000.parquet`` of two directories), an ``out_dir`` that holds an input, or one
    that holds other Parquet files (a reader of the directory would mix them with these
    features) are refused with a ``ValueError`` before anything is written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iterreduce.fs import in_file

    from .data import _parquet_files, table_to_arrays

    if not isinstance(model, Model):
        model = load(model)
    out = Path(out_dir)
    sources = [Path(f) for f in _parquet_files(inputs)]
    by_name: dict[str, Path] = {}
    for src in sources:
        if Path(src).resolve().parent == out.resolve():
            raise ValueError(f"export_features: out_dir {out} holds the input {src}: its features would "
                             "overwrite it; write them to another directory")
        if Path(src).name in by_name:
            raise ValueError(f"export_features: inputs {by_name[Path(src).name]} and {src} would both be "
                             f"written to {out / Path(src).name}; export them to separate directories")
        by_name[Path(src).name] = Path(src)
    _check_out_dir(out, set(by_name))
    k = model.layer_index(layer)  # a bad layer is refused before anything is written
    schemas = {}
    for src in sources:
        try:
            schemas[src] = pq.ParquetFile(src).schema_arrow
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"export_features: {src}: not a readable Parquet file: {exc}") from None
        if "x" not in schemas[src].names:
            raise ValueError(f"export_features: {src}: no column 'x' (the examples); its columns are "
                             f"{schemas[src].names}")
        if "features" in schemas[src].names:
            raise ValueError(f"export_features: {src} already has a column 'features' (features of features?)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        pf = pq.ParquetFile(src, page_checksum_verification=verify_checksums())
        names = schemas[src].names
        has_y = "y" in names
        keep = [c for c in names if c not in ("x", "y")]  # ids and the like travel with their rows
        dst = out / Path(src).name

        def batches():  # consumed by _write_features below, before the next file
            row = 0
            for batch in pf.iter_batches(batch_size=batch_size):
                x, y = in_file(str(src), row, lambda: table_to_arrays(
                    pa.Table.from_batches([batch]).select(["x", "y"] if has_y else ["x"]),
                    n_features=model.sizes[0]))
                row += len(x)
                yield x, y, {c: batch.column(c) for c in keep}

        _write_features(model, k, batches(), dst, has_y, [schemas[src].field(c) for c in keep])
        written.append(dst)
    return written
