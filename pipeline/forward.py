"""Store-and-forward: filter -> local SQLite outbox -> a sender thread that forwards batches upstream over HTTP.

Three strategies share the same storage, so the only differences a run measures are when a row leaves it and
whether a retry can be recognised upstream:

- ``naive``: the sender takes a batch, deletes it, then posts it once; whatever the upstream answers (or does not),
  the rows are gone. An outage or a 500 loses the batch in flight.
- ``retry``: the sender posts the oldest batch and deletes it only after a 2xx acknowledgement; on any failure it
  keeps the rows and retries the same batch with exponential backoff and full jitter. No idempotency key: a retry
  after a lost acknowledgement (or an answer slower than the timeout) is stored upstream a second time.
- ``outbox``: ``retry`` plus an idempotency key per record (``machine:seq``), so such a retry is recognised
  upstream instead of stored twice. Sending strictly the oldest rows first (head-of-line) keeps each machine's
  order.

The outbox is bounded (``max_rows``); when full, the named ``overflow`` policy decides (``drop_newest``: refuse the
new reading; ``drop_oldest``: evict the oldest stored one), and every drop is written to the ``dropped`` table with
its reason, so nothing leaves the storage unaccounted. Rejected input goes to the ``rejected`` table.

A full disk is a named policy too: a reading that would leave less than ``min_free_bytes`` free on the outbox's
file system (or that SQLite cannot write: ``SQLITE_FULL``) is refused with reason ``disk_full``, never half
stored. The refusal is written to ``dropped`` as soon as a write succeeds again; until then it is kept in memory
(``Outbox.pending_drops``; the command line prints it on exit). The reserve keeps room for what frees space:
the sender's deletes after an acknowledgement, and the WAL checkpoints (kept small by ``wal_autocheckpoint``
and ``journal_size_limit``), so the outbox takes readings again once the upstream has drained it.

This module never imports the bench: it runs on its own (``python -m pipeline.forward --upstream URL --db FILE``
reads JSON lines from standard input).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

Strategy = Literal["naive", "retry", "outbox"]
STRATEGIES: tuple[Strategy, ...] = ("naive", "retry", "outbox")
Overflow = Literal["drop_newest", "drop_oldest"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, machine TEXT NOT NULL,
    seq INTEGER NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (seq INTEGER, reason TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dropped (seq INTEGER NOT NULL, reason TEXT NOT NULL);
"""


@dataclass(frozen=True)
class ForwardConfig:
    """How the sender behaves; the defaults are the improved strategy's."""

    upstream: str
    """Base URL of the upstream, e.g. ``http://127.0.0.1:8080``; batches go to ``POST {upstream}/ingest``."""
    db_path: Path
    strategy: Strategy = "outbox"
    batch_size: int = 50
    max_rows: int = 100_000
    overflow: Overflow = "drop_newest"
    poll_s: float = 0.02
    """How long the sender sleeps when the outbox is empty."""
    timeout_s: float = 1.0
    """Per request: a slower answer counts as a failure (its acknowledgement may be lost)."""
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    seed: int = 0
    """Seeds the backoff jitter, so a run's retry schedule is reproducible given the same failures."""
    min_free_bytes: int = 256 * 1024
    """Refuse new readings (reason ``disk_full``) below this much free space on the outbox's file system."""


@dataclass
class SenderStats:
    requests: int = 0
    acknowledged: int = 0
    retries: int = 0
    """Requests that re-sent a batch already posted (retry and outbox)."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed requests by kind: refused, http_5xx, no_answer (connection closed or timed out); and
    delete_failed: an acknowledged batch the full disk would not let it delete (kept, re-sent)."""


