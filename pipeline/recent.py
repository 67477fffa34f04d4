"""The seqs most recently accepted per machine, read back from a crash-safe output folder at start-up.

Why: with ``durability: crash_safe`` and MQTT ``ack: durable``, a message that was durable (in a Parquet
file or its journal) but whose acknowledgement had not reached the broker when the process died is
delivered again after the restart. The validator's ``duplicate`` rule would quarantine it, but its
per-machine window of recent seqs (``dedup_window``) starts empty in a new process, so the copy was
stored a second time (293 rows in one kill -9 run). :func:`recent_seqs` reads the window back from what
the folder holds; :meth:`pipeline.validate.Validator.seed_recent` takes it.

What "most recent" means here, in order of acceptance:

1. **Processes.** Every crash-safe file name carries its writer's token, ``p<start UTC>-<random>``
   (:func:`pipeline.parquet_sink.process_token`), and the folder lock lets one process write at a time,
   so processes are ordered by the start time in their token; two tokens of the same second by the newest
   mtime among their files. Files without a token (a ``naive`` run's) come before every token, each file
   on its own, by mtime: batch ids restart with each naive run and nothing else tells two runs apart.
2. **Within a process**, by ``batch_id``: the readings buffer numbers its flushes in order, and one flush
   may span several files (one per time window), so file order alone would interleave wrongly.
3. **Within a flush**, by file name (its time window, then its part), then row order. A flush is stored
   sorted by (machine, ts), so per machine this is timestamp order, not arrival order: which seq is the
   oldest of a window is exact to the flush only. The set of seqs, what the duplicate rule looks at, is
   what matters.

Bounded cost. Files are read newest process first, and within a process by mtime, newest first: a file is
written at or after the flush of each of its rows (a window's file at its rotation, from its journal), so
every row flushed after the mtime of the last file read is in a file read. Only the columns ``machine``,
``seq`` and ``batch_id`` are read, and a file's row groups (a flush each, for the writer strategy) from its
end. Reading stops

- once every machine seen has ``window`` seqs, judged between flushes (the dataset strategy writes one
  flush as a file per machine, all of one name) and not before ``min_rows`` rows;
- at ``max_files`` files;
- at ``max_rows`` rows: whole row groups while they fit, and when not even a file's last one does, its last
  rows up to the cap (decoded whole: the rewrite strategy writes a window as one row group).

The caps matter: the default ``dedup_window`` is 100,000 per machine, far more than can ever come again.
What a restart is delivered again is what was durable but unacknowledged at the kill: the broker's
inflight window (Mosquitto's 20 by default, more as observed once acknowledgements flow: 293 in one run;
1000 over MQTT v5). Those are the newest rows of the folder, which the caps cover many times over. A
machine found only past the caps starts with an empty window, as one evicted by ``machines_tracked``
does.

Measured (warm cache, 2 cores): 1,000,000 rows of 10 machines in 200 files of the writer strategy: 3 ms
for a window of 1000 (2 files), 57 ms for the default window (the 250,000-row cap, 50 files), 190 ms
for all of it uncapped. The same rows in the dataset strategy's 20,000 files: 0.25 s for a window of
1000 (200 files), 0.7 s at the 1,024-file cap. Listing the folder (a ``stat`` per file, for its mtime) is
the one cost the caps do not bound: about 5 us per file, 0.1 s of those.

Call it after the folder's sink was created: the sink recovers a dead process's journals into Parquet
files at construction, holding the folder lock. Journals still present (read before the sink, or a tool
reading a folder a live pipeline writes) are read too, their complete records only, so the order does not
change the result; a journal whose final file exists already is skipped, as recovery skips it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.parquet_sink import JOURNAL_SUFFIX, LOCK_NAME, _read_journal

log = logging.getLogger(__name__)

COLUMNS = ("machine", "seq", "batch_id")
"""The only columns read."""
_READ_SCHEMA = pa.schema([("machine", pa.string()), ("seq", pa.int64()), ("batch_id", pa.int64())])
DEFAULT_MAX_FILES = 1024
"""Files read at most. It binds for the dataset strategy only, which writes a file per flush and machine: a
fleet where each machine sends one reading per flush puts the 1000 messages an MQTT v5 broker may hold
unacknowledged in 1000 files."""
DEFAULT_MAX_ROWS = 250_000
"""Rows read at most."""
DEFAULT_MIN_ROWS = 10_000
"""Rows read at least (when the folder holds them) before "every machine seen has its window" may stop the
reading: with a small ``dedup_window``, the machines of the newest files would otherwise fill up before a
rarely sending machine's redelivered message, still within what the broker may send again, is read."""

# The token process_token() puts in every crash-safe file name: "-p20240301T101500Z-3fa9c1-" (writer,
# rewrite, quarantine) or "part-p20240301T101500Z-3fa9c1-" (dataset).
_JOURNAL_OF_PARQUET = ".parquet" + JOURNAL_SUFFIX
_TOKEN = re.compile(r"(?:^|-)(p(\d{8}T\d{6}Z)-[0-9a-f]{6})-")

