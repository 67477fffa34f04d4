"""A TCP proxy between a system under test and a service (an MQTT broker, a SQL server) that injects network faults.

:class:`FaultProxy` listens on 127.0.0.1 on an ephemeral port and forwards every connection it accepts to one
fixed upstream ``(host, port)``. The system under test is pointed at the proxy (:meth:`FaultProxy.wrap_url`)
instead of the service; a fault is then switched on and off from any thread while the run goes on::

    with FaultProxy.from_url("mqtt://127.0.0.1:1883") as proxy:
        start_pipeline(broker=proxy.wrap_url("mqtt://127.0.0.1:1883"))
        proxy.drop()        # every connection breaks (RST), new ones are refused
        proxy.heal()        # back to forwarding
        proxy.half_open()   # connections stay up but nothing passes: only a keepalive notices
        proxy.heal()        # ... and the half-open connections are reset, as by a NAT that forgot them
        proxy.delay(0.2)    # +200 ms on every chunk, order kept
        proxy.throttle(100_000)  # at most 100 kB/s each way, all connections together
        proxy.heal()
        print(proxy.stats().transitions)

Modes (exactly one at a time; each call replaces the previous mode and :meth:`FaultProxy.heal` returns to
``normal``):

``drop``
    Every open connection is reset on both sides (``SO_LINGER`` 0, so a RST rather than a FIN: the peers see
    ``ECONNRESET``, a broken connection, not a polite close) and each new connection is accepted and reset at
    once. The listener stays open on purpose: closing it would give the port back to the system, and on heal
    another process could hold it. A real partition would make ``connect()`` time out instead of being reset;
    a reset is what a client sees fastest, which keeps the fault windows of a run sharp.
``half_open``
    Connections stay open but nothing is forwarded either way: the proxy stops reading both sockets (bytes
    stay in the kernel buffers, so a sender that keeps writing eventually blocks, as behind a black hole).
    New connections are accepted but never connected upstream. When the mode ends (heal or any other mode),
    every connection that was half-open is reset on both sides, as a NAT or firewall that forgot the flow
    would answer the next segment with a RST; forwarding them again would let a client carry on as if nothing
    had happened, which is not what the fault models, and keeping them black-holed forever would leak them.
    Note: the proxy's own kernel still acknowledges TCP keepalive probes, so only an application-level
    keepalive (MQTT ``PINGREQ``, a SQL ``SELECT 1``) detects this fault, not ``SO_KEEPALIVE``.
``delay``
    Every chunk (one read from a socket) is forwarded ``seconds`` after the proxy read it, in order per
    direction. A connection holds at most ``buffer_bytes`` in flight per direction, like a TCP window, so one
    connection carries at most about ``buffer_bytes / seconds`` per second while delayed.
``throttle``
    At most ``bytes_per_s`` per direction, shared by all connections together (one token bucket each way, as
    one constrained uplink that every client shares), in pieces of about 20 ms worth of bytes.

Design: one asyncio event loop in a daemon thread, callback-based protocols (no task per chunk). In normal mode
a chunk read from one socket is written to the other at once with flow control (a full write buffer pauses
reading the other side), so the proxy adds a copy and a loop iteration, no more; a per-direction pump task
exists only while chunks are held back (delay, throttle, half-open). Mode changes run in the loop and return
once they took effect (``drop()`` returns after the sockets are closed). Counters are kept under a lock so
:meth:`FaultProxy.stats` can be read from any thread. Peer resets and refused upstreams are logged at debug
level, never printed; an idle proxy sleeps in ``select()`` with no timer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = ["DEFAULT_PORTS", "FaultProxy", "Mode", "ProxyStats"]

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
"""The proxy only ever listens on loopback, on a port the system picks (never a service's standard port)."""

DEFAULT_PORTS: dict[str, int] = {
    "mqtt": 1883,
    "mqtts": 8883,
    "postgresql": 5432,
    "postgres": 5432,
    "postgresql+psycopg": 5432,
    "mysql": 3306,
    "mysql+pymysql": 3306,
    "opc.tcp": 4840,
}
"""Ports assumed by :meth:`FaultProxy.from_url` when a URL names none."""

_CONTROL_TIMEOUT_S = 10.0
"""How long a mode change or close waits for the loop: only a wedged loop takes that long."""

_THROTTLE_QUANTUM_S = 0.02
"""Throttled bytes go in pieces of this much time at the rate: fine-grained enough to be smooth, coarse enough
that a throttled proxy wakes up ~50 times a second per direction, not per byte."""

_T = TypeVar("_T")


class Mode(StrEnum):
    """The proxy's current fault mode (a ``str``, so it goes into results JSON as is)."""

    NORMAL = "normal"
    DROP = "drop"
    HALF_OPEN = "half_open"
    DELAY = "delay"
    THROTTLE = "throttle"


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the proxy's counters."""

    mode: Mode
    delay_s: float
    """The added latency while ``mode`` is ``delay`` (0 otherwise)."""
    rate_bytes_per_s: float
    """The rate per direction while ``mode`` is ``throttle`` (0 otherwise)."""
    accepted: int
    """Client connections accepted, including the ones reset at once during ``drop``."""
    closed: int
    """Client connections whose socket is closed, however they ended."""
    refused: int
    """Connections accepted during ``drop`` and reset at once (counted in ``accepted`` and ``closed`` too)."""
    reset: int
    """Connections the proxy reset because of a fault (``drop``, or the end of ``half_open``)."""
    upstream_failures: int
    """Connections reset because the upstream could not be reached (refused, timed out)."""
    bytes_to_upstream: int
    """Bytes forwarded from clients to the upstream."""
    bytes_to_client: int
    """Bytes forwarded from the upstream to clients."""
    transitions: tuple[tuple[float, Mode], ...]
    """``(time.monotonic(), mode)`` for the start (``normal``) and every mode change since, in order."""

    @property
    def open(self) -> int:
        """Client connections open now."""
        return self.accepted - self.closed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of this snapshot (mode names as strings)."""
        return {
            "mode": str(self.mode),
            "delay_s": self.delay_s,
            "rate_bytes_per_s": self.rate_bytes_per_s,
            "accepted": self.accepted,
            "closed": self.closed,
            "open": self.open,
            "refused": self.refused,
            "reset": self.reset,
            "upstream_failures": self.upstream_failures,
            "bytes_to_upstream": self.bytes_to_upstream,
            "bytes_to_client": self.bytes_to_client,
            "transitions": [[at, str(mode)] for at, mode in self.transitions],
        }


class _Counters:
    """Counters written by the loop thread and read by any thread, under one lock (a snapshot is consistent)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = 0
        self.closed = 0
        self.refused = 0
        self.reset = 0
        self.upstream_failures = 0
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0


class _TokenBucket:
    """A token bucket for one direction, shared by every connection (loop thread only, so no lock).

    Reservations may take the level below zero: each caller is given the moment its bytes may go, and callers
    are served in the order they asked, so connections share the rate fairly chunk by chunk.
    """

    def __init__(self) -> None:
        self.rate = 0.0
        self.quantum = 1
        self._level = 0.0
        self._last = 0.0

    def configure(self, rate: float, now: float) -> None:
        self.rate = rate
        # A burst of one quantum: after an idle spell the link does not go faster than its rate for long.
        self.quantum = max(1, min(256 * 1024, int(rate * _THROTTLE_QUANTUM_S)))
        self._level = min(self._level, float(self.quantum))
        self._last = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth of tokens; return the loop time at which they may be sent."""
        self._level = min(float(self.quantum), self._level + (now - self._last) * self.rate)
        self._last = now
        self._level -= n
        return now if self._level >= 0 else now + (-self._level) / self.rate


def _set_rst_on_close(transport: asyncio.BaseTransport) -> None:
    """Make closing this socket send a RST (SO_LINGER on, timeout 0) instead of a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: the client's accepted socket, or the socket to the upstream."""

    def __init__(self, conn: _Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = conn.loop.create_future()
        self.reading = True
        # The pipe that reads from this socket and the one that writes into it, set once the upstream is connected.
        self.reader: _Pipe | None = None
        self.writer: _Pipe | None = None

    # asyncio.Protocol callbacks (run in the loop thread).

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.side_made(self)

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(data)

    def eof_received(self) -> bool:
        if self.reader is not None:
            self.reader.feed_eof()
        # True: keep the socket open for the other direction (TCP half-close is forwarded, not turned into close).
        return True

    def pause_writing(self) -> None:
        if self.writer is not None:
            self.writer.dst_paused(True)

    def resume_writing(self) -> None:
        if self.writer is not None:
            self.writer.dst_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("proxy connection %d: %s side lost: %r", self.conn.ident, self.name, exc)
        if not self.lost.done():
            self.lost.set_result(None)
        self.conn.side_lost(self, exc)

    # Used by the connection and the pipes.

    def set_reading(self, reading: bool) -> None:
        """Pause or resume reading this socket (idempotent)."""
        if reading == self.reading:
            return
        self.reading = reading
        if self.transport is not None:
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def reset(self) -> None:
        """Close this socket at once with a RST."""
        if self.transport is not None and not self.lost.done():
            _set_rst_on_close(self.transport)
            self.transport.abort()

    def close(self) -> None:
        """Close this socket at once, dropping unsent bytes (a FIN unless unread bytes make the kernel send RST)."""
        if self.transport is not None and not self.lost.done():
            self.transport.abort()


class _Pipe:
    """One direction of a connection: what is read from ``src`` is written to ``dst``, now or later."""

    def __init__(self, conn: _Connection, src: _Side, dst: _Side, to_upstream: bool) -> None:
        self.conn = conn
        self.proxy = conn.proxy
        self.src = src
        self.dst = dst
        self.to_upstream = to_upstream
        src.reader = self
        dst.writer = self
        self.bucket = conn.proxy.bucket_up if to_upstream else conn.proxy.bucket_down
        # Chunks read but not yet written: (loop time read, data), None for the peer's EOF.
        self.pending: collections.deque[tuple[float, memoryview | None]] = collections.deque()
        self.pending_bytes = 0
        self.over_buffer = False
        self.pump: asyncio.Task[None] | None = None
        self.dst_full = False
        self.dst_room: asyncio.Future[None] | None = None
        self.eof_sent = False

    def feed(self, data: bytes) -> None:
        # Fast path: nothing held back, normal mode: write straight through (flow control via pause_writing).
        if self.pump is None and self.proxy.mode is Mode.NORMAL and not self.conn.blackholed:
            self._write(data)
            return
        self.pending.append((self.proxy.loop_time(), memoryview(data)))
        self.pending_bytes += len(data)
        self._check_buffer()
        self._ensure_pump()

    def feed_eof(self) -> None:
        if self.pump is None and not self.pending and self.proxy.mode is Mode.NORMAL and not self.conn.blackholed:
            self._write_eof()
            return
        self.pending.append((self.proxy.loop_time(), None))
        self._ensure_pump()

    def dst_paused(self, paused: bool) -> None:
        self.dst_full = paused
        if not paused and self.dst_room is not None and not self.dst_room.done():
            self.dst_room.set_result(None)
        self.update_reading()

    def update_reading(self) -> None:
        """Read ``src`` only when its bytes can go somewhere: not black-holed, ``dst`` not full, buffer not full."""
        self.src.set_reading(not self.conn.blackholed and not self.dst_full and not self.over_buffer)

    def cancel(self) -> None:
        if self.pump is not None:
            self.pump.cancel()

    def _check_buffer(self) -> None:
        limit = self.proxy.buffer_bytes
        # Hysteresis (pause above the limit, resume below a quarter of it) so reading does not flap per chunk.
        over = self.pending_bytes > limit if not self.over_buffer else self.pending_bytes > limit // 4
        if over != self.over_buffer:
            self.over_buffer = over
            self.update_reading()

    def _ensure_pump(self) -> None:
        if self.pump is None:
            self.pump = self.conn.loop.create_task(self._run_pump())

    def _write(self, data: bytes | memoryview) -> None:
        if not self.dst.usable():
            return  # the connection is being torn down: writing would only make asyncio warn
        assert self.dst.transport is not None
        self.dst.transport.write(data)
        n = len(data)
        counters = self.proxy.counters
        with counters.lock:
            if self.to_upstream:
                counters.bytes_to_upstream += n
            else:
                counters.bytes_to_client += n

    def _write_eof(self) -> None:
        self.eof_sent = True
        if self.dst.usable():
            assert self.dst.transport is not None
            if self.dst.transport.can_write_eof():
                self.dst.transport.write_eof()
        self.conn.pipe_finished()

    async def _run_pump(self) -> None:
        """Write held-back chunks as the mode allows; the fast path takes over again once none are left."""
        try:
            await self._drain_pending()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug, not a peer's doing: say so loudly, and do not leave the connection hanging
            log.exception("proxy connection %d: pump failed", self.conn.ident)
            self.conn.reset()
        finally:
            self.pump = None

    async def _drain_pending(self) -> None:
        proxy = self.proxy
        while self.pending:
            if self.conn.blackholed:
                # Half-open: never forwarded; the connection is reset when the mode ends (this task is cancelled).
                await self.conn.loop.create_future()
            arrived, data = self.pending[0]
            mode = proxy.mode
            if mode is Mode.DELAY:
                deadline = arrived + proxy.delay_s
                if proxy.loop_time() < deadline:
                    await proxy.wait_for_change(deadline)
                    continue  # the mode may have changed meanwhile: decide again
            if data is None:
                self.pending.popleft()
                self._write_eof()
                continue
            if mode is Mode.THROTTLE:
                size = min(len(data), self.bucket.quantum)
                at = self.bucket.reserve(size, proxy.loop_time())
                if at > proxy.loop_time():
                    await proxy.wait_for_change(at)
                if self.conn.blackholed:
                    continue  # became half-open while waiting: these bytes must not go
                if size < len(data):
                    self.pending[0] = (arrived, data[size:])
                    data = data[:size]
                else:
                    self.pending.popleft()
            else:
                self.pending.popleft()
            self.pending_bytes -= len(data)
            self._write(data)
            self._check_buffer()
            if self.dst_full:
                self.dst_room = self.conn.loop.create_future()
                await self.dst_room
                self.dst_room = None


class _Connection:
    """A client connection and its upstream connection, with one pipe each way."""

    def __init__(self, proxy: _LoopState, ident: int) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.ident = ident
        self.client = _Side(self, "client")
        self.upstream: _Side | None = None
        self.pipes: list[_Pipe] = []
        self.connect_task: asyncio.Task[None] | None = None
        self.blackholed = False
        self.closing = False

    def side_made(self, side: _Side) -> None:
        if side is self.client:
            self._client_made()
        elif self.closing:
            side.close()  # the upstream connect finished after the client went away
        else:
            self._upstream_made(side)

    def _client_made(self) -> None:
        proxy = self.proxy
        with proxy.counters.lock:
            proxy.counters.accepted += 1
        if proxy.mode is Mode.DROP:
            log.debug("proxy connection %d refused (drop)", self.ident)
            with proxy.counters.lock:
                proxy.counters.refused += 1
            self.closing = True
            self.client.reset()
            return
        proxy.connections.add(self)
        # Nothing is read from the client until the upstream is there to take it.
        self.client.set_reading(False)
        if proxy.mode is Mode.HALF_OPEN:
            self.blackholed = True  # accepted, never forwarded
            return
        self.connect_task = self.loop.create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        proxy = self.proxy
        try:
            async with asyncio.timeout(proxy.connect_timeout_s):
                await self.loop.create_connection(lambda: _Side(self, "upstream"), proxy.host, proxy.port)
        except (OSError, TimeoutError) as exc:
            log.debug("proxy connection %d: upstream %s:%d unreachable: %r", self.ident, proxy.host, proxy.port, exc)
            with proxy.counters.lock:
                proxy.counters.upstream_failures += 1
            self.reset()

    def _upstream_made(self, upstream: _Side) -> None:
        self.upstream = upstream
        self.pipes = [_Pipe(self, self.client, upstream, True), _Pipe(self, upstream, self.client, False)]
        if self.blackholed:
            upstream.set_reading(False)
        else:
            self.client.set_reading(True)

    def blackhole(self) -> None:
        """Stop forwarding either way, keeping both sockets open (half_open)."""
        self.blackholed = True
        self.client.set_reading(False)
        if self.upstream is not None:
            self.upstream.set_reading(False)

    def pipe_finished(self) -> None:
        """A direction forwarded its EOF: when both have, the connection ended cleanly; close both sockets."""
        if self.pipes and all(p.eof_sent for p in self.pipes):
            self._teardown(graceful=True)

    def reset(self) -> None:
        """Break the connection: RST on both sockets."""
        self._teardown(graceful=False, rst=True)

    def close(self) -> None:
        """End the connection at once without a RST (the proxy is closing)."""
        self._teardown(graceful=False, rst=False)

    def _teardown(self, graceful: bool, rst: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        if self.connect_task is not None:
            self.connect_task.cancel()
        for pipe in self.pipes:
            pipe.cancel()
        for side in (self.client, self.upstream):
            if side is None or side.transport is None:
                continue
            if graceful:
                side.transport.close()  # flushes what is buffered, then FIN
            elif rst:
                side.reset()
            else:
                side.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self.client:
            with self.proxy.counters.lock:
                self.proxy.counters.closed += 1
            self.proxy.connections.discard(self)
        if not self.closing:
            # A peer went away on its own. A reset (exc) is passed on as a reset; a close as a close, after
            # flushing what the other side still has to receive.
            log.debug("proxy connection %d: %s side ended (%r)", self.ident, side.name, exc)
            if exc is not None:
                self.reset()
            else:
                self._teardown(graceful=True)

    async def wait_closed(self) -> None:
        waits: list[Awaitable[Any]] = []
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                waits.append(side.lost)
        if self.connect_task is not None:
            waits.append(self.connect_task)
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)


class _LoopState:
    """Everything the loop thread owns: mode, connections, buckets. Only touched from the loop thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        upstream: tuple[str, int],
        *,
        counters: _Counters,
        buffer_bytes: int,
        connect_timeout_s: float,
    ) -> None:
        self.loop = loop
        self.host, self.port = upstream
        self.counters = counters
        self.buffer_bytes = buffer_bytes
        self.connect_timeout_s = connect_timeout_s
        self.mode = Mode.NORMAL
        self.delay_s = 0.0
        self.connections: set[_Connection] = set()
        self.bucket_up = _TokenBucket()
        self.bucket_down = _TokenBucket()
        self.changed = asyncio.Event()
        self.next_ident = 0

    def loop_time(self) -> float:
        return self.loop.time()

    def new_connection(self) -> _Side:
        self.next_ident += 1
        return _Connection(self, self.next_ident).client

    async def wait_for_change(self, deadline: float) -> None:
        """Sleep until ``deadline`` (loop time) or the next mode change, whichever comes first."""
        event = self.changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await event.wait()

    async def set_mode(self, mode: Mode, delay_s: float, rate: float) -> None:
        previous = self.mode
        self.mode = mode
        self.delay_s = delay_s
        if mode is Mode.THROTTLE:
            now = self.loop_time()
            self.bucket_up.configure(rate, now)
            self.bucket_down.configure(rate, now)
        # Wake pumps sleeping on a delay or the bucket: they decide again under the new mode.
        self.changed.set()
        self.changed = asyncio.Event()
        ending: list[_Connection] = []
        if mode is Mode.DROP:
            ending = list(self.connections)
        elif previous is Mode.HALF_OPEN and mode is not Mode.HALF_OPEN:
            ending = [c for c in self.connections if c.blackholed]
        elif mode is Mode.HALF_OPEN:
            for conn in self.connections:
                conn.blackhole()
        for conn in ending:
            conn.reset()
        if ending:
            with self.counters.lock:
                self.counters.reset += len(ending)
            # Return once the sockets are closed, so the caller's next step sees the fault in effect.
            await asyncio.gather(*(c.wait_closed() for c in ending))

    async def shutdown(self, server: asyncio.Server) -> None:
        server.close()
        conns = list(self.connections)
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.wait_closed() for c in conns))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await server.wait_closed()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (ephemeral port) to one upstream, with switchable network faults.

    Thread-safe: every public method may be called from any thread except the proxy's own. Use it as a context
    manager, or call :meth:`start` and :meth:`close` (idempotent). See the module docstring for the modes.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        connect_timeout_s: float = 5.0,
        buffer_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        """
        :param upstream_host: where every accepted connection is forwarded (resolved at each connect).
        :param upstream_port: the upstream's port.
        :param connect_timeout_s: a client connection whose upstream connect takes longer is reset.
        :param buffer_bytes: bytes a connection may hold back per direction (delay, throttle) before the proxy
            stops reading that side, so a held-back sender is slowed by TCP flow control instead of filling memory.
        """
        if not 0 < upstream_port < 65536:
            raise ValueError(f"upstream port {upstream_port} is not a TCP port")
        if buffer_bytes < 1:
            raise ValueError("buffer_bytes must be positive")
        self.upstream: tuple[str, int] = (upstream_host, upstream_port)
        self._connect_timeout_s = connect_timeout_s
        self._buffer_bytes = buffer_bytes
        self._counters = _Counters()
        self._lock = threading.Lock()  # start/close/mode changes, one at a time
        self._mode = Mode.NORMAL
        self._delay_s = 0.0
        self._rate = 0.0
        self._transitions: list[tuple[float, Mode]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._state: _LoopState | None = None
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> FaultProxy:
        """A proxy to the host and port a URL names (the scheme's usual port from :data:`DEFAULT_PORTS` if none)."""
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"{url!r} names no host")
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
        if port is None:
            raise ValueError(f"{url!r} names no port and scheme {parts.scheme!r} has no known default")
        return cls(parts.hostname, port, **kwargs)

    # Life cycle.

    def start(self) -> Self:
        """Listen and start forwarding (in a background thread); returns self. A second call does nothing."""
        with self._lock:
            if self._closed:
                raise RuntimeError("FaultProxy is closed; make a new one")
            if self._loop is not None:
                return self
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_log_loop_error)
            ready = threading.Event()
            thread = threading.Thread(target=self._run, args=(loop, ready), name="fault-proxy", daemon=True)
            thread.start()
            ready.wait()
            self._loop, self._thread = loop, thread
            state = _LoopState(
                loop,
                self.upstream,
                counters=self._counters,
                buffer_bytes=self._buffer_bytes,
                connect_timeout_s=self._connect_timeout_s,
            )
            try:
                server = self._call(self._listen(state))
            except BaseException:
                self._stop_loop()
                self._closed = True
                raise
            self._state, self._server = state, server
            self._port = server.sockets[0].getsockname()[1]
            thread.name = f"fault-proxy-{self._port}"
            self._transitions.append((time.monotonic(), Mode.NORMAL))
            # A mode chosen before start takes effect now.
            if self._mode is not Mode.NORMAL:
                self._call(state.set_mode(self._mode, self._delay_s, self._rate))
                self._transitions.append((time.monotonic(), self._mode))
            log.debug("fault proxy on %s:%d -> %s:%d", LISTEN_HOST, self._port, *self.upstream)
            return self

    async def _listen(self, state: _LoopState) -> asyncio.Server:
        # Backlog 1024: a few hundred clients connecting at once (a load test's ramp) are not turned away.
        return await state.loop.create_server(state.new_connection, LISTEN_HOST, 0, backlog=1024)

    def close(self) -> None:
        """End every connection at once (a FIN, not a RST: the proxy goes away, it is no fault) and the listener;
        stop the loop thread. Idempotent; also fine before :meth:`start`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._loop is None:
                return
            state, server = self._state, self._server
            try:
                if state is not None and server is not None:
                    self._call(state.shutdown(server))
            finally:
                self._stop_loop()
            log.debug("fault proxy on port %s closed", self._port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # Where clients connect.

    @property
    def host(self) -> str:
        """The address the proxy listens on (always loopback)."""
        return LISTEN_HOST

    @property
    def port(self) -> int:
        """The port the proxy listens on (chosen by the system at :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (LISTEN_HOST, self.port)

    def url_for(self, scheme: str, *, userinfo: str | None = None, path: str = "") -> str:
        """``scheme://[userinfo@]127.0.0.1:port[path]``: a URL to the proxy, e.g. ``url_for("mqtt")``."""
        user = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{user}{LISTEN_HOST}:{self.port}{path}"

    def wrap_url(self, url: str) -> str:
        """The same URL with its host and port replaced by the proxy's (user, path, query kept)."""
        parts = urlsplit(url)
        userinfo, sep, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{sep}{LISTEN_HOST}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # Faults.

    @property
    def mode(self) -> Mode:
        return self._mode

    def drop(self) -> None:
        """Reset every open connection (both sides) and reset each new one at once, until :meth:`heal`."""
        self._set_mode(Mode.DROP)

    def half_open(self) -> None:
        """Stop forwarding either way while keeping connections open; new ones are never forwarded.

        When the mode ends, every connection that was half-open is reset on both sides.
        """
        self._set_mode(Mode.HALF_OPEN)

    def delay(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` after it was read, order kept per direction."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {seconds!r}")
        self._set_mode(Mode.DELAY, delay_s=seconds)

    def throttle(self, bytes_per_s: float) -> None:
        """Forward at most ``bytes_per_s`` per direction, all connections together (one token bucket each way)."""
        if not math.isfinite(bytes_per_s) or bytes_per_s <= 0:
            raise ValueError(f"throttle needs a finite rate > 0 bytes/s, not {bytes_per_s!r}")
        self._set_mode(Mode.THROTTLE, rate=bytes_per_s)

    def heal(self) -> None:
        """Back to normal forwarding (half-open connections are reset; held-back chunks go at once)."""
        self._set_mode(Mode.NORMAL)

    def stats(self) -> ProxyStats:
        """A consistent snapshot of the counters, the current mode and the transitions so far."""
        c = self._counters
        with self._lock, c.lock:
            return ProxyStats(
                mode=self._mode,
                delay_s=self._delay_s,
                rate_bytes_per_s=self._rate,
                accepted=c.accepted,
                closed=c.closed,
                refused=c.refused,
                reset=c.reset,
                upstream_failures=c.upstream_failures,
                bytes_to_upstream=c.bytes_to_upstream,
                bytes_to_client=c.bytes_to_client,
                transitions=tuple(self._transitions),
            )

    def _set_mode(self, mode: Mode, *, delay_s: float = 0.0, rate: float = 0.0) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("FaultProxy is closed")
            if (mode, delay_s, rate) == (self._mode, self._delay_s, self._rate):
                return  # already so: no transition to record (heal() when healthy is a no-op)
            state = self._state
            if state is not None:
                self._call(state.set_mode(mode, delay_s, rate))
                self._transitions.append((time.monotonic(), mode))
            self._mode, self._delay_s, self._rate = mode, delay_s, rate
            log.info("fault proxy on port %s: %s", self._port, _describe(mode, delay_s, rate))

    # The loop thread.

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            # Whatever is still pending (it should be nothing) is cancelled and awaited, so asyncio has nothing
            # to complain about ("Task was destroyed but it is pending") when the loop closes.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine in the loop thread and wait for its result (from any other thread)."""
        loop, thread = self._loop, self._thread
        assert loop is not None and thread is not None
        if threading.current_thread() is thread:
            coro.close()
            raise RuntimeError("FaultProxy methods cannot be called from the proxy's own thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=_CONTROL_TIMEOUT_S)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already stopped and closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_CONTROL_TIMEOUT_S)
        if thread.is_alive():
            log.warning("fault proxy thread %s did not stop within %.0f s", thread.name, _CONTROL_TIMEOUT_S)


def _describe(mode: Mode, delay_s: float, rate: float) -> str:
    if mode is Mode.DELAY:
        return f"delay {delay_s * 1000:g} ms"
    if mode is Mode.THROTTLE:
        return f"throttle {rate:g} B/s"
    return str(mode)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: peers going away are routine (debug); anything else is a bug (error)."""
    exc = context.get("exception")
    message = context.get("message", "unhandled error in the fault proxy loop")
    if isinstance(exc, OSError):
        log.debug("%s: %r", message, exc)
    else:
        log.error("%s", message, exc_info=exc if isinstance(exc, BaseException) else None)
