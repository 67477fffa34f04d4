"""Parquet output that appends for real: ParquetWriter row groups, a file per time window.

Each flush becomes one row group in the file of its time window, so the cost of
a flush does not grow with the size of the file (the naive "read, concat,
rewrite" does). The append strategies are chosen by name from
:data:`PARQUET_STRATEGIES`. A file is written as ``*.parquet.tmp`` and renamed to
``*.parquet`` only when its footer is written, so anyone listing the folder sees
only complete, readable files. File names come from window times only, never
from ids in the data (a machine id is not a safe path).

``crash_safe=True`` (``pipeline.durability: crash_safe``) adds, for every
strategy and the quarantine: a lock on the output folder, a per-process token
in every file name (a restart never opens or renames onto an existing file), a
journal of the open file that survives kill -9 (``<final name>.arrows.partial``,
an Arrow IPC stream, one record batch per flush), and recovery of what a dead
process left at start-up. docs/durability.md describes the design and what it
guarantees. Without it, files, names and behaviour are as they always were.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SinkError
from pipeline.model import Reading, Rejection
from pipeline.sinks import SinkTiming

WindowKeys = Sequence[int] | npt.NDArray[np.int64]
"""Each row's time in ns, by which it is filed into a window."""
_NS_LIMIT_US = 2**63 // 1000
"""Microseconds beyond which nanoseconds no longer fit int64."""

log = logging.getLogger(__name__)

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


# --- crash_safe: the folder lock, the per-process token, the journal, recovery -------------------------------------

JOURNAL_SUFFIX = ".arrows.partial"
"""Ends the name of a journal: ``<final name>.arrows.partial``; matches neither ``*.parquet`` nor ``*.tmp``."""
LOCK_NAME = ".lock"
"""The lock file of an output folder (a dot file: pyarrow's dataset discovery skips it)."""


