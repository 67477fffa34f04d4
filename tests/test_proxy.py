"""Tests for bench/harness/proxy.py (FaultProxy): real sockets on loopback, no mocks.

An echo server (asyncio, in its own thread, port 0) stands in for the service in most tests; the last ones go
through the proxy to the real Mosquitto and PostgreSQL on loopback (skipped when unreachable, failed when
BENCH_REQUIRE_SERVICES=1). Timings are lower bounds only: the machines are shared, so a slow run may take
longer, never less. Waits for an event have generous timeouts that only a hang reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from bench.harness.proxy import FaultProxy, Mode
from tests.conftest import require_service

PG_USERS = ("postgres", "root")
WAIT_S = 10.0
"""How long a test waits for something that should happen at once: reached only when it hangs."""


# An echo server to forward to.


class _EchoProtocol(asyncio.Protocol):
    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        with self.server.lock:
            self.server.accepted += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the echo is flushed: the client then reads EOF

    def connection_lost(self, exc: Exception | None) -> None:
        with self.server.lock:
            self.server.lost.append(exc)


class EchoServer:
    """Echoes every byte back; closes after the client's EOF. Counts connections and how they ended."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = 0
        self.lost: list[Exception | None] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="echo-server", daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(WAIT_S)
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _listen(self) -> asyncio.Server:
        return await self.loop.create_server(lambda: _EchoProtocol(self), "127.0.0.1", 0, backlog=1024)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(WAIT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as p:
        yield p


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """No test may print on stderr or log a warning: peers going away is routine for a fault proxy (debug)."""
    caplog.set_level(logging.DEBUG, logger="bench.harness.proxy")
    yield
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("asyncio", "bench"))]
    assert not loud, [r.getMessage() for r in loud]
    assert capfd.readouterr().err == ""


# Helpers.


def connect(port: int, timeout: float = WAIT_S) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        data = sock.recv(n - len(chunks))
        if not data:
            raise EOFError(f"EOF after {len(chunks)} of {n} bytes")
        chunks += data
    return bytes(chunks)


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def assert_broken(sock: socket.socket) -> None:
    """The connection is over: the next read sees EOF or a reset (not a timeout, not data)."""
    sock.settimeout(WAIT_S)
    try:
        data = sock.recv(1024)
    except ConnectionResetError:
        return
    assert data == b"", f"expected EOF or a reset, read {data!r}"


def assert_silent(sock: socket.socket, seconds: float = 0.5) -> None:
    """Nothing arrives, and the connection is not closed either."""
    sock.settimeout(seconds)
    with pytest.raises(TimeoutError):
        sock.recv(1024)


def assert_refused(port: int) -> None:
    """A connection is refused: reset during the handshake, or accepted by the kernel and reset at once."""
    try:
        sock = connect(port)
    except ConnectionError:
        return  # the proxy's RST came before connect() returned
    with sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"anyone?")
        assert_broken(sock)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def modes(p: FaultProxy) -> list[Mode]:
    return [mode for _, mode in p.stats().transitions]


def proxy_thread(p: FaultProxy) -> threading.Thread:
    (thread,) = [t for t in threading.enumerate() if t.name == f"fault-proxy-{p.port}"]
    return thread


# Forwarding.


def test_forwards_a_large_random_payload_byte_exact_both_ways(proxy: FaultProxy) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    sock = connect(proxy.port)

    def send() -> None:
        # From another thread: the echo comes back while we still send, and the reader must drain it.
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # our EOF reaches the echo server, which closes after echoing

    sender = threading.Thread(target=send)
    sender.start()
    received = bytearray()
    while chunk := sock.recv(1 << 20):
        received += chunk
    sender.join(WAIT_S)
    sock.close()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    wait_until(lambda: proxy.stats().open == 0, "the proxy to see the connection closed")
    stats = proxy.stats()
    assert (stats.accepted, stats.closed, stats.bytes_to_upstream, stats.bytes_to_client) == (
        1,
        1,
        len(payload),
        len(payload),
    )
    assert stats.mode is Mode.NORMAL and modes(proxy) == [Mode.NORMAL]


