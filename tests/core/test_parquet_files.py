"""``core.files.write_parquet_atomic``: the table reads back, a rerun writes the same bytes, a full disk is
one error and leaves the old file."""

from __future__ import annotations

import pytest

from ldmclip.core.files import DiskFullError, write_parquet_atomic

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _table():
    return pa.table({"key": ["a", "b", "ü"], "score": pa.array([0.5, 0.25, 1.0], pa.float32()),
                     "keep": [True, False, True]})


def test_parquet_reads_back_and_a_rerun_gives_the_same_bytes(tmp_path):
    path = tmp_path / "out" / "t.parquet"
    write_parquet_atomic(path, _table())
    assert pq.read_table(path).equals(_table())
    first = path.read_bytes()
    write_parquet_atomic(path, _table())
    assert path.read_bytes() == first
    assert [p.name for p in path.parent.iterdir()] == ["t.parquet"]


@pytest.mark.parametrize("after", [0, 100])
def test_a_full_disk_is_one_error_and_keeps_the_old_file(tmp_path, monkeypatch, after):
    from tests.core.disk_full import fill_disk

    path = tmp_path / "t.parquet"
    write_parquet_atomic(path, _table())
    before = path.read_bytes()
    fill_disk(monkeypatch, after=after)
    with pytest.raises(DiskFullError, match=f"disk full writing {path}"):
        write_parquet_atomic(path, _table())
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"] and path.read_bytes() == before
