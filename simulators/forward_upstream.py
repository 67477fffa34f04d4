"""A fake upstream for store-and-forward senders: a standard-library HTTP server with switchable faults.

``POST /ingest`` takes ``{"records": [{"key": str | absent, "machine": str, "seq": int, "body": {...}}]}``. A record
with a key already stored is acknowledged and *not* stored again (the upstream honours idempotency keys, counted in
``deduplicated``); a record without a key is always stored, so a sender without keys that re-sends shows up as a
seq stored twice. What it stored is kept in memory, in arrival order, with the time (``clock()``) it was stored.

Faults, switched on and off by whoever runs it (the bench's timeline):

- ``down()`` / ``up()``: the listening socket is closed and reopened on the same port (connection refused between);
- ``error_fraction``: that fraction of requests is answered 500 without storing anything;
- ``lost_ack_fraction``: that fraction of requests is stored, then the connection is closed with no answer;
- ``delay_s``: every request waits this long before it is handled (a slow upstream).

The log keeps the evidence the bench names a loss or a duplicate by: the seqs of requests answered 500, of
requests stored whose acknowledgement was then withheld, and of requests answered later than ``late_after_s``.

Fault draws come from a seeded generator, so a run's faults are reproducible given the same request order.
HTTP/1.0 (one request per connection) keeps "down" simple: no kept-alive connection outlives the listener.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Stored:
    seq: int
    machine: str
    key: str | None
    at_ns: int


@dataclass
class UpstreamLog:
    """What the upstream saw, for the ledger: stored records, and the seqs of requests it refused with a 500."""

    stored: list[Stored] = field(default_factory=list)
    deduplicated: int = 0
    answered_500: list[int] = field(default_factory=list)
    """Seqs in requests answered 500 (nothing of them stored)."""
    acks_lost: int = 0
    lost_ack_seqs: list[int] = field(default_factory=list)
    """Seqs in requests stored and then closed without an answer (the lost_ack fault)."""
    late_seqs: list[int] = field(default_factory=list)
    """Seqs in requests stored and answered ``late_after_s`` or more after the request arrived: the sender may
    have given up waiting, so to it the acknowledgement was lost."""
    requests: int = 0


class Upstream:
    """The server; ``start()`` binds 127.0.0.1 on port 0 (or ``port``) and serves in a daemon thread."""

    def __init__(self, *, seed: int = 0, port: int = 0, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.log = UpstreamLog()
        self.error_fraction = 0.0
        self.lost_ack_fraction = 0.0
        self.delay_s = 0.0
        self.late_after_s = float("inf")
        """Answers at least this slow are logged in ``late_seqs`` (the bench sets a fraction of the timeout)."""
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._rng = random.Random(f"{seed}:upstream")
        self._clock = clock
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                upstream._handle(self)

            def log_message(self, format: str, *args: object) -> None:
                pass  # thousands of requests; the log object is the record

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="upstream", daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: new connections are refused until :meth:`up`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def up(self) -> None:
        if self._server is None:
            self.start()

    stop = down

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        arrived = time.monotonic()
        if self.delay_s:
            time.sleep(self.delay_s)
        length = int(req.headers.get("Content-Length", "0"))
        try:
            records = json.loads(req.rfile.read(length))["records"]
        except (ValueError, KeyError, TypeError):
            req.send_error(400, "expected {records: [...]}")
            return
        with self._lock:
            self.log.requests += 1
            draw = self._rng.random()
            if draw < self.error_fraction:
                self.log.answered_500.extend(int(r["seq"]) for r in records)
                fail = True
            else:
                fail = False
                now = self._clock()
                for r in records:
                    key = r.get("key")
                    if key is not None and key in self._keys:
                        self.log.deduplicated += 1
                        continue
                    if key is not None:
                        self._keys.add(key)
                    self.log.stored.append(Stored(int(r["seq"]), str(r["machine"]), key, now))
                lose_ack = self._rng.random() < self.lost_ack_fraction
                if lose_ack:
                    self.log.acks_lost += 1
                    self.log.lost_ack_seqs.extend(int(r["seq"]) for r in records)
        if fail:
            try:
                req.send_error(500, "injected fault")
            except OSError:
                req.close_connection = True
            return
        if lose_ack:
            # Stored, and the answer never comes: the sender cannot tell this from a failure.
            req.close_connection = True
            with contextlib.suppress(OSError):
                req.connection.shutdown(socket.SHUT_RDWR)
            return
        answer = json.dumps({"stored": len(records)}).encode()
        try:
            req.send_response(200)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(answer)))
            req.end_headers()
            req.wfile.write(answer)
        except OSError:
            # The sender gave up waiting (slow fault) and closed: stored all the same, its ack lost on its side.
            req.close_connection = True
        if time.monotonic() - arrived >= self.late_after_s:
            with self._lock:
                self.log.late_seqs.extend(int(r["seq"]) for r in records)
