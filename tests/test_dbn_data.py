"""Tests of dbn.data (IDX, MNIST, Parquet shards), dbn.model and dbn.plots."""

from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dbn
from dbn import data as D
from dbn import network as N
from dbn import plots
from dbn.model import META_KEY, Model, export_features, load, save

MNIST_DIR = (Path(__file__).parents[1] / ".." / "shared" / "data" / "mnist").resolve()
README_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason=f"MNIST not found at {MNIST_DIR}"
)


@pytest.fixture(scope="module")
def mnist():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return D.load_mnist(MNIST_DIR)


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    be = arr.astype(arr.dtype.newbyteorder(">"))
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + be.tobytes()


# ----------------------------------------------------------------------- IDX


@pytest.mark.parametrize(
    "dtype,code", [("u1", 0x08), ("i1", 0x09), ("i2", 0x0B), ("i4", 0x0C), ("f4", 0x0D), ("f8", 0x0E)]
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_all_types(tmp_path, dtype, code, gz):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    raw = _idx_bytes(arr, code)
    p = tmp_path / "a.idx"  # name without .gz: compression detected from magic bytes
    p.write_bytes(gzip.compress(raw) if gz else raw)
    out = D.read_idx(p)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_bad_magic_names_file_and_position(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(D.IDXError, match=r"bad\.idx.*byte 0"):
        D.read_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(D.IDXError, match=r"bad\.idx.*type code 0x07 at byte 2"):
        D.read_idx(p)


def test_read_idx_truncated_names_file_and_position(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = _idx_bytes(arr, 0x08)
    p = tmp_path / "trunc-images.gz"
    p.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(D.IDXError, match=rf"trunc-images\.gz: truncated data at byte {len(raw) - 100}"):
        D.read_idx(p)
    p.write_bytes(raw[:10])  # inside the dimension header
    with pytest.raises(D.IDXError, match=r"trunc-images\.gz: truncated header at byte 10"):
        D.read_idx(p)
    p.write_bytes(gzip.compress(raw)[:-20])  # gzip stream cut short
    with pytest.raises(D.IDXError, match=r"trunc-images\.gz"):
        D.read_idx(p)


def test_read_idx_corrupt_gzip_and_huge_shapes_name_the_file(tmp_path):
    raw = gzip.compress(_idx_bytes(np.arange(600, dtype=np.uint8).reshape(2, 300), 0x08))
    p = tmp_path / "flipped.gz"
    corrupt = bytearray(raw)
    corrupt[10] ^= 0xFF  # the first deflate block's header: zlib.error, not an OSError
    p.write_bytes(bytes(corrupt))
    with pytest.raises(D.IDXError, match=r"flipped\.gz: corrupt gzip stream"):
        D.read_idx(p)
    # dimensions whose product wraps an int64 (2^31 * 2^31 * 4 = 2^64): no data, not an odd reshape error
    p.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 2**31, 2**31, 4))
    with pytest.raises(D.IDXError, match=r"flipped\.gz: truncated data at byte 16: shape \(2147483648, 2147483648, 4\)"):
        D.read_idx(p)


@needs_mnist
def test_mnist_files_checksums_and_label_counts(mnist):
    x_tr, y_tr, x_te, y_te = mnist
    assert x_tr.shape == (60000, 784) and x_tr.dtype == np.uint8
    assert x_te.shape == (10000, 784) and x_te.dtype == np.uint8
    assert y_tr.dtype == np.int64 and y_te.dtype == np.int64 and y_te.shape == (10000,)
    assert np.bincount(y_tr, minlength=10).tolist() == README_COUNTS
    assert 0 < x_tr.mean() < 255


@needs_mnist
def test_mnist_checksum_mismatch_names_file(tmp_path):
    raw = bytearray(gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # still a valid IDX file, wrong content
    p = tmp_path / "t10k-labels-idx1-ubyte"  # uncompressed variant of the name
    p.write_bytes(bytes(raw))
    with pytest.raises(D.ChecksumError, match=r"t10k-labels-idx1-ubyte: sha256"):
        D.read_mnist_file(p)
    assert D.read_mnist_file(MNIST_DIR / "t10k-labels-idx1-ubyte.gz").shape == (10000,)
    assert D.read_mnist_file(p, verify=False)[92] == raw[100]  # (8 header bytes) another dataset in MNIST's form: read as it is
    p.write_bytes(bytes(raw[:5000]))  # cut short: said so, not a checksum mismatch
    with pytest.raises(D.IDXError, match=r"t10k-labels-idx1-ubyte: truncated data at byte 5000"):
        D.read_mnist_file(p)
    images = gzip.decompress((MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    p.write_bytes(images)  # the images under the labels' name: said so, not a size puzzle
    with pytest.raises(D.IDXError, match=r"t10k-labels-idx1-ubyte: an IDX file of 3 dimension\(s\) \(magic 0x0803 "
                                         r"at byte 2\), where MNIST's labels file has 1: images and labels swapped\?"):
        D.read_mnist_file(p)


def test_load_mnist_missing_dir_mentions_data_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data DIR on the command line.*leave --data out to download"):
        D.load_mnist(tmp_path)


def test_load_mnist_takes_the_mirrors_other_file_names(tmp_path):
    import gzip

    for fname in D.MNIST_FILES.values():  # train-images.idx3-ubyte, uncompressed, as some mirrors ship them
        raw = gzip.decompress((MNIST_DIR / fname).read_bytes())
        (tmp_path / fname[:-3].replace("-idx", ".idx")).write_bytes(raw)
    x_tr, y_tr, x_te, y_te = D.load_mnist(tmp_path)
    ref = D.load_mnist(MNIST_DIR)
    for a, b in zip((x_tr, y_tr, x_te, y_te), ref):
        np.testing.assert_array_equal(a, b)


def test_mnist_dbn_command_refuses_misplaced_options_and_names_missing_files(tmp_path):
    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "mnist_dbn.py")]
    res = subprocess.run([*script, "--data", str(tmp_path), "prepare"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--data before the sub-command: put options after it" in res.stderr
    res = subprocess.run([*script, "prepare", "--data", str(tmp_path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"MNIST file {tmp_path / 'train-images-idx3-ubyte.gz'} not found" in res.stderr
    res = subprocess.run([*script, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--out with training needs --job: the example job files read data/mnist" \
        in res.stderr
    assert not (tmp_path / "out").exists()


@needs_mnist
def test_another_dataset_in_mnists_form_is_refused_with_the_way_out_then_prepared(tmp_path):
    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "mnist_dbn.py")]
    (tmp_path / "fashion").mkdir()
    for fname in D.MNIST_FILES.values():  # another dataset in MNIST's names: refused with the way out, then read
        raw = bytearray(gzip.decompress((MNIST_DIR / fname).read_bytes()))
        raw[-1] ^= 1
        (tmp_path / "fashion" / fname[:-3]).write_bytes(bytes(raw))
    res = subprocess.run([*script, "prepare", "--data", str(tmp_path / "fashion"), "--out", str(tmp_path / "f")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Fashion-MNIST say? `prepare --no-verify` reads it" in res.stderr, res.stderr
    res = subprocess.run([*script, "prepare", "--no-verify", "--data", str(tmp_path / "fashion"), "--out",
                          str(tmp_path / "f")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "f" / "meta.json").read_text())["source_sha256"] is None


def test_download_fails_fast_and_clearly(tmp_path):
    t = time.time()
    with pytest.raises(RuntimeError) as e:
        D.download_mnist(tmp_path / "mnist", mirrors=("http://127.0.0.1:9/",), timeout=5)
    assert time.time() - t < 10
    msg = str(e.value)
    assert "--data DIR" in msg and str((tmp_path / "mnist").resolve()) in msg
    assert "127.0.0.1:9" in msg


@needs_mnist
def test_download_from_file_mirror_verifies_checksums(tmp_path):
    # urllib also speaks file://, so the local copy can stand in for a mirror
    dest = D.download_mnist(tmp_path / "dl", mirrors=("http://127.0.0.1:9/", MNIST_DIR.as_uri() + "/"))
    assert sorted(p.name for p in dest.iterdir()) == sorted(D.MNIST_SHA256)
    assert D.read_mnist_file(dest / "train-labels-idx1-ubyte.gz").shape == (60000,)
    # a corrupted "mirror" is rejected with the checksum error in the message
    bad = tmp_path / "badmirror"
    bad.mkdir()
    for name in D.MNIST_SHA256:
        (bad / name).write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    with pytest.raises(RuntimeError, match="sha256"):
        D.download_mnist(tmp_path / "dl2", mirrors=(bad.as_uri() + "/",))
    # a corrupt gzip already there, and one on the first mirror: replaced from the next mirror
    name = "t10k-labels-idx1-ubyte.gz"
    broken = bytearray((MNIST_DIR / name).read_bytes())
    broken[10] ^= 0xFF  # zlib.error
    (bad / name).write_bytes(bytes(broken))
    (tmp_path / "dl" / name).write_bytes(bytes(broken))
    D.download_mnist(tmp_path / "dl", mirrors=(bad.as_uri() + "/", MNIST_DIR.as_uri() + "/"))
    assert (tmp_path / "dl" / name).read_bytes() == (MNIST_DIR / name).read_bytes()


# ------------------------------------------------------------------- Parquet


def test_parquet_shards_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1234, 17), dtype=np.uint8)
    y = rng.integers(0, 10, 1234).astype(np.int64)
    paths = D.write_parquet_shards(x, y, tmp_path / "s", 3, row_group_size=100)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    schema = pq.read_schema(paths[0])
    assert schema.field("x").type == pa.list_(pa.uint8(), 17)
    assert schema.field("y").type == pa.int64()
    assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 5
    x2, y2 = D.read_parquet_dir(tmp_path / "s")
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    # files list, and a sliced table (non-zero offset) converts correctly
    x3, y3 = D.read_parquet_dir([paths[1]])
    t = pq.read_table(paths[0])
    xs, ys = D.table_to_arrays(t.slice(7, 50))
    np.testing.assert_array_equal(xs, x[7:57])
    np.testing.assert_array_equal(ys, y[7:57])
    assert [pq.read_metadata(q).num_rows for q in paths] == [411, 412, 411]
    np.testing.assert_array_equal(x3, x[411:823])
    # without labels
    D.write_parquet_shards(x, None, tmp_path / "nolab", 1)
    x4, y4 = D.read_parquet_dir(tmp_path / "nolab")
    assert y4 is None and x4.shape == (1234, 17)


def _examples(x_col, y=None):
    cols = {"x": x_col}
    if y is not None:
        cols["y"] = pa.array(y, pa.int64()) if not isinstance(y, pa.Array) else y
    return pa.table(cols)


def _pixels(n=6, d=4, values=None, type=pa.uint8()):
    vals = np.arange(n * d) % 200 if values is None else values
    return pa.FixedSizeListArray.from_arrays(pa.array(vals, type), d)


_BAD_EXAMPLES = {
    # name: (table, row of the bad example in it or None when the columns are wrong as a whole, message)
    "label out of range": (_examples(_pixels(), [0, 1, 2, 3, 10, 5]), 4, "label 10 is not a class of 0..9"),
    "negative label": (_examples(_pixels(), [0, 1, -1, 3, 4, 5]), 2, "label -1 is not a class of 0..9"),
    "null label": (_examples(_pixels(), pa.array([0, 1, 2, None, 4, 5], pa.int64())), 3, "the label y is null"),
    "null example": (_examples(pa.array([[1] * 4, [2] * 4, None, [1] * 4, [1] * 4, [1] * 4],
                                        pa.list_(pa.uint8(), 4)), [0] * 6), 2, "the example x is null"),
    "null pixel": (_examples(pa.array([[1] * 4, [2] * 4, [3] * 4, [1] * 4, [1, None, 1, 1], [1] * 4],
                                      pa.list_(pa.uint8(), 4)), [0] * 6), 4, "x has a null pixel"),
    "pixel above 255": (_examples(_pixels(values=np.r_[np.zeros(21), 300, 0, 0], type=pa.int32()), [0] * 6),
                        5, "pixel 1 of x (counted from 0) is 300, outside 0..255"),
    "ragged examples": (_examples(pa.array([[1] * 4, [2] * 4, [3] * 4, [4] * 3, [1] * 4, [1] * 4],
                                           pa.list_(pa.uint8())), [0] * 6), 3,
                        "x has 3 values, the examples before it have 4"),
    "float above 1": (_examples(_pixels(values=np.r_[np.zeros(9), 1.5, np.zeros(14)], type=pa.float32()), [0] * 6),
                      2, "value 1 of x (counted from 0) is 1.5, outside [0, 1] (float features are taken as they are: "
                      "scale them to [0, 1])"),
    "NaN feature": (_examples(_pixels(values=np.r_[np.zeros(13), np.nan, np.zeros(10)], type=pa.float64()),
                              [0] * 6), 3, "value 1 of x (counted from 0) is NaN"),
    "string values": (_examples(pa.array([["a"] * 4] * 6, pa.list_(pa.string(), 4)), [0] * 6), None,
                      "column 'x': expected a list per example of integer pixels 0..255 (fixed_size_list<uint8>[d]) "
                      "or of floats in [0, 1], got fixed_size_list<element: string>[4]"),
    "wrong width": (_examples(_pixels(d=3, n=8), [0] * 8), None, "column 'x' has 3 values per example, 4 are expected"),
    "float labels": (_examples(_pixels(), pa.array([0.0] * 6)), None, "column 'y': expected integer labels, got double"),
}


@pytest.mark.parametrize("case", list(_BAD_EXAMPLES))
def test_bad_example_is_refused_naming_the_file_and_its_row(tmp_path, case):
    from functools import partial

    from iterreduce.fs import FilePiece, InputError, RecordError, read_split

    table, row, words = _BAD_EXAMPLES[case]
    path = tmp_path / "part-00000.parquet"
    floats = pa.types.is_floating(table.schema.field("x").type.value_type)
    good = _examples(_pixels(n=5, values=np.linspace(0, 1, 20), type=pa.float32()) if floats else _pixels(n=5),
                     [0] * 5).cast(table.schema) if row is not None else None
    # a good row group first, so that the row in the file differs from the row in its group
    with pq.ParquetWriter(path, table.schema) as w:
        if good is not None:
            w.write_table(good)
        w.write_table(table)
    check = partial(D.check_examples, n_features=4, classes=10)
    with pytest.raises(InputError) as err:
        read_split([FilePiece(str(path))], check=check)
    with pytest.raises(InputError) as err2:  # dbn.data's own reader names them too
        D.read_parquet_dir(path, n_features=4, classes=10)
    assert str(err2.value) == str(err.value)  # one reader: the same words
    if row is None:  # the columns are wrong as a whole
        assert str(err.value).startswith(f"input file {path}: {words}")
    else:
        assert isinstance(err.value, RecordError) and err.value.row == 5 + row
        assert str(err.value) == f"input file {path}, row {5 + row}: {words}"


def test_good_examples_of_other_integer_and_list_types_convert():
    t = _examples(pa.array([[0, 255, 7], [1, 2, 3]], pa.list_(pa.int64())), [9, 0])
    x, y = D.table_to_arrays(t, n_features=3, classes=10)
    assert x.dtype == np.uint8 and x.tolist() == [[0, 255, 7], [1, 2, 3]] and y.tolist() == [9, 0]


@pytest.mark.parametrize("y,words", [([0, 1.5], "y row 1 is 1.5"), ([np.nan, 1.0], "y row 0 is nan"),
                                     ([3, -1], "y row 1 is -1"), (["a", "b"], "y row 0 is 'a'")])
def test_shards_refuse_labels_that_are_not_class_numbers(tmp_path, y, words):
    with pytest.raises(ValueError, match=f"^{words}: labels must be class numbers"):
        D.write_parquet_shards(np.zeros((2, 3), np.uint8), np.array(y), tmp_path / "s", 1)
    assert not list((tmp_path / "s").glob("*.parquet"))
    with pytest.raises(ValueError, match="3 shards of 2 rows would leave some shards empty"):
        D.write_parquet_shards(np.zeros((2, 3), np.uint8), np.array([0, 1]), tmp_path / "s", 3)
    D.write_parquet_shards(np.zeros((2, 3), np.uint8), np.array([2.0, 7.0]), tmp_path / "ok", 2)
    assert D.read_parquet_dir(tmp_path / "ok")[1].tolist() == [2, 7]


@pytest.mark.parametrize("x,words", [(np.array([[0, 1.5]]), "x row 0, value 1 is 1.5"),
                                     (np.array([[7, 8], [0, 300]]), "x row 1, value 1 is 300"),
                                     (np.array([[np.nan, 0]]), "x row 0, value 0 is nan")])
def test_shards_refuse_pixels_that_are_not_integers_0_to_255(tmp_path, x, words):
    with pytest.raises(ValueError, match=f"^{words}: pixels must be integers 0..255"):
        D.write_parquet_shards(x, None, tmp_path / "s", 1)
    assert not list((tmp_path / "s").glob("*.parquet"))
    D.write_parquet_shards(np.array([[3.0, 255.0]]), None, tmp_path / "ok", 1)  # whole numbers are fine
    assert D.read_parquet_dir(tmp_path / "ok")[0].tolist() == [[3, 255]]


@needs_mnist
def test_prepare_mnist(tmp_path, mnist):
    meta = D.prepare_mnist(MNIST_DIR, tmp_path, num_shards=3)
    x_tr, y_tr, x_te, y_te = mnist
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["splits"]["train"]["rows"] == 50000 and len(meta["splits"]["train"]["files"]) == 3
    assert meta["source_sha256"] == D.MNIST_SHA256
    xv, yv = D.read_parquet_dir(tmp_path / "validation")
    np.testing.assert_array_equal(xv, x_tr[50000:])
    np.testing.assert_array_equal(yv, y_tr[50000:])
    xt, yt = D.read_parquet_dir(tmp_path / "test")
    np.testing.assert_array_equal(yt, y_te)
    xtr, ytr = D.read_parquet_dir(tmp_path / "train")
    assert np.bincount(np.concatenate([ytr, yv]), minlength=10).tolist() == README_COUNTS
    np.testing.assert_array_equal(xtr[:5], x_tr[:5])


# --------------------------------------------------------------------- model


def _tiny_net(seed=0):
    rng = np.random.default_rng(seed)
    return N.init_net([784, 20, 15, 10], rng, init_std=0.1)


def test_model_round_trip(tmp_path):
    net = _tiny_net()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (200, 784), dtype=np.uint8)
    save(tmp_path / "model.avro", net, {"note": "test", "errors": [0.1, 0.05]})
    m = dbn.load(tmp_path / "model.avro")
    assert isinstance(m, Model) and m.kind == "classifier"
    assert m.sizes == [784, 20, 15, 10] and m.meta["note"] == "test" and m.meta["format"] == "dbn-model"
    assert repr(m) == "<dbn.Model classifier 784-20-15-10>"
    assert set(m.params) == {"W0", "b0", "W1", "b1", "W2", "b2"}
    for k in m.params:
        np.testing.assert_array_equal(m.params[k], net[k])
        assert m.params[k].dtype == np.float32
    np.testing.assert_array_equal(m.predict(x), N.predict(net, x))
    np.testing.assert_allclose(m.predict(x.astype(np.float32) / 255), N.predict(net, x))
    f = m.features(x, 1)
    assert f.shape == (200, 20) and f.dtype == np.float32
    np.testing.assert_array_equal(m.features(x, -1), m.features(x, 2))
    with pytest.raises(ValueError):
        m.features(x, 3)
    # velocities, file objects, and the raw Avro structure
    buf = io.BytesIO()
    save(buf, net, include_velocities=True)
    buf.seek(0)
    import fastavro

    r = fastavro.reader(io.BytesIO(buf.getvalue()))
    recs = list(r)
    assert {rec["name"] for rec in recs} >= {"dW0", "db2"}
    assert json.loads(r.metadata[META_KEY])["sizes"] == [784, 20, 15, 10]
    assert recs[0]["dtype"] == "<f4" and recs[0]["shape"] == [784, 20]
    assert load(buf).params["dW0"].shape == (784, 20)


def test_model_stack_and_export_features(tmp_path):
    net = _tiny_net()
    stack = N.DBN([(net["W0"], net["b0"]), (net["W1"], net["b1"])])
    save(tmp_path / "stack.avro", stack)
    s = load(tmp_path / "stack.avro")
    assert s.kind == "stack"
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (300, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 300)
    np.testing.assert_allclose(s.features(x, -1), stack.up(x), rtol=1e-6)
    with pytest.raises(ValueError):
        s.predict(x)
    D.write_parquet_shards(x, y, tmp_path / "in", 2)
    save(tmp_path / "model.avro", net)
    outs = export_features(tmp_path / "model.avro", tmp_path / "in", 2, tmp_path / "out", batch_size=64)
    assert [p.name for p in outs] == ["part-00000.parquet", "part-00001.parquet"]
    t = pq.read_table(tmp_path / "out")
    assert t.schema.field("features").type == pa.list_(pa.float32(), 15)
    f = t.column("features").combine_chunks().values.to_numpy().reshape(-1, 15)
    np.testing.assert_allclose(f, load(tmp_path / "model.avro").features(x, 2), atol=1e-6)
    np.testing.assert_array_equal(t.column("y").to_numpy(), y)


def test_model_header_is_strict_json_and_export_refuses_to_overwrite(tmp_path):
    import fastavro

    save(tmp_path / "m.avro", _tiny_net(), {"validation_error": float("nan"), "curve": [0.5, float("inf")]})
    with open(tmp_path / "m.avro", "rb") as f:
        raw = fastavro.reader(f).metadata[META_KEY]

    def refuse(name):
        raise AssertionError(f"{name} in the header")
    meta = json.loads(raw, parse_constant=refuse)  # as Java's or JavaScript's parsers read it
    assert meta["validation_error"] is None and meta["curve"] == [0.5, None]
    # two directories' part-00000.parquet would land on one output file; out_dir = an input's directory
    x, y = np.zeros((4, 784), np.uint8), np.arange(4)
    for name in ("validation", "test"):
        D.write_parquet_shards(x, y, tmp_path / name, 1)
    both = [tmp_path / "validation" / "part-00000.parquet", tmp_path / "test" / "part-00000.parquet"]
    with pytest.raises(ValueError, match=r"would both be written to .*out/part-00000\.parquet"):
        export_features(tmp_path / "m.avro", both, 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="holds the input"):
        export_features(tmp_path / "m.avro", tmp_path / "test", 1, tmp_path / "test")
    # into a directory that holds another export's files: refused, not mixed with them
    D.write_parquet_shards(np.zeros((6, 784), np.uint8), np.arange(6), tmp_path / "three", 3)
    export_features(tmp_path / "m.avro", tmp_path / "three", 1, tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"out_dir .*mixed already holds 2 other Parquet file\(s\) "
                                         r"\(part-00001\.parquet, part-00002\.parquet\), which a reader"):
        export_features(tmp_path / "m.avro", tmp_path / "test", 1, tmp_path / "mixed")
    export_features(tmp_path / "m.avro", tmp_path / "three", 1, tmp_path / "mixed")  # the same again: replaced
    assert pq.read_table(tmp_path / "mixed").num_rows == 6
    assert pq.read_table(tmp_path / "test").column_names == ["x", "y"]
    # a bad record in the second batch: no file at all, not a readable half
    rows = [[0] * 784 for _ in range(6)]
    rows[4] = None
    t = pa.table({"x": pa.array(rows, pa.list_(pa.uint8(), 784)), "y": pa.array([0, 1, 2, 3, 4, 5])})
    (tmp_path / "bad").mkdir()
    pq.write_table(t, tmp_path / "bad" / "part-00000.parquet")
    with pytest.raises(ValueError, match="part-00000.parquet, row 4: the example x is null"):
        export_features(tmp_path / "m.avro", tmp_path / "bad", 1, tmp_path / "badout", batch_size=3)
    assert list((tmp_path / "badout").iterdir()) == []


def test_model_inputs_are_checked():
    m = Model(_tiny_net())
    with pytest.raises(ValueError, match=r"rows of 784 values, an array \[m, 784\]; got shape \(784,\) \(one"):
        m.predict(np.zeros(784, np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(2, 10\)"):
        m.features(np.zeros((2, 10), np.uint8), 1)
    with pytest.raises(ValueError, match=r"float inputs must be in \[0, 1\].*pass uint8 pixels, or divide by 255"):
        m.predict(np.full((2, 784), 255.0))
    assert m.predict(np.full((2, 784), 1.0)).shape == (2,)
    x = np.random.default_rng(0).integers(0, 256, (3, 784))  # int64 pixels: as uint8
    np.testing.assert_array_equal(m.predict(x), m.predict(x.astype(np.uint8)))
    with pytest.raises(ValueError, match=r"integer inputs are pixels 0..255; these are 300 .. 300"):
        m.predict(np.full((1, 784), 300))


def test_model_rejects_foreign_avro(tmp_path):
    import fastavro

    p = tmp_path / "other.avro"
    with open(p, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema({"type": "record", "name": "R", "fields": [
            {"name": "a", "type": "int"}]}), [{"a": 1}])
    with pytest.raises(ValueError, match="other.avro: not a DBN model"):
        load(p)
    D.write_parquet_shards(np.zeros((2, 3), np.uint8), None, tmp_path / "pq", 1)
    with pytest.raises(ValueError, match=r"part-00000\.parquet: not a DBN model file \(not an Avro"):
        load(tmp_path / "pq" / "part-00000.parquet")
    # a record whose bytes do not fill its shape names the array
    buf = io.BytesIO()
    fastavro.writer(buf, fastavro.parse_schema(dbn.model.SCHEMA),
                    [{"name": "W0", "dtype": "<f4", "shape": [3, 4], "data": bytes(8)}],
                    metadata={META_KEY: json.dumps({"format": "dbn-model", "version": 1})})
    buf.seek(0)
    with pytest.raises(ValueError, match=r"array 'W0' \(record 0\) is damaged"):
        load(buf)


def _rewrite(src, dst, recs=None, meta=None):
    """``src``'s model file with its records and header changed as given."""
    import fastavro

    with open(src, "rb") as f:
        r = fastavro.reader(f)
        old_meta, old_recs = json.loads(r.metadata[META_KEY]), list(r)
    meta = {**old_meta, **(meta or {})}
    with open(dst, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(dbn.model.SCHEMA), recs(old_recs) if recs else old_recs,
                        codec="deflate", metadata={META_KEY: json.dumps(meta)})
    return dst


def test_model_file_damage_is_found(tmp_path):
    net = _tiny_net()
    p = tmp_path / "model.avro"
    save(p, net)
    raw = p.read_bytes()
    save(tmp_path / "again.avro", dict(net))
    assert (tmp_path / "again.avro").read_bytes() == raw  # same model, same bytes (no random sync marker)
    # one flipped byte anywhere in the arrays: refused (deflate has no checksum; the header's sha256 does)
    header_end = raw.index(b"NamedArray") + 300
    found = 0
    for frac in (0.3, 0.5, 0.8, 0.95):
        pos = max(header_end, int(len(raw) * frac))
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        (tmp_path / "flip.avro").write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=r"flip\.avro: ") as e:
            load(tmp_path / "flip.avro")
        found += "checksum" in str(e.value)
    assert found  # at least one flip decodes to other numbers and only the checksum sees it
    for cut in (len(raw) // 2, len(raw) - 10):
        (tmp_path / "cut.avro").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"cut\.avro: the model file is truncated or damaged"):
            load(tmp_path / "cut.avro")


def test_model_structure_is_checked(tmp_path):
    p = tmp_path / "model.avro"
    save(p, _tiny_net())
    drop = lambda *names: (lambda recs: [r for r in recs if r["name"] not in names])  # noqa: E731
    cases = {
        "no-w1": (drop("W1"), {"sha256": None}, r"arrays \['b1', 'W2', 'b2'\]|arrays \['W2', 'b1', 'b2'\]"),
        "listed": (drop("W1"), None, r"lacks the arrays \['W1'\] that its header lists"),
        "no-b2": (drop("b2"), {"sha256": None}, r"has W2 but no b2"),
        "reshaped": (lambda recs: [dict(r, shape=[10, 30]) if r["name"] == "W1" else r for r in recs],
                     {"sha256": None}, r"b1 has shape \[15\], W1 \[10, 30\] needs \[30\]"),
        "sizes": (None, {"sizes": [1, 2, 3]}, r"the header says the layers are \[1, 2, 3\], the arrays are "
                                              r"\[784, 20, 15, 10\]"),
        "v2": (None, {"version": 2}, r"model format version 2; .*upgrade dbn"),
        "kind": (None, {"kind": "regressor"}, r"unknown model kind 'regressor'"),
    }
    for name, (recs, meta, msg) in cases.items():
        q = _rewrite(p, tmp_path / f"{name}.avro", recs, meta)
        with pytest.raises(ValueError, match=rf"{name}\.avro: ") as e:
            load(q)
        assert __import__("re").search(msg, str(e.value)), (name, str(e.value))
    assert load(_rewrite(p, tmp_path / "ok.avro")).sizes == [784, 20, 15, 10]  # the rewrite itself is fine


def test_model_inputs_labels_and_layers(tmp_path):
    m = Model(_tiny_net())
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (50, 784), dtype=np.uint8)
    y = m.predict(x)
    y[:5] = (y[:5] + 1) % 10
    np.testing.assert_array_equal(m.predict(x.reshape(50, 28, 28)), m.predict(x))  # images: flattened
    assert m.error_rate(x, y) == 0.1 and m.error_rate(x, y[:, None]) == 0.1
    with pytest.raises(ValueError, match=r"one label per example, shape \[50\]; got shape \(50, 10\) \(one-hot"):
        m.error_rate(x, np.eye(10)[y])
    with pytest.raises(ValueError, match=r"shape \[50\]; got shape \(49,\)"):
        m.error_rate(x, y[:49])
    for outside in (12, -1):  # a label the model cannot give is no error of the model's
        wrong = y.copy()
        wrong[[3, 9]] = outside
        with pytest.raises(ValueError, match=rf"label {outside} of example 3 is not a class of the model \(0\.\.9\); "
                                             r"2 labels are outside"):
            m.error_rate(x, wrong)
    for bad in (1.0, "1", True):
        with pytest.raises(ValueError, match="layer must be an integer"):
            m.features(x, bad)
    assert m.features(x, np.int64(1)).shape == (50, 20)
    f = x.astype(np.float32) / 255
    f[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"example 7 holds NaN or infinity"):
        m.predict(f)
    with pytest.raises(ValueError, match="pre-trained stack without an output layer: it gives features"):
        Model(m.params, {"kind": "stack"}).predict(x)


def test_export_features_columns(tmp_path):
    net = _tiny_net()
    save(tmp_path / "m.avro", net)
    x = np.random.default_rng(4).integers(0, 256, (6, 784), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": pa.array([f"r{i}" for i in range(6)]),
                             "x": pa.array(list(x), pa.list_(pa.uint8(), 784)),
                             "y": pa.array(np.arange(6), pa.int32())}), tmp_path / "in" / "a.parquet")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        export_features(tmp_path / "m.avro", tmp_path / "in", 5, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export_features(tmp_path / "m.avro", tmp_path / "in", 1, tmp_path / "out", batch_size=4)
    t = pq.read_table(tmp_path / "out" / "a.parquet")
    assert t.column_names == ["features", "y", "id"]
    assert t.column("id").to_pylist() == [f"r{i}" for i in range(6)] and t.column("y").to_pylist() == list(range(6))
    (tmp_path / "img").mkdir()
    pq.write_table(pa.table({"image": pa.array(list(x), pa.list_(pa.uint8(), 784)), "label": np.arange(6)}),
                   tmp_path / "img" / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet: no column 'x' \(the examples\); its columns are "
                                         r"\['image', 'label'\]"):
        export_features(tmp_path / "m.avro", tmp_path / "img", 1, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------- plots


def _parse_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + n
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    w, h, depth, ct, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    ch = {0: 1, 2: 3}[ct]
    assert depth == 8 and len(raw) == h * (1 + w * ch)
    return w, h, ct


def test_png_writer_round_trip(tmp_path):
    g = np.arange(12 * 7, dtype=np.uint8).reshape(7, 12)
    plots.write_png(tmp_path / "g.png", g)
    assert _parse_png(tmp_path / "g.png") == (12, 7, 0)
    np.testing.assert_array_equal(plots.read_png(tmp_path / "g.png"), g)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 9, 3), dtype=np.uint8)
    plots.write_png(tmp_path / "c.png", rgb)
    assert _parse_png(tmp_path / "c.png") == (9, 5, 2)
    np.testing.assert_array_equal(plots.read_png(tmp_path / "c.png"), rgb)


def test_filter_grid_png(tmp_path):
    W = np.random.default_rng(0).standard_normal((784, 150)).astype(np.float32)
    plots.filter_grid_png(W, tmp_path / "f.png", max_filters=100, scale=1)
    w, h, ct = _parse_png(tmp_path / "f.png")
    assert (w, h, ct) == (10 * 29 + 1, 10 * 29 + 1, 0)
    img = plots.read_png(tmp_path / "f.png")
    tile = img[1:29, 1:29]
    assert tile.min() == 0 and tile.max() == 255  # normalised per filter


def test_learning_curves_png(tmp_path):
    series = {"train": [0.3, 0.1, 0.05, 0.04], "validation": [0.35, 0.15, 0.09, float("nan")],
              "flat": [0.2] * 4}
    plots.learning_curves_png(series, tmp_path / "lc.png", "Error rate", size=(500, 300))
    assert _parse_png(tmp_path / "lc.png") == (500, 300, 2)
    img = plots.read_png(tmp_path / "lc.png")
    for c in plots.COLORS[:3]:
        assert (img == np.array(c, np.uint8)).all(axis=2).sum() > 20  # each line drawn
    plots.learning_curves_png({}, tmp_path / "empty.png", "")
    _parse_png(tmp_path / "empty.png")


def test_float_features_in_0_1_are_read_as_float32_and_not_mixed_with_pixels(tmp_path):
    from iterreduce.fs import InputError

    rng = np.random.default_rng(3)
    feats = rng.random((6, 4))  # float64 features in [0, 1): tabular data, not images
    pq.write_table(_examples(_pixels(values=feats.ravel(), type=pa.float64()), [1, 0, 1, 0, 1, 0]),
                   tmp_path / "a.parquet")
    x, y = D.read_parquet_dir(tmp_path, n_features=4, classes=2)
    assert x.dtype == np.float32 and np.array_equal(x, feats.astype(np.float32)) and y.tolist() == [1, 0] * 3
    pq.write_table(_examples(_pixels(), [0] * 6), tmp_path / "b.parquet")  # pixels beside them: refused
    with pytest.raises(InputError, match=rf"^input file {tmp_path / 'b.parquet'}: column 'x' holds integer pixels "
                                         r"0\.\.255 \(fixed_size_list<element: uint8>\[4\]\), where the data before "
                                         r"it holds floats in \[0, 1\] \(fixed_size_list<element: double>\[4\]\)"):
        D.read_parquet_dir(tmp_path)


def test_dbn_command_uses_a_saved_model(tmp_path):
    import subprocess
    import sys

    net = _tiny_net()
    save(tmp_path / "m.avro", net, {"metrics": {"test_error": 0.5}})
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (40, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 40)
    D.write_parquet_shards(x, y, tmp_path / "pq", 2)
    # the same examples as IDX files, as MNIST ships them
    with open(tmp_path / "img-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 40, 28, 28) + x.tobytes())
    with open(tmp_path / "lab-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 0x801, 40) + y.astype(np.uint8).tobytes())

    def dbn_cmd(*args):
        return subprocess.run([sys.executable, "-m", "dbn.cli", *map(str, args)], capture_output=True, text=True)

    expect = float(np.mean(N.predict(net, x) != y))
    r = dbn_cmd("evaluate", tmp_path / "m.avro", tmp_path / "pq")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"examples": 40, "errors": round(expect * 40), "error_rate": expect}
    D.write_parquet_shards(x[:7], y[:7], tmp_path / "pq" / "sub", 1)  # not read: a directory's own *.parquet are
    (tmp_path / "pq" / "meta.json").write_text("{}")
    for where in (tmp_path / "pq", f"file://{tmp_path / 'pq'}"):  # a URI is read as the local directory is
        r = dbn_cmd("evaluate", tmp_path / "m.avro", where)
        assert r.returncode == 0 and json.loads(r.stdout) == {"examples": 40, "errors": round(expect * 40),
                                                              "error_rate": expect}, (where, r.stdout, r.stderr)
    r = dbn_cmd("evaluate", tmp_path / "m.avro", tmp_path / "img-idx3-ubyte", "--labels", tmp_path / "lab-idx1-ubyte")
    assert r.returncode == 0 and json.loads(r.stdout)["error_rate"] == expect, r.stderr
    r = dbn_cmd("predict", tmp_path / "m.avro", tmp_path / "pq", "-o", tmp_path / "p.csv")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert r.returncode == 0 and lines[0] == "row,label"
    assert [int(s.split(",")[1]) for s in lines[1:]] == N.predict(net, x).tolist()
    r = dbn_cmd("features", tmp_path / "m.avro", tmp_path / "pq", tmp_path / "f", "--layer", "2")
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / "f").schema.field("features").type == pa.list_(pa.float32(), 15)
    # the IDX files give the same features, and the labels as y, in one file named after the images
    r = dbn_cmd("features", tmp_path / "m.avro", tmp_path / "img-idx3-ubyte", tmp_path / "fi", "--layer", "2",
                "--labels", tmp_path / "lab-idx1-ubyte")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "fi").iterdir()) == ["img-idx3-ubyte.parquet"]
    ti, tp = pq.read_table(tmp_path / "fi"), pq.read_table(tmp_path / "f")
    assert ti.column_names == ["features", "y"] and ti.column("y").to_pylist() == y.tolist()
    assert ti.column("features").to_pylist() == tp.column("features").to_pylist()
    r = dbn_cmd("features", tmp_path / "m.avro", tmp_path / "img-idx3-ubyte", tmp_path / "f")  # holds others
    assert r.returncode == 1 and "already holds 2 other Parquet file(s)" in r.stderr, r.stderr
    with open(tmp_path / "small-idx3-ubyte", "wb") as f:  # 3x3 images for a 784-pixel model: nothing made
        f.write(struct.pack(">IIII", 0x803, 2, 3, 3) + bytes(18))
    r = dbn_cmd("features", tmp_path / "m.avro", tmp_path / "small-idx3-ubyte", tmp_path / "fs")
    assert r.returncode == 1 and "the examples have 9 values each, the model takes 784" in r.stderr, r.stderr
    assert not (tmp_path / "fs").exists()
    r = dbn_cmd("info", tmp_path / "m.avro")
    assert "classifier, layers 784-20-15-10" in r.stdout and "test_error=0.5" in r.stdout
    # mistakes: one line, no traceback
    for args, msg in [(("evaluate", tmp_path / "none.avro", tmp_path / "pq"), "none.avro does not exist"),
                      (("evaluate", tmp_path / "pq" / "part-00000.parquet", tmp_path / "pq"), "not a DBN model"),
                      (("features", tmp_path / "m.avro", tmp_path / "pq", tmp_path / "g", "--layer", "3"),
                       "layer 3 out of range"),
                      (("evaluate", tmp_path / "m.avro", tmp_path / "img-idx3-ubyte"), "has no labels"),
                      (("features", tmp_path / "m.avro", tmp_path / "pq", tmp_path / "h", "--labels",
                        tmp_path / "lab-idx1-ubyte"), "--labels goes with an IDX images file"),
                      (("features", tmp_path / "m.avro", tmp_path / "img-idx3-ubyte", tmp_path / "h", "--labels",
                        tmp_path / "img-idx3-ubyte"), "is not a labels file: it holds an array of shape (40, 28, 28)")]:
        r = dbn_cmd(*args)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_dbn_command_on_an_idx_file_of_no_images(tmp_path):
    import subprocess
    import sys

    save(tmp_path / "m.avro", _tiny_net(), {})
    (tmp_path / "none-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 0, 28, 28))
    (tmp_path / "none-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 0))

    def dbn_cmd(*args):
        return subprocess.run([sys.executable, "-m", "dbn.cli", *map(str, args)], capture_output=True, text=True)

    r = dbn_cmd("evaluate", tmp_path / "m.avro", tmp_path / "none-idx3-ubyte", "--labels", tmp_path / "none-idx1-ubyte")
    assert r.returncode == 1 and "none-idx3-ubyte holds no examples" in r.stderr, r.stderr
    r = dbn_cmd("predict", tmp_path / "m.avro", tmp_path / "none-idx3-ubyte")
    assert r.returncode == 0 and r.stdout == "row,label\n", r.stderr
    r = dbn_cmd("features", tmp_path / "m.avro", tmp_path / "none-idx3-ubyte", tmp_path / "f", "--layer", "2",
                "--labels", tmp_path / "none-idx1-ubyte")
    assert r.returncode == 0, r.stderr
    t = pq.read_table(tmp_path / "f" / "none-idx3-ubyte.parquet")  # an empty file with the columns' types
    assert t.num_rows == 0 and t.schema.field("features").type == pa.list_(pa.float32(), 15), t.schema
    assert t.column_names == ["features", "y"]


def test_a_width_that_the_job_sets_is_named_in_the_message():
    from iterreduce.fs import InputError

    table = _examples(_pixels(d=3, n=8), [0] * 8)
    with pytest.raises(InputError, match=r"^column 'x' has 3 values per example, 4 are expected "
                                         r"\(algorithm\.params\.n_visible is 4\)$"):
        D.check_examples(table, 4, features_from="algorithm.params.n_visible")
    wide = pa.table({f"p{i}": [0] for i in range(784)})  # pixels as columns: the first few named
    with pytest.raises(InputError, match=r"^no column 'x' \(the examples\); its columns are p0, p1, .*, p9 and 774 "
                                         r"more$"):
        D.check_examples(wide)
