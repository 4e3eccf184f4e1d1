"""Filesystems and input splits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iterreduce.fs import FilePiece, InputError, filesystem, plan_splits, read_split


def write(path, rows, row_group):
    t = pa.table({"v": np.arange(rows, dtype=np.int64)})
    pq.write_table(t, path, row_group_size=row_group)


def test_splits_are_balanced_by_row_group_and_cover_everything_once(tmp_path):
    write(tmp_path / "a.parquet", 9000, 1000)   # one big file: 9 row groups
    write(tmp_path / "b.parquet", 1000, 1000)
    write(tmp_path / "c.parquet", 2000, 1000)
    splits = plan_splits([str(tmp_path)], 4)
    rows = [sum(p.num_rows for p in s) for s in splits]
    assert sum(rows) == 12000 and max(rows) - min(rows) <= 1000, rows
    values = np.concatenate([read_split(s).column("v").to_numpy() for s in splits])
    assert len(values) == 12000 and len(np.unique(values[:9000])) == 9000


def test_more_splits_than_row_groups_is_refused(tmp_path):
    write(tmp_path / "a.parquet", 100, 100)
    with pytest.raises(InputError, match="1 non-empty row group\\(s\\) cannot make 2 splits"):
        plan_splits([str(tmp_path)], 2)


def test_every_split_gets_a_piece_even_when_one_row_group_dominates(tmp_path):
    write(tmp_path / "a.parquet", 100000, 100000)
    write(tmp_path / "b.parquet", 10, 10)
    write(tmp_path / "c.parquet", 10, 10)
    splits = plan_splits([str(tmp_path)], 3)
    assert all(splits) and sum(sum(p.num_rows for p in s) for s in splits) == 100020


def test_hdfs_without_libhdfs_says_what_to_do():
    with pytest.raises(InputError) as err:
        filesystem("hdfs://127.0.0.1:1/data")
    msg = str(err.value)
    assert "libhdfs" in msg and "webhdfs://127.0.0.1:9870/" in msg


def test_files_whose_columns_cannot_be_read_as_one_are_named_others_are_read(tmp_path, caplog):
    import logging

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dbn.data import read_parquet_dir
    from iterreduce.fs import FilePiece, InputError, plan_splits, read_split

    def piece(name):
        return FilePiece(str(tmp_path / name))

    pq.write_table(pa.table({"x": np.arange(5, dtype=np.float32), "y": np.arange(5)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"y": np.arange(5, dtype=np.int32), "x": np.arange(5.0)}), tmp_path / "b.parquet")
    both = read_split([piece("a.parquet"), piece("b.parquet")])  # another order, int32 / float64: one table
    assert both.num_rows == 10 and both.schema.field("x").type == pa.float64()
    pq.write_table(pa.table({"x": [str(i) for i in range(5)], "y": np.arange(5)}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"input files .*a\.parquet and .*c\.parquet do not have the same columns: "
                                         r"x: float, y: int64 in the one, x: string, y: int64 in the other"):
        read_split([piece("a.parquet"), piece("c.parquet")])
    with pytest.raises(InputError, match=r"the input files' columns do not agree: column 'x' is string in "
                                         r".*c\.parquet, where 2 other file\(s\) have "):
        plan_splits([str(tmp_path)], 1, columns=["x"])  # a column the algorithm reads
    assert len(plan_splits([str(tmp_path)], 1, columns=["y"])) == 1  # one it does not: no matter
    with caplog.at_level(logging.WARNING):  # the algorithm does not say what it reads: a warning
        assert len(plan_splits([str(tmp_path)], 1)) == 1
    assert "the input files' columns do not agree: column 'x' is string in" in caplog.text
    assert "Master.input_columns" in caplog.text
    with pytest.raises(InputError, match=r"^column 'z', which the algorithm reads, is in none of the 3 input "
                                         r"file\(s\); their columns: x, y$"):  # misnamed: not files that differ
        plan_splits([str(tmp_path)], 1, columns=["y", "z"])
    with pytest.raises(InputError, match=r"^columns 'X' \(is it 'x'\?\), 'label', which the algorithm reads, are "
                                         r"in none of the 3"):
        plan_splits([str(tmp_path)], 1, columns=["X", "label"])
    (tmp_path / "c.parquet").unlink()
    pq.write_table(pa.table({"x": np.arange(5.0), "y": np.arange(5), "id": np.arange(5)}), tmp_path / "d.parquet")
    assert len(plan_splits([str(tmp_path)], 3)) == 3  # an extra column: the reader decides
    pq.write_table(pa.table({"x": pa.array([], pa.string())}), tmp_path / "e.parquet")  # empty: its schema aside
    assert len(plan_splits([str(tmp_path)], 3)) == 3
    lists = tmp_path / "lists"
    lists.mkdir()
    pq.write_table(pa.table({"x": pa.array([[1, 2]], pa.list_(pa.uint8(), 2)), "y": [1]}), lists / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([[1, 2]], pa.list_(pa.int64())), "y": [1]}), lists / "b.parquet",
                   use_compliant_nested_type=False)  # list<item: ...> as pyarrow < 13 wrote it
    x, y = read_parquet_dir(lists)
    assert x.tolist() == [[1, 2], [1, 2]] and y.tolist() == [1, 1]
    pq.write_table(pa.table({"x": pa.array([["a", "b"]]), "y": [1]}), lists / "c.parquet")
    with pytest.raises(InputError, match=r"c\.parquet: column 'x': expected a list per example of integer pixels"):
        read_parquet_dir([lists / "a.parquet", lists / "c.parquet"])

def test_hidden_directories_and_empty_row_groups_are_not_input(tmp_path):
    from iterreduce.fs import list_input_files

    write(tmp_path / "a.parquet", 1000, 500)
    for hidden in ("_temporary/0", ".staging"):
        (tmp_path / hidden).mkdir(parents=True)
        write(tmp_path / hidden / "part-0.parquet", 300, 300)  # a failed Spark or Hadoop write's leftovers
    pq.write_table(pa.table({"v": pa.array([], pa.int64())}), tmp_path / "b.parquet")  # an empty partition
    assert [f.rsplit("/", 1)[1] for f in list_input_files([str(tmp_path)])] == ["a.parquet", "b.parquet"]
    splits = plan_splits([str(tmp_path)], 2)
    assert [sum(p.num_rows for p in s) for s in splits] == [500, 500]
    with pytest.raises(InputError, match="2 non-empty row group\\(s\\) cannot make 3 splits"):
        plan_splits([str(tmp_path)], 3)


def test_a_file_that_two_input_paths_reach_is_refused_not_read_twice(tmp_path):
    from iterreduce.fs import list_input_files

    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "a.parquet", 100, 50)
    write(tmp_path / "d" / "b.parquet", 100, 50)
    d, a = str(tmp_path / "d"), str(tmp_path / "d" / "a.parquet")
    with pytest.raises(InputError, match=rf"^input path {d} is given twice: its files would be read twice$"):
        list_input_files([d, d])
    with pytest.raises(InputError, match=rf"^input file {a} is given by both input path {d} and input path {a}: "):
        plan_splits([d, a], 2)
    with pytest.raises(InputError, match=r"is given by both input path .*a\.parquet and input path .*/\./a\.parquet"):
        list_input_files([a, f"{tmp_path}/d/./a.parquet"])
    assert len(list_input_files([a, str(tmp_path / "d" / "b.parquet")])) == 2


def test_a_damaged_page_of_a_file_written_with_checksums_is_named_not_read(tmp_path, monkeypatch):
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"v": np.arange(100_000, dtype=np.float64)}), path, compression="none",
                   write_page_checksum=True)
    assert read_split([FilePiece(str(path))]).num_rows == 100_000
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = b"\0" * 200  # inside the data: the file still opens
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"^input file {path}, row group 0: .*CRC checksum verification failed"):
        read_split([FilePiece(str(path))])
    monkeypatch.setenv("ITERREDUCE_VERIFY_CHECKSUMS", "0")  # for files whose writer got them wrong
    assert read_split([FilePiece(str(path))]).num_rows == 100_000


def test_a_damaged_latest_checkpoint_gives_way_to_the_one_before_it(tmp_path, caplog):
    from iterreduce.fs import Checkpoints

    ck = Checkpoints(str(tmp_path / "ck"), keep=2)
    for step in (3, 4):
        ck.save(step, {"w": np.full(1000, step, np.float32)}, {"step": step})
    newest = tmp_path / "ck" / "ckpt-00000004.npz"
    newest.write_bytes(newest.read_bytes()[:200])  # cut short
    step, arrays, meta = ck.latest()
    assert step == 3 and meta == {"step": 3} and (arrays["w"] == 3).all()
    assert "ckpt-00000004.npz cannot be read" in caplog.text
    older = tmp_path / "ck" / "ckpt-00000003.npz"
    older.write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"no checkpoint can be read: .*ckpt-00000004\.npz .*ckpt-00000003\.npz"):
        ck.latest()


def test_a_checkpoint_left_half_written_is_removed_by_the_next_save(tmp_path):
    from iterreduce.fs import Checkpoints

    ck = Checkpoints(str(tmp_path / "ck"), keep=2)
    ck.save(3, {"w": np.zeros(10, np.float32)}, {"step": 3})
    (tmp_path / "ck" / ".ckpt-00000009.npz.tmp").write_bytes(b"PK half")  # a master killed while it wrote
    (tmp_path / "ck" / ".notes.tmp").write_bytes(b"not ours")
    assert ck.latest()[0] == 3  # not a checkpoint
    ck.save(4, {"w": np.ones(10, np.float32)}, {"step": 4})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".notes.tmp", "ckpt-00000003.npz",
                                                                    "ckpt-00000004.npz"]


def test_the_check_before_submitting_reads_a_checkpoint_s_metadata_only(tmp_path):
    from iterreduce.fs import Checkpoints

    ck = Checkpoints(str(tmp_path / "ck"), keep=2)
    for step in (3, 4):
        ck.save(step, {"w": np.full(250_000, step, np.float32)}, {"step": step})
    assert ck.latest(arrays=False) == (4, {}, {"step": 4})
    newest = tmp_path / "ck" / "ckpt-00000004.npz"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2  # inside the array's member: the zip's directory and the metadata stay whole
    data[middle:middle + 64] = b"x" * 64
    newest.write_bytes(bytes(data))
    assert ck.latest(arrays=False) == (4, {}, {"step": 4})  # the damaged arrays were not read
    step, arrays, meta = ck.latest()  # the master's full read finds the damage and takes the one before
    assert step == 3 and meta == {"step": 3} and (arrays["w"] == 3).all()
    newest.write_bytes(bytes(data[:200]))  # cut short: no directory, so the metadata cannot be found either
    assert ck.latest(arrays=False) == (3, {}, {"step": 3})


def test_master_context_reads_its_own_data_relative_to_the_job_file(tmp_path):
    import logging

    from iterreduce import MasterContext, RecordError
    from iterreduce.fs import Output
    from tests.algos import write_dataset

    data = write_dataset(tmp_path / "jobs" / "test", rows=400, files=2)
    ctx = MasterContext(params={}, seed=1, num_workers=1, output=Output(str(tmp_path / "out")),
                        log=logging.getLogger("t"), base_dir=str(tmp_path / "jobs"))
    table = ctx.read_table("test", ["y"])
    expected = np.concatenate([pq.read_table(f).column("y").to_numpy() for f in sorted(data.iterdir())])
    assert table.column_names == ["y"] and np.array_equal(table.column("y").to_numpy(), expected)
    with pytest.raises(InputError, match=r"tset.*does not exist"):
        ctx.read_table(["test", "tset"])

    def no_negatives(t):
        bad = np.flatnonzero(t.column("y").to_numpy() < 0)
        if len(bad):
            raise RecordError(int(bad[0]), "y is negative")

    with pytest.raises(InputError, match=r"part-00000\.parquet, row \d+: y is negative"):
        ctx.read_table("test", check=no_negatives)


def test_a_null_is_a_bad_record_named_with_its_file_row_and_column_unless_nulls_are_asked_for(tmp_path):
    from iterreduce import RecordError

    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"v": pa.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                             "x": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, None], [9.0, 1.0], None])}),
                   path, row_group_size=3)
    with pytest.raises(RecordError, match=rf"input file {path}, row 3: column 'x' holds a null value \(at x\[1\]\) "
                                          r"\(an algorithm"):
        read_split([FilePiece(str(path))])
    assert read_split([FilePiece(str(path))], ["v"]).num_rows == 6  # the columns read are what counts
    table = read_split([FilePiece(str(path))], nulls=True)
    assert table.column("x").null_count == 1 and table.num_rows == 6
    pq.write_table(pa.table({"v": pa.array([1.0, None, 3.0])}), path)
    with pytest.raises(RecordError, match=rf"input file {path}, row 1: column 'v' is null"):
        read_split([FilePiece(str(path))])

    # deeper: lists of lists, structs, maps; the first row wins, a null struct before its fields
    nested = {
        "ll": (pa.array([[[1]], [[2], [3]], [[4, None]], None]), "row 2: column 'll' holds a null value (at ll[0][1])"),
        "s": (pa.array([{"a": 1, "b": [1.0]}, {"a": 2, "b": [2.0, None]}, None, {"a": None, "b": []}]),
              "row 1: column 's' holds a null value (at s.b[1])"),
        "sn": (pa.array([{"a": 1}, None, {"a": None}, {"a": 4}]), "row 1: column 'sn' is null"),
        "m": (pa.array([[("k", 1)], [("k", 2)], [("k", 3), ("j", None)], []], pa.map_(pa.string(), pa.int64())),
              "row 2: column 'm' holds a null value (at m[1].value)"),
    }
    nested["f"] = (pa.array([1.0, 2.0, 3.0, float("nan")], pa.float32()), "row 3: column 'f' is NaN")
    nested["fl"] = (pa.array([[1.0], [float("nan"), 2.0], None, [3.0]]),
                    "row 1: column 'fl' holds a NaN value (at fl[0])")
    for name, (values, words) in nested.items():
        pq.write_table(pa.table({"ok": pa.array([1, 2, 3, 4]), name: values}), path, row_group_size=2)
        with pytest.raises(RecordError) as err:
            read_split([FilePiece(str(path))])
        assert f"input file {path}, {words} (an algorithm" in str(err.value), str(err.value)
        assert read_split([FilePiece(str(path))], nulls=True).num_rows == 4

    def check(t):  # the algorithm's own check speaks first
        raise RecordError(0, "mine")

    with pytest.raises(RecordError, match=r"row 0: mine"):
        read_split([FilePiece(str(path))], check=check)