def test_upstream_sends_first_and_client_half_close_is_forwarded(echo: EchoServer, proxy: FaultProxy) -> None:
    # Half-close: after our EOF the echo still gets to answer (the proxy forwards the FIN, not a close).
    sock = connect(proxy.port)
    sock.sendall(b"last words")
    sock.shutdown(socket.SHUT_WR)
    assert recv_exactly(sock, 10) == b"last words"
    assert sock.recv(10) == b""
    sock.close()
    wait_until(lambda: len(echo.lost) == 1, "the echo server to see the close")
    assert echo.lost == [None], "a clean close, not a reset"


def test_hundreds_of_concurrent_connections(echo: EchoServer, proxy: FaultProxy) -> None:
    socks = [connect(proxy.port) for _ in range(300)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(f"{i:04d}".encode() * 256)
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, 1024) == f"{i:04d}".encode() * 256
        assert proxy.stats().open == 300
        assert echo.accepted == 300
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: proxy.stats().open == 0, "every connection to close")


def test_switching_modes_from_another_thread_keeps_every_byte_in_order(proxy: FaultProxy) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    sock = connect(proxy.port)
    stop = threading.Event()

    def switch() -> None:
        # Delay, throttle (slow enough that bytes are held back, fast enough for a short test) and normal,
        # back and forth while bytes flow: chunks held back under one mode must leave in order under the next.
        while not stop.is_set():
            proxy.delay(0.005)
            time.sleep(0.005)
            proxy.throttle(10_000_000)
            time.sleep(0.01)
            proxy.heal()

    switcher = threading.Thread(target=switch)
    switcher.start()

    def send() -> None:
        # In pieces spread over ~0.5 s, so that many mode changes find chunks in flight.
        for offset in range(0, len(payload), 32 * 1024):
            sock.sendall(payload[offset : offset + 32 * 1024])
            time.sleep(0.004)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    received = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            received += chunk
    finally:
        stop.set()
        switcher.join(WAIT_S)
        sender.join(WAIT_S)
        sock.close()
    assert bytes(received) == payload
    assert len(modes(proxy)) > 10


# Faults.


def test_drop_resets_open_connections_and_refuses_new_ones_until_heal(echo: EchoServer, proxy: FaultProxy) -> None:
    sock = connect(proxy.port)
    round_trip(sock)
    proxy.drop()
    assert proxy.mode is Mode.DROP
    assert_broken(sock)
    # Both sides: the upstream's socket was reset too (it saw an error, not a polite close).
    wait_until(lambda: len(echo.lost) == 1, "the echo server to see the connection end")
    assert isinstance(echo.lost[0], ConnectionResetError)

    assert_refused(proxy.port)
    assert echo.accepted == 1, "a connection during drop never reaches the upstream"

    proxy.heal()
    again = connect(proxy.port)
    round_trip(again, b"back")
    for s in (sock, again):
        s.close()
    stats = proxy.stats()
    assert stats.refused == 1 and stats.reset == 1
    assert modes(proxy) == [Mode.NORMAL, Mode.DROP, Mode.NORMAL]
    times = [at for at, _ in stats.transitions]
    assert times == sorted(times)


def test_half_open_forwards_nothing_and_heal_resets_those_connections(echo: EchoServer, proxy: FaultProxy) -> None:
    sock = connect(proxy.port)
    round_trip(sock)
    proxy.half_open()
    sock.sendall(b"into the void")
    assert_silent(sock)  # no echo, and no EOF either: the connection looks alive

    late = connect(proxy.port)  # accepted, but never forwarded
    late.sendall(b"hello?")
    assert_silent(late)
    assert echo.accepted == 1
    assert echo.lost == [], "the upstream side stays open too"

    proxy.heal()
    # Like a NAT that forgot the flows: the half-open connections are reset, on both sides.
    assert_broken(sock)
    assert_broken(late)
    wait_until(lambda: len(echo.lost) == 1, "the upstream side to be reset")
    fresh = connect(proxy.port)
    round_trip(fresh, b"fresh")
    for s in (sock, late, fresh):
        s.close()
    assert proxy.stats().reset == 2
    assert modes(proxy) == [Mode.NORMAL, Mode.HALF_OPEN, Mode.NORMAL]


