"""Tests for the crash_safe mode of pipeline/parquet_sink.py: kill -9, restarts, the folder lock, a full disk.

Everything here happens for real: a child process is SIGKILLed mid-stream, a
tmpfs of 2 MB fills up. Rows carry unique seq ids, so "nothing lost, nothing
twice" is a comparison of seq sets read back from the Parquet files alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import SinkError
from pipeline.model import Reading, Rejection
from pipeline.parquet_sink import (
    JOURNAL_SUFFIX,
    PARQUET_STRATEGIES,
    ParquetSink,
    ParquetStrategy,
    QuarantineSink,
)

ROOT = Path(__file__).resolve().parent.parent
BASE_NS = 1_699_999_980 * 10**9  # 2023-11-14T22:13:00Z, the start of a 60 s window
ROWS = 200
STEP_S = 20  # flush k holds readings of BASE + 20 k s: a new one-minute window every third flush

Kind = Literal["writer", "rewrite", "dataset", "quarantine"]
KINDS: list[Kind] = ["writer", "rewrite", "dataset", "quarantine"]

# The child writes flush k (k = 1, 2, ...) with seq k*ROWS .. k*ROWS+ROWS-1 and prints "flushed k" once
# write_batch returned; after flush `stop_after` (0: never) it waits on stdin to be killed.
CHILD = f"""
import sys
from pathlib import Path
from pipeline.model import Reading, Rejection
from pipeline.parquet_sink import ParquetSink, QuarantineSink

folder, kind, stop_after = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
BASE_NS, ROWS, STEP_S = {BASE_NS}, {ROWS}, {STEP_S}
if kind == "quarantine":
    sink = QuarantineSink(folder, rotate_s=60.0, fsync=True, crash_safe=True)
else:
    sink = ParquetSink(folder, rotate_s=60.0, compression="snappy", fsync=True, strategy=kind, crash_safe=True)
print("ready", flush=True)
k = 0
while True:
    k += 1
    ts = BASE_NS + k * STEP_S * 10**9
    if kind == "quarantine":
        items = [Rejection("nan", "load_rate: NaN", b"x" * 40, "t", ts + i * 10**6, k * ROWS + i, "m")
                 for i in range(ROWS)]
    else:
        items = [Reading("m-1", ts + i * 10**6, 1.0, 2.0, k * ROWS + i, ts) for i in range(ROWS)]
    sink.write_batch(items, k)
    print(f"flushed {{k}}", flush=True)
    if k == stop_after:
        sys.stdin.read()
"""


def items_of(kind: Kind, k: int) -> list[Reading] | list[Rejection]:
    """Flush k's rows, as the child builds them."""
    ts = BASE_NS + k * STEP_S * 10**9
    if kind == "quarantine":
        return [
            Rejection("nan", "load_rate: NaN", b"x" * 40, "t", ts + i * 10**6, k * ROWS + i, "m") for i in range(ROWS)
        ]
    return [Reading("m-1", ts + i * 10**6, 1.0, 2.0, k * ROWS + i, ts) for i in range(ROWS)]


def seqs_of(*flushes: int) -> list[int]:
    return sorted(k * ROWS + i for k in flushes for i in range(ROWS))


def open_sink(folder: Path, kind: Kind, *, fsync: bool = True) -> ParquetSink | QuarantineSink:
    if kind == "quarantine":
        return QuarantineSink(folder, rotate_s=60.0, fsync=fsync, crash_safe=True)
    return ParquetSink(folder, rotate_s=60.0, compression="snappy", fsync=fsync, strategy=kind, crash_safe=True)


def write(sink: ParquetSink | QuarantineSink, kind: Kind, k: int, batch_id: int | None = None) -> None:
    assert isinstance(sink, QuarantineSink) == (kind == "quarantine")
    sink.write_batch(items_of(kind, k), k if batch_id is None else batch_id)  # type: ignore[arg-type]


