"""Seeing a subscriber arrive at a broker: how the bench knows a system under test has subscribed.

MQTT gives one client no view of another's subscriptions, so this reads what brokers publish about themselves,
in order of precision:

- **The subscribe log** (:data:`~simulators.broker.SUBSCRIBE_LOG_TOPIC`): one message per SUBSCRIBE, as it
  happens, naming the filter. Mosquitto publishes it with ``log_dest topic`` and ``log_type subscribe`` (the
  Mosquitto the bench starts sets both); the embedded amqtt broker publishes the same through a plugin. Ready is
  a new subscription whose filter covers the one wanted.
- **The subscription count** (``$SYS/broker/subscriptions/count``): any Mosquitto with $SYS, but only every
  ``sys_interval`` seconds (10 by default), and only the total over all clients. Ready is a rise above the count
  seen before the system started, so another client subscribing at the same moment can be taken for it, and a
  restart quicker than ``sys_interval`` may not show at all.

A broker that publishes neither cannot be watched: the caller says so and names the other ready signals.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simulators.broker import SUBSCRIBE_LOG_TOPIC
from simulators.errors import SimulatorError

COUNT_TOPICS = ("$SYS/broker/subscriptions/count", "$SYS/broker/messages/subscriptions/count")
"""Mosquitto's subscription count, and amqtt's (with its $SYS plugin): published every ``sys_interval``."""

_QOS_LEVEL = re.compile(r" [012] ")


def covers(subscribed: str, wanted: str) -> bool:
    """Whether every topic that matches ``wanted`` also matches the filter ``subscribed``.

    >>> covers("plant/#", "plant/+/telemetry"), covers("plant/m1/telemetry", "plant/+/telemetry")
    (True, False)
    """
    if subscribed.startswith("$share/"):  # a shared subscription: $share/<group>/<filter>
        subscribed = subscribed.split("/", 2)[2] if subscribed.count("/") >= 2 else ""
    have, want = subscribed.split("/"), wanted.split("/")
    for index, level in enumerate(have):
        if level == "#":
            return True
        if index >= len(want) or want[index] == "#":
            return False
        if level != "+" and level != want[index]:
            return False  # a literal level covers only the same literal, never a wildcard
    return len(have) == len(want)


def logged_filters(line: str) -> Iterator[str]:
    """The filters a subscribe-log line may name: ``<epoch s>: <client id> <qos> <filter>``.

    A client id or a filter may contain spaces, so every split at `` <qos> `` is a candidate."""
    _, colon, rest = line.partition(": ")
    if not colon:
        return
    for match in _QOS_LEVEL.finditer(rest):
        yield rest[match.end() :]


@dataclass(frozen=True)
class Mark:
    """Where the watch stood when the system under test started: only what comes after counts."""

    subscribes: int
    counts: int
    count: int | None


class SubscriptionWatch:
    """Watches one broker for a new subscription covering ``wanted`` (see the module's doc).

    >>> watch = SubscriptionWatch("mqtt://127.0.0.1:1883", "plant/+/telemetry").start()   # doctest: +SKIP
    >>> watch.settle(30.0); mark = watch.mark()   # then start the subscriber     # doctest: +SKIP
    >>> watch.seen_since(mark)                                                      # doctest: +SKIP
    """

    def __init__(self, url: str, wanted: str, *, username: str | None = None, password: str | None = None) -> None:
        where = urlsplit(url)
        if not where.hostname:
            raise SimulatorError(f"expected a broker URL like mqtt://127.0.0.1:1883, got {url!r}")
        self.url, self.wanted = url, wanted
        self.host, self.port = where.hostname, where.port or 1883
        self._lock = threading.Condition()
        self._subscribes: list[str] = []
        self._counts: list[int] = []
        self._log = False
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"iiot-bench-ready-{uuid.uuid4().hex[:8]}")
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def start(self, timeout_s: float = 10.0) -> SubscriptionWatch:
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise SimulatorError(f"cannot connect to MQTT broker {self.host}:{self.port}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout_s) or self._refused:
            self.close()
            raise SimulatorError(
                f"MQTT broker {self.host}:{self.port} did not accept the ready watch: {self._refused or 'no CONNACK'}"
            )
        return self

    def settle(self, timeout_s: float) -> bool:
        """Wait until the broker has shown what it publishes: the subscribe log (our own SUBSCRIBE comes back at
        once), or a live subscription count that includes our own subscriptions (within one ``sys_interval``).
        False when it showed neither within ``timeout_s``."""
        with self._lock:
            return self._lock.wait_for(lambda: self._log or bool(self._counts), timeout_s)

    def mark(self) -> Mark:
        with self._lock:
            return Mark(len(self._subscribes), len(self._counts), self._counts[-1] if self._counts else None)

    def seen_since(self, mark: Mark) -> bool:
        """A subscription covering ``wanted`` came after ``mark`` (or, with only the count, the count rose above
        its lowest value since ``mark``: a restarted system's old subscription may go first)."""
        with self._lock:
            if any(
                covers(f, self.wanted) for line in self._subscribes[mark.subscribes :] for f in logged_filters(line)
            ):
                return True
            if self._log or mark.count is None:
                return False
            lowest = mark.count
            for count in self._counts[mark.counts :]:
                if count > lowest:
                    return True
                lowest = min(lowest, count)
            return False

    def explain(self, mark: Mark | None = None) -> str:
        """What the watch saw, for an error that says why it is not ready."""
        with self._lock:
            if self._log:
                return f"no new subscription covering {self.wanted!r} on {SUBSCRIBE_LOG_TOPIC} of {self.url}"
            if self._counts:
                since = f" above {mark.count}" if mark is not None and mark.count is not None else ""
                return (
                    f"{COUNT_TOPICS[0]} of {self.url} did not rise{since} (last {self._counts[-1]}); the broker "
                    "publishes it every sys_interval (Mosquitto: 10 s by default), so give a longer timeout, set "
                    "sys_interval 1, or enable 'log_dest topic' and 'log_type subscribe'"
                )
        return (
            f"the broker at {self.url} publishes neither {SUBSCRIBE_LOG_TOPIC} nor {COUNT_TOPICS[0]}; "
            "use a Mosquitto (broker: mosquitto, or one with $SYS) or ready: log, port or file"
        )

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        else:
            # The log first: our own SUBSCRIBE to it comes back on it, and tells that the broker publishes it.
            client.subscribe([(SUBSCRIBE_LOG_TOPIC, 0), *((topic, 0) for topic in COUNT_TOPICS)])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        text = msg.payload.decode("utf-8", errors="replace")
        with self._lock:
            if msg.topic == SUBSCRIBE_LOG_TOPIC:
                self._log = True
                self._subscribes.append(text)
            elif not msg.retain and text.strip().isdigit():
                # Retained values predate our own subscriptions: only a live one is a baseline that includes them.
                self._counts.append(int(text))
            self._lock.notify_all()