def test_delay_adds_at_least_the_delay_each_way_and_keeps_order(proxy: FaultProxy) -> None:
    sock = connect(proxy.port)
    round_trip(sock)
    proxy.delay(0.3)
    started = time.monotonic()
    messages = [f"<{i:03d}>".encode() for i in range(50)]
    for message in messages:  # separate small writes: many chunks, all of which must stay in order
        sock.sendall(message)
    first = recv_exactly(sock, 5)
    elapsed = time.monotonic() - started
    rest = recv_exactly(sock, 5 * 49)
    assert first + rest == b"".join(messages)
    # Out through the proxy and back: the delay is added twice. Lower bound only.
    assert elapsed >= 2 * 0.3 * 0.95, elapsed
    proxy.heal()
    round_trip(sock, b"prompt again")
    sock.close()
    stats = proxy.stats()
    assert modes(proxy) == [Mode.NORMAL, Mode.DELAY, Mode.NORMAL]
    assert stats.delay_s == 0.0


def test_throttle_limits_the_rate_for_all_connections_together(proxy: FaultProxy) -> None:
    rate = 200_000
    per_connection = 150_000
    proxy.throttle(rate)
    assert proxy.stats().rate_bytes_per_s == rate
    socks = [connect(proxy.port) for _ in range(2)]
    results: queue.Queue[bytes] = queue.Queue()
    payloads = [os.urandom(per_connection) for _ in socks]

    def exchange(sock: socket.socket, payload: bytes) -> None:
        sock.sendall(payload)
        results.put(recv_exactly(sock, len(payload)))

    started = time.monotonic()
    workers = [threading.Thread(target=exchange, args=pair) for pair in zip(socks, payloads, strict=True)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT_S)
    elapsed = time.monotonic() - started
    got = sorted(results.get_nowait() for _ in socks)
    assert got == sorted(payloads)
    # 300 kB each way at 200 kB/s shared: at least ~1.5 s (a generous 0.8 of it), however it is split.
    assert elapsed >= 0.8 * 2 * per_connection / rate, elapsed
    for sock in socks:
        sock.close()


def test_unreachable_upstream_resets_the_client_quietly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    # The port is free again: nothing listens there.
    with FaultProxy("127.0.0.1", dead_port) as p:
        assert_refused(p.port)
        wait_until(lambda: p.stats().upstream_failures == 1, "the failure to be counted")


# Life cycle.


def test_close_ends_connections_stops_the_thread_and_is_idempotent(echo: EchoServer) -> None:
    before = set(threading.enumerate())
    p = FaultProxy("127.0.0.1", echo.port)
    p.close()  # before start: nothing to do
    p = FaultProxy("127.0.0.1", echo.port).start()
    assert p.start() is p  # a second start changes nothing
    sock = connect(p.port)
    round_trip(sock)
    thread = proxy_thread(p)
    p.close()
    assert_broken(sock)
    sock.close()
    assert not thread.is_alive()
    p.close()
    assert set(threading.enumerate()) <= before, "no thread left behind"
    with pytest.raises(RuntimeError):
        p.drop()
    with pytest.raises(RuntimeError):
        p.start()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.port), timeout=WAIT_S)


def test_an_idle_proxy_uses_no_cpu(proxy: FaultProxy) -> None:
    sock = connect(proxy.port)
    round_trip(sock)
    native_id = proxy_thread(proxy).native_id

    def cpu_s() -> float:
        (t,) = [t for t in psutil.Process().threads() if t.id == native_id]
        return t.user_time + t.system_time

    before = cpu_s()
    time.sleep(1.0)
    # A busy loop would burn ~1 s of CPU here; sleeping in select() burns none.
    assert cpu_s() - before < 0.05
    sock.close()


def test_urls_point_at_the_proxy(echo: EchoServer) -> None:
    p = FaultProxy.from_url("postgresql://postgres@127.0.0.1/test")
    assert p.upstream == ("127.0.0.1", 5432)
    assert FaultProxy.from_url("mqtt://localhost:1884").upstream == ("localhost", 1884)
    with pytest.raises(ValueError, match="no port"):
        FaultProxy.from_url("gopher://example")
    with FaultProxy("127.0.0.1", echo.port) as q:
        assert q.port not in (0, echo.port) and q.host == "127.0.0.1"
        assert q.url_for("mqtt") == f"mqtt://127.0.0.1:{q.port}"
        assert q.wrap_url("postgresql://u:p@db:5432/test?sslmode=disable") == (
            f"postgresql://u:p@127.0.0.1:{q.port}/test?sslmode=disable"
        )


def test_a_mode_chosen_before_start_applies_at_start(echo: EchoServer) -> None:
    p = FaultProxy("127.0.0.1", echo.port)
    p.drop()
    with p:
        assert_refused(p.port)
        p.heal()
        with connect(p.port) as ok:
            round_trip(ok)
    assert modes(p) == [Mode.NORMAL, Mode.DROP, Mode.NORMAL]