StopReason = Literal["window", "max_files", "max_rows", "all_read"]


@dataclass(frozen=True, slots=True)
class RecentSeqs:
    """What :func:`recent_seqs` found, and what it cost."""

    seqs: dict[str, list[int]] = field(default_factory=dict)
    """Per machine its last ``window`` seqs, oldest first; machines ordered by their last accepted row, least
    recent first (the order :meth:`~pipeline.validate.Validator.seed_recent` evicts in)."""
    files_listed: int = 0
    files_read: int = 0
    rows_read: int = 0
    stopped: StopReason = "all_read"
    """``window``: every machine seen had its window; ``max_files``/``max_rows``: a cap, with files left;
    ``all_read``: nothing more to read."""
    elapsed_ns: int = 0


@dataclass(frozen=True, slots=True)
class _File:
    path: str
    name: str
    mtime_ns: int
    journal: bool


@dataclass(frozen=True, slots=True)
class _Chunk:
    group: int
    """Rank of the file's process, oldest 0."""
    name: str
    """The file's name: the order of a flush's rows across files (its time windows, then parts)."""
    path: str
    """Then its path: the dataset strategy names a flush's files alike, in folders by machine and date."""
    table: pa.Table


def recent_seqs(
    folder: Path,
    window: int,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_rows: int = DEFAULT_MAX_ROWS,
    min_rows: int = DEFAULT_MIN_ROWS,
) -> RecentSeqs:
    """Per machine, the last ``window`` seqs accepted into ``folder`` (a readings folder), bounded in cost.

    Never raises for what the folder holds: a file that cannot be read is logged and skipped (seeding is a
    best effort; the pipeline must start). Reads no file when ``window``, ``max_files`` or ``max_rows`` is 0.
    """
    started = time.perf_counter_ns()
    files = _data_files(folder)
    chunks: list[_Chunk] = []
    counts: dict[str, int] = {}
    files_read = rows_read = 0
    stopped: StopReason = "all_read"
    previous = ""
    for group, item in _newest_first(files):
        # Judged between flushes only: the dataset strategy writes one flush as a file per machine, all of the
        # same name, and a machine not read yet must not be missed because the ones read are full.
        if item.name != previous and _windows_full(counts, window, rows_read, min_rows):
            stopped = "window"
            break
        if files_read >= max_files:
            stopped = "max_files"
            break
        if rows_read >= max_rows:
            stopped = "max_rows"
            break
        previous = item.name
        table, whole = _read_tail(item, max_rows - rows_read)
        files_read += 1
        if table is not None and table.num_rows:
            rows_read += table.num_rows
            chunks.append(_Chunk(group, item.name, item.path, table))
            for machine, n in _value_counts(table.column("machine")):
                counts[machine] = counts.get(machine, 0) + n
        if not whole:
            stopped = "max_rows"
            break
    else:
        if _windows_full(counts, window, rows_read, min_rows):
            stopped = "window"
    seqs = _last_per_machine(chunks, window) if window > 0 else {}
    result = RecentSeqs(seqs, len(files), files_read, rows_read, stopped, time.perf_counter_ns() - started)
    log.info(
        "recent seqs of %s: %d machines, %d seqs from %d of %d files (%d rows read, stopped: %s) in %.1f ms",
        folder,
        len(seqs),
        sum(map(len, seqs.values())),
        files_read,
        len(files),
        rows_read,
        stopped,
        result.elapsed_ns / 1e6,
    )
    return result


def _windows_full(counts: dict[str, int], window: int, rows_read: int, min_rows: int) -> bool:
    if window <= 0:
        return True
    return rows_read >= min_rows and bool(counts) and min(counts.values()) >= window


def _data_files(folder: Path) -> list[_File]:
    """The readings files and journals of ``folder`` with their mtimes, as the sink's recovery sees the folder
    (subfolders with a lock of their own belong to another sink).

    ``os.scandir`` and plain strings, not ``Path``: the dataset strategy leaves a file per flush and machine,
    and listing 20,000 of them through ``pathlib`` took 0.4 s of a 0.5 s start-up read.
    """
    found: list[_File] = []
    pending = [str(folder)]
    while pending:
        at = pending.pop()
        try:
            entries = list(os.scandir(at))
        except OSError:
            continue  # the folder itself missing, or a subfolder gone since its parent was listed
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not os.path.exists(os.path.join(entry.path, LOCK_NAME)):
                        pending.append(entry.path)
                    continue
                journal = name.endswith(_JOURNAL_OF_PARQUET)
                if not (journal or name.endswith(".parquet")):
                    continue
                if journal and os.path.exists(entry.path[: -len(JOURNAL_SUFFIX)]):
                    continue  # finalised just before a crash: its rows are in the final file, read once
                mtime_ns = entry.stat().st_mtime_ns
            except OSError:
                continue  # gone since the listing (a live writer's journal finalised meanwhile)
            found.append(_File(entry.path, name, mtime_ns, journal))
    return found