def persisted(folder: Path) -> list[int]:
    """Seq ids in every final file, each file read on its own (as the bench's read-back does)."""
    return sorted(s for p in sorted(folder.rglob("*.parquet")) for s in pq.read_table(p).column("seq").to_pylist())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((JOURNAL_SUFFIX, ".tmp")))


# --- kill -9 -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def child_writer(folder: Path, kind: Kind, stop_after: int = 0) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), kind, str(stop_after)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def read_until_flushed(proc: subprocess.Popen[str], k: int) -> int:
    """Read the child's lines until it reported flush ``k``; the last flush reported."""
    assert proc.stdout is not None
    last = 0
    while last < k:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr is not None else ""
            pytest.fail(f"the child stopped after flush {last}: {err}")
        if line.startswith("flushed "):
            last = int(line.split()[1])
    return last


def kill_and_drain(proc: subprocess.Popen[str], last: int) -> int:
    """SIGKILL the child; the last flush it reported, counting lines still in the pipe."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout is not None
    for line in proc.stdout.read().splitlines():
        if line.startswith("flushed "):
            last = int(line.split()[1])
    return last


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_mid_stream_loses_no_reported_flush(
    tmp_path: Path, kind: Kind, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "out"
    with child_writer(folder, kind) as proc:
        read_until_flushed(proc, 12)
        # While it runs, the folder is its own: a second writer is refused, named by the child's pid.
        with pytest.raises(SinkError, match=rf"{folder}.* locked by process {proc.pid}\b"):
            open_sink(folder, kind)
        last = kill_and_drain(proc, read_until_flushed(proc, 15))
    if kind in ("writer", "quarantine"):
        assert any(name.endswith(JOURNAL_SUFFIX) for name in leftovers(folder))

    caplog.set_level(logging.WARNING, logger="pipeline.parquet_sink")
    sink = open_sink(folder, kind)
    sink.close()

    assert leftovers(folder) == []
    seqs = persisted(folder)
    assert len(seqs) == len(set(seqs)), "a row persisted twice"
    reported = set(seqs_of(*range(1, last + 1)))
    assert reported <= set(seqs), f"lost rows of reported flushes: {sorted(reported - set(seqs))[:10]}"
    # Beyond what was reported, at most the flush that was running when the kill came.
    assert set(seqs) <= set(seqs_of(*range(1, last + 2)))
    # One log line per recovered file, with its row count, and the count is what the file holds.
    recovered = sink.recovered
    if kind in ("writer", "quarantine"):
        assert recovered
    for path, rows in recovered:
        assert pq.read_metadata(path).num_rows == rows > 0
        assert sum(f"recovered {path}: {rows} rows" in r.getMessage() for r in caplog.records) == 1


def test_a_torn_last_flush_is_dropped_and_every_complete_one_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "out"
    with child_writer(folder, "writer", stop_after=2) as proc:
        kill_and_drain(proc, read_until_flushed(proc, 2))  # flushes 1, 2: one window, still open
    (journal,) = folder.glob(f"*{JOURNAL_SUFFIX}")
    # What a kill in the middle of the third append leaves: half a record at the end.
    with pa.ipc.open_stream(journal.read_bytes()) as reader:
        record = reader.read_next_batch().serialize().to_pybytes()
    with open(journal, "ab") as handle:
        handle.write(record[: len(record) // 2])

    caplog.set_level(logging.WARNING, logger="pipeline.parquet_sink")
    sink = open_sink(folder, "writer")
    sink.close()
    assert persisted(folder) == seqs_of(1, 2)
    assert leftovers(folder) == []
    final = journal.with_name(journal.name.removesuffix(JOURNAL_SUFFIX))
    assert pq.ParquetFile(final).num_row_groups == 2  # one row group per flush, as the naive writer makes
    (line,) = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert f"{final}: {2 * ROWS} rows" in line and "torn last flush" in line


def test_a_journal_whose_file_was_already_finalised_adds_no_row_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash between the rename of the final file and the removal of the journal."""
    folder = tmp_path / "out"
    with child_writer(folder, "writer", stop_after=2) as proc:
        kill_and_drain(proc, read_until_flushed(proc, 2))
    (journal,) = folder.glob(f"*{JOURNAL_SUFFIX}")
    kept = tmp_path / "journal.copy"
    shutil.copyfile(journal, kept)
    open_sink(folder, "writer").close()  # recovers: the final file appears, the journal goes
    shutil.copyfile(kept, journal)  # as if its removal had not reached the disk

    caplog.set_level(logging.WARNING, logger="pipeline.parquet_sink")
    sink = open_sink(folder, "writer")
    sink.close()
    assert sink.recovered == []
    assert persisted(folder) == seqs_of(1, 2)
    assert leftovers(folder) == []
    assert any("already finalised" in r.getMessage() for r in caplog.records)


