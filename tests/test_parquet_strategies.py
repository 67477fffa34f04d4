"""Tests for the Parquet append strategies of pipeline/parquet_sink.py: rewrite, writer, dataset.

rewrite: read-concat-rewrite of one file per window (complete after every flush);
writer:  ParquetWriter row groups, .tmp until finalised, rotate_rows starts a new part;
dataset: one new file per flush and (machine, date) partition, hive layout.
"""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.model import Reading
from pipeline.parquet_sink import PARQUET_STRATEGIES, ParquetSink, ParquetStrategy, partition_dir

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_NS = 86_400 * 10**9
BASE_NS = 1_699_920_000 * 10**9  # 2023-11-14T00:00:00Z
COLUMNS = ["machine", "ts", "load_rate", "mileage", "seq", "received_at", "batch_id"]

HOSTILE = {
    "traversal": "../../etc",
    "slash": "a/b",
    "backslash": "x\\y",
    "dotdot": "..",
    "percent": "a%2Fb",  # already looks encoded: must not be decoded into a slash
    "quotes": 'it\'s "quoted"',
    "non_ascii": "Maschine-Ü-東京-🏭",
}
LONG_ASCII = "L" * 500
LONG_NON_ASCII = "é" * 200


def reading(seq: int, ts_ns: int, machine: str = "m-1") -> Reading:
    return Reading(
        machine=machine, ts_ns=ts_ns, load_rate=seq * 0.5, mileage=1000.0 + seq, seq=seq, received_ns=ts_ns + 7_000
    )


def make(folder: Path, strategy: ParquetStrategy, rotate_rows: int | None = None) -> ParquetSink:
    return ParquetSink(
        folder, rotate_s=3600.0, compression="snappy", fsync=False, strategy=strategy, rotate_rows=rotate_rows
    )


def batch(first_seq: int, n: int, machine: str = "m-1", day: int = 0) -> list[Reading]:
    return [reading(first_seq + i, BASE_NS + day * DAY_NS + (first_seq + i) * 10**6, machine) for i in range(n)]


def rows_of(tables: list[Any]) -> list[tuple[Any, ...]]:
    """All rows of the given tables as sorted tuples over COLUMNS."""
    out: list[tuple[Any, ...]] = []
    for table in tables:
        cols = [table.column(c).to_pylist() for c in COLUMNS]
        out.extend(zip(*cols, strict=True))
    return sorted(out)


def file_rows(folder: Path) -> list[tuple[Any, ...]]:
    """Rows of every complete file, read file by file (no partition columns involved)."""
    return rows_of([pq.read_table(p) for p in sorted(folder.rglob("*.parquet"))])


def micros(moment: datetime) -> int:
    assert moment.utcoffset() == timedelta(0)  # read back as UTC, never naive
    return (moment - EPOCH) // timedelta(microseconds=1)


def hive_table(folder: Path) -> Any:
    return ds.dataset(folder, format="parquet", partitioning="hive").to_table()


# --- rewrite ----------------------------------------------------------------------


def test_rewrite_file_is_complete_after_every_flush_and_probe_grows(tmp_path: Path) -> None:
    out = make(tmp_path, "rewrite")
    path = tmp_path / "readings-20231114T000000Z-000.parquet"
    size_before = rows_before = 0
    for b in range(4):
        timing = out.write_batch(batch(b * 10, 10), b + 1)
        # The append-cost probe reports the file as it was before this flush.
        assert (timing.bytes_before, timing.rows_before) == (size_before, rows_before)
        # Complete and readable right now, before close(): no .tmp left behind.
        table = pq.read_table(path)
        assert table.column("seq").to_pylist() == list(range((b + 1) * 10))
        assert table.column("batch_id").to_pylist() == [i // 10 + 1 for i in range((b + 1) * 10)]
        assert [p.name for p in tmp_path.iterdir()] == [path.name]
        size_before, rows_before = path.stat().st_size, table.num_rows
    out.close()
    assert out.files_written == [path]


def test_rewrite_rotate_rows_starts_a_new_part(tmp_path: Path) -> None:
    out = make(tmp_path, "rewrite", rotate_rows=20)
    timings = [out.write_batch(batch(b * 10, 10), b + 1) for b in range(5)]
    out.close()
    assert [t.rows_before for t in timings] == [0, 10, 0, 10, 0]  # a part holds >= 20 rows: next one starts
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"readings-20231114T000000Z-00{i}.parquet" for i in range(3)]
    assert [pq.read_metadata(tmp_path / n).num_rows for n in names] == [20, 20, 10]
    assert file_rows(tmp_path) == rows_of([pq.read_table(tmp_path / n) for n in names])


