"""The MQTT publisher sends every message of a large QoS 1 burst, or counts each one it did not send, with why.

Issue 14: with more than 65,535 publishes unacknowledged, paho reuses a message
id that is still pending and refuses the publish (``MQTT_ERR_QUEUE_SIZE``); a
100,000-message burst had about 30% refused and the run did not say so. The
publisher now keeps a bounded window of unacknowledged publishes. These tests
use real brokers: Mosquitto on loopback (skipped when unreachable, unless
BENCH_REQUIRE_SERVICES=1) and the embedded amqtt broker on port 0.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from pipeline.clock import MonotonicWallClock
from simulators.broker import EmbeddedBroker
from simulators.errors import SimulatorError
from simulators.publisher import ACK_TIMEOUT, DEFAULT_WINDOW, MAX_WINDOW, PacedPublisher
from simulators.stream import Message, PhaseSpec, StreamSpec, stream

BURST = 100_000
MACHINES = tuple(f"press-{i:02d}" for i in range(10))


def burst(count: int, clock: MonotonicWallClock, *, seconds: float = 1.0) -> list[Message]:
    """``count`` messages due within ``seconds`` from now: far faster than any broker acknowledges them."""
    spec = StreamSpec(seed=14, machines=MACHINES, phases=(PhaseSpec("steady", seconds, count / seconds),))
    return list(stream(spec, clock.now_ns()))


def topic() -> str:
    # A topic of its own: a shared Mosquitto may carry other runs' traffic.
    return f"iiot-bench-test/{uuid.uuid4().hex}/{{machine}}"


class _Lags:
    """Every accepted message's send lag (sent minus intended), as the runner's send log records it."""

    def __init__(self) -> None:
        self.count = 0
        self.max_ns = 0
        self._lock = threading.Lock()

    def on_sent(self, message: Message, sent_ns: int) -> None:
        with self._lock:
            self.count += 1
            self.max_ns = max(self.max_ns, sent_ns - message.intended_send_ns)


def send_burst_and_check(url: str) -> None:
    clock = MonotonicWallClock()
    messages = burst(BURST, clock)
    assert len(messages) == BURST
    publisher = PacedPublisher(url, topic(), 1)
    publisher.connect()
    lags = _Lags()
    try:
        accepted = publisher.run(messages, clock, on_sent=lags.on_sent)
        all_acked = publisher.wait_acked(BURST, 120)
    finally:
        publisher.close()
    assert publisher.not_sent == {}, publisher.not_sent_problem()
    assert accepted == lags.count == BURST
    assert all_acked, f"only {publisher.acked:,} of {BURST:,} acknowledged"
    assert publisher.acked == BURST
    window = publisher.window_stats()
    # The burst outruns the broker, so the window filled (more than 65,535 would otherwise have been pending) ...
    assert window["in_flight_max"] == DEFAULT_WINDOW
    assert window["waits"] > 0
    # ... and each wait for room came after the message's intended time: it is inside that message's send lag.
    assert lags.max_ns / 1e6 >= window["wait_max_ms"]


@pytest.mark.services
def test_100k_qos1_burst_is_all_acknowledged_by_mosquitto(mosquitto_url: str) -> None:
    send_burst_and_check(mosquitto_url)


@pytest.mark.slow
def test_100k_qos1_burst_is_all_acknowledged_by_the_embedded_broker() -> None:
    # amqtt acknowledges about 5,000 msg/s on 2 cores: 20-40 s, too long for the default run.
    with EmbeddedBroker() as broker:
        send_burst_and_check(broker.url)


def test_a_stalled_window_counts_every_unsent_message_with_its_reason() -> None:
    """The broker dies: the window fills, no acknowledgement comes, the rest of the stream is counted, promptly."""
    clock = MonotonicWallClock()
    messages = burst(200, clock, seconds=0.2)
    broker = EmbeddedBroker().start()
    publisher = PacedPublisher(broker.url, topic(), 1, window=8, stall_timeout_s=0.5)
    try:
        publisher.connect()
        broker.close()
        started = time.monotonic()
        accepted = publisher.run(messages, clock)
        elapsed = time.monotonic() - started
    finally:
        publisher.close()
        broker.close()
    # paho keeps a QoS 1 message while disconnected (to send it on reconnect): the window's 8 count as sent.
    assert accepted == 8
    assert publisher.acked == 0
    assert publisher.not_sent == {ACK_TIMEOUT: 192}
    problem = publisher.not_sent_problem()
    assert problem is not None and "192" in problem and ACK_TIMEOUT in problem and "0.5 s" in problem
    # One stall timeout for the whole stream, not one per message.
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_publishes_refused_by_the_client_are_counted_by_their_error_name() -> None:
    """QoS 0 with the broker gone: paho refuses (MQTT_ERR_NO_CONN) and keeps nothing; each one is counted."""
    clock = MonotonicWallClock()
    broker = EmbeddedBroker().start()
    publisher = PacedPublisher(broker.url, topic(), 0)
    try:
        publisher.connect()
        broker.close()
        # Spread over a second: paho notices the closed connection within milliseconds of the first sends.
        messages = burst(300, clock, seconds=1.0)
        accepted = publisher.run(messages, clock)
    finally:
        publisher.close()
        broker.close()
    assert set(publisher.not_sent) == {"MQTT_ERR_NO_CONN"}
    refused = publisher.not_sent["MQTT_ERR_NO_CONN"]
    assert refused > 0
    assert accepted + refused == 300, "every message is either sent or counted as not sent"
    problem = publisher.not_sent_problem()
    assert problem is not None and f"did not send {refused:,} messages" in problem and "MQTT_ERR_NO_CONN" in problem


def test_a_window_beyond_paho_message_ids_is_refused() -> None:
    with pytest.raises(SimulatorError, match="65,535"):
        PacedPublisher("mqtt://127.0.0.1:1883", "t/{machine}", 1, window=MAX_WINDOW + 1)