# Real services on loopback.


@pytest.mark.services
def test_mqtt_publish_subscribe_through_the_proxy_survives_drop_and_heal(mosquitto_url: str) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topic = f"iiot-bench-test/proxy/{uuid.uuid4().hex}"
    received: queue.Queue[bytes] = queue.Queue()
    subscribed: queue.Queue[None] = queue.Queue()
    disconnects: queue.Queue[str] = queue.Queue()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(topic, qos=1)  # again after every reconnect: a clean session forgets it

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        subscribed.put(None)  # only now may a publish from the other connection reach us

    def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        disconnects.put(str(reason))

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        received.put(bytes(msg.payload))

    with FaultProxy.from_url(mosquitto_url) as p:
        sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        sub.on_connect, sub.on_subscribe = on_connect, on_subscribe
        sub.on_disconnect, sub.on_message = on_disconnect, on_message
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        for client in (sub, pub):
            client.reconnect_delay_set(min_delay=1, max_delay=1)  # back soon after heal
            client.connect("127.0.0.1", p.port, keepalive=30)
            client.loop_start()
        try:
            subscribed.get(timeout=WAIT_S)
            wait_until(pub.is_connected, "the publisher to connect")
            for i in range(20):
                pub.publish(topic, f"m{i}".encode(), qos=1).wait_for_publish(WAIT_S)
            assert [received.get(timeout=WAIT_S) for _ in range(20)] == [f"m{i}".encode() for i in range(20)]
            stats = p.stats()
            assert stats.bytes_to_upstream > 20 * len(topic) and stats.bytes_to_client > 20 * len(topic)
            assert stats.open == 2

            p.drop()
            disconnects.get(timeout=WAIT_S)  # the subscriber notices at once: its connection was reset
            p.heal()
            subscribed.get(timeout=WAIT_S)  # it came back by itself, and so does the publisher
            wait_until(pub.is_connected, "the publisher to reconnect")
            pub.publish(topic, b"after heal", qos=1).wait_for_publish(WAIT_S)
            assert received.get(timeout=WAIT_S) == b"after heal"
        finally:
            for client in (pub, sub):
                client.disconnect()
                client.loop_stop()
    assert p.stats().reset >= 2


@pytest.mark.services
def test_mqtt_keepalive_detects_half_open(mosquitto_url: str) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    disconnected = threading.Event()

    def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        disconnected.set()

    with FaultProxy.from_url(mosquitto_url) as p:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        client.on_disconnect = on_disconnect
        client.connect("127.0.0.1", p.port, keepalive=1)
        client.loop_start()
        try:
            wait_until(client.is_connected, "the MQTT connection")
            p.half_open()
            # Nothing breaks at the TCP level; only the unanswered PINGREQ (after ~1-2 keepalives) gives it away.
            assert disconnected.wait(WAIT_S), "the MQTT keepalive should detect the half-open connection"
        finally:
            client.disconnect()
            client.loop_stop()
            p.heal()


def pg_url() -> str:
    """The first of postgres@ and root@ that the loopback PostgreSQL lets in (trust auth)."""
    import psycopg

    require_service("PostgreSQL", "127.0.0.1", 5432)
    errors = []
    for user in PG_USERS:
        url = f"postgresql://{user}@127.0.0.1:5432/test"
        try:
            psycopg.connect(url, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            errors.append(f"{user}: {exc}")
            continue
        return url
    message = f"PostgreSQL on 127.0.0.1:5432 lets none of {PG_USERS} into database test: {errors}"
    if os.environ.get("BENCH_REQUIRE_SERVICES") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.mark.services
def test_postgresql_connection_breaks_on_drop_and_reconnects_after_heal() -> None:
    import psycopg

    url = pg_url()
    with FaultProxy.from_url(url) as p:
        through = p.wrap_url(url)
        with psycopg.connect(through, connect_timeout=5, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            p.drop()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(through, connect_timeout=5)  # refused while dropped
        p.heal()
        with psycopg.connect(through, connect_timeout=5, autocommit=True) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
    stats = p.stats()
    assert stats.refused == 1 and stats.reset == 1
    assert [mode for _, mode in stats.transitions] == [Mode.NORMAL, Mode.DROP, Mode.NORMAL]