# --- writer -----------------------------------------------------------------------


def test_writer_probe_grows_with_the_open_file(tmp_path: Path) -> None:
    out = make(tmp_path, "writer")
    tmp = tmp_path / "readings-20231114T000000Z-000.parquet.tmp"
    timings = []
    on_disk = []
    for b in range(4):
        timings.append(out.write_batch(batch(b * 10, 10), b + 1))
        on_disk.append(tmp.stat().st_size)  # flushed after every write: what the next flush appends to
    out.close()
    assert [t.rows_before for t in timings] == [0, 10, 20, 30]
    sizes = [t.bytes_before for t in timings]
    assert sizes[0] == 4  # just the "PAR1" magic of a new file
    assert all(a is not None and b is not None and a < b for a, b in itertools.pairwise(sizes))
    assert sizes[1:] == on_disk[:-1]
    final = tmp_path / "readings-20231114T000000Z-000.parquet"
    assert pq.ParquetFile(final).num_row_groups == 4  # one row group per flush, no rewrite
    assert pq.read_table(final).column("seq").to_pylist() == list(range(40))


def test_writer_rotate_rows_starts_a_new_part_file(tmp_path: Path) -> None:
    out = make(tmp_path, "writer", rotate_rows=25)
    timings = [out.write_batch(batch(b * 10, 10), b + 1) for b in range(6)]
    # The first part was finalised (complete, readable) when the second one started.
    first = tmp_path / "readings-20231114T000000Z-000.parquet"
    assert pq.read_table(first).column("seq").to_pylist() == list(range(30))
    out.close()
    assert [t.rows_before for t in timings] == [0, 10, 20, 0, 10, 20]
    assert timings[3].bytes_before == 4  # back to a fresh file
    assert timings[4].bytes_before is not None and timings[4].bytes_before > 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "readings-20231114T000000Z-000.parquet",
        "readings-20231114T000000Z-001.parquet",
    ]
    assert pq.read_table(tmp_path / "readings-20231114T000000Z-001.parquet").column("seq").to_pylist() == list(
        range(30, 60)
    )


# --- dataset ----------------------------------------------------------------------


def test_dataset_one_file_per_flush_per_partition(tmp_path: Path) -> None:
    out = make(tmp_path, "dataset")
    first = batch(0, 4, "press-1") + batch(4, 3, "press 2") + batch(7, 2, "press-1", day=1)
    timing = out.write_batch(first, 1)
    out.write_batch(batch(20, 5, "press-1"), 2)
    out.close()
    assert (timing.bytes_before, timing.rows_before) == (0, 0)  # nothing is ever appended to

    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet"))
    p1, p2 = partition_dir("press-1"), partition_dir("press 2")
    assert files == sorted(
        [
            f"{p2}/date=2023-11-14/part-00000001.parquet",
            f"{p1}/date=2023-11-14/part-00000001.parquet",
            f"{p1}/date=2023-11-14/part-00000002.parquet",
            f"{p1}/date=2023-11-15/part-00000001.parquet",
        ]
    )
    assert p1.startswith("machine_key=press-1~") and p2.startswith("machine_key=press_2~")
    assert not list(tmp_path.rglob("*.tmp"))
    assert sorted(out.files_written) == sorted(tmp_path / f for f in files)
    rows_by_file = {f: pq.read_metadata(tmp_path / f).num_rows for f in files}
    assert rows_by_file[f"{p2}/date=2023-11-14/part-00000001.parquet"] == 3
    assert sorted(rows_by_file.values()) == [2, 3, 4, 5]

    table = hive_table(tmp_path)
    assert table.num_rows == 14
    by_seq = {r["seq"]: r for r in table.to_pylist()}
    assert (by_seq[0]["machine"], by_seq[0]["date"]) == ("press-1", "2023-11-14")
    assert (by_seq[4]["machine"], by_seq[4]["date"]) == ("press 2", "2023-11-14")
    assert (by_seq[7]["machine"], by_seq[7]["date"]) == ("press-1", "2023-11-15")
    assert rows_of([table.select(COLUMNS)]) == rows_of([pq.read_table(tmp_path / f) for f in files])


