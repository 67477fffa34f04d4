"""Gather -> notify -> recompute a derived series from the earliest changed point -> store -> HTTP read API.

The derived series is per machine and cumulative: ``energy`` after a reading is the energy before it plus its
``load_rate`` times the time since the machine's previous reading (load %·hours). Every point depends on every
earlier one, so a late reading (a timestamp behind readings already stored) changes each point after it.

Stages, each in its own thread:

- **gather**: readings handed to :meth:`RecomputePipeline.submit` are committed to the raw store (SQLite) every
  ``gather_interval_s``; each commit gives its readings increasing *ingest* numbers and sends one notification.
- **notify**: over a loopback TCP connection (127.0.0.1, a free port) from the gather thread to the recompute
  worker's receiver thread. ``full`` sends a bare ping per commit (one byte, ``\n``: it says only that something
  changed); ``incremental`` sends a JSON line with the earliest changed time per machine and the highest ingest
  number committed. The receiving side decides what to do with them: ``coalesce=False`` queues every
  notification and serves each one; ``coalesce=True`` merges the notifications that arrive while a recompute
  runs into one (earliest changed time per machine, highest ingest number), so at most one recompute is ever
  running or waiting (single flight).
- **recompute**: ``full`` recomputes every machine's whole series; ``incremental`` starts each notified machine
  at its earliest changed time, from the stored point just before it. Both rewrite the points they touch by key,
  so running either twice leaves the same rows (idempotent), and both commit the points together with the
  series' ``version``, ``raw_through`` (the highest ingest number the series reflects) and ``seq_through`` (the
  highest ``seq`` among the readings it reflects) in one transaction.
- **read API**: a standard-library :class:`~http.server.ThreadingHTTPServer` on its own thread serves
  ``GET /series`` (``?machine=ID`` for one) and ``GET /status``, with ``ETag: "v<version>"``; a request with a
  matching ``If-None-Match`` gets 304. Each answer is read in one SQLite transaction (WAL), so the version it
  carries is the version of the points it carries.

Run on its own: ``python -m pipeline.recompute --db series.sqlite`` reads JSON readings, one a line, from stdin
(``{"machine": "press-001", "ts": "2025-01-01T00:00:00Z", "load_rate": 42.0, "seq": 7}``; ``seq`` identifies the
reading within its machine: a second reading with the same one is a correction) and prints the API's URL on stderr
once it serves (``serving http://127.0.0.1:PORT/series and ...``: a ready line). With ``--exit-at-eof`` it exits
once stdin is closed and everything read is reflected, which is how the bench runs it as an external pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import queue
import socket
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

NS_PER_HOUR = 3_600_000_000_000
BUSY_TIMEOUT_S = 60.0
"""How long a writer waits for the other writer's transaction (a full recompute of a long series holds it)."""

