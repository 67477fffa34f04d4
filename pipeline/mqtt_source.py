"""MQTT source: a paho-mqtt subscription feeding :meth:`Pipeline.submit`.

A thin wrapper: paho's network thread delivers each message to ``on_payload``.
With QoS 1 paho acknowledges after the callback returns, i.e. once the message
is in the buffer, not once it is on disk; a crash between the two loses the
buffered rows (the ledger would show them as lost).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.errors import SourceError


def parse_mqtt_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise SourceError(f"expected a broker URL like mqtt://127.0.0.1:1883, got {url!r}")
    return parts.hostname, parts.port or 1883


class MqttSource:
    """Subscribe to ``topic`` on ``url`` and hand every payload to ``on_payload``."""

    def __init__(
        self,
        url: str,
        topic: str,
        qos: int,
        on_payload: Callable[[bytes, str], None],
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        protocol: int = 4,
    ) -> None:
        """``protocol`` 5 speaks MQTT v5 (needed for shared subscriptions ``$share/<group>/<filter>`` on
        brokers that follow the v5 specification); 4 is MQTT 3.1.1."""
        self.url = url
        self.host, self.port = parse_mqtt_url(url)
        self.topic = topic
        self.qos = qos
        self._on_payload = on_payload
        self._subscribed = threading.Event()
        self._refused: str | None = None
        if protocol not in (4, 5):
            raise SourceError(f"MQTT protocol: expected 4 (3.1.1) or 5, got {protocol}")
        self.protocol = protocol
        client_id = client_id or f"iiot-pipeline-{uuid.uuid4().hex[:8]}"
        self._client = (
            mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
            if protocol == 5
            # v5 has no clean_session; its clean start is the default of connect().
            else mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        # Without a bound the client queues without limit while a slow pipeline
        # applies backpressure; the buffer is the bounded part.
        self._client.max_inflight_messages_set(100)

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; returns once the broker has granted the subscription."""
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise SourceError(f"cannot connect to MQTT broker {self.host}:{self.port}: {exc}") from None
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self._client.loop_stop()
            why = self._refused or "no SUBACK"
            raise SourceError(
                f"could not subscribe to {self.topic!r} on {self.host}:{self.port} within {timeout_s:g} s: {why}"
            )
        if self._refused:
            raise SourceError(f"broker {self.host}:{self.port} refused: {self._refused}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = f"connection refused: {reason}"
            self._subscribed.set()
            return
        # Re-subscribing on every (re)connect keeps the subscription after a broker restart.
        client.subscribe(self.topic, qos=self.qos)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            self._refused = f"subscription refused: {failed[0]}"
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_payload(bytes(message.payload), message.topic)
