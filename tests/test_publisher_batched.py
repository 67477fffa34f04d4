"""The publisher hands due messages to paho in batches (issue 19) and still sends what paho's publish() would.

Batched, the publisher builds the PUBLISH packets itself and gives paho's network thread several at once (QoS 0
and 1), instead of one ``publish()`` per message. These tests hold it to the same bytes on the wire, the same
accounting (every message sent, acknowledged or counted as not sent), the window bounding what paho keeps, and
paho's resend of unacknowledged QoS 1 publishes after the broker is killed and restarted. Real brokers: Mosquitto
on loopback (skipped when unreachable, unless BENCH_REQUIRE_SERVICES=1) and one of the test's own on a spare port.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.clock import MonotonicWallClock
from simulators.mosquitto import ManagedMosquitto
from simulators.publisher import PacedPublisher
from simulators.stream import Message, PhaseSpec, StreamSpec, stream

MACHINES = ("press/01", "press-02", "press+03", "oven-04")  # two need escaping as topic levels


def messages(count: int, clock: MonotonicWallClock, *, seconds: float, lead_s: float = 0.0) -> list[Message]:
    spec = StreamSpec(seed=19, machines=MACHINES, phases=(PhaseSpec("steady", seconds, count / seconds),))
    # Payload timestamps from a fixed instant: the same bytes whenever the stream is built.
    return list(stream(spec, clock.now_ns() + round(lead_s * 1e9), ts_epoch_ns=1_780_000_000_000_000_000))


class Subscriber:
    """Everything published under ``prefix/#``, in arrival order: (topic, payload, user properties)."""

    def __init__(self, url: str, prefix: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.received: list[tuple[str, bytes, list[tuple[str, str]]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.connect(host, int(port))
        self._client.loop_start()
        self._client.subscribe(f"{prefix}/#", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = list(getattr(message.properties, "UserProperty", []) or [])
        with self._lock:
            self.received.append((message.topic, bytes(message.payload), props))

    def wait_for(self, count: int, timeout_s: float = 60) -> list[tuple[str, bytes, list[tuple[str, str]]]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    break
            time.sleep(0.02)
        time.sleep(0.2)  # and nothing more than that arrives
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def publish_all(url: str, pattern: str, qos: int, *, batched: bool, seq_property: str | None) -> PacedPublisher:
    clock = MonotonicWallClock()
    batch = messages(300, clock, seconds=0.05)  # far faster than due: whole batches form
    publisher = PacedPublisher(url, pattern, qos, seq_property=seq_property, batched=batched)
    publisher.connect()
    try:
        assert publisher.run(batch, clock) == len(batch)
        assert publisher.wait_acked(len(batch), 60)
    finally:
        publisher.close()
    assert publisher.not_sent == {}
    assert publisher.acked == len(batch), "QoS 0: every message written; QoS 1: every one acknowledged"
    return publisher


@pytest.mark.services
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize(
    ("pattern", "seq_property"), [("{machine}/telemetry", None), ("{machine}/{seq}", None), ("{machine}", "seq")]
)
def test_batched_publishes_carry_what_paho_publish_sends(
    mosquitto_url: str, qos: int, pattern: str, seq_property: str | None
) -> None:
    """Topic, payload and user property of each message, in order, as through paho's publish() one by one."""
    seen = []
    for batched in (True, False):
        prefix = f"iiot-bench-test/{uuid.uuid4().hex}"
        subscriber = Subscriber(mosquitto_url, prefix)
        try:
            topic = f"{prefix}/{pattern}"
            publisher = publish_all(mosquitto_url, topic, qos, batched=batched, seq_property=seq_property)
            assert publisher.batched is batched
            got = subscriber.wait_for(300)
        finally:
            subscriber.close()
        seen.append([(topic.removeprefix(prefix), payload, props) for topic, payload, props in got])
    batched_seen, published_seen = seen
    assert len(batched_seen) == 300
    assert batched_seen == published_seen
    if seq_property is not None:
        assert batched_seen[7][2] == [("seq", "7")]


@pytest.mark.services
def test_at_qos_1_paho_keeps_no_more_than_the_window_while_behind_schedule(mosquitto_url: str) -> None:
    """A burst far ahead of the broker: paho's store of unacknowledged publishes never exceeds the window."""
    clock = MonotonicWallClock()
    burst = messages(20_000, clock, seconds=0.1)
    window = 512
    publisher = PacedPublisher(mosquitto_url, f"iiot-bench-test/{uuid.uuid4().hex}/{{machine}}", 1, window=window)
    kept_max = 0
    sent = 0

    def on_sent(message: Message, sent_ns: int) -> None:
        nonlocal kept_max, sent
        sent += 1
        # Read by the publishing thread, the only one that adds to it (the network thread only removes).
        kept_max = max(kept_max, len(publisher._client._out_messages))

    publisher.connect()
    try:
        accepted = publisher.run(burst, clock, on_sent=on_sent)
        all_acked = publisher.wait_acked(len(burst), 120)
    finally:
        publisher.close()
    assert accepted == sent == len(burst)
    assert publisher.not_sent == {}
    assert all_acked and publisher.acked == len(burst) and publisher.in_flight == 0
    stats = publisher.window_stats()
    assert stats["in_flight_max"] == window, "the burst filled the window"
    assert stats["waits"] > 0
    assert 0 < kept_max <= window


@pytest.mark.services
def test_a_message_that_is_not_due_never_waits_in_a_batch(mosquitto_url: str) -> None:
    """Each message of a slow stream goes to paho alone, before the publisher sleeps until the next one is due."""
    clock = MonotonicWallClock()
    # 0.25 s apart: only a publishing thread held off for a quarter of a second could find two due at once.
    slow = messages(8, clock, seconds=2.0, lead_s=0.2)
    publisher = PacedPublisher(mosquitto_url, f"iiot-bench-test/{uuid.uuid4().hex}/{{machine}}", 0)
    publisher.connect()
    try:
        assert publisher.run(slow, clock) == len(slow)
    finally:
        publisher.close()
    assert publisher._batch_ids == len(slow)
    assert publisher.acked == len(slow)


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")
def test_qos_1_publishes_unacknowledged_when_the_broker_is_killed_are_resent(tmp_path: Path) -> None:
    """kill -9 of the broker mid-stream, then a restart on its port: paho resends what the batches left pending."""
    broker = ManagedMosquitto(tmp_path / "broker").start()
    clock = MonotonicWallClock()
    total = 6_000
    stream_ = messages(total, clock, seconds=3.0)
    publisher = PacedPublisher(broker.url, f"iiot-bench-test/{uuid.uuid4().hex}/{{machine}}", 1, window=1_024)
    killed = threading.Event()
    sent = 0

    def on_sent(message: Message, sent_ns: int) -> None:
        nonlocal sent
        sent += 1
        if sent == total // 3 and broker.proc is not None:
            broker.proc.kill()  # SIGKILL: no goodbye to anyone
            broker.proc.wait(10)
            killed.set()

    def restart() -> None:
        killed.wait(30)
        time.sleep(0.5)
        broker.start()

    restarter = threading.Thread(target=restart, daemon=True)
    try:
        publisher.connect()
        restarter.start()
        accepted = publisher.run(stream_, clock, on_sent=on_sent)
        all_acked = publisher.wait_acked(total, 90)
    finally:
        publisher.close()
        restarter.join(30)
        broker.close()
    assert killed.is_set()
    # QoS 1 while disconnected is kept by paho for the reconnect, so it counts as sent: nothing is refused ...
    assert publisher.not_sent == {}
    assert accepted == sent == total
    # ... and every publish, including those the kill caught on the wire or in a batch, is acknowledged in the end.
    assert all_acked, f"{publisher.acked:,} of {total:,} acknowledged"
    assert publisher.acked == total
    assert publisher.in_flight == 0


@pytest.mark.services
@pytest.mark.parametrize("qos", [0, 1])
def test_a_fast_stream_wakes_the_publisher_once_a_quantum_and_sends_nothing_early(
    mosquitto_url: str, qos: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 msg/s with a 5 ms quantum: about 100 sleeps for 5,000 messages (not one each), none sent early."""
    clock = MonotonicWallClock()
    seconds, quantum_s = 0.5, 0.005
    fast = messages(5_000, clock, seconds=seconds, lead_s=0.2)
    publisher = PacedPublisher(
        mosquitto_url, f"iiot-bench-test/{uuid.uuid4().hex}/{{machine}}", qos, pace_quantum_s=quantum_s
    )
    sleeps = 0
    real_sleep = time.sleep
    publishing_thread = threading.current_thread()

    def counting_sleep(seconds_: float) -> None:
        nonlocal sleeps
        if threading.current_thread() is publishing_thread:
            sleeps += 1
        real_sleep(seconds_)

    early = 0

    def on_sent(message: Message, sent_ns: int) -> None:
        nonlocal early
        early += sent_ns < message.intended_send_ns

    publisher.connect()
    monkeypatch.setattr(time, "sleep", counting_sleep)
    try:
        accepted = publisher.run(fast, clock, on_sent=on_sent)
    finally:
        monkeypatch.undo()
        publisher.wait_acked(len(fast), 60)
        publisher.close()
    assert accepted == len(fast) and publisher.not_sent == {}
    assert publisher.acked == len(fast)
    assert early == 0
    # Each sleep ends at least a quantum after the one before, and the first no sooner than the first message is
    # due: the stream's span bounds them, whatever the machine's load (a slow machine only sleeps less).
    span_s = (fast[-1].intended_send_ns - fast[0].intended_send_ns) / 1e9
    assert 0 < sleeps <= span_s / quantum_s + 2