def test_leftover_tmp_files_of_a_dead_process_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "out"
    nested = folder / "machine_key=m~0" / "date=2023-11-14"
    nested.mkdir(parents=True)
    # What a killed naive writer leaves: row groups without a footer, unreadable.
    (folder / "readings-20231114T221300Z-000.parquet.tmp").write_bytes(b"PAR1" + b"\0" * 100)
    (nested / "part-00000001.parquet.tmp").write_bytes(b"PAR1")
    caplog.set_level(logging.WARNING, logger="pipeline.parquet_sink")
    open_sink(folder, "dataset").close()
    assert leftovers(folder) == []
    assert sum("unfinished temporary file" in r.getMessage() for r in caplog.records) == 2


# --- restarts and the lock -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", PARQUET_STRATEGIES)
def test_a_graceful_restart_within_one_window_never_replaces_a_finalised_file(
    tmp_path: Path, strategy: ParquetStrategy
) -> None:
    """The restarted process writes the same window, its batch ids from 1 again: both runs' rows stay."""
    first = ParquetSink(
        tmp_path, rotate_s=3600.0, compression="snappy", fsync=False, strategy=strategy, crash_safe=True
    )
    for k in (1, 2, 3):
        write(first, strategy, k)
    first.close()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.parquet")}
    assert sum(pq.read_metadata(p).num_rows for p in before) == 3 * ROWS

    second = ParquetSink(
        tmp_path, rotate_s=3600.0, compression="snappy", fsync=False, strategy=strategy, crash_safe=True
    )
    for batch_id, k in enumerate((4, 5), start=1):
        write(second, strategy, k, batch_id)
    second.close()

    for path, content in before.items():
        assert path.read_bytes() == content, f"{path.name} was replaced"
    assert persisted(tmp_path) == seqs_of(1, 2, 3, 4, 5)
    assert sum(pq.read_metadata(p).num_rows for p in tmp_path.rglob("*.parquet")) == 5 * ROWS
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_sink_on_a_locked_folder_is_refused_until_the_first_closes(tmp_path: Path, kind: Kind) -> None:
    first = open_sink(tmp_path, kind, fsync=False)
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    with pytest.raises(SinkError, match=rf"output folder {tmp_path} is locked by process {os.getpid()}\b"):
        open_sink(tmp_path, kind, fsync=False)
    write(first, kind, 1)
    first.close()
    second = open_sink(tmp_path, kind, fsync=False)  # released at close
    write(second, kind, 2)
    second.close()
    assert persisted(tmp_path) == seqs_of(1, 2)


def test_naive_sinks_take_no_lock(tmp_path: Path) -> None:
    ParquetSink(tmp_path, rotate_s=60.0, compression="snappy", fsync=False)
    ParquetSink(tmp_path, rotate_s=60.0, compression="snappy", fsync=False)
    assert not (tmp_path / ".lock").exists()


