"""Store-and-forward: filter -> local SQLite outbox -> a sender thread that forwards batches upstream over HTTP.

Two strategies share the same storage, so the only difference a run measures is when a row leaves it:

- ``naive``: the sender takes a batch, deletes it, then posts it once; whatever the upstream answers (or does not),
  the rows are gone. An outage or a 500 loses the batch in flight.
- ``outbox``: the sender posts the oldest batch and deletes it only after a 2xx acknowledgement; on any failure it
  keeps the rows and retries the same batch with exponential backoff and full jitter. Every record carries an
  idempotency key (``machine:seq``), so a retry after a lost acknowledgement is recognised upstream instead of
  stored twice. Sending strictly the oldest rows first (head-of-line) keeps each machine's order.

The outbox is bounded (``max_rows``); when full, the named ``overflow`` policy decides (``drop_newest``: refuse the
new reading; ``drop_oldest``: evict the oldest stored one), and every drop is written to the ``dropped`` table with
its reason, so nothing leaves the storage unaccounted. Rejected input goes to the ``rejected`` table.

This module never imports the bench: it runs on its own (``python -m pipeline.forward --upstream URL --db FILE``
reads JSON lines from standard input).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

Strategy = Literal["naive", "outbox"]
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


@dataclass
class SenderStats:
    requests: int = 0
    acknowledged: int = 0
    retries: int = 0
    """Requests that re-sent a batch already posted (outbox only)."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed requests by kind: refused, http_5xx, no_answer (connection closed or timed out)."""


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

    def __init__(self, path: Path, max_rows: int, overflow: Overflow) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # One connection shared by the filter and the sender: the lock serialises them (SQLite would anyway).
        self._lock = threading.Lock()
        self._max_rows = max_rows
        self._overflow = overflow
        self._rows = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def reject(self, seq: int | None, reason: str, payload: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT INTO rejected VALUES (?, ?, ?)", (seq, reason, payload))

    def put(self, machine: str, seq: int, body: dict[str, object]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            if self._rows >= self._max_rows:
                if self._overflow == "drop_newest":
                    self._db.execute("INSERT INTO dropped VALUES (?, 'outbox_full_drop_newest')", (seq,))
                    self._db.execute("COMMIT")
                    return
                oldest = self._db.execute("SELECT id, seq FROM outbox ORDER BY id LIMIT 1").fetchone()
                self._db.execute("DELETE FROM outbox WHERE id = ?", (oldest[0],))
                self._db.execute("INSERT INTO dropped VALUES (?, 'outbox_full_drop_oldest')", (oldest[1],))
                self._rows -= 1
            self._db.execute(
                "INSERT INTO outbox (machine, seq, key, body) VALUES (?, ?, ?, ?)",
                (machine, seq, f"{machine}:{seq}", json.dumps(body, separators=(",", ":"))),
            )
            self._db.execute("COMMIT")
            self._rows += 1

    def head(self, limit: int) -> list[tuple[int, str, int, str, str]]:
        """The oldest rows, in insertion order: (id, machine, seq, key, body)."""
        with self._lock:
            return self._db.execute(
                "SELECT id, machine, seq, key, body FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()

    def delete(self, ids: list[int]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            self._db.execute("COMMIT")
            self._rows = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    @property
    def rows(self) -> int:
        return self._rows

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Failed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class ForwardPipeline:
    """filter -> outbox -> sender thread. ``put`` is called by the source; ``close`` drains and stops."""

    def __init__(self, config: ForwardConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.outbox = Outbox(config.db_path, config.max_rows, config.overflow)
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

    def put(self, payload: bytes) -> bool:
        """Filter one raw reading into the outbox; False when the filter rejected it (it is in ``rejected``)."""
        reading, seq, reason = check_reading(payload)
        if reading is None or seq is None:
            self.outbox.reject(seq, reason or "invalid", payload)
            return False
        self.outbox.put(str(reading["machine"]), seq, reading)
        return True

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

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            rows = self.outbox.head(self.config.batch_size)
            if not rows:
                self._sleep(self.config.poll_s)
                continue
            records = [{"key": key, "machine": m, "seq": s, "body": json.loads(b)} for _, m, s, key, b in rows]
            ids = [r[0] for r in rows]
            if self.config.strategy == "naive":
                # The baseline's bug, on purpose: the rows leave storage before anyone has accepted them.
                self.outbox.delete(ids)
                for r in records:
                    r.pop("key")  # and it has no idempotency key to offer
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
                # Full jitter: a fleet of senders recovering from one outage does not retry in lockstep.
                delay = self._rng.uniform(0, min(self.config.backoff_cap_s, self.config.backoff_base_s * 2**attempt))
                attempt += 1
                self._stop.wait(delay)
                continue
            attempt = 0
            self.stats.acknowledged += 1
            self.outbox.delete(ids)


def main(argv: list[str] | None = None) -> int:
    """Forward JSON lines from standard input through the outbox to an upstream; drains on end of input."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.forward", description=main.__doc__)
    parser.add_argument("--upstream", required=True, help="http://host:port of the upstream")
    parser.add_argument("--db", required=True, type=Path, help="the outbox's SQLite file")
    parser.add_argument("--strategy", choices=["naive", "outbox"], default="outbox")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for the outbox to empty")
    args = parser.parse_args(argv)
    try:
        pipeline = ForwardPipeline(ForwardConfig(args.upstream, args.db, args.strategy))
    except ValueError as exc:
        print(f"pipeline.forward: {exc}", file=sys.stderr)
        return 2
    pipeline.start()
    for line in sys.stdin.buffer:
        if line.strip():
            pipeline.put(line.strip())
    pipeline.close(args.drain)
    left = pipeline.outbox.rows
    print(json.dumps({"requests": pipeline.stats.requests, "left_in_outbox": left}))
    return 0 if left == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
