"""A paho-mqtt publisher that sends each message at its intended time (open model).

It never waits for the pipeline: if it falls behind its schedule it catches up
by sending what is due at once, and records how late each send was, so that a
publisher that cannot keep up is reported as such and not mistaken for a slow
pipeline.

At QoS 1 and 2 it keeps at most a *window* of publishes awaiting their
acknowledgement: paho numbers them with a 16-bit message id and refuses
(``MQTT_ERR_QUEUE_SIZE``) a publish whose id is still pending, which a burst of
more than 65,535 unacknowledged messages reaches (issue 14: about 30% of a
100,000-message burst refused). Waiting for a free slot happens before the send
time is taken, so it shows as send lag. A publish that is still not sent is
counted by its reason in :attr:`PacedPublisher.not_sent`, never dropped silently.

At QoS 0 and 1 it builds the PUBLISH packets itself and hands paho's network thread the due ones a batch at a
time (:data:`BATCH_MESSAGES`), registering each QoS 1 publish with paho as ``publish()`` does (issue 19: one
``publish()`` per message cost 2.9x a bare paho loop's CPU at QoS 0). The bytes on the wire are the same.
"""

from __future__ import annotations

import asyncio
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from string import Formatter
from typing import Any
from urllib.parse import quote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MessageState, MQTTErrorCode
from paho.mqtt.properties import Properties

from pipeline.clock import Clock
from simulators.errors import SimulatorError
from simulators.stream import Message

DEFAULT_WINDOW = 16_384
"""Publishes (QoS 1/2) that may await their acknowledgement at once.

A quarter of paho's 65,535 message ids: an id comes round again 65,535
publishes later, long after its acknowledgement. Measured with a
100,000-message QoS 1 burst into Mosquitto on loopback (2 busy cores): windows
of 1,000 / 4,096 / 16,384 took 8.3-9.6 / 7.6-8.0 / 6.6-7.1 s until all were
acknowledged. A full window holds about 35 MB of pending messages. Into the embedded amqtt
broker (about 3,300 acknowledgements/s) the window size makes no difference.
"""

REFILL = 1024
"""A full window takes new publishes once this many are acknowledged (at most half the window).

Waking the sender for every single acknowledgement hands the GIL between the
sender and paho's network thread once per message (a 100,000 burst took about 25%
longer); refilling from half of a 16,384 window made single sends wait 0.5 s.
"""

MAX_WINDOW = 65_535
"""paho's message ids run 1..65,535: a larger window would reuse a pending id."""

STALL_TIMEOUT_S = 30.0
"""With the window full, how long without any acknowledgement before the publisher gives up (as the runner's
ACK_TIMEOUT_S): the broker or the connection is gone, and the rest of the stream is counted as not sent."""

ACK_TIMEOUT = "ack_timeout"
"""The :attr:`PacedPublisher.not_sent` reason of messages not sent because acknowledgements stopped."""

_WAIT_SLICE_S = 0.25
"""A wait for a window slot looks at the stop event this often (an interrupted run must end promptly)."""

BATCH_MESSAGES = 64
"""At most this many PUBLISH packets (QoS 0 and 1) go to paho's network thread as one write (issue 19).

One ``publish()`` per message costs a wake-up byte on paho's socket pair, a socket ``send``, an
``MQTTMessageInfo`` (with its own ``threading.Condition``), at QoS 0 an ``on_publish`` call building a
``ReasonCode`` and ``Properties``, at QoS 1 paho's message lock, contended with its network thread handling
acknowledgements. Packets of messages that are due are built here and handed over together; a message that is not
yet due never waits in a batch (the batch goes before the publisher sleeps), so a batch only ever holds messages
that are already late or on time.
"""

PACE_QUANTUM_S = 0.001
"""Batched, the publisher sleeps at most once per millisecond: what falls due meanwhile goes together on waking.

Sleeping until each message's own time costs two thread wake-ups a message (the publisher's, then paho's
network thread's): paced at 5,000 msg/s, 120-130 us of CPU a message against 15-20 us when all are due at once.
No message goes before its time; one may go up to a quantum (plus the sleep's overshoot) late, and that is
recorded in its send lag like any other. Streams slower than one message per quantum are paced message by message.
"""