@pytest.mark.parametrize("strategy", PARQUET_STRATEGIES)
def test_hostile_machine_ids_stay_inside_and_round_trip(tmp_path: Path, strategy: ParquetStrategy) -> None:
    folder = tmp_path / "out"
    ids = [*HOSTILE.values(), LONG_ASCII, LONG_NON_ASCII]
    readings = [reading(i, BASE_NS + i * 10**6, machine) for i, machine in enumerate(ids)]
    out = make(folder, strategy)
    out.write_batch(readings, 1)
    out.close()

    # Nothing was created beside or above the output folder ...
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    root = tmp_path.resolve()
    for path in tmp_path.rglob("*"):
        assert path.resolve().is_relative_to(root), path
        assert not path.is_symlink()
    # ... every name is a single bounded path component ...
    for _dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            assert "/" not in name and "\\" not in name and name not in (".", "..")
            assert len(name.encode()) <= 255
    if strategy == "dataset":
        assert all(p.name.startswith("machine_key=") for p in folder.iterdir())
        assert len(list(folder.iterdir())) == len(ids)  # distinct ids, distinct partitions
    # ... and each id comes back byte for byte in the files' machine column.
    machines = sorted(m for p in folder.rglob("*.parquet") for m in pq.read_table(p).column("machine").to_pylist())
    assert machines == sorted(ids)


def test_dataset_hostile_ids_round_trip_through_the_hive_reader(tmp_path: Path) -> None:
    """The documented read path returns the exact id: it lives in the files' machine column."""
    out = make(tmp_path, "dataset")
    ids = list(HOSTILE.values())
    out.write_batch([reading(i, BASE_NS + i * 10**6, m) for i, m in enumerate(ids)], 1)
    out.close()
    assert {p.name for p in tmp_path.iterdir()} == {partition_dir(m) for m in ids}
    table = hive_table(tmp_path)
    assert sorted(zip(table.column("seq").to_pylist(), table.column("machine").to_pylist(), strict=True)) == list(
        enumerate(ids)
    )


def test_dataset_long_id_round_trips_through_the_hive_reader(tmp_path: Path) -> None:
    out = make(tmp_path, "dataset")
    out.write_batch([reading(1, BASE_NS, LONG_ASCII)], 1)
    out.close()
    assert hive_table(tmp_path).column("machine").to_pylist() == [LONG_ASCII]


def test_dataset_long_non_ascii_id_keeps_the_dataset_readable(tmp_path: Path) -> None:
    out = make(tmp_path, "dataset")
    out.write_batch([reading(1, BASE_NS, "ok"), reading(2, BASE_NS, LONG_NON_ASCII)], 1)
    out.close()
    assert hive_table(tmp_path).num_rows == 2


def test_dataset_numeric_looking_ids_are_readable(tmp_path: Path) -> None:
    out = make(tmp_path, "dataset")
    out.write_batch([reading(1, BASE_NS, "007"), reading(2, BASE_NS, "12")], 1)
    out.close()
    assert sorted(hive_table(tmp_path).column("machine").to_pylist()) == ["007", "12"]


# --- all strategies ---------------------------------------------------------------


def test_all_strategies_store_identical_rows(tmp_path: Path) -> None:
    batches = [
        batch(0, 7, "press-1") + batch(100, 5, "press-2"),
        batch(7, 6, "press-1", day=1),  # another day: another window/partition
        batch(13, 3, "press-1") + batch(105, 4, "press-2"),  # back to the first day
    ]
    results: dict[str, list[tuple[Any, ...]]] = {}
    for strategy in PARQUET_STRATEGIES:
        folder = tmp_path / strategy
        out = make(folder, strategy, rotate_rows=8 if strategy != "dataset" else None)
        for batch_id, items in enumerate(batches, start=1):
            out.write_batch(items, batch_id)
        out.close()
        assert not list(folder.rglob("*.tmp"))
        results[strategy] = file_rows(folder)
    results["dataset (hive)"] = rows_of([hive_table(tmp_path / "dataset").select(COLUMNS)])

    expected = sorted(
        (r.machine, r.ts_ns // 1000, r.load_rate, r.mileage, r.seq, r.received_ns // 1000, batch_id)
        for batch_id, items in enumerate(batches, start=1)
        for r in items
    )
    for name, rows in results.items():
        # Compare timestamps as integer microseconds (exact): what the writer stored.
        as_us = sorted((m, micros(ts), lr, mi, s, micros(rx), b) for m, ts, lr, mi, s, rx, b in rows)
        assert as_us == expected, name
    assert results["writer"] == results["rewrite"] == results["dataset"] == results["dataset (hive)"]