def check_reading(payload: bytes) -> tuple[dict[str, object] | None, int | None, str | None]:
    """The filter: (reading, seq, None) for a clean reading, (None, seq-if-readable, reason) otherwise."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None, None, "malformed_json"
    if not isinstance(body, dict):
        return None, None, "not_an_object"
    seq = body.get("seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    if seq is None:
        return None, None, "missing_seq"
    if not isinstance(body.get("machine"), str) or not isinstance(body.get("ts"), str):
        return None, seq, "missing_field"
    for name in ("load_rate", "mileage"):
        value = body.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None, seq, f"{name}_not_a_number"
        if not math.isfinite(value):
            return None, seq, f"{name}_not_finite"
    return body, seq, None


class Outbox:
    """The local storage: a SQLite file (WAL, synchronous=FULL, so an acknowledged put survives a crash)."""

    def __init__(self, path: Path, max_rows: int, overflow: Overflow, *, min_free_bytes: int = 0) -> None:
        self._path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # A small WAL, reset after each checkpoint: on a nearly full disk the default (1,000 pages before a
        # checkpoint, never truncated) would let the WAL take the last free bytes, and then not even a delete
        # (which frees rows for new readings) could be written.
        self._db.execute("PRAGMA wal_autocheckpoint=64")
        self._db.execute("PRAGMA journal_size_limit=262144")
        self._db.executescript(_SCHEMA)
        # One connection shared by the filter and the sender: the lock serialises them (SQLite would anyway).
        self._lock = threading.Lock()
        self._max_rows = max_rows
        self._overflow = overflow
        self._min_free = min_free_bytes
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        self._rows = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        self.pending_drops: list[tuple[int, str]] = []
        """Drops not yet written to the ``dropped`` table (the disk was full); written with the next write."""

    def reject(self, seq: int | None, reason: str, payload: bytes) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT INTO rejected VALUES (?, ?, ?)", (seq, reason, payload))
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                # The rejection is named all the same, as a drop (its payload cannot be kept).
                self.pending_drops.append((seq if seq is not None else -1, f"disk_full:{reason}"))

    def _free_bytes(self) -> int:
        """Room for new rows: the file system's free space plus the pages SQLite freed inside its file (deleted
        rows; the file does not shrink, and new rows reuse them first)."""
        st = os.statvfs(self._path.parent)
        (free_pages,) = self._db.execute("PRAGMA freelist_count").fetchone()
        return st.f_bavail * st.f_frsize + int(free_pages) * self._page_size

    def put(self, machine: str, seq: int, body: dict[str, object]) -> str | None:
        """Store one reading; None when stored, else the named reason it was refused (and recorded as dropped)."""
        with self._lock:
            if self._min_free and self._free_bytes() < self._min_free:
                self.pending_drops.append((seq, "disk_full"))
                self._flush_drops()  # as the reserve allows: a few rows of ``dropped`` fit in it
                return "disk_full"
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._write_drops()
                refused = self._insert(machine, seq, body)
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                if not _disk_full(exc):
                    raise
                self.pending_drops.append((seq, "disk_full"))
                return "disk_full"
            self.pending_drops.clear()
            if refused is None:
                self._rows += 1
            return refused

    def _insert(self, machine: str, seq: int, body: dict[str, object]) -> str | None:
        if self._rows >= self._max_rows:
            if self._overflow == "drop_newest":
                self._db.execute("INSERT INTO dropped VALUES (?, 'outbox_full_drop_newest')", (seq,))
                return "outbox_full_drop_newest"
            oldest = self._db.execute("SELECT id, seq FROM outbox ORDER BY id LIMIT 1").fetchone()
            self._db.execute("DELETE FROM outbox WHERE id = ?", (oldest[0],))
            self._db.execute("INSERT INTO dropped VALUES (?, 'outbox_full_drop_oldest')", (oldest[1],))
            self._rows -= 1
        self._db.execute(
            "INSERT INTO outbox (machine, seq, key, body) VALUES (?, ?, ?, ?)",
            (machine, seq, f"{machine}:{seq}", json.dumps(body, separators=(",", ":"))),
        )
        return None

    def _write_drops(self) -> None:
        if self.pending_drops:
            self._db.executemany("INSERT INTO dropped VALUES (?, ?)", self.pending_drops)

    def _flush_drops(self) -> None:
        """Write the pending drops in a transaction of their own; they stay pending if even that fails."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._write_drops()
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            if not _disk_full(exc):
                raise
            return
        self.pending_drops.clear()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def head(self, limit: int) -> list[tuple[int, str, int, str, str]]:
        """The oldest rows, in insertion order: (id, machine, seq, key, body)."""
        with self._lock:
            return self._db.execute(
                "SELECT id, machine, seq, key, body FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()

    def delete(self, ids: list[int]) -> None:
        """Delete rows, all or none; raises ``sqlite3.OperationalError`` (rows kept) when it cannot."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
                self._write_drops()  # a delete frees room: the drops waiting for it go with it
                self._db.execute("COMMIT")
            except sqlite3.OperationalError:
                self._rollback()
                raise
            self.pending_drops.clear()
            self._rows = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    @property
    def rows(self) -> int:
        return self._rows

    def close(self) -> None:
        with self._lock:
            if self.pending_drops:
                self._flush_drops()
            self._db.close()


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    # SQLITE_FULL ("database or disk is full"); Python 3.11 exposes the code as sqlite_errorcode.
    return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)


class _Failed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class ForwardPipeline:
    """filter -> outbox -> sender thread. ``put`` is called by the source; ``close`` drains and stops."""

    def __init__(self, config: ForwardConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.outbox = Outbox(config.db_path, config.max_rows, config.overflow, min_free_bytes=config.min_free_bytes)
        self.stats = SenderStats()
        self._rng = random.Random(f"{config.seed}:backoff")
        self._sleep = sleep
        self._stop = threading.Event()
        parts = urlsplit(config.upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"upstream: expected http://host:port, got {config.upstream!r}")
        self._host, self._port = parts.hostname, parts.port or 80
        self._path = parts.path.rstrip("/") + "/ingest"
        self._thread = threading.Thread(target=self._run, name="forward-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, payload: bytes) -> str | None:
        """Filter one raw reading into the outbox: None when stored, else why not (the filter's reason, in
        ``rejected``; or the outbox's: ``outbox_full_drop_newest``, ``disk_full``, in ``dropped``)."""
        reading, seq, reason = check_reading(payload)
        if reading is None or seq is None:
            self.outbox.reject(seq, reason or "invalid", payload)
            return reason or "invalid"
        return self.outbox.put(str(reading["machine"]), seq, reading)

    def close(self, drain_s: float) -> None:
        """Let the sender empty the outbox for up to ``drain_s`` seconds without progress, then stop it."""
        last, since = self.outbox.rows, time.monotonic()
        while self.outbox.rows and time.monotonic() - since < drain_s:
            time.sleep(0.05)
            if self.outbox.rows != last:
                last, since = self.outbox.rows, time.monotonic()
        self._stop.set()
        self._thread.join(timeout=self.config.timeout_s + self.config.backoff_cap_s + 5)
        self.outbox.close()

    # ------------------------------------------------------------------ the sender

    def _post(self, records: list[dict[str, object]]) -> None:
        body = json.dumps({"records": records}, separators=(",", ":")).encode()
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.config.timeout_s)
        self.stats.requests += 1
        try:
            conn.request("POST", self._path, body, {"Content-Type": "application/json"})
            status = conn.getresponse().status
        except ConnectionRefusedError as exc:
            raise _Failed("refused") from exc
        except (OSError, http.client.HTTPException) as exc:
            # Closed without an answer, reset or timed out: the upstream may have stored it (a lost ack).
            raise _Failed("no_answer") from exc
        finally:
            conn.close()
        if not 200 <= status < 300:
            raise _Failed(f"http_{status // 100}xx")

    def _fail(self, kind: str) -> None:
        self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1

    def _backoff(self, attempt: int) -> None:
        # Full jitter: a fleet of senders recovering from one outage does not retry in lockstep.
        self._stop.wait(self._rng.uniform(0, min(self.config.backoff_cap_s, self.config.backoff_base_s * 2**attempt)))

    def _run(self) -> None:
        attempt = 0
        keyed = self.config.strategy == "outbox"
        while not self._stop.is_set():
            rows = self.outbox.head(self.config.batch_size)
            if not rows:
                self._sleep(self.config.poll_s)
                continue
            records: list[dict[str, object]] = [
                {"key": key, "machine": m, "seq": s, "body": json.loads(b)} for _, m, s, key, b in rows
            ]
            if not keyed:
                for r in records:
                    r.pop("key")  # naive and retry have no idempotency key to offer
            ids = [r[0] for r in rows]
            if self.config.strategy == "naive":
                # The baseline's bug, on purpose: the rows leave storage before anyone has accepted them.
                try:
                    self.outbox.delete(ids)
                except sqlite3.OperationalError:
                    self._fail("delete_failed")  # a full disk: not even the baseline posts what it cannot delete
                    self._backoff(attempt)
                    attempt += 1
                    continue
                attempt = 0
                try:
                    self._post(records)
                    self.stats.acknowledged += 1
                except _Failed as exc:
                    self._fail(exc.kind)
                continue
            if attempt:
                self.stats.retries += 1
            try:
                self._post(records)
            except _Failed as exc:
                self._fail(exc.kind)
                self._backoff(attempt)
                attempt += 1
                continue
            self.stats.acknowledged += 1
            try:
                self.outbox.delete(ids)
            except sqlite3.OperationalError:
                # Acknowledged but not deletable (a full disk): the rows stay and go again, which the outbox's
                # keys make harmless; retry's re-send is a duplicate upstream, the price of having no key.
                self._fail("delete_failed")
                self._backoff(attempt)
                attempt += 1
                continue
            attempt = 0


def read_lines(fd: int) -> Iterator[bytes]:
    """Lines from a file descriptor, read as they come (``os.read``, no read-ahead buffer).

    Each read takes what the pipe holds then (one line at the stream's pace) and every line of it is put before
    the next read, so what a kill -9 can catch in memory is that read's lines, nothing read ahead; what is still
    in the pipe was never taken (the bench writes it again to the restarted process).
    """
    tail = b""
    while chunk := os.read(fd, 65536):
        *lines, tail = (tail + chunk).split(b"\n")
        yield from lines
    if tail:
        yield tail


def main(argv: list[str] | None = None) -> int:
    """Forward JSON lines from standard input through the outbox to an upstream; drains on end of input.

    Restarted on the same --db (after a crash), it resumes what the outbox holds."""
    d = ForwardConfig("http://-", Path("-"))
    parser = argparse.ArgumentParser(prog="python -m pipeline.forward", description=main.__doc__)
    parser.add_argument("--upstream", required=True, help="http://host:port of the upstream")
    parser.add_argument("--db", required=True, type=Path, help="the outbox's SQLite file")
    parser.add_argument("--strategy", choices=STRATEGIES, default=d.strategy)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="records per request")
    parser.add_argument("--max-rows", type=int, default=d.max_rows, help="outbox bound")
    parser.add_argument("--overflow", choices=["drop_newest", "drop_oldest"], default=d.overflow)
    parser.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request")
    parser.add_argument("--backoff-base", type=float, default=d.backoff_base_s, help="first retry delay bound, s")
    parser.add_argument("--backoff-cap", type=float, default=d.backoff_cap_s, help="largest retry delay bound, s")
    parser.add_argument("--min-free", type=int, default=d.min_free_bytes, help="bytes kept free on the disk")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds the backoff jitter")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds without progress before giving up")
    args = parser.parse_args(argv)
    config = ForwardConfig(
        args.upstream,
        args.db,
        args.strategy,
        batch_size=args.batch_size,
        max_rows=args.max_rows,
        overflow=args.overflow,
        timeout_s=args.timeout,
        backoff_base_s=args.backoff_base,
        backoff_cap_s=args.backoff_cap,
        seed=args.seed,
        min_free_bytes=args.min_free,
    )
    try:
        pipeline = ForwardPipeline(config)
    except ValueError as exc:
        print(f"pipeline.forward: {exc}", file=sys.stderr)
        return 2
    pipeline.start()
    print(f"pipeline.forward: ready ({args.strategy}, {pipeline.outbox.rows} row(s) in the outbox)", flush=True)
    for line in read_lines(sys.stdin.fileno()):
        if line.strip():
            pipeline.put(line.strip())
    pipeline.close(args.drain)
    left, pending = pipeline.outbox.rows, pipeline.outbox.pending_drops
    # Drops the full disk never let it write down: said here, so they are not silent.
    summary = {"requests": pipeline.stats.requests, "left_in_outbox": left, "unwritten_drops": pending}
    print(json.dumps(summary), flush=True)
    return 0 if left == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