Strategy = Literal["full", "incremental"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS raw (
    machine TEXT NOT NULL, seq INTEGER NOT NULL, ts_ns INTEGER NOT NULL, value REAL NOT NULL,
    ingest INTEGER NOT NULL, PRIMARY KEY (machine, seq));
CREATE INDEX IF NOT EXISTS raw_by_time ON raw (machine, ts_ns, seq);
CREATE TABLE IF NOT EXISTS derived (
    machine TEXT NOT NULL, ts_ns INTEGER NOT NULL, seq INTEGER NOT NULL, value REAL NOT NULL, energy REAL NOT NULL,
    PRIMARY KEY (machine, ts_ns, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, raw_through INTEGER NOT NULL,
    points INTEGER NOT NULL, seq_through INTEGER);
INSERT OR IGNORE INTO meta VALUES (1, 0, 0, 0, NULL);
CREATE TABLE IF NOT EXISTS commits (through INTEGER PRIMARY KEY, seq_max INTEGER NOT NULL);
"""


class ReadingError(ValueError):
    """A payload that is not a reading (the gatherer counts it and goes on)."""


@dataclass(frozen=True, slots=True)
class Reading:
    machine: str
    seq: int
    ts_ns: int
    value: float


@dataclass(frozen=True, slots=True)
class Point:
    """One point of the derived series."""

    machine: str
    ts_ns: int
    seq: int
    value: float
    energy: float


def parse_reading(payload: bytes) -> Reading:
    """A JSON reading with ``machine``, ``ts`` (ISO 8601 with an offset), ``load_rate`` and ``seq``."""
    try:
        body = json.loads(payload)
        when = datetime.fromisoformat(body["ts"])
        value = float(body["load_rate"])
        seq = body["seq"]
        machine = body["machine"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReadingError(f"not a reading: {exc}") from None
    if when.tzinfo is None or not isinstance(seq, int) or not isinstance(machine, str) or not math.isfinite(value):
        raise ReadingError("not a reading: expected an aware ts, an integer seq, a machine and a finite load_rate")
    delta = when.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    ts_ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    return Reading(machine, seq, ts_ns, value)


def derive(rows: Iterable[tuple[int, int, float]], machine: str, before: tuple[int, float] | None) -> list[Point]:
    """The points of ``rows`` ((ts_ns, seq, value) in (ts, seq) order) following ``before`` ((ts_ns, energy) of
    the point just before them, None at the series' start). The one definition both strategies and the oracle use,
    so they add the same floating-point terms in the same order."""
    out: list[Point] = []
    prev_ts, energy = (None, 0.0) if before is None else before
    for ts_ns, seq, value in rows:
        if prev_ts is not None:
            energy = energy + value * (ts_ns - prev_ts) / NS_PER_HOUR
        out.append(Point(machine, ts_ns, seq, value, energy))
        prev_ts = ts_ns
    return out


def oracle(readings: Iterable[Reading]) -> dict[str, list[Point]]:
    """The whole derived series from raw readings, in memory: what any recompute must have stored."""
    by_machine: dict[str, list[tuple[int, int, float]]] = {}
    for r in readings:
        by_machine.setdefault(r.machine, []).append((r.ts_ns, r.seq, r.value))
    return {m: derive(sorted(rows), m, None) for m, rows in sorted(by_machine.items())}


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL so readers never wait for a writer."""
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives a process crash (an OS crash may lose the last ones), as a bench wants.
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    return conn


def open_store(path: Path) -> sqlite3.Connection:
    conn = connect(path)
    conn.executescript(_SCHEMA)
    return conn


def read_raw(conn: sqlite3.Connection) -> list[tuple[Reading, int]]:
    """Every stored reading with its ingest number."""
    rows = conn.execute("SELECT machine, seq, ts_ns, value, ingest FROM raw").fetchall()
    return [(Reading(m, s, t, v), i) for m, s, t, v, i in rows]


# ----------------------------------------------------------------------------- gather


class RawStore:
    """The raw readings; :meth:`add` commits a batch and says what it changed."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.ingest: int = conn.execute("SELECT COALESCE(MAX(ingest), 0) FROM raw").fetchone()[0]
        self.seq_max: int | None = conn.execute("SELECT MAX(seq_max) FROM commits").fetchone()[0]
        """The highest seq stored so far: with readings sent in seq order, what /status's seq_through says."""

    def add(self, readings: Sequence[Reading]) -> tuple[dict[str, int], int]:
        """Store ``readings`` (a reading with a stored (machine, seq) replaces it); returns the earliest changed
        time per machine and the highest ingest number given."""
        earliest: dict[str, int] = {}
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for r in readings:
                old = c.execute("SELECT ts_ns FROM raw WHERE machine = ? AND seq = ?", (r.machine, r.seq)).fetchone()
                # A correction that moves a reading changes the series from the earlier of its two times.
                t0 = r.ts_ns if old is None else min(r.ts_ns, old[0])
                earliest[r.machine] = min(earliest.get(r.machine, t0), t0)
                self.ingest += 1
                c.execute(
                    "INSERT INTO raw (machine, seq, ts_ns, value, ingest) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (machine, seq) DO UPDATE SET ts_ns = excluded.ts_ns, value = excluded.value, "
                    "ingest = excluded.ingest",
                    (r.machine, r.seq, r.ts_ns, r.value, self.ingest),
                )
            seq_max = max([r.seq for r in readings] + ([] if self.seq_max is None else [self.seq_max]))
            # One row per commit, so a recompute finds the seq its ingest number stands for with one index lookup
            # (a MAX over the raw table would make every recompute's cost grow with the series).
            if readings:
                c.execute("INSERT INTO commits (through, seq_max) VALUES (?, ?)", (self.ingest, seq_max))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            self.ingest = c.execute("SELECT COALESCE(MAX(ingest), 0) FROM raw").fetchone()[0]
            raise
        if readings:
            self.seq_max = seq_max
        return earliest, self.ingest


# ----------------------------------------------------------------------------- notify


@dataclass(frozen=True, slots=True)
class Change:
    """A notification: the earliest changed time per machine (empty for a bare ping) and the highest ingest
    number committed when it was sent."""

    earliest: dict[str, int]
    through: int


class Notifier:
    """The recompute worker's inbox: the notifications its :class:`NotifyReceiver` read off the wire.

    Without ``coalesce`` each notification is served on its own, in order (a queue of pings). With it, what
    arrives while a recompute runs is merged into the one pending change, so a burst of commits costs one more
    recompute, not one each (single flight: one worker, one running, at most one waiting).
    """

    def __init__(self, coalesce: bool) -> None:
        self.coalesce = coalesce
        self._cond = threading.Condition()
        self._queue: deque[Change] = deque()
        self._pending: Change | None = None
        self.received = 0
        self.merged = 0
        """Notifications folded into one already pending (served by a recompute they did not start)."""
        self.closed = False
        """No more notifications will come (the sender hung up): the worker serves what is left and ends."""

    def notify(self, change: Change) -> None:
        with self._cond:
            self.received += 1
            if not self.coalesce:
                self._queue.append(change)
            elif self._pending is None:
                self._pending = change
            else:
                self.merged += 1
                merged = dict(self._pending.earliest)
                for machine, t0 in change.earliest.items():
                    merged[machine] = min(merged.get(machine, t0), t0)
                self._pending = Change(merged, max(self._pending.through, change.through))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def take(self, timeout_s: float) -> Change | None:
        """The next change to serve (all that is pending, merged, with ``coalesce``), or None after the timeout
        (at once when closed and nothing is left)."""
        with self._cond:
            if not self._queue and self._pending is None and not self.closed:
                self._cond.wait(timeout_s)
            if self._queue:
                return self._queue.popleft()
            change, self._pending = self._pending, None
            return change

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue) + (self._pending is not None)


PING = b"\n"
"""The naive notification on the wire: one byte, no content (an empty line)."""


def encode_change(change: Change) -> bytes:
    """A notification on the wire: a bare ping when it carries nothing, else one JSON line."""
    if not change.earliest and change.through == 0:
        return PING
    return json.dumps({"earliest": change.earliest, "through": change.through}, separators=(",", ":")).encode() + b"\n"


def decode_change(line: bytes) -> Change:
    if line == PING:
        return Change({}, 0)
    body = json.loads(line)
    return Change({str(m): int(t) for m, t in body["earliest"].items()}, int(body["through"]))


class NotifySender:
    """The gather side of the notification wire: one TCP connection to a :class:`NotifyReceiver`."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=BUSY_TIMEOUT_S)
        # A ping is one byte: without this, Nagle's algorithm would hold the next one until the last is acked.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = 0
        self.bytes = 0

    def send(self, change: Change) -> None:
        data = encode_change(change)
        self.sock.sendall(data)
        self.sent += 1
        self.bytes += len(data)

    def close(self) -> None:
        """End of notifications: the receiver sees end of stream after the last one and closes its notifier."""
        with contextlib.suppress(OSError):  # the receiver is gone already: nothing left to tell it
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()


class NotifyReceiver:
    """The recompute worker's side of the wire: listens on 127.0.0.1 (a free port), takes one connection and
    hands each notification to a :class:`Notifier`, which queues or merges it (coalescing happens here, on the
    receiving side: what arrives while a recompute runs is merged into the one pending change)."""

    def __init__(self, notifier: Notifier, host: str = "127.0.0.1") -> None:
        self.notifier = notifier
        self.listener = socket.create_server((host, 0))
        self.bytes = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def serve(self) -> None:
        """Accept the sender and read until it hangs up (run on its own thread); closes the notifier at the end,
        whatever happened, so the worker never waits for notifications that cannot come."""
        try:
            conn, _ = self.listener.accept()
            self.listener.close()
            with conn, conn.makefile("rb") as stream:
                for line in stream:
                    self.bytes += len(line)
                    self.notifier.notify(decode_change(line))
        finally:
            self.notifier.close()

    def close(self) -> None:
        self.listener.close()


# ----------------------------------------------------------------------------- recompute


@dataclass(frozen=True, slots=True)
class RecomputeCost:
    """One recompute: how long the series was, what it rewrote, what it cost."""

    series_len: int
    rows_written: int
    cpu_ns: int
    """CPU time of the recompute's thread (SQLite's work included: it runs in that thread)."""
    wall_ns: int
    done_ns: int
    """time.monotonic_ns() when it committed."""


class Recomputer:
    """Recomputes the derived series in the store and publishes it with a new version."""

    def __init__(self, conn: sqlite3.Connection, strategy: Strategy) -> None:
        self.conn = conn
        self.strategy = strategy

    def run(self, change: Change) -> RecomputeCost:
        cpu0, wall0 = time.thread_time_ns(), time.monotonic_ns()
        c = self.conn
        # IMMEDIATE: the write lock and the read snapshot from the start, so what is read is what is replaced.
        c.execute("BEGIN IMMEDIATE")
        try:
            if self.strategy == "full":
                written, through = self._full(), c.execute("SELECT COALESCE(MAX(ingest), 0) FROM raw").fetchone()[0]
                points = written
            else:
                # Only what the notifications named is known to be reflected; a reading committed since (in this
                # snapshot or not) is claimed by its own notification.
                written, removed = self._incremental(change.earliest)
                through = change.through
                # Kept as a running count: COUNT(*) would read the whole series and make this cost grow with it.
                points = c.execute("SELECT points FROM meta").fetchone()[0] + written - removed
            c.execute(
                "UPDATE meta SET version = version + 1, raw_through = MAX(raw_through, ?), points = ? WHERE id = 1",
                (through, points),
            )
            c.execute(
                "UPDATE meta SET seq_through = (SELECT seq_max FROM commits WHERE commits.through <= meta.raw_through "
                "ORDER BY commits.through DESC LIMIT 1) WHERE id = 1"
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        done = time.monotonic_ns()
        return RecomputeCost(points, written, time.thread_time_ns() - cpu0, done - wall0, done)

    def _write(self, points: list[Point]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO derived (machine, ts_ns, seq, value, energy) VALUES (?, ?, ?, ?, ?)",
            [(p.machine, p.ts_ns, p.seq, p.value, p.energy) for p in points],
        )

    def _full(self) -> int:
        c = self.conn
        rows = c.execute("SELECT machine, ts_ns, seq, value FROM raw ORDER BY machine, ts_ns, seq").fetchall()
        c.execute("DELETE FROM derived")
        written = 0
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i][0] != rows[start][0]:
                points = derive(((t, s, v) for _, t, s, v in rows[start:i]), rows[start][0], None)
                self._write(points)
                written += len(points)
                start = i
        return written

    def _incremental(self, earliest: dict[str, int]) -> tuple[int, int]:
        """Recompute each machine from its earliest change; returns the points written and the points removed."""
        c = self.conn
        written = removed = 0
        for machine, t0 in sorted(earliest.items()):
            before = c.execute(
                "SELECT ts_ns, energy FROM derived WHERE machine = ? AND ts_ns < ? ORDER BY ts_ns DESC, seq DESC "
                "LIMIT 1",
                (machine, t0),
            ).fetchone()
            rows = c.execute(
                "SELECT ts_ns, seq, value FROM raw WHERE machine = ? AND ts_ns >= ? ORDER BY ts_ns, seq",
                (machine, t0),
            ).fetchall()
            # A corrected reading may have moved: its old point (at or after t0) must not stay behind.
            removed += c.execute("DELETE FROM derived WHERE machine = ? AND ts_ns >= ?", (machine, t0)).rowcount
            points = derive(rows, machine, None if before is None else (before[0], before[1]))
            self._write(points)
            written += len(points)
        return written, removed


# ----------------------------------------------------------------------------- read API


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: ten readers connecting at once overflowed it, and the kernel's
    # SYN retry made some first requests take a whole second (seen as a 1 s max latency under 10 readers).
    request_queue_size = 128
    db_path: Path

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A reader that hangs up before its answer is written (a load generator stopping) is not a server fault:
        # no traceback on stderr for it. Anything else is printed as the standard library does.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, so a polling reader measures the answer, not a TCP handshake per poll.
    protocol_version = "HTTP/1.1"
    server: _ApiServer

    def setup(self) -> None:
        super().setup()
        self.conn = connect(self.server.db_path, read_only=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.conn.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per request on stderr would cost more than the answer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path not in ("/series", "/status"):
            self._send(404, {"error": f"no such resource {url.path}; expected /series or /status"}, None)
            return
        machines = parse_qs(url.query).get("machine")
        c = self.conn
        # One read transaction: the version and the points come from the same snapshot.
        c.execute("BEGIN")
        try:
            version, through, points, seq_through = c.execute(
                "SELECT version, raw_through, points, seq_through FROM meta"
            ).fetchone()
            etag = f'"v{version}"'
            if self.headers.get("If-None-Match") == etag:
                self._send(304, None, etag)
                return
            body: dict[str, Any] = {
                "version": version,
                "raw_through": through,
                "seq_through": seq_through,
                "points": points,
            }
            if url.path == "/series":
                sql = "SELECT machine, ts_ns, seq, value, energy FROM derived"
                args: tuple[str, ...] = ()
                if machines:
                    sql += " WHERE machine = ?"
                    args = (machines[0],)
                series: dict[str, list[list[Any]]] = {}
                for m, t, s, v, e in c.execute(sql + " ORDER BY machine, ts_ns, seq", args):
                    series.setdefault(m, []).append([t, s, v, e])
                body["series"] = series
        finally:
            c.execute("COMMIT")
        self._send(200, body, etag)

    def _send(self, status: int, body: dict[str, Any] | None, etag: str | None) -> None:
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        if etag is not None:
            self.send_header("ETag", etag)
        self.send_header("Cache-Control", "no-cache")
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class SeriesApi:
    """The HTTP JSON read API on its own thread (``port=0``: a free port, see :attr:`url`)."""

    def __init__(self, db_path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = _ApiServer((host, port), _Handler)
        self.server.db_path = db_path
        self.thread = threading.Thread(target=self.server.serve_forever, name="recompute-api", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


# ----------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class RecomputeConfig:
    strategy: Strategy = "incremental"
    coalesce: bool = True
    gather_interval_s: float = 0.1
    host: str = "127.0.0.1"
    port: int = 0


@dataclass
class _Stats:
    rejected: int = 0
    commits: list[tuple[int, int]] = field(default_factory=list)
    """(highest ingest number, time.monotonic_ns() after its commit) per gather commit."""
    costs: list[RecomputeCost] = field(default_factory=list)


class RecomputePipeline:
    """The whole shape: :meth:`submit` readings, read the series from :attr:`url`."""

    def __init__(self, db_path: Path, config: RecomputeConfig) -> None:
        self.db_path = db_path
        self.config = config
        self.store = RawStore(open_store(db_path))
        self.recomputer = Recomputer(connect(db_path), config.strategy)
        self.notifier = Notifier(config.coalesce)
        self.receiver = NotifyReceiver(self.notifier)
        self.sender: NotifySender | None = None
        self.api = SeriesApi(db_path, config.host, config.port)
        self.stats = _Stats()
        self._inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._published = 0
        self._submitted = 0
        self._processed = 0
        """Payloads the gatherer has committed or rejected (under ``_cond``, as ``_published``)."""
        self.failure: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._guard, args=(self.receiver.serve,), name="recompute-notify", daemon=True),
            threading.Thread(target=self._guard, args=(self._gather,), name="recompute-gather", daemon=True),
            threading.Thread(target=self._guard, args=(self._work,), name="recompute-worker", daemon=True),
        ]

    @property
    def url(self) -> str:
        return self.api.url

    def start(self) -> None:
        self.api.start()
        # Connected before the gather thread runs: the listener's backlog holds it until the receiver accepts.
        self.sender = NotifySender(self.receiver.address)
        for t in self._threads:
            t.start()

    def submit(self, payload: bytes) -> None:
        """Hand one reading to the gatherer (from one thread at a time)."""
        self._submitted += 1
        self._inbox.put(payload)

    def committed_through(self) -> int:
        return self.store.ingest

    def published_through(self) -> int:
        with self._cond:
            return self._published

    def wait_published(self, through: int, timeout_s: float) -> bool:
        """Wait until the series reflects every reading up to ingest number ``through``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._published >= through or self.failure is not None, timeout_s)

    def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted reading is committed and reflected by the published series."""
        deadline = time.monotonic() + timeout_s
        submitted = self._submitted
        with self._cond:
            # Counted, not inferred from an empty inbox: the gatherer may hold a batch it waits to commit (a full
            # recompute holds the write lock), and that batch must be in the series the caller then reads.
            if not self._cond.wait_for(lambda: self._processed >= submitted or self.failure is not None, timeout_s):
                return False
        return self.wait_published(self.store.ingest, max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Commit what is left, let the worker serve every notification sent, then stop (in that order: the gather
        thread hangs up the wire after its last commit, the receiver then closes the notifier, the worker ends when
        nothing is left)."""
        self._stop.set()
        for t in reversed(self._threads):  # worker, gather, receiver: each ends once the one before it did
            t.join(30)
        self.receiver.close()
        self.api.stop()

    def _guard(self, target: Any) -> None:
        try:
            target()
        except BaseException as exc:  # the owner sees it in .failure and stops waiting
            self.failure = exc
            with self._cond:
                self._cond.notify_all()

    def _gather(self) -> None:
        sender = self.sender
        assert sender is not None, "start() connects the notification wire"
        try:
            self._gather_into(sender)
        finally:
            sender.close()  # the receiver sees the end of notifications, whatever ended this thread

    def _gather_into(self, sender: NotifySender) -> None:
        interval = self.config.gather_interval_s
        next_at = time.monotonic() + interval
        while True:
            stopping = self._stop.is_set()
            batch: list[Reading] = []
            taken = 0
            while True:
                try:
                    payload = self._inbox.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                try:
                    batch.append(parse_reading(payload))
                except ReadingError:
                    self.stats.rejected += 1
            if batch:
                earliest, through = self.store.add(batch)
                self.stats.commits.append((through, time.monotonic_ns()))
                # The naive notification is a bare ping (one byte): it says nothing about what changed.
                sender.send(Change(earliest, through) if self.config.strategy == "incremental" else Change({}, 0))
            if taken:
                with self._cond:
                    self._processed += taken
                    self._cond.notify_all()
            if stopping:
                return
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic())

    def _work(self) -> None:
        while True:
            change = self.notifier.take(0.05)
            if change is None:
                if self.notifier.closed:
                    return  # the sender hung up and everything it sent was served
                continue
            cost = self.recomputer.run(change)
            through = self.recomputer.conn.execute("SELECT raw_through FROM meta").fetchone()[0]
            self.stats.costs.append(cost)
            with self._cond:
                self._published = through
                self._cond.notify_all()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.recompute", description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="SQLite file for the raw readings and the series")
    parser.add_argument("--strategy", choices=("full", "incremental"), default="incremental")
    parser.add_argument(
        "--coalesce",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="merge notifications arriving during a recompute into one (single flight); --no-coalesce: serve each",
    )
    parser.add_argument("--gather-interval", type=float, default=0.1, metavar="S")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument(
        "--exit-at-eof",
        action="store_true",
        help="exit once stdin is closed and every reading is reflected (default: serve until interrupted)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.gather_interval < 3600:
        parser.error(f"--gather-interval: expected seconds between 0 and 3600, got {args.gather_interval}")
    if not 0 <= args.port < 65536:
        parser.error(f"--port: expected 0 (a free port) to 65535, got {args.port}")
    config = RecomputeConfig(args.strategy, args.coalesce, args.gather_interval, args.host, args.port)
    try:
        store = open_store(args.db)
        store.close()
    except (sqlite3.Error, OSError) as exc:
        print(f"--db {args.db}: {exc}", file=sys.stderr)
        return 2
    try:
        pipe = RecomputePipeline(args.db, config)
    except OSError as exc:
        print(f"--host {args.host} --port {args.port}: {exc}", file=sys.stderr)
        return 2
    pipe.start()
    # The ready line: printed once the API answers (a bench may wait for it, or poll GET /status).
    print(f"serving {pipe.url}/series and {pipe.url}/status", file=sys.stderr, flush=True)
    try:
        for line in sys.stdin.buffer:
            if line.strip():
                pipe.submit(line)
        if not pipe.drain(3600):
            print(f"stdin closed; not everything was reflected: {pipe.failure}", file=sys.stderr, flush=True)
            return 1
        if args.exit_at_eof:
            print(f"stdin closed; {pipe.stats.rejected} line(s) were not readings; exiting", file=sys.stderr)
            return 0
        print(
            f"stdin closed; serving until interrupted ({pipe.stats.rejected} line(s) were not readings)",
            file=sys.stderr,
            flush=True,
        )
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        pipe.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
