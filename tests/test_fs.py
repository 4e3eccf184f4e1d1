"""Filesystems and input splits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iterreduce.fs import InputError, filesystem, plan_splits, read_split


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
    with pytest.raises(InputError, match="1 row group\\(s\\) cannot make 2 splits"):
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


def test_files_whose_columns_differ_are_named(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dbn.data import read_parquet_dir
    from iterreduce.fs import FilePiece, InputError, read_split

    pq.write_table(pa.table({"x": np.arange(5, dtype=np.float32), "y": np.arange(5)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": np.arange(5, dtype=np.float64), "y": np.arange(5)}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"input files .*a\.parquet and .*b\.parquet do not have the same columns: "
                                         r"x: float, y: int64 in the one, x: double, y: int64 in the other"):
        read_split([FilePiece(str(tmp_path / "a.parquet")), FilePiece(str(tmp_path / "b.parquet"))])
    lists = tmp_path / "lists"
    lists.mkdir()
    pq.write_table(pa.table({"x": pa.array([[1, 2]], pa.list_(pa.uint8(), 2)), "y": [1]}), lists / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([[1, 2]], pa.list_(pa.int64())), "y": [1]}), lists / "b.parquet")
    with pytest.raises(InputError, match=r"a\.parquet and .*b\.parquet do not have the same columns"):
        read_parquet_dir(lists)


def test_plan_splits_names_the_input_files_whose_columns_differ_from_the_others(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iterreduce.fs import FilePiece, InputError, plan_splits, read_split

    def table(**cols):
        return pa.table({k: np.arange(4, dtype=v) for k, v in cols.items()})

    for i in range(4):
        pq.write_table(table(x=np.float64, y=np.int64), tmp_path / f"part-{i}.parquet")
    assert len(plan_splits([str(tmp_path)], 2)) == 2
    pq.write_table(table(y=np.int64, x=np.float64), tmp_path / "part-4.parquet")  # another order: fine
    assert len(plan_splits([str(tmp_path)], 2)) == 2
    both = read_split([FilePiece(str(tmp_path / "part-0.parquet")), FilePiece(str(tmp_path / "part-4.parquet"))])
    assert both.column_names == ["x", "y"] and both.num_rows == 8
    pq.write_table(table(x=np.float32, y=np.int64), tmp_path / "part-2.parquet")
    pq.write_table(table(x=np.float64), tmp_path / "part-3.parquet")
    with pytest.raises(InputError) as err:
        plan_splits([str(tmp_path)], 2)
    msg = str(err.value)
    assert msg.startswith("2 of 5 input files do not have the columns of the others (x double, y int64): ")
    assert "part-2.parquet: x is float (elsewhere double)" in msg and "part-3.parquet: no column y" in msg
    assert "part-0" not in msg and "part-4" not in msg
    for i in (0, 1, 4):
        (tmp_path / f"part-{i}.parquet").unlink()
    with pytest.raises(InputError, match=r"the input files do not have the same columns \(.*part-2\.parquet: x "
                                         r"float, y int64; .*part-3\.parquet: x double\)"):
        plan_splits([str(tmp_path)], 1)