def _newest_first(files: Iterable[_File]) -> list[tuple[int, _File]]:
    """(process rank, file): the newest process first, its newest file first; ranks count from the oldest."""
    # Key of a process: (has a token, the token's start time, the token). A file without a token is a
    # process of its own: batch ids cannot order it against anything else.
    groups: dict[tuple[bool, str, str], list[_File]] = {}
    for item in files:
        found = _TOKEN.search(item.name)
        key = (True, found.group(2), found.group(1)) if found else (False, "", item.path)
        groups.setdefault(key, []).append(item)

    def rank(key: tuple[bool, str, str]) -> tuple[bool, str, int, str]:
        # The token's start time first (names survive a copy that resets mtimes), then the newest mtime, for
        # two processes started within one second.
        return (key[0], key[1], max(f.mtime_ns for f in groups[key]), key[2])

    ordered = sorted(groups, key=rank)
    out: list[tuple[int, _File]] = []
    for group in range(len(ordered) - 1, -1, -1):
        # Equal mtimes (coarse file system clocks) fall back on the name: window then part, or batch id.
        members = sorted(groups[ordered[group]], key=lambda f: (f.mtime_ns, f.name, f.path), reverse=True)
        out.extend((group, member) for member in members)
    return out


def _read_tail(item: _File, budget: int) -> tuple[pa.Table | None, bool]:
    """The columns of a file's last rows that fit in ``budget``, in file order, and whether the file fitted whole.

    Whole row groups (journal records) from the end. When not even the last one fits, its last ``budget`` rows:
    the rewrite strategy writes a whole window as one row group (up to pyarrow's 1 Mi rows), which is then
    decoded whole and cut, so that a long window still seeds the newest rows.
    """
    if budget <= 0:
        return None, False
    try:
        if item.journal:
            batches, _ = _read_journal(Path(item.path))  # complete records only: a torn one never returned
            sizes = [b.num_rows for b in batches]
            keep = _fitting_tail(sizes, budget)
            tail = batches[len(batches) - max(keep, 1) :] if batches else []
            table = pa.Table.from_batches(tail) if tail else None
        else:
            with pq.ParquetFile(item.path) as parquet:
                meta = parquet.metadata
                sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                keep = _fitting_tail(sizes, budget)
                groups = list(range(len(sizes) - max(keep, 1), len(sizes))) if sizes else []
                table = parquet.read_row_groups(groups, columns=list(COLUMNS)) if groups else None
        if table is not None:
            # A Parquet file of another schema in the folder holds no readings to remember: pyarrow leaves out
            # columns it does not have rather than failing, so select them, which does fail (KeyError).
            table = table.select(list(COLUMNS)).cast(_READ_SCHEMA)
    except (OSError, pa.ArrowException, KeyError) as exc:
        log.warning("recent seqs: cannot read %s, skipped: %s", item.path, exc)
        return None, True
    if table is None:
        return None, True  # no rows at all
    table = table.drop_null()
    if table.num_rows > budget:
        table = table.slice(table.num_rows - budget)
    return table, keep == len(sizes)


def _fitting_tail(sizes: list[int], budget: int) -> int:
    """How many of the last ``sizes`` fit in ``budget`` together."""
    total = keep = 0
    for size in reversed(sizes):
        if total + size > budget:
            break
        total += size
        keep += 1
    return keep


def _value_counts(machines: pa.ChunkedArray) -> list[tuple[str, int]]:
    counted = pc.value_counts(machines)
    return list(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True))


def _last_per_machine(chunks: list[_Chunk], window: int) -> dict[str, list[int]]:
    """Sort the rows read into acceptance order (process, batch id, file, row) and keep each machine's last
    ``window`` seqs, machines ordered by their last row."""
    if not chunks:
        return {}
    # Positions count rows in (process, file name, path) order: what orders the rows of one flush. Not the order of
    # reading (mtimes): a window's file is written at its rotation, after the flush that rotated it appended
    # newer rows to the next window's journal.
    ascending = sorted(chunks, key=lambda c: (c.group, c.name, c.path))
    rows = pa.concat_tables([c.table for c in ascending])
    encoded = pc.dictionary_encode(rows.column("machine").combine_chunks())
    names: list[str] = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    seq = rows.column("seq").to_numpy()
    batch = rows.column("batch_id").to_numpy()
    group = np.repeat(np.array([c.group for c in ascending], dtype=np.int64), [c.table.num_rows for c in ascending])
    position = np.arange(len(seq))
    order = np.lexsort((position, batch, group))  # the last key is the primary one
    codes, seq = codes[order], seq[order]
    by_machine = np.argsort(codes, kind="stable")  # stable: each machine's rows stay in acceptance order
    sorted_codes = codes[by_machine]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    ends = np.r_[starts[1:], len(sorted_codes)]
    tails = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        last = by_machine[max(start, end - window) : end]
        tails.append((int(last[-1]), names[int(sorted_codes[start])], seq[last].tolist()))
    tails.sort()  # by each machine's last row: least recently seen first
    return {name: seqs for _, name, seqs in tails}
