"""Tests for pipeline/parquet_sink.py: windowed Parquet files, row group per flush, atomic finalise."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.config import ParquetSettings
from pipeline.model import Reading, Rejection
from pipeline.parquet_sink import ParquetSink, ParquetStrategy, QuarantineSink

MINUTE_NS = 60 * 10**9
BASE_NS = 1_699_999_980 * 10**9  # 2023-11-14T22:13:00Z, the start of a 60 s window


def reading(seq: int, ts_ns: int, machine: str = "m-1") -> Reading:
    return Reading(
        machine=machine, ts_ns=ts_ns, load_rate=seq / 2, mileage=1000.0 + seq, seq=seq, received_ns=ts_ns + 5
    )


def minute(m: int, count: int, first_seq: int) -> list[Reading]:
    """`count` readings spread over minute `m` after BASE."""
    return [reading(first_seq + i, BASE_NS + m * MINUTE_NS + i * 10**9) for i in range(count)]


def sink(folder: Path, **kw: object) -> ParquetSink:
    opts: dict[str, object] = {"rotate_s": 60.0, "compression": "snappy", "fsync": False}
    opts.update(kw)
    return ParquetSink(folder, **opts)  # type: ignore[arg-type]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def seqs_in(folder: Path) -> list[int]:
    return sorted(s for p in sorted(folder.glob("*.parquet")) for s in pq.read_table(p).column("seq").to_pylist())


def test_round_trip_one_window(tmp_path: Path) -> None:
    out = sink(tmp_path)
    first = minute(0, 10, 0)
    second = [reading(10 + i, BASE_NS + 30 * 10**9) for i in range(5)]
    out.write_batch(first, 1)
    out.write_batch(second, 2)
    out.close()

    assert names(tmp_path) == ["readings-20231114T221300Z-000.parquet"]
    path = tmp_path / "readings-20231114T221300Z-000.parquet"
    table = pq.read_table(path)
    assert table.num_rows == 15
    assert sorted(table.column("seq").to_pylist()) == list(range(15))
    assert table.column("batch_id").to_pylist() == [1] * 10 + [2] * 5
    assert table.column("machine").to_pylist() == ["m-1"] * 15
    assert table.column("load_rate").to_pylist() == [r.load_rate for r in first + second]
    # Timestamps are timezone-aware UTC, at microsecond resolution.
    for column in ("ts", "received_at"):
        assert table.schema.field(column).type.tz == "UTC"
    ts = table.column("ts").to_pylist()
    assert ts[0] == datetime(2023, 11, 14, 22, 13, 0, tzinfo=UTC)
    assert ts[0].tzinfo is not None and ts[0].utcoffset().total_seconds() == 0
    assert table.column("received_at").to_pylist()[3] == datetime(2023, 11, 14, 22, 13, 3, tzinfo=UTC)
    assert pq.ParquetFile(path).num_row_groups == 2  # one per flush


def test_one_file_per_rotate_window(tmp_path: Path) -> None:
    """Readings spanning 3 minutes with rotate_s=60 -> 3 files, each holding only its minute."""
    out = sink(tmp_path)
    for m in range(3):
        out.write_batch(minute(m, 20, m * 100), m + 1)
    out.close()

    assert names(tmp_path) == [
        "readings-20231114T221300Z-000.parquet",
        "readings-20231114T221400Z-000.parquet",
        "readings-20231114T221500Z-000.parquet",
    ]
    assert out.files_written == [tmp_path / n for n in names(tmp_path)]
    for m, name in enumerate(names(tmp_path)):
        table = pq.read_table(tmp_path / name)
        assert sorted(table.column("seq").to_pylist()) == list(range(m * 100, m * 100 + 20))
        start = datetime(2023, 11, 14, 22, 13 + m, tzinfo=UTC)
        assert all(start <= t < start.replace(minute=14 + m) for t in table.column("ts").to_pylist())


def test_one_batch_spanning_windows_is_split(tmp_path: Path) -> None:
    out = sink(tmp_path)
    mixed = minute(2, 5, 200) + minute(0, 5, 0) + minute(1, 5, 100)  # unsorted on purpose
    out.write_batch(mixed, 1)
    out.close()
    assert len(names(tmp_path)) == 3
    assert seqs_in(tmp_path) == sorted(r.seq for r in mixed)


def test_row_group_per_flush_per_window(tmp_path: Path) -> None:
    """Two flushes, each touching two adjacent windows (within grace): 2 files x 2 row groups."""
    out = sink(tmp_path)
    out.write_batch(minute(0, 4, 0) + minute(1, 4, 100), 1)
    out.write_batch(minute(0, 3, 10) + minute(1, 3, 110), 2)
    out.close()
    files = sorted(tmp_path.glob("*.parquet"))
    assert len(files) == 2
    for path in files:
        meta = pq.ParquetFile(path)
        assert meta.num_row_groups == 2
        assert [meta.metadata.row_group(i).num_rows for i in range(2)] == [4, 3]


def test_tmp_files_until_close(tmp_path: Path) -> None:
    out = sink(tmp_path)
    out.write_batch(minute(0, 5, 0), 1)
    # Written and flushed, but not finalised: only a .tmp, which readers must ignore.
    assert names(tmp_path) == ["readings-20231114T221300Z-000.parquet.tmp"]
    assert out.files_written == []
    out.close()
    assert names(tmp_path) == ["readings-20231114T221300Z-000.parquet"]
    assert not list(tmp_path.glob("*.tmp"))
    assert seqs_in(tmp_path) == list(range(5))


def test_old_window_finalised_once_past_grace(tmp_path: Path) -> None:
    """With one window of grace, minute 0 stays open while minute 1 arrives and closes at minute 2."""
    out = sink(tmp_path)
    out.write_batch(minute(0, 2, 0), 1)
    out.write_batch(minute(1, 2, 100), 2)
    assert not list(tmp_path.glob("*.parquet"))
    out.write_batch(minute(2, 2, 200), 3)
    assert [p.name for p in tmp_path.glob("*.parquet")] == ["readings-20231114T221300Z-000.parquet"]
    assert pq.read_table(tmp_path / "readings-20231114T221300Z-000.parquet").num_rows == 2  # readable now
    assert len(list(tmp_path.glob("*.tmp"))) == 2
    out.close()
    assert not list(tmp_path.glob("*.tmp"))


def test_late_row_goes_to_new_part_file(tmp_path: Path) -> None:
    out = sink(tmp_path)
    out.write_batch(minute(0, 5, 0), 1)
    out.write_batch(minute(3, 5, 300), 2)  # minute 0 is now past grace: finalised
    first = tmp_path / "readings-20231114T221300Z-000.parquet"
    assert first.exists()
    before = first.read_bytes()
    stat_before = first.stat()

    out.write_batch([reading(999, BASE_NS + 59 * 10**9)], 3)  # late row for minute 0
    out.close()

    assert first.read_bytes() == before  # nothing rewritten
    assert first.stat().st_ino == stat_before.st_ino
    late = [n for n in names(tmp_path) if n.endswith("-001.parquet")]
    assert late == ["readings-20231114T221300Z-001.parquet"]
    assert pq.read_table(tmp_path / late[0]).column("seq").to_pylist() == [999]
    assert pq.read_table(first).column("seq").to_pylist() == list(range(5))
    assert seqs_in(tmp_path) == [*range(5), *range(300, 305), 999]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("compression", ["snappy", "zstd", "none"])
def test_compressions_and_fsync_readable(tmp_path: Path, compression: str) -> None:
    out = sink(tmp_path, compression=compression, fsync=True)
    out.write_batch(minute(0, 7, 0), 1)
    out.close()
    (path,) = tmp_path.glob("*.parquet")
    codec = pq.ParquetFile(path).metadata.row_group(0).column(0).compression
    assert codec == ("UNCOMPRESSED" if compression == "none" else compression.upper())
    assert seqs_in(tmp_path) == list(range(7))


def test_quarantine_round_trip(tmp_path: Path) -> None:
    rejections = [
        Rejection("malformed_json", "Expecting value", b"{", "plant/a/telemetry", BASE_NS + 1_000),
        Rejection("invalid_utf8", "byte 0: invalid start byte", b"\xff\x00\xfe", "plant/b/telemetry", BASE_NS + 2_000),
        Rejection("wrong_type", "load_rate: expected a number, got str", b'{"seq":7}', "t", BASE_NS + 3_000, 7, "m-7"),
        Rejection("out_of_range", "seq: too big", b"", "t", BASE_NS + 4_000, 2**63 - 1, None),
    ]
    out = QuarantineSink(tmp_path, rotate_s=60.0, fsync=False)
    assert out.name == "quarantine"
    out.write_batch(rejections[:2], 1)
    out.write_batch(rejections[2:], 2)
    out.close()

    (path,) = tmp_path.glob("*.parquet")
    assert path.name == "rejected-20231114T221300Z-000.parquet"
    rows = pq.read_table(path).to_pylist()
    assert [r["reason"] for r in rows] == [r.reason for r in rejections]
    assert [r["detail"] for r in rows] == [r.detail for r in rejections]
    assert [r["seq"] for r in rows] == [None, None, 7, 2**63 - 1]
    assert [r["machine"] for r in rows] == [None, None, "m-7", None]
    assert [r["payload"] for r in rows] == [r.payload for r in rejections]  # raw bytes, byte-exact
    assert [r["topic"] for r in rows] == [r.topic for r in rejections]
    assert [r["batch_id"] for r in rows] == [1, 1, 2, 2]
    assert rows[0]["received_at"] == datetime(2023, 11, 14, 22, 13, 0, 1, tzinfo=UTC)
    assert pq.ParquetFile(path).num_row_groups == 2


def test_sub_second_rotation_is_refused(tmp_path: Path) -> None:
    """File names resolve to the second, so two sub-second windows would share a file."""
    with pytest.raises(ValueError, match="at least 1 s"):
        sink(tmp_path, rotate_s=0.5)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        ParquetSettings(rotate="500ms")


@pytest.mark.parametrize("strategy", ["writer", "rewrite"])
def test_a_batch_spanning_two_windows_puts_each_row_in_its_own_window(
    tmp_path: Path, strategy: ParquetStrategy
) -> None:
    """The table is sorted by (machine, ts) before writing: each row's window must follow it (keys taken in the
    batch's arrival order put m-2's second-minute reading into the first minute's file, and m-1's the other way)."""
    minute = 60_000_000_000
    t0 = 1_800_000_000 * 1_000_000_000 // minute * minute
    items = [
        Reading("m-2", t0 + minute + 5_000_000_000, 1.0, 1.0, 1, t0),
        Reading("m-1", t0 + 5_000_000_000, 2.0, 2.0, 2, t0),
    ]
    sink = ParquetSink(tmp_path, rotate_s=60, compression="snappy", fsync=False, strategy=strategy)
    sink.write_batch(items, 0)
    sink.close()
    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) == 2
    for path in files:
        # readings-<window start, YYYYmmddTHHMMSSZ>-...: the window the file was opened for.
        window = datetime.strptime(path.name.split("-")[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        for ts in pq.read_table(path, columns=["ts"]).column("ts").to_pylist():
            assert ts.replace(second=0, microsecond=0) == window, f"{path.name} holds a row of {ts:%H:%M}"


@pytest.mark.parametrize("strategy", ["writer", "rewrite", "dataset"])
def test_a_reading_after_2262_is_filed_under_its_own_window(tmp_path: Path, strategy: ParquetStrategy) -> None:
    """Its time in nanoseconds is past int64: the window key must not wrap (it once filed a year-3000 reading,
    accepted by a future_timestamp policy, under 1830)."""
    far = int(datetime(3000, 1, 1, 0, 0, 5, tzinfo=UTC).timestamp()) * 10**9
    near = int(datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC).timestamp()) * 10**9
    sink = ParquetSink(tmp_path, rotate_s=60, compression="snappy", fsync=False, strategy=strategy)
    sink.write_batch([Reading("m-1", far, 1.0, 1.0, 1, near), Reading("m-1", near, 1.0, 1.0, 2, near)], 0)
    sink.close()
    names = (
        " ".join(p.name for p in tmp_path.rglob("*.parquet"))
        + " "
        + " ".join(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet"))
    )
    assert "3000" in names and "2026" in names and "1830" not in names, names
    seqs = [s for p in tmp_path.rglob("*.parquet") for s in pq.read_table(p, columns=["seq"]).column("seq").to_pylist()]
    assert sorted(seqs) == [1, 2]
