"""A paho-mqtt publisher that sends each message at its intended time (open model).

It never waits for the pipeline: if it falls behind its schedule it catches up
by sending what is due at once, and records how late each send was, so that a
publisher that cannot keep up is reported as such and not mistaken for a slow
pipeline.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simulators.errors import SimulatorError
from simulators.stream import Message


def topic_segment(machine: str) -> str:
    """A machine id as one MQTT topic level.

    ``/`` would split it into several levels (and miss a ``plant/+/telemetry``
    subscription), ``+`` and ``#`` are wildcards a publisher may not use, and
    NUL is forbidden: percent-encode those (and ``%`` itself, so the mapping is
    reversible). The id inside the payload is untouched.

    >>> topic_segment("../../etc/passwd")
    '..%2F..%2Fetc%2Fpasswd'
    """
    return (
        quote(machine, safe="".join(chr(c) for c in range(32, 127) if chr(c) not in "/+#%"))
        if any(c in machine for c in "/+#%\x00")
        else machine
    )


class Clock(Protocol):
    """Anything that tells time in nanoseconds since the epoch."""

    def now_ns(self) -> int: ...


def pace(
    messages: Iterable[Message],
    clock: Clock,
    send: Callable[[Message], bool],
    *,
    stop: threading.Event | None = None,
    on_sent: Callable[[Message, int], None] | None = None,
) -> int:
    """Call ``send`` for each message at its intended time (open model); returns how many were accepted.

    Behind schedule, due messages go out at once: the lateness is reported
    through ``on_sent`` (sent time vs intended), never absorbed by waiting.
    """
    accepted = 0
    for message in messages:
        if stop is not None and stop.is_set():
            break
        delay = (message.intended_send_ns - clock.now_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        if send(message):
            accepted += 1
            if on_sent is not None:
                on_sent(message, clock.now_ns())
    return accepted


async def apace(
    messages: Iterable[Message],
    clock: Clock,
    send: Callable[[Message], Awaitable[bool]],
    *,
    stop: threading.Event | None = None,
    on_sent: Callable[[Message, int], None] | None = None,
) -> int:
    """:func:`pace` for a sender on an event loop (the OPC UA plant and writer)."""
    accepted = 0
    for message in messages:
        if stop is not None and stop.is_set():
            break
        delay = (message.intended_send_ns - clock.now_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        elif accepted % 100 == 0:
            # Behind schedule: still yield now and then, so the loop's other work (publishing) goes on.
            await asyncio.sleep(0)
        if await send(message):
            accepted += 1
            if on_sent is not None:
                on_sent(message, clock.now_ns())
    return accepted


class DirectPublisher:
    """Hands payloads straight to a callable (the in-memory transport), paced like MQTT.

    ``deliver(payload, topic)`` is typically ``Pipeline.submit``; the call's
    time counts as send time, and backpressure from it shows as send lag.
    """

    def __init__(self, deliver: Callable[[bytes, str], None], topic_pattern: str) -> None:
        self._deliver = deliver
        self.topic_pattern = topic_pattern

    def run(
        self,
        messages: Iterable[Message],
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        on_sent: Callable[[Message, int], None] | None = None,
    ) -> int:
        def send(message: Message) -> bool:
            self._deliver(message.payload, self.topic_pattern.format(machine=topic_segment(message.machine)))
            return True

        return pace(messages, clock, send, stop=stop, on_sent=on_sent)


class PacedPublisher:
    """Publish messages to ``topic_pattern`` (``{machine}`` is filled in) at their intended times."""

    def __init__(
        self,
        url: str,
        topic_pattern: str,
        qos: int,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if not parts.hostname:
            raise SimulatorError(f"expected a broker URL like mqtt://127.0.0.1:1883, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 1883
        self.topic_pattern = topic_pattern
        self.qos = qos
        self._connected = threading.Event()
        self._refused: str | None = None
        self._acked = 0
        self._ack_cond = threading.Condition()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"iiot-bench-pub-{uuid.uuid4().hex[:8]}"
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.max_inflight_messages_set(1000)
        self._client.on_connect = self._on_connect
        self._client.on_publish = self._on_publish

    @property
    def acked(self) -> int:
        with self._ack_cond:
            return self._acked

    def connect(self, timeout_s: float = 10.0) -> None:
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise SimulatorError(f"cannot connect to MQTT broker {self.host}:{self.port}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout_s) or self._refused:
            self._client.loop_stop()
            raise SimulatorError(
                f"MQTT broker {self.host}:{self.port} did not accept the publisher: {self._refused or 'no CONNACK'}"
            )

    def run(
        self,
        messages: Iterable[Message],
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        on_sent: Callable[[Message, int], None] | None = None,
    ) -> int:
        """Send every message at its intended time; returns how many the client accepted."""

        def send(message: Message) -> bool:
            topic = self.topic_pattern.format(machine=topic_segment(message.machine))
            info = self._client.publish(topic, message.payload, qos=self.qos)
            return bool(info.rc == mqtt.MQTT_ERR_SUCCESS)

        return pace(messages, clock, send, stop=stop, on_sent=on_sent)

    def wait_acked(self, expected: int, timeout_s: float) -> bool:
        """Wait until the broker acknowledged ``expected`` publishes (QoS 0: sent on the wire)."""
        with self._ack_cond:
            return self._ack_cond.wait_for(lambda: self._acked >= expected, timeout_s)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        self._connected.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._ack_cond:
            self._acked += 1
            self._ack_cond.notify_all()