def process_token() -> str:
    """What makes a process's file names its own: its start (UTC, to the second) and 24 random bits.

    >>> process_token()  # doctest: +SKIP
    'p20240301T101500Z-3fa9c1'
    """
    return f"p{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class FolderLock:
    """An exclusive lock on an output folder, held until :meth:`release` or the end of the process (kill -9 too).

    ``fcntl.flock`` on ``<folder>/.lock``, non-blocking: a second writer fails at once with a
    :class:`SinkError` naming the folder and the pid the file records. The file is never removed:
    a process waiting on the old file and one creating a new one would both "hold" the lock.
    """

    def __init__(self, folder: Path, token: str) -> None:
        self.path = folder / LOCK_NAME
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SinkError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            mine = " (this process: give each sink its own folder)" if holder == str(os.getpid()) else ""
            raise SinkError(
                f"output folder {folder} is locked by process {holder}{mine} ({self.path}); two pipelines must not "
                "write one folder: stop the other one or give this one another path"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise SinkError(f"cannot lock {self.path}: {exc.strerror}") from None
        self._fd = fd
        record = f"pid {os.getpid()}\ntoken {token}\n".encode()
        try:
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, len(record))
        except OSError as exc:
            # Held all the same; only a refused second writer's message loses the pid.
            log.warning("cannot record the holder in %s: %s", self.path, exc.strerror)

    def release(self) -> None:
        """Let another process write the folder; idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale pid once nobody holds it
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        found = re.search(rb"pid (\d+)", os.pread(fd, 256, 0))
    except OSError:
        found = None
    return found.group(1).decode() if found else "(unknown pid)"


def _fsync_dir(folder: Path) -> None:
    """Make renames, creations and removals in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    """Best effort, on a path that is already failing: the original error is the one to report."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)


def _publish(tmp: Path, final: Path, *, fsync: bool, replace: bool = False) -> None:
    """Rename a complete, synced ``tmp`` to ``final`` (never onto an existing file unless ``replace``)."""
    if not replace and final.exists():
        # Names carry the process token and the folder is locked: this is a bug, never a reason to overwrite.
        raise FileExistsError(errno.EEXIST, "refusing to replace an existing file", str(final))
    os.replace(tmp, final)
    if fsync:
        _fsync_dir(final.parent)


def _write_new(path: Path, table: pa.Table, compression: str | None) -> None:
    """Write ``table`` as a Parquet file at a name that must not exist yet (O_EXCL)."""
    with open(path, "xb") as handle:
        pq.write_table(table, handle, compression=compression)


def _write_parquet_from(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, final: Path, *, compression: str | None, fsync: bool
) -> int:
    """``batches`` as ``final`` (a row group each) via ``final.tmp`` + fsync + rename + fsync of the folder; rows.

    On any failure the temporary file is removed and nothing appears under ``final``.
    """
    tmp = final.with_name(final.name + ".tmp")
    rows = 0
    handle = open(tmp, "xb")  # noqa: SIM115 - closed by the with below; an existing tmp is not ours to remove
    try:
        with handle:
            writer = pq.ParquetWriter(handle, schema, compression=compression)
            try:
                for batch in batches:
                    writer.write_batch(batch)
                    rows += batch.num_rows
            finally:
                # Also on failure: a writer left open would write its footer to a closed file when collected.
                writer.close()
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        _publish(tmp, final, fsync=fsync)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return rows


def _pwrite_all(fd: int, data: pa.Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _record_of(table: pa.Table) -> pa.Buffer:
    """One flush as one IPC record batch message: a journal record is complete or torn, never half a flush."""
    batches = table.combine_chunks().to_batches()
    batch = batches[0] if len(batches) == 1 else pa.concat_batches(batches)
    return batch.serialize()


@dataclass
class _Journal:
    """The flushes of one open file: an Arrow IPC stream, a record batch per flush, fsynced per flush.

    Written with ``pwrite`` at ``size``, the end of the last complete record, so a failed append is cut
    back with one ``ftruncate`` and the next one starts clean. ``broken``: the cut failed, or an fsync
    did (its pages can no longer be trusted): nothing more is appended, a new journal takes over.
    """

    final: Path
    path: Path
    fd: int
    size: int
    rows: int = 0
    broken: bool = False

    @classmethod
    def create(cls, final: Path, schema: pa.Schema, *, fsync: bool) -> _Journal:
        path = final.with_name(final.name + JOURNAL_SUFFIX)
        header = schema.serialize()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SinkError(f"cannot create journal {path}: {exc.strerror}") from None
        try:
            _pwrite_all(fd, header, 0)
            if fsync:
                os.fsync(fd)
                _fsync_dir(path.parent)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(path)
            raise SinkError(f"cannot create journal {path}: {exc.strerror}") from None
        return cls(final, path, fd, header.size)

    def append(self, record: pa.Buffer, rows: int, *, fsync: bool) -> int:
        """Append one flush and make it durable; the ns its fsync took. On failure the file is cut back, and raises."""
        try:
            _pwrite_all(self.fd, record, self.size)
        except OSError:
            self._cut_back()
            raise
        start = time.perf_counter_ns()
        if fsync:
            try:
                os.fsync(self.fd)
            except OSError:
                self._cut_back()
                self.broken = True
                raise
        self.size += record.size
        self.rows += rows
        return time.perf_counter_ns() - start

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            # A torn record stays at the end: readers stop there, and nothing may follow it.
            log.warning("cannot cut %s back after a failed write: %s", self.path, exc.strerror)
            self.broken = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_journal(path: Path) -> tuple[list[pa.RecordBatch], bool]:
    """The complete record batches of a journal a dead process left, and whether a torn tail was dropped.

    Read into memory first, so a read error raises (the journal is kept) while a parse error can only be
    the tail a kill cut short: that flush never returned, so it was never acknowledged as durable.
    """
    data = pa.py_buffer(path.read_bytes())
    try:
        reader = pa.ipc.open_stream(data)
    except (pa.ArrowException, OSError):
        return [], data.size > 0
    batches: list[pa.RecordBatch] = []
    while True:
        try:
            batch = reader.read_next_batch()
            batch.validate(full=True)
        except StopIteration:
            return batches, False
        except (pa.ArrowException, OSError):
            return batches, True
        batches.append(batch)


def _owned_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, skipping subfolders with a lock of their own (another sink recovers those)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not os.path.exists(os.path.join(dirpath, d, LOCK_NAME)))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def recover_folder(folder: Path, *, compression: str | None, fsync: bool) -> list[tuple[Path, int]]:
    """Finish what a dead process left in ``folder``; (final file, rows) per journal. Call it holding the lock.

    ``*.tmp`` files are removed (a temporary file is never the only copy of anything); each journal becomes
    its final Parquet file with all its complete flushes, then is removed. A journal whose final file already
    exists was finalised just before the crash: only the journal is removed.
    """
    recovered: list[tuple[Path, int]] = []
    for path in [p for p in _owned_files(folder) if p.name.endswith(".tmp")]:
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError as exc:
            raise SinkError(f"cannot remove {path}, left by a stopped process: {exc.strerror}") from None
        log.warning("removed %s (%d bytes): an unfinished temporary file of a stopped process", path, size)
    for journal in [p for p in _owned_files(folder) if p.name.endswith(JOURNAL_SUFFIX)]:
        final = journal.with_name(journal.name[: -len(JOURNAL_SUFFIX)])
        try:
            if final.exists():
                journal.unlink()
                log.warning("removed journal %s: %s was already finalised", journal, final.name)
                continue
            batches, torn = _read_journal(journal)
            rows = 0
            if batches:
                rows = _write_parquet_from(batches, batches[0].schema, final, compression=compression, fsync=fsync)
            journal.unlink()
            if fsync:
                _fsync_dir(journal.parent)
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(f"cannot recover {journal}: {exc} (the journal is kept)") from None
        dropped = "; a torn last flush, never acknowledged, was dropped" if torn else ""
        if batches:
            log.warning("recovered %s: %d rows from the journal of a stopped process%s", final, rows, dropped)
            recovered.append((final, rows))
        else:
            log.warning("removed journal %s: 0 rows, no flush was complete%s", journal, dropped)
    return recovered


class _CrashSafeFolder:
    """What ``crash_safe`` adds to a sink's folder: the lock, the token for names, and recovery at start."""

    def __init__(self, folder: Path, *, compression: str | None, fsync: bool) -> None:
        self.folder = folder
        self.token = process_token()
        self._lock = FolderLock(folder, self.token)
        try:
            self.recovered = recover_folder(folder, compression=compression, fsync=fsync)
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        self._lock.release()


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
        crash_safe: bool = False,
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
        self._safe = _CrashSafeFolder(folder, compression=self._compression, fsync=fsync) if crash_safe else None
        self.recovered: list[tuple[Path, int]] = self._safe.recovered if self._safe is not None else []
        """(final file, rows) of each journal a dead process left, finished at start (crash_safe)."""

    def _stem(self, window: int, part: int) -> str:
        return _window_stem(
            self._prefix, window, self._window_ns, part, self._safe.token if self._safe is not None else None
        )

    def _pending_windows(
        self, window_keys: WindowKeys, batch_id: int
    ) -> list[tuple[int, Sequence[int] | npt.NDArray[np.intp]]]:
        """(window, row indexes) of this batch not yet written, oldest window first; marks none done."""
        if self._written[0] != batch_id:
            self._written = (batch_id, set())
        try:
            keys = np.asarray(window_keys, dtype=np.int64)
        except OverflowError:  # a key past int64 (a time beyond 2262 accepted by policy): the exact way
            by_window: dict[int, list[int]] = {}
            for index, key in enumerate(window_keys):
                by_window.setdefault(key // self._window_ns, []).append(index)
            return [(w, rows) for w, rows in sorted(by_window.items()) if w not in self._written[1]]
        # Vectorised: a Python loop here cost about 0.2 us a row, a tenth of a flush. numpy's // floors as
        # Python's does, negative keys included.
        windows = keys // self._window_ns
        if not windows.size:
            return []
        first = int(windows[0])
        if (windows == first).all():  # the usual batch: one window
            groups: list[tuple[int, Sequence[int] | npt.NDArray[np.intp]]] = [(first, range(windows.size))]
        else:
            groups = [(int(w), np.flatnonzero(windows == w)) for w in np.unique(windows)]
        return [(w, rows) for w, rows in groups if w not in self._written[1]]

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
        crash_safe: bool = False,
    ) -> None:
        super().__init__(
            folder,
            schema,
            rotate_s=rotate_s,
            compression=compression,
            fsync=fsync,
            prefix=prefix,
            rotate_rows=rotate_rows,
            crash_safe=crash_safe,
        )
        self._grace = grace_windows
        self._open: dict[int, _OpenFile] = {}
        self._newest: int | None = None
        # crash_safe: the open journal per window, and closed ones whose Parquet file is still to write.
        self._journals: dict[int, _Journal] = {}
        self._sealed: list[_Journal] = []
        self._closed = False

    def write(self, table: pa.Table, window_keys: WindowKeys, batch_id: int) -> WriteResult:
        """Append ``table``; ``window_keys[i]`` is row i's time in ns."""
        if self._safe is not None:
            return self._write_journaled(table, window_keys, batch_id)
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
        if self._safe is not None:
            self._close_journaled(self._safe)
            return
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

    # -- crash_safe: a journal per open file, the Parquet file written whole at rotation ------------------------

    def _write_journaled(self, table: pa.Table, window_keys: WindowKeys, batch_id: int) -> WriteResult:
        write_ns = commit_ns = bytes_before = rows_before = 0
        for window, rows in self._pending_windows(window_keys, batch_id):
            start = time.perf_counter_ns()
            part = table if len(rows) == table.num_rows else table.take(pa.array(rows))
            journal = self._journal_for(window)
            if self._rotate_rows is not None and journal.rows >= self._rotate_rows:
                self._seal(window)
                journal = self._journal_for(window)
            bytes_before = max(bytes_before, journal.size)
            rows_before = max(rows_before, journal.rows)
            try:
                synced_ns = journal.append(_record_of(part), part.num_rows, fsync=self._fsync)
            except OSError as exc:
                if journal.broken:
                    self._seal(window)
                raise SinkError(f"cannot append to {journal.path}: {exc.strerror or exc}") from None
            self._mark_written(window)
            write_ns += time.perf_counter_ns() - start - synced_ns
            commit_ns += synced_ns
            if self._newest is None or window > self._newest:
                self._newest = window
        if self._newest is not None:
            for window in [w for w in self._journals if w < self._newest - self._grace]:
                self._seal(window)
        # This batch is durable in its journals whatever happens here: a failed rotation is retried later.
        self._finalise_sealed()
        return WriteResult(write_ns, commit_ns, bytes_before, rows_before)

    def _journal_for(self, window: int) -> _Journal:
        existing = self._journals.get(window)
        if existing is not None:
            return existing
        part = self._parts.get(window, 0)
        self._parts[window] = part + 1
        journal = _Journal.create(self.folder / f"{self._stem(window, part)}.parquet", self.schema, fsync=self._fsync)
        self._journals[window] = journal
        return journal

    def _seal(self, window: int) -> None:
        journal = self._journals.pop(window)
        journal.close()
        self._sealed.append(journal)

    def _finalise_sealed(self) -> list[str]:
        """Write the Parquet file of every sealed journal; what failed stays sealed, its error in the list."""
        errors = []
        for journal in list(self._sealed):
            try:
                self._finalise_journal(journal)
            except (OSError, pa.ArrowException, SinkError) as exc:
                log.warning("cannot finalise %s yet (its journal is kept): %s", journal.final, exc)
                errors.append(f"{journal.final}: {exc}")
                continue
            self._sealed.remove(journal)
        return errors

    def _finalise_journal(self, journal: _Journal) -> None:
        if journal.final.exists():
            # Published by an earlier attempt that then failed to remove the journal.
            journal.path.unlink()
            self.files_written.append(journal.final)
            return
        if journal.rows == 0:
            # Its only append failed and was cut back: nothing to keep.
            journal.path.unlink()
            return
        if journal.broken:
            # A record may be torn at its end: read it as recovery does, keeping the complete ones.
            batches, _ = _read_journal(journal.path)
            if not batches:
                journal.path.unlink()
                return
            _write_parquet_from(batches, self.schema, journal.final, compression=self._compression, fsync=self._fsync)
        else:
            with pa.OSFile(str(journal.path)) as source:
                reader = pa.ipc.open_stream(source)
                rows = _write_parquet_from(
                    reader, self.schema, journal.final, compression=self._compression, fsync=self._fsync
                )
            if rows != journal.rows:
                log.error("%s holds %d rows where %d were appended to its journal", journal.final, rows, journal.rows)
        # Once the final file is durable: a crash before this unlink leaves a journal that recovery drops.
        journal.path.unlink()
        self.files_written.append(journal.final)

    def _close_journaled(self, safe: _CrashSafeFolder) -> None:
        if self._closed:
            return
        self._closed = True
        for window in list(self._journals):
            self._seal(window)
        try:
            errors = self._finalise_sealed()
        finally:
            safe.release()
        if errors:
            raise SinkError(
                f"cannot finalise {'; '.join(errors)}; the journals are kept and recovered at the next start"
            )