BATCH_BYTES = 32_768
"""QoS 0: a batch also goes once it holds this many bytes (one socket write of a few tens of KB)."""

_BATCHED = all(hasattr(mqtt.Client, name) for name in ("_packet_queue", "_mid_generate"))
"""paho's private hand-over to its network thread (paho-mqtt 2.x); without it each message uses ``publish()``."""

_WAIT_FOR_PUBACK = MessageState.MQTT_MS_WAIT_FOR_PUBACK
_TO_PUBLISH = MessageState.MQTT_MS_PUBLISH


def describe_not_sent(not_sent: dict[str, int], *, window: int, stall_timeout_s: float) -> str | None:
    """One loud line about messages the publisher did not send, with why; None when it sent them all."""
    total = sum(not_sent.values())
    if not total:
        return None
    why = {
        ACK_TIMEOUT: f"no acknowledgement for {stall_timeout_s:g} s with {window:,} publishes unacknowledged",
        MQTTErrorCode.MQTT_ERR_QUEUE_SIZE.name: "paho refused it: its message id was still pending",
        MQTTErrorCode.MQTT_ERR_NO_CONN.name: "not connected (QoS 0 is not kept for a reconnect)",
    }
    parts = [
        f"{reason} {n:,} ({why.get(reason) or 'paho refused it'})"
        for reason, n in sorted(not_sent.items(), key=lambda kv: -kv[1])
    ]
    return f"MQTT publisher did not send {total:,} messages: " + ", ".join(parts)


class UserProperty(Properties):
    """The PUBLISH properties ``name: value`` (one MQTT 5 user property), packed once, here.

    paho only calls ``pack()`` on a publish's properties. Its own :class:`Properties` builds two dictionaries
    per object and packs by scanning every property name: about 64 us a message against 3 us for this (measured
    on the bench's 2-core machine), which a publisher sending 10,000 msg/s cannot spare.
    """

    __slots__ = ("_packed",)

    def __init__(self, name: str, value: str) -> None:  # no super().__init__: nothing of it is used
        body = _USER_PROPERTY + _utf8(name) + _utf8(value)
        object.__setattr__(self, "_packed", _varint(len(body)) + body)

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed

    def __repr__(self) -> str:
        return f"UserProperty({self.pack()!r})"


_USER_PROPERTY = b"\x26"
"""MQTT 5 property identifier 38: User Property, a UTF-8 string pair."""


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def _varint(n: int) -> bytes:
    """MQTT's variable byte integer (a length)."""
    if n < 0x80:
        return _SMALL_VARINT[n]
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


_SMALL_VARINT = tuple(bytes((i,)) for i in range(0x80))

_PUBLISH_QOS0 = bytes((mqtt.PUBLISH,))
"""The fixed header's first byte of a QoS 0 PUBLISH: no DUP, QoS 0, no RETAIN."""


def _topic_field(topic: str) -> bytes:
    """The topic as a PUBLISH packet carries it (length-prefixed UTF-8), checked as paho checks it."""
    data = topic.encode("utf-8")
    if not data or len(data) > 65_535 or b"+" in data or b"#" in data:
        raise ValueError(f"invalid publish topic {topic!r} (empty, longer than 65,535 bytes, or a wildcard)")
    return struct.pack("!H", len(data)) + data


