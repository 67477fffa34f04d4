"""Parquet output that appends for real: ParquetWriter row groups, a file per time window.

Each flush becomes one row group in the file of its time window, so the cost of
a flush does not grow with the size of the file (the naive "read, concat,
rewrite" does). The append strategies are chosen by name from
:data:`PARQUET_STRATEGIES`. A file is written as ``*.parquet.tmp`` and renamed to
``*.parquet`` only when its footer is written, so anyone listing the folder sees
only complete, readable files. File names come from window times only, never
from ids in the data (a machine id is not a safe path).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SinkError
from pipeline.model import Reading, Rejection
from pipeline.sinks import SinkTiming

TS = pa.timestamp("us", tz="UTC")

READING_SCHEMA = pa.schema(
    [
        pa.field("machine", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=False),
        pa.field("load_rate", pa.float64(), nullable=False),
        pa.field("mileage", pa.float64(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("received_at", TS, nullable=False),
        pa.field("batch_id", pa.int64(), nullable=False),
        # Comma-separated repairs the validator made (null when none): lineage for every changed row.
        pa.field("repairs", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("received_at", TS, nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("seq", pa.int64()),
        pa.field("machine", pa.string()),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("payload", pa.binary(), nullable=False),
        pa.field("batch_id", pa.int64(), nullable=False),
    ]
)


@dataclass(frozen=True, slots=True)
class WriteResult:
    write_ns: int
    commit_ns: int
    bytes_before: int
    rows_before: int


@dataclass
class _OpenFile:
    tmp: Path
    final: Path
    handle: IO[bytes]
    writer: pq.ParquetWriter
    rows: int = 0


class _WindowedFiles:
    """What the window-based writers share: settings, the output folder, and
    splitting a batch by time window while skipping windows a retried batch
    already wrote (so a failure half-way through cannot duplicate rows)."""

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        *,
        rotate_s: float,
        compression: str,
        fsync: bool,
        prefix: str,
        rotate_rows: int | None = None,
    ) -> None:
        if rotate_s < 1:
            raise ValueError("rotate_s must be at least 1 s: file names resolve to the second")
        self.folder = folder
        self.schema = schema
        self._window_ns = int(rotate_s * 1e9)
        self._compression = None if compression == "none" else compression
        self._fsync = fsync
        self._prefix = prefix
        self._rotate_rows = rotate_rows
        self._parts: dict[int, int] = {}
        self._written: tuple[int, set[int]] = (-1, set())
        self.files_written: list[Path] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create output folder {folder}: {exc}") from None

    def _pending_windows(self, window_keys: Sequence[int], batch_id: int) -> list[tuple[int, list[int]]]:
        """(window, row indexes) of this batch not yet written, oldest window first; marks none done."""
        if self._written[0] != batch_id:
            self._written = (batch_id, set())
        by_window: dict[int, list[int]] = {}
        for index, key in enumerate(window_keys):
            by_window.setdefault(key // self._window_ns, []).append(index)
        return [(w, rows) for w, rows in sorted(by_window.items()) if w not in self._written[1]]

    def _mark_written(self, window: int) -> None:
        self._written[1].add(window)


class WindowedParquetWriter(_WindowedFiles):
    """Writes tables as row groups into one file per time window.

    Windows older than the newest one seen by more than ``grace`` windows are
    closed (footer written, renamed). A late row for a closed window opens a
    new part file for that window instead of rewriting the old one.
    """

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        *,
        rotate_s: float,
        compression: str,
        fsync: bool,
        prefix: str,
        grace_windows: int = 1,
        rotate_rows: int | None = None,
    ) -> None:
        super().__init__(
            folder,
            schema,
            rotate_s=rotate_s,
            compression=compression,
            fsync=fsync,
            prefix=prefix,
            rotate_rows=rotate_rows,
        )
        self._grace = grace_windows
        self._open: dict[int, _OpenFile] = {}
        self._newest: int | None = None

    def write(self, table: pa.Table, window_keys: Sequence[int], batch_id: int) -> WriteResult:
        """Append ``table``; ``window_keys[i]`` is row i's time in ns."""
        write_ns = commit_ns = 0
        bytes_before = rows_before = 0
        touched: list[_OpenFile] = []
        for window, rows in self._pending_windows(window_keys, batch_id):
            start = time.perf_counter_ns()
            part = table if len(rows) == table.num_rows else table.take(pa.array(rows))
            target = self._file_for(window)
            if self._rotate_rows is not None and target.rows >= self._rotate_rows:
                self._finalise(window)
                target = self._file_for(window)
            # tell() is the bytes already in the file: the append-cost probe's x axis.
            bytes_before = max(bytes_before, target.handle.tell())
            rows_before = max(rows_before, target.rows)
            try:
                target.writer.write_table(part)
            except (OSError, pa.ArrowException) as exc:
                raise SinkError(f"cannot write {target.tmp}: {exc}") from None
            target.rows += part.num_rows
            self._mark_written(window)
            touched.append(target)
            write_ns += time.perf_counter_ns() - start
            if self._newest is None or window > self._newest:
                self._newest = window
        start = time.perf_counter_ns()
        for target in touched:
            target.handle.flush()
            if self._fsync:
                os.fsync(target.handle.fileno())
        commit_ns += time.perf_counter_ns() - start
        if self._newest is not None:
            for window in [w for w in self._open if w < self._newest - self._grace]:
                self._finalise(window)
        return WriteResult(write_ns, commit_ns, bytes_before, rows_before)

    def close(self) -> None:
        for window in list(self._open):
            self._finalise(window)

    def _file_for(self, window: int) -> _OpenFile:
        existing = self._open.get(window)
        if existing is not None:
            return existing
        part = self._parts.get(window, 0)
        self._parts[window] = part + 1
        stem = _window_stem(self._prefix, window, self._window_ns, part)
        final = self.folder / f"{stem}.parquet"
        tmp = self.folder / f"{stem}.parquet.tmp"
        try:
            handle = open(tmp, "wb")  # noqa: SIM115 - lives until the window closes
            writer = pq.ParquetWriter(handle, self.schema, compression=self._compression)
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(f"cannot open {tmp}: {exc}") from None
        opened = _OpenFile(tmp, final, handle, writer)
        self._open[window] = opened
        return opened

    def _finalise(self, window: int) -> None:
        target = self._open.pop(window)
        try:
            target.writer.close()
            target.handle.flush()
            if self._fsync:
                os.fsync(target.handle.fileno())
            target.handle.close()
            os.replace(target.tmp, target.final)
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(f"cannot finalise {target.final}: {exc}") from None
        self.files_written.append(target.final)