def _window_stem(prefix: str, window: int, window_ns: int, part: int, token: str | None = None) -> str:
    start = datetime.fromtimestamp(window * window_ns / 1e9, tz=UTC)
    if token is None:
        return f"{prefix}-{start:%Y%m%dT%H%M%S}Z-{part:03d}"
    return f"{prefix}-{start:%Y%m%dT%H%M%S}Z-{token}-{part:03d}"


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
        crash_safe: bool = False,
    ) -> None:
        super().__init__(
            folder,
            schema,
            rotate_s=rotate_s,
            compression=compression,
            fsync=fsync,
            prefix=prefix,
            rotate_rows=rotate_rows,
            crash_safe=crash_safe,
        )
        self._rows: dict[int, int] = {}

    def write(self, table: pa.Table, window_keys: WindowKeys, batch_id: int) -> WriteResult:
        write_ns = commit_ns = bytes_before = rows_before = 0
        for window, rows in self._pending_windows(window_keys, batch_id):
            start = time.perf_counter_ns()
            part = table if len(rows) == table.num_rows else table.take(pa.array(rows))
            if self._rotate_rows is not None and self._rows.get(window, 0) >= self._rotate_rows:
                self._parts[window] = self._parts.get(window, 0) + 1
                self._rows[window] = 0
            path = self.folder / f"{self._stem(window, self._parts.get(window, 0))}.parquet"
            tmp = path.with_name(path.name + ".tmp")
            existed = False
            try:
                if path.exists():
                    existed = True
                    bytes_before = max(bytes_before, path.stat().st_size)
                    old = pq.read_table(path)
                    rows_before = max(rows_before, old.num_rows)
                    part = pa.concat_tables([old, part])
                if self._safe is None:
                    pq.write_table(part, tmp, compression=self._compression)
                else:
                    _write_new(tmp, part, self._compression)
            except (OSError, pa.ArrowException) as exc:
                if self._safe is not None:
                    _unlink_quietly(tmp)
                raise SinkError(f"cannot rewrite {path}: {exc}") from None
            write_ns += time.perf_counter_ns() - start
            start = time.perf_counter_ns()
            try:
                if self._fsync:
                    _fsync_path(tmp)
                if self._safe is None:
                    os.replace(tmp, path)
                else:
                    # Only this process's own file is ever replaced: its name carries the process token.
                    _publish(tmp, path, fsync=self._fsync, replace=existed)
            except OSError as exc:
                if self._safe is not None:
                    _unlink_quietly(tmp)
                raise SinkError(f"cannot replace {path}: {exc}") from None
            commit_ns += time.perf_counter_ns() - start
            if path not in self.files_written:
                self.files_written.append(path)
            self._rows[window] = part.num_rows
            self._mark_written(window)
        return WriteResult(write_ns, commit_ns, bytes_before, rows_before)

    def close(self) -> None:
        """Every file is complete after each flush; nothing to finalise (crash_safe: the lock is released)."""
        if self._safe is not None:
            self._safe.release()


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
        crash_safe: bool = False,
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
        self._safe = _CrashSafeFolder(folder, compression=self._compression, fsync=fsync) if crash_safe else None
        self.recovered: list[tuple[Path, int]] = self._safe.recovered if self._safe is not None else []
        self._made_dirs: set[Path] = set()

    def write(self, table: pa.Table, window_keys: WindowKeys, batch_id: int) -> WriteResult:
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
            if self._safe is None:
                path = folder / f"part-{batch_id:08d}.parquet"
            else:
                # Batch ids restart with the process: the token keeps a restart's files apart from the last run's.
                path = folder / f"part-{self._safe.token}-{batch_id:08d}.parquet"
            tmp = path.with_name(path.name + ".tmp")
            try:
                if self._safe is None:
                    folder.mkdir(parents=True, exist_ok=True)
                    pq.write_table(table.take(pa.array(rows)), tmp, compression=self._compression)
                else:
                    self._make_dirs(folder)
                    _write_new(tmp, table.take(pa.array(rows)), self._compression)
            except (OSError, pa.ArrowException) as exc:
                if self._safe is not None:
                    _unlink_quietly(tmp)
                raise SinkError(f"cannot write {path}: {exc}") from None
            write_ns += time.perf_counter_ns() - start
            start = time.perf_counter_ns()
            try:
                if self._fsync:
                    _fsync_path(tmp)
                if self._safe is None:
                    os.replace(tmp, path)
                else:
                    _publish(tmp, path, fsync=self._fsync)
            except OSError as exc:
                if self._safe is not None:
                    _unlink_quietly(tmp)
                raise SinkError(f"cannot replace {path}: {exc}") from None
            commit_ns += time.perf_counter_ns() - start
            written.append(path)
            done.add((machine, day))
        self.files_written.extend(written)
        return WriteResult(write_ns, commit_ns, 0, 0)

    def _make_dirs(self, folder: Path) -> None:
        """Create a partition folder durably: each new folder's entry in its parent is fsynced (crash_safe)."""
        if folder in self._made_dirs:
            return
        missing = []
        at = folder
        while at != self.folder and not at.is_dir():
            missing.append(at)
            at = at.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            if self._fsync:
                _fsync_dir(new.parent)
        self._made_dirs.add(folder)

    def close(self) -> None:
        """Every file is complete when written; nothing to finalise (crash_safe: the lock is released)."""
        if self._safe is not None:
            self._safe.release()