# --- what crash_safe writes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", PARQUET_STRATEGIES)
def test_crash_safe_stores_the_rows_naive_stores(tmp_path: Path, strategy: ParquetStrategy) -> None:
    results = {}
    schemas = {}
    for crash_safe in (False, True):
        folder = tmp_path / str(crash_safe)
        sink = ParquetSink(
            folder,
            rotate_s=60.0,
            compression="snappy",
            fsync=False,
            strategy=strategy,
            rotate_rows=None if strategy == "dataset" else 3 * ROWS,
            crash_safe=crash_safe,
        )
        for k in range(1, 11):
            write(sink, strategy, k)
        sink.close()
        assert leftovers(folder) == []
        tables = [pq.read_table(p) for p in sorted(folder.rglob("*.parquet"))]
        results[crash_safe] = sorted(row for t in tables for row in zip(*t.to_pydict().values(), strict=True))
        schemas[crash_safe] = {t.schema for t in tables}
        if crash_safe:
            assert all("-p20" in p.name for p in folder.rglob("*.parquet")), "every name carries the process token"
    assert results[True] == results[False]
    assert schemas[True] == schemas[False] and len(schemas[True]) == 1


def test_the_open_file_is_a_journal_the_read_back_globs_never_match(tmp_path: Path) -> None:
    sink = open_sink(tmp_path, "writer", fsync=False)
    write(sink, "writer", 1)
    (journal,) = [p for p in tmp_path.iterdir() if p.name != ".lock"]
    assert journal.name.startswith("readings-20231114T221300Z-p") and journal.name.endswith(
        "-000.parquet.arrows.partial"
    )
    assert list(tmp_path.rglob("*.parquet")) == [] and list(tmp_path.rglob("*.tmp")) == []
    # A readable Arrow IPC stream at every moment: one record batch per flush.
    write(sink, "writer", 2)
    with pa.ipc.open_stream(journal.read_bytes()) as reader:
        assert [b.num_rows for b in reader] == [ROWS, ROWS]
    sink.close()
    assert not journal.exists()
    assert persisted(tmp_path) == seqs_of(1, 2)


# --- a full disk ---------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, unmounted afterwards; skipped where mounting is not permitted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system to fill")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a 2 MB tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def fill(handle: IO[bytes]) -> None:
    """Write until the file system is full."""
    chunk = b"\xff" * 65536
    while True:
        try:
            handle.write(chunk)
            handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            handle.seek(0, os.SEEK_END)
            return


def check_no_broken_final_file(folder: Path) -> None:
    for path in folder.rglob("*.parquet"):
        pq.read_table(path)  # raises on a file without a footer
    assert not list(folder.rglob("*.tmp"))


@pytest.mark.parametrize("strategy", PARQUET_STRATEGIES)
def test_a_full_disk_fails_the_flush_and_the_next_one_works_once_space_returns(
    small_disk: Path, strategy: ParquetStrategy
) -> None:
    folder = small_disk / "out"
    sink = ParquetSink(folder, rotate_s=60.0, compression="snappy", fsync=True, strategy=strategy, crash_safe=True)
    for k in range(1, 5):  # two windows, one of them finalised
        write(sink, strategy, k)
    filler_path = small_disk / "filler"
    with open(filler_path, "wb", buffering=0) as filler:
        fill(filler)
        failures = 0
        k = 5
        # Give space back a page at a time, retrying each flush until it goes through, as the buffer retries:
        # every partial append, failed rotation and failed rename on the way must leave no trace.
        while k <= 12:
            try:
                write(sink, strategy, k)
            except SinkError as exc:
                failures += 1
                assert "No space left on device" in str(exc)
                check_no_broken_final_file(folder)
                size = filler.seek(0, os.SEEK_END)
                filler.truncate(max(0, size - 4096))
                continue
            k += 1
            if k == 8:
                fill(filler)  # full again, in a new window this time
    assert failures >= 2
    check_no_broken_final_file(folder)
    filler_path.unlink()
    for k in range(13, 16):
        write(sink, strategy, k)
    sink.close()
    check_no_broken_final_file(folder)
    assert leftovers(folder) == []
    # Every flush in exactly once: a failed attempt left nothing, its retry everything.
    assert persisted(folder) == seqs_of(*range(1, 16))