def _window_stem(prefix: str, window: int, window_ns: int, part: int) -> str:
    start = datetime.fromtimestamp(window * window_ns / 1e9, tz=UTC)
    return f"{prefix}-{start:%Y%m%dT%H%M%S}Z-{part:03d}"


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class RewriteParquetWriter(_WindowedFiles):
    """The naive "append": read the whole file, concatenate, write it all again.

    Kept as the baseline: the cost of each flush grows with the file, which the
    append-cost probe shows. Each rewrite goes to a temporary file that replaces
    the old one atomically, so a crash mid-flush never leaves a broken file.
    """

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        *,
        rotate_s: float,
        compression: str,
        fsync: bool,
        prefix: str,
        rotate_rows: int | None = None,
    ) -> None:
        super().__init__(
            folder,
            schema,
            rotate_s=rotate_s,
            compression=compression,
            fsync=fsync,
            prefix=prefix,
            rotate_rows=rotate_rows,
        )
        self._rows: dict[int, int] = {}

    def write(self, table: pa.Table, window_keys: Sequence[int], batch_id: int) -> WriteResult:
        write_ns = commit_ns = bytes_before = rows_before = 0
        for window, rows in self._pending_windows(window_keys, batch_id):
            start = time.perf_counter_ns()
            part = table if len(rows) == table.num_rows else table.take(pa.array(rows))
            if self._rotate_rows is not None and self._rows.get(window, 0) >= self._rotate_rows:
                self._parts[window] = self._parts.get(window, 0) + 1
                self._rows[window] = 0
            path = (
                self.folder
                / f"{_window_stem(self._prefix, window, self._window_ns, self._parts.get(window, 0))}.parquet"
            )
            tmp = path.with_name(path.name + ".tmp")
            try:
                if path.exists():
                    bytes_before = max(bytes_before, path.stat().st_size)
                    old = pq.read_table(path)
                    rows_before = max(rows_before, old.num_rows)
                    part = pa.concat_tables([old, part])
                pq.write_table(part, tmp, compression=self._compression)
            except (OSError, pa.ArrowException) as exc:
                raise SinkError(f"cannot rewrite {path}: {exc}") from None
            write_ns += time.perf_counter_ns() - start
            start = time.perf_counter_ns()
            try:
                if self._fsync:
                    _fsync_path(tmp)
                os.replace(tmp, path)
            except OSError as exc:
                raise SinkError(f"cannot replace {path}: {exc}") from None
            commit_ns += time.perf_counter_ns() - start
            if path not in self.files_written:
                self.files_written.append(path)
            self._rows[window] = part.num_rows
            self._mark_written(window)
        return WriteResult(write_ns, commit_ns, bytes_before, rows_before)

    def close(self) -> None:
        """Every file is complete after each flush; nothing to finalise."""