class TableWriter(Protocol):
    """Appends tables to files; what each Parquet strategy implements."""

    files_written: list[Path]
    recovered: list[tuple[Path, int]]

    def write(self, table: pa.Table, window_keys: WindowKeys, batch_id: int) -> WriteResult: ...

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
        crash_safe: bool = False,
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


def _micros(values: Sequence[int]) -> pa.Array:
    """Nanosecond ints to a microsecond timestamp column, flooring as Python's // does."""
    try:
        return pa.array(np.asarray(values, dtype=np.int64) // 1000, TS)
    except OverflowError:  # past int64 nanoseconds (after 2262, accepted by policy): the exact way
        return pa.array([v // 1000 for v in values], TS)


def readings_table(items: Sequence[Reading], batch_id: int) -> pa.Table:
    if not items:
        return READING_SCHEMA.empty_table()
    # One transposition in C (a Reading is a named tuple) instead of a Python pass per column.
    machine, ts_ns, load_rate, mileage, seq, received_ns, repairs = zip(*items, strict=True)
    return pa.table(
        {
            "machine": pa.array(machine, pa.string()),
            "ts": _micros(ts_ns),
            "load_rate": pa.array(load_rate, pa.float64()),
            "mileage": pa.array(mileage, pa.float64()),
            "seq": pa.array(seq, pa.int64()),
            "received_at": _micros(received_ns),
            "batch_id": pa.array(np.full(len(items), batch_id, dtype=np.int64), pa.int64()),
            # The usual batch has no repaired row: any() over empty tuples runs in C, a Python join per row not.
            "repairs": (
                pa.array([",".join(r) if r else None for r in repairs], pa.string())
                if any(repairs)
                else pa.nulls(len(items), pa.string())
            ),
        },
        schema=READING_SCHEMA,
        # Out-of-order readings (within the watermark) land in time order within each flush.
    ).sort_by([("machine", "ascending"), ("ts", "ascending")])


class ParquetSink:
    """Accepted readings to Parquet with an append strategy from :data:`PARQUET_STRATEGIES`.

    ``writer`` (default): ParquetWriter row groups, a file per time window (and
    per ``rotate_rows``). ``rewrite``: the naive read-concat-rewrite baseline.
    ``dataset``: a new file per flush in a hive-partitioned dataset.
    ``crash_safe``: lock the folder, recover what a dead process left, names a
    restart never reuses, the open file journaled per flush (docs/durability.md).
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
        crash_safe: bool = False,
    ) -> None:
        self.strategy = strategy
        self.crash_safe = crash_safe
        self._out: TableWriter = parquet_strategy(strategy)(
            folder,
            READING_SCHEMA,
            rotate_s=rotate_s,
            compression=compression,
            fsync=fsync,
            prefix="readings",
            rotate_rows=rotate_rows,
            crash_safe=crash_safe,
        )

    @property
    def files_written(self) -> list[Path]:
        return self._out.files_written

    @property
    def recovered(self) -> list[tuple[Path, int]]:
        """(file, rows) finished at start from the journals of a dead process (crash_safe)."""
        return self._out.recovered

    def write_batch(self, items: Sequence[Reading], batch_id: int) -> SinkTiming:
        start = time.perf_counter_ns()
        table = readings_table(items, batch_id)
        build_ns = time.perf_counter_ns() - start
        # The window of each row of the table as built: sorted by (machine, ts), no longer in ``items``' order
        # (keys in items' order put a batch spanning two windows' rows into the wrong files).
        micros = table.column("ts").cast(pa.int64()).to_numpy()
        keys: WindowKeys = micros * 1000
        if micros.size and not -_NS_LIMIT_US < int(micros.min()) <= int(micros.max()) < _NS_LIMIT_US:
            # A time past int64 nanoseconds (after 2262, accepted by policy) would wrap in numpy and file the row
            # under a window centuries off: Python ints, which the windows are grouped from exactly.
            keys = [v * 1000 for v in micros.tolist()]
        result = self._out.write(table, keys, batch_id)
        return SinkTiming(build_ns, result.write_ns, result.commit_ns, result.bytes_before, result.rows_before)

    def close(self) -> None:
        self._out.close()


class QuarantineSink:
    """Rejected inputs, with reason and raw payload, to Parquet."""

    name = "quarantine"

    def __init__(self, folder: Path, *, rotate_s: float, fsync: bool, crash_safe: bool = False) -> None:
        self.crash_safe = crash_safe
        self._out = WindowedParquetWriter(
            folder,
            QUARANTINE_SCHEMA,
            rotate_s=rotate_s,
            compression="snappy",
            fsync=fsync,
            prefix="rejected",
            crash_safe=crash_safe,
        )

    @property
    def recovered(self) -> list[tuple[Path, int]]:
        return self._out.recovered

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