class _KeptMessage(mqtt.MQTTMessage):
    """A QoS 1 publish as paho keeps it until its acknowledgement, as ``publish()`` builds it.

    Except that the messages of one batch share one :class:`MQTTMessageInfo` (which nobody here waits on): paho's
    own builds a ``threading.Condition`` per message, 15% of the publisher's samples at QoS 1 (issue 19).
    """

    __slots__ = ()

    def __init__(
        self,
        mid: int,
        topic: bytes,
        payload: bytes,
        *,
        qos: int,
        properties: Properties | None,
        timestamp: float,
        info: mqtt.MQTTMessageInfo,
    ) -> None:  # no super().__init__: it would build the per-message info this class exists to avoid
        self.timestamp = timestamp
        self.state = _TO_PUBLISH
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = False
        self.info = info
        self.properties = properties


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
            self._deliver(
                message.payload, self.topic_pattern.format(machine=topic_segment(message.machine), seq=message.seq)
            )
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
        window: int = DEFAULT_WINDOW,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        seq_property: str | None = None,
        batched: bool = True,
        pace_quantum_s: float = PACE_QUANTUM_S,
    ) -> None:
        """``seq_property``: connect with MQTT 5 and send each message's seq as a user property of that name.

        ``batched``: at QoS 0, hand due messages to paho's network thread in batches (:data:`BATCH_MESSAGES`);
        False sends each through ``publish()`` (the same bytes on the wire, dearer). ``pace_quantum_s``: batched,
        the publisher wakes up at most once per quantum (see :data:`PACE_QUANTUM_S`).
        """
        parts = urlsplit(url)
        if not parts.hostname:
            raise SimulatorError(f"expected a broker URL like mqtt://127.0.0.1:1883, got {url!r}")
        if not 1 <= window <= MAX_WINDOW:
            raise SimulatorError(f"publish window must be 1..{MAX_WINDOW:,} (paho's message ids), got {window}")
        self.host, self.port = parts.hostname, parts.port or 1883
        self.topic_pattern = topic_pattern
        # A pattern without {seq} gives one topic per machine: formatted once, not once a message.
        self._topic_has_seq = any(field == "seq" for _, field, _, _ in Formatter().parse(topic_pattern))
        self.qos = qos
        self.window = window
        self.stall_timeout_s = stall_timeout_s
        self.batched = batched and qos in (0, 1) and _BATCHED
        self.pace_quantum_s = pace_quantum_s
        self._qos0_batched = self.batched and qos == 0
        self._connected = threading.Event()
        self._refused: str | None = None
        # Counted by paho's network thread alone (on_publish), read by others: no lock on the hot path. Python's
        # GIL makes each read and write whole and keeps their order, which the wake-ups below rely on.
        self._acked = 0
        self._ack_cond = threading.Condition()
        self._ack_target = _NOBODY
        self._ack_waiters = 0
        # The window (QoS > 0): publishes taken, minus those paho did not keep (returned, publishing thread), minus
        # those acknowledged (_acked, network thread) are in flight. No lock per message (issue 19: a Condition
        # taken and notify_all-ed on every acknowledgement was 18% of the publisher's samples).
        self._taken = 0
        self._returned = 0
        self._window_cond = threading.Condition()
        self._slot_waiting = False
        # A full window takes new publishes again at this level (see REFILL).
        self._low_water = window - max(1, min(window // 2, REFILL))
        self._in_flight_max = 0
        self._last_ack_ns = 0
        self._stalled = False
        self._not_sent: Counter[str] = Counter()
        self._waits = 0
        self._wait_ns = 0
        self._wait_max_ns = 0
        # QoS 0 batches handed to paho and not yet written: batch id -> messages in it.
        self._batches: dict[int, int] = {}
        self._batch_ids = 0
        self.seq_property = seq_property
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"iiot-bench-pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if seq_property is not None else mqtt.MQTTv311,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        # No in-flight limit inside paho (0): the window above is the limit. With one, paho queues the excess
        # itself, invisible to the send lag, and rescans all its pending messages on every acknowledgement.
        self._client.max_inflight_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_publish = self._on_publish

    @property
    def acked(self) -> int:
        """Publishes the broker acknowledged (QoS 0: written to the socket)."""
        return self._acked

    @property
    def in_flight(self) -> int:
        """Publishes (QoS > 0) taken into the window and not yet acknowledged."""
        return self._taken - self._returned - self._acked

    @property
    def not_sent(self) -> dict[str, int]:
        """Messages of the stream that were not sent, by reason: a paho error name, or ``ack_timeout``."""
        return dict(self._not_sent)

    def not_sent_problem(self) -> str | None:
        """What :attr:`not_sent` means, in one line for the run's errors; None when every message was sent."""
        return describe_not_sent(self._not_sent, window=self.window, stall_timeout_s=self.stall_timeout_s)

    def window_stats(self) -> dict[str, float]:
        """The window, the most publishes it held, and how often and how long sends waited for room.

        The waits are part of the send lag (a wait starts after the message's intended time).
        """
        return {
            "size": self.window,
            "in_flight_max": self._in_flight_max,
            "waits": self._waits,
            "wait_total_s": round(self._wait_ns / 1e9, 3),
            "wait_max_ms": round(self._wait_max_ns / 1e6, 3),
        }

    def connect(self, timeout_s: float = 10.0) -> None:
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise SimulatorError(f"cannot connect to MQTT broker {self.host}:{self.port}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout_s) or self._refused:
            self._client.loop_stop()
            if self.seq_property is not None and self._refused is not None and "protocol" in self._refused.lower():
                raise SimulatorError(
                    f"MQTT broker {self.host}:{self.port} does not speak MQTT 5 ({self._refused}): "
                    "transport.mqtt.seq_property needs it; use a broker such as Mosquitto"
                )
            raise SimulatorError(
                f"MQTT broker {self.host}:{self.port} did not accept the publisher: {self._refused or 'no CONNACK'}"
            )

    def _topic(self, message: Message) -> str:
        return self.topic_pattern.format(machine=topic_segment(message.machine), seq=message.seq)

    def run(
        self,
        messages: Iterable[Message],
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        on_sent: Callable[[Message, int], None] | None = None,
    ) -> int:
        """Send every message at its intended time; returns how many the client accepted.

        The others are counted in :attr:`not_sent` by reason (except those left when ``stop`` is set).
        """
        if self.batched:
            return self._run_batched(messages, clock, stop=stop, on_sent=on_sent)
        windowed = self.qos > 0
        name = self.seq_property
        topics: dict[str, str] = {}
        per_seq = self._topic_has_seq
        publish = self._client.publish
        qos = self.qos

        def send(message: Message) -> bool:
            if per_seq:
                topic = self._topic(message)
            elif (topic := topics.get(message.machine)) is None:  # type: ignore[assignment]
                topic = topics[message.machine] = self._topic(message)
            if windowed and not self._take_slot(stop):
                return False
            props = UserProperty(name, str(message.seq)) if name is not None else None
            try:
                info = publish(topic, message.payload, qos=qos, properties=props)
            except BaseException:
                if windowed:
                    self._return_slot()
                raise
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                return True
            if info.rc == mqtt.MQTT_ERR_NO_CONN and windowed:
                # paho keeps a QoS > 0 message and sends it once reconnected: it is sent, and its slot is
                # freed by its acknowledgement then.
                return True
            if windowed:
                self._return_slot()  # paho did not keep it: no acknowledgement will come
            self._not_sent[MQTTErrorCode(info.rc).name] += 1
            return False

        return pace(self._until_stalled(messages, stop), clock, send, stop=stop, on_sent=on_sent)

    def _run_batched(
        self,
        messages: Iterable[Message],
        clock: Clock,
        *,
        stop: threading.Event | None,
        on_sent: Callable[[Message, int], None] | None,
    ) -> int:
        """:func:`pace` with the PUBLISH packets built here and handed to paho a batch at a time (QoS 0 and 1).

        The bytes are those ``publish()`` would send. A message counts as sent when it joins a batch, as it
        counted when ``publish()`` queued it: either way it then waits for paho's network thread, and a batch
        waits for nothing that is not yet due. At QoS 0, not connected is counted as ``MQTT_ERR_NO_CONN``, as
        ``publish()`` refuses it. At QoS 1 each message gets its paho message id when it joins the batch and is
        registered with paho as ``publish()`` registers it, so paho matches its acknowledgement and resends it
        after a reconnect; the window's slot is taken before, and a full window sends the batch before waiting.
        """
        client = self._client
        qos = self.qos
        name = self.seq_property
        fields: dict[str, bytes] = {}
        per_seq = self._topic_has_seq
        header = bytes((mqtt.PUBLISH | qos << 1,))
        now_ns = clock.now_ns
        window = self.window
        mid_generate = client._mid_generate
        out_messages = client._out_messages
        quantum_ns = round(self.pace_quantum_s * 1e9)
        wake_ns = 0  # when the last sleep was to end
        batch: list[bytes] = []
        # QoS 1: (mid, topic, payload, properties) of each message in the batch, registered with paho at the hand-over.
        pending: list[tuple[int, bytes, bytes, Properties | None]] = []
        size = 0
        accepted = 0

        def flush() -> None:
            nonlocal size
            data = b"".join(batch)
            if qos == 0:
                self._batch_ids += 1
                batch_id = self._batch_ids
                self._batches[batch_id] = len(batch)  # before paho sees it: its on_publish may come at once
                # paho's own hand-over (as publish() does): append to its outgoing queue, wake its network thread.
                client._packet_queue(mqtt.PUBLISH, data, batch_id, 0, mqtt.MQTTMessageInfo(batch_id))
            else:
                sent_at = time.monotonic()
                info = mqtt.MQTTMessageInfo(pending[-1][0])
                # What publish() keeps per message, so paho matches the acknowledgement and resends after a
                # reconnect; built before taking paho's message lock, which its network thread wants on every
                # acknowledgement.
                kept = [
                    _KeptMessage(mid, topic, payload, qos=qos, properties=props, timestamp=sent_at, info=info)
                    for mid, topic, payload, props in pending
                ]
                with client._out_message_mutex:
                    if client._sock is not None:
                        for k in kept:
                            k.state = _WAIT_FOR_PUBACK
                        client._inflight_messages += len(kept)
                        out_messages.update((k.mid, k) for k in kept)
                        client._packet_queue(mqtt.PUBLISH, data, pending[-1][0], qos, None)
                    else:
                        # Not connected: kept to be sent on reconnect, as publish() keeps it (MQTT_ERR_NO_CONN).
                        out_messages.update((k.mid, k) for k in kept)
                pending.clear()
            batch.clear()
            size = 0

        for message in self._until_stalled(messages, stop) if qos else messages:
            if stop is not None and stop.is_set():
                break
            due_ns = message.intended_send_ns
            delay_ns = due_ns - now_ns()
            if delay_ns > 0:
                if batch:
                    flush()  # nothing due waits behind a sleep
                # Never before its time; at most one wake-up per quantum, whatever the rate.
                wake_ns = max(due_ns, wake_ns + quantum_ns)
                time.sleep((wake_ns - due_ns + delay_ns) / 1e9)
            if qos:
                if batch and self._taken - self._returned - self._acked >= window:
                    flush()  # the window is full: what is in it must go before anything can come back
                if not self._take_slot(stop):
                    continue
            elif client._sock is None:  # what publish() looks at: paho saw the connection go
                self._not_sent[MQTTErrorCode.MQTT_ERR_NO_CONN.name] += 1
                continue
            if per_seq:
                topic = _topic_field(self._topic(message))
            elif (topic := fields.get(message.machine)) is None:  # type: ignore[assignment]
                topic = fields[message.machine] = _topic_field(self._topic(message))
            payload = message.payload
            if qos:
                mid = mid_generate()
                if mid in out_messages:  # still pending; the window (<= 65,535) keeps this from happening
                    self._return_slot()
                    self._not_sent[MQTTErrorCode.MQTT_ERR_QUEUE_SIZE.name] += 1
                    continue
                head = topic + struct.pack("!H", mid)
            else:
                mid = 0
                head = topic
            if name is None:
                packet = b"".join((header, _varint(len(head) + len(payload)), head, payload))
                props = None
            else:
                props = UserProperty(name, str(message.seq))
                packed = props.pack()
                packet = b"".join((header, _varint(len(head) + len(packed) + len(payload)), head, packed, payload))
            batch.append(packet)
            if qos:
                pending.append((mid, topic[2:], payload, props))
            size += len(packet)
            accepted += 1
            if on_sent is not None:
                on_sent(message, now_ns())
            if len(batch) >= BATCH_MESSAGES or size >= BATCH_BYTES:
                flush()
        if batch:
            flush()
        return accepted

    def _take_slot(self, stop: threading.Event | None) -> bool:
        """Count one more publish in flight, waiting while the window is full; False when stopped or stalled."""
        in_flight = self._taken - self._returned - self._acked
        if in_flight < self.window:
            self._taken += 1
            if in_flight >= self._in_flight_max:
                self._in_flight_max = in_flight + 1
            return True
        started = time.monotonic_ns()
        self._last_ack_ns = started
        with self._window_cond:
            # Announced before looking again: an acknowledgement counted after this look sees the flag and wakes
            # us; one counted before it is seen by the look (the GIL orders the two threads' steps).
            self._slot_waiting = True
            try:
                while self._taken - self._returned - self._acked > self._low_water:
                    if stop is not None and stop.is_set():
                        return False
                    silent_s = (time.monotonic_ns() - self._last_ack_ns) / 1e9
                    if silent_s >= self.stall_timeout_s:
                        # Not one acknowledgement in stall_timeout_s: the broker or the connection is gone.
                        self._stalled = True
                        self._not_sent[ACK_TIMEOUT] += 1
                        return False
                    self._window_cond.wait(min(self.stall_timeout_s - silent_s, _WAIT_SLICE_S))
            finally:
                self._slot_waiting = False
        self._taken += 1
        waited = time.monotonic_ns() - started
        self._waits += 1
        self._wait_ns += waited
        self._wait_max_ns = max(self._wait_max_ns, waited)
        return True

    def _return_slot(self) -> None:
        """Give back a slot whose publish paho did not keep (no acknowledgement will come for it)."""
        if self._taken - self._returned - self._acked <= 0:
            raise SimulatorError("publish window released more often than taken")  # a bookkeeping bug
        self._returned += 1

    def _until_stalled(self, messages: Iterable[Message], stop: threading.Event | None) -> Iterator[Message]:
        """The messages until the window stalls; the rest are counted as not sent, without waiting for their times."""
        remaining = iter(messages)
        for message in remaining:
            if self._stalled and not (stop is not None and stop.is_set()):
                self._not_sent[ACK_TIMEOUT] += 1 + sum(1 for _ in remaining)
                return
            yield message

    def wait_acked(self, expected: int, timeout_s: float) -> bool:
        """Wait until the broker acknowledged ``expected`` publishes (QoS 0: written to the socket)."""
        with self._ack_cond:
            # Set before the predicate's first look, so an acknowledgement counted after it notifies (see _taken).
            self._ack_waiters += 1
            self._ack_target = min(self._ack_target, expected)
            try:
                return self._ack_cond.wait_for(lambda: self._acked >= expected, timeout_s)
            finally:
                self._ack_waiters -= 1
                if not self._ack_waiters:
                    self._ack_target = _NOBODY

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        self._connected.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # paho calls this once per message it kept: QoS > 0 on its acknowledgement (QoS 0 once written; batched,
        # once per batch written).
        acked = self._acked + (self._batches.pop(mid, 0) if self._qos0_batched else 1)
        self._acked = acked
        if self._slot_waiting:
            self._last_ack_ns = time.monotonic_ns()
            if self._taken - self._returned - acked <= self._low_water:
                with self._window_cond:
                    self._window_cond.notify()
        if acked >= self._ack_target:
            with self._ack_cond:
                self._ack_cond.notify_all()


_NOBODY = sys.maxsize
"""The acknowledgement count nobody waits for (no wake-ups while no one is in :meth:`PacedPublisher.wait_acked`)."""