def partition_dir(machine: str) -> str:
    """A safe, bounded directory name for a machine id; never a path, never numeric.

    The id itself stays in the ``machine`` column; the folder only groups its
    files. A readable slug plus a hash of the exact id keeps distinct ids apart
    (``a/b`` and ``a_b`` differ), and the non-numeric key means pyarrow's hive
    reader never guesses an integer type for it.

    >>> partition_dir("press/../01")
    'machine_key=press_.._01~629428b054ec'
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", machine)[:48]
    digest = hashlib.sha256(machine.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"machine_key={slug}~{digest}"


class DatasetParquetWriter:
    """One new file per flush and partition, in a hive-partitioned dataset (machine_key, date).

    Appending never touches an existing file, so its cost is flat; the price is
    many small files. Read it with ``pyarrow.dataset.dataset(path, partitioning="hive")``.
    ``rotate_s``, ``prefix`` and ``rotate_rows`` are accepted, as every strategy takes them, and unused:
    files are per flush and partition, named by batch.
    """

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        *,
        compression: str,
        fsync: bool,
        rotate_s: float | None = None,
        prefix: str = "",
        rotate_rows: int | None = None,
    ) -> None:
        self.folder = folder
        self.schema = schema
        self._compression = None if compression == "none" else compression
        self._fsync = fsync
        self._written: tuple[int, set[tuple[str, str]]] = (-1, set())
        self.files_written: list[Path] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create output folder {folder}: {exc}") from None

    def write(self, table: pa.Table, window_keys: Sequence[int], batch_id: int) -> WriteResult:
        if self._written[0] != batch_id:
            self._written = (batch_id, set())
        done = self._written[1]
        groups: dict[tuple[str, str], list[int]] = {}
        machines = table.column("machine").to_pylist()
        for index, (machine, key) in enumerate(zip(machines, window_keys, strict=True)):
            day = datetime.fromtimestamp(key / 1e9, tz=UTC).strftime("%Y-%m-%d")
            groups.setdefault((machine, day), []).append(index)
        write_ns = commit_ns = 0
        written: list[Path] = []
        for (machine, day), rows in sorted(groups.items()):
            if (machine, day) in done:
                continue
            start = time.perf_counter_ns()
            folder = self.folder / partition_dir(machine) / f"date={day}"
            path = folder / f"part-{batch_id:08d}.parquet"
            tmp = path.with_name(path.name + ".tmp")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                pq.write_table(table.take(pa.array(rows)), tmp, compression=self._compression)
            except (OSError, pa.ArrowException) as exc:
                raise SinkError(f"cannot write {path}: {exc}") from None
            write_ns += time.perf_counter_ns() - start
            start = time.perf_counter_ns()
            try:
                if self._fsync:
                    _fsync_path(tmp)
                os.replace(tmp, path)
            except OSError as exc:
                raise SinkError(f"cannot replace {path}: {exc}") from None
            commit_ns += time.perf_counter_ns() - start
            written.append(path)
            done.add((machine, day))
        self.files_written.extend(written)
        return WriteResult(write_ns, commit_ns, 0, 0)

    def close(self) -> None:
        """Every file is complete when written; nothing to finalise."""


class TableWriter(Protocol):
    """Appends tables to files; what each Parquet strategy implements."""

    files_written: list[Path]

    def write(self, table: pa.Table, window_keys: Sequence[int], batch_id: int) -> WriteResult: ...

    def close(self) -> None: ...


class TableWriterFactory(Protocol):
    """A strategy's constructor, as :class:`ParquetSink` calls it."""

    def __call__(
        self,
        folder: Path,
        schema: pa.Schema,
        *,
        rotate_s: float,
        compression: str,
        fsync: bool,
        prefix: str,
        rotate_rows: int | None,
    ) -> TableWriter: ...


ParquetStrategy = Literal["writer", "rewrite", "dataset"]
PARQUET_STRATEGIES: dict[ParquetStrategy, TableWriterFactory] = {
    "writer": WindowedParquetWriter,
    "rewrite": RewriteParquetWriter,
    "dataset": DatasetParquetWriter,
}
"""Every append strategy by name; ``pipeline.parquet.strategy`` accepts exactly these keys."""


def parquet_strategy(name: str) -> TableWriterFactory:
    """The writer class of strategy ``name``; an unknown name is a :class:`ValueError` listing the known ones."""
    if name not in PARQUET_STRATEGIES:
        raise ValueError(f"parquet strategy: expected one of {', '.join(PARQUET_STRATEGIES)}, got {name!r}")
    return PARQUET_STRATEGIES[name]


def readings_table(items: Sequence[Reading], batch_id: int) -> pa.Table:
    return pa.table(
        {
            "machine": pa.array([r.machine for r in items], pa.string()),
            "ts": pa.array([r.ts_ns // 1000 for r in items], TS),
            "load_rate": pa.array([r.load_rate for r in items], pa.float64()),
            "mileage": pa.array([r.mileage for r in items], pa.float64()),
            "seq": pa.array([r.seq for r in items], pa.int64()),
            "received_at": pa.array([r.received_ns // 1000 for r in items], TS),
            "batch_id": pa.array([batch_id] * len(items), pa.int64()),
            "repairs": pa.array([",".join(r.repairs) if r.repairs else None for r in items], pa.string()),
        },
        schema=READING_SCHEMA,
        # Out-of-order readings (within the watermark) land in time order within each flush.
    ).sort_by([("machine", "ascending"), ("ts", "ascending")])


class ParquetSink:
    """Accepted readings to Parquet with an append strategy from :data:`PARQUET_STRATEGIES`.

    ``writer`` (default): ParquetWriter row groups, a file per time window (and
    per ``rotate_rows``). ``rewrite``: the naive read-concat-rewrite baseline.
    ``dataset``: a new file per flush in a hive-partitioned dataset.
    """

    name = "parquet"

    def __init__(
        self,
        folder: Path,
        *,
        rotate_s: float,
        compression: str,
        fsync: bool,
        strategy: ParquetStrategy = "writer",
        rotate_rows: int | None = None,
    ) -> None:
        self.strategy = strategy
        self._out: TableWriter = parquet_strategy(strategy)(
            folder,
            READING_SCHEMA,
            rotate_s=rotate_s,
            compression=compression,
            fsync=fsync,
            prefix="readings",
            rotate_rows=rotate_rows,
        )

    @property
    def files_written(self) -> list[Path]:
        return self._out.files_written

    def write_batch(self, items: Sequence[Reading], batch_id: int) -> SinkTiming:
        start = time.perf_counter_ns()
        table = readings_table(items, batch_id)
        build_ns = time.perf_counter_ns() - start
        result = self._out.write(table, [r.ts_ns for r in items], batch_id)
        return SinkTiming(build_ns, result.write_ns, result.commit_ns, result.bytes_before, result.rows_before)

    def close(self) -> None:
        self._out.close()


class QuarantineSink:
    """Rejected inputs, with reason and raw payload, to Parquet."""

    name = "quarantine"

    def __init__(self, folder: Path, *, rotate_s: float, fsync: bool) -> None:
        self._out = WindowedParquetWriter(
            folder, QUARANTINE_SCHEMA, rotate_s=rotate_s, compression="snappy", fsync=fsync, prefix="rejected"
        )

    def write_batch(self, items: Sequence[Rejection], batch_id: int) -> SinkTiming:
        start = time.perf_counter_ns()
        table = pa.table(
            {
                "received_at": pa.array([r.received_ns // 1000 for r in items], TS),
                "reason": pa.array([r.reason for r in items], pa.string()),
                "detail": pa.array([r.detail for r in items], pa.string()),
                "seq": pa.array([r.seq for r in items], pa.int64()),
                "machine": pa.array([r.machine for r in items], pa.string()),
                "topic": pa.array([r.topic for r in items], pa.string()),
                "payload": pa.array([r.payload for r in items], pa.binary()),
                "batch_id": pa.array([batch_id] * len(items), pa.int64()),
            },
            schema=QUARANTINE_SCHEMA,
        )
        build_ns = time.perf_counter_ns() - start
        result = self._out.write(table, [r.received_ns for r in items], batch_id)
        return SinkTiming(build_ns, result.write_ns, result.commit_ns)

    def close(self) -> None:
        self._out.close()
