"""MQTT source: a paho-mqtt subscription feeding :meth:`Pipeline.submit`.

A thin wrapper: paho's network thread delivers each message to ``on_payload``. Two choices decide what a
crash or an outage costs (docs/durability.md, "MQTT: sessions and acknowledgements"):

``session``
    ``clean`` (default): a new session on every connect; while the pipeline is down nothing is queued for it.
    ``persistent``: MQTT 3.1.1 ``clean_session=False`` (v5: ``clean_start=False`` and a session expiry
    interval) under a stable client id, so the broker keeps the subscription and queues QoS 1/2 messages
    while the pipeline is down or reconnecting.
``ack``
    ``on_receive`` (default): paho acknowledges a QoS 1 message when the callback returns, i.e. once it is
    in the buffer, not on disk; a crash loses what was buffered. ``durable``: paho's manual acknowledgement;
    a message is acknowledged once the pipeline calls its ``on_durable`` callback (its row or its quarantine
    row flushed, or dropped by an overflow policy), in the order the messages arrived. A message whose
    flush failed, or that arrived while closing, is not acknowledged: the broker delivers it again after a
    reconnect or a restart (at least once; duplicates are possible, never losses).

paho reconnects on its own (``loop_start``); every connect subscribes again, and every disconnect and
reconnect is logged with its reason.
"""

from __future__ import annotations

import functools
import inspect
import logging
import struct
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.errors import SourceError

if TYPE_CHECKING:
    from pipeline.sources import Submit

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
"""MQTT v5 persistent sessions: how long the broker keeps the session (and queues for it) after a disconnect.
A week covers a plant's long weekend; a session of a decommissioned client id does not live for ever."""

ACK_WINDOW = {4: 20, 5: 1000}
"""Unacknowledged messages at which ``ack: durable`` asks the pipeline to flush, by protocol. MQTT 3.1.1 has
no way to ask the broker for a window: Mosquitto sends at most ``max_inflight_messages`` (default 20) and
then waits for acknowledgements. MQTT v5 sends this as Receive Maximum, which the broker honours."""


def parse_mqtt_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise SourceError(f"expected a broker URL like mqtt://127.0.0.1:1883, got {url!r}")
    return parts.hostname, parts.port or 1883


@dataclass(slots=True)
class _Unacked:
    """A QoS 1 message handed to the pipeline and not acknowledged yet."""

    mid: int
    connection: int
    durable: bool = False


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
        session: Literal["clean", "persistent"] = "clean",
        ack: Literal["on_receive", "durable"] = "on_receive",
        request_flush: Callable[[], None] | None = None,
        ack_window: int | None = None,
        session_expiry_s: int = SESSION_EXPIRY_S,
        drain_timeout_s: float = 30.0,
    ) -> None:
        """``protocol`` 5 speaks MQTT v5 (needed for shared subscriptions ``$share/<group>/<filter>`` on
        brokers that follow the v5 specification); 4 is MQTT 3.1.1.

        With ``ack="durable"``, ``on_payload`` takes a third argument (``Pipeline.submit`` does), and
        ``request_flush`` (``Pipeline.request_flush``) is called when ``ack_window`` messages wait for their
        acknowledgement; :meth:`close` waits up to ``drain_timeout_s`` for those to become durable.
        """
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
        if session == "persistent" and not client_id:
            raise SourceError("MQTT session persistent needs a client_id: the broker keeps the session under it")
        self.session = session
        self.ack = ack
        self._durable = ack == "durable"
        if self._durable:
            _check_durable(qos, on_payload)
            if session == "clean":
                log.warning(
                    "MQTT ack durable with a clean session: the broker discards what is not acknowledged when "
                    "the connection drops; use session persistent to have it delivered again"
                )
        self.ack_window = ack_window or ACK_WINDOW[protocol]
        self._session_expiry_s = session_expiry_s
        self._drain_timeout_s = drain_timeout_s
        self._request_flush = request_flush
        self._submit = cast("Submit", on_payload)
        # Guards the acknowledgement queue, the connection number and closing; never held while calling the
        # pipeline, so a producer blocked on a full buffer cannot stop a flusher from acknowledging.
        self._acks = threading.Condition()
        self._unacked: deque[_Unacked] = deque()
        self._connection = 0
        self._connected_once = False
        self._closing = False
        client_id = client_id or f"iiot-pipeline-{uuid.uuid4().hex[:8]}"
        self.client_id = client_id
        self._client = (
            mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=self._durable
            )
            if protocol == 5
            # v5 has no clean_session; its clean start is an argument of connect().
            else mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=session == "clean",
                manual_ack=self._durable,
            )
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message_durable if self._durable else self._on_message
        # Outgoing messages only (this client publishes none). Incoming ones are bounded by the broker's window
        # (its max_inflight_messages over 3.1.1; over v5 with ack durable, our Receive Maximum, ack_window).
        self._client.max_inflight_messages_set(100)

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; returns once the broker has granted the subscription."""
        try:
            self._client.connect(self.host, self.port, keepalive=30, **self._connect_options())
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

    def _connect_options(self) -> dict[str, Any]:
        if self.protocol != 5 or (self.session == "clean" and not self._durable):
            return {}  # as connect() always was: MQTT 3.1.1 carries its session choice in the client
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
        if self._durable:
            props.ReceiveMaximum = self.ack_window
        if self.session == "clean":
            return {"properties": props}
        # Without an expiry interval a v5 session ends with the connection, clean_start or not.
        props.SessionExpiryInterval = self._session_expiry_s
        return {"clean_start": False, "properties": props}

    def close(self) -> None:
        """Stop; with ack durable, first let what the pipeline holds become durable and acknowledge it.

        Messages that arrive meanwhile are not taken: the broker delivers them again in the next session.
        """
        with self._acks:
            self._closing = True
            waiting = bool(self._unacked)
        if waiting:
            if self._request_flush is not None:
                self._request_flush()
            with self._acks:
                if not self._acks.wait_for(lambda: not self._unacked, self._drain_timeout_s):
                    log.warning(
                        "MQTT: %d messages not durable within %g s of closing stay unacknowledged: the broker "
                        "delivers them again in the next session",
                        len(self._unacked),
                        self._drain_timeout_s,
                    )
        self._client.disconnect()
        self._client.loop_stop()

    # -- paho callbacks, on its network thread -----------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            if self._connected_once:
                log.warning("MQTT: reconnecting to %s:%d refused: %s", self.host, self.port, reason)
                return
            self._refused = f"connection refused: {reason}"
            self._subscribed.set()
            return
        with self._acks:
            # What the previous connection left unacknowledged, the broker sends again (persistent session) or
            # has forgotten (clean): acknowledging it now could hit a packet id the broker has reused.
            self._connection += 1
            self._unacked.clear()
        resumed = bool(getattr(flags, "session_present", False))
        if self._connected_once:
            log.info("MQTT: reconnected to %s:%d (%s; %s)", self.host, self.port, reason, _session_state(resumed))
        elif self.session == "persistent":
            log.info(
                "MQTT: connected to %s:%d as %r (%s)", self.host, self.port, self.client_id, _session_state(resumed)
            )
        if self.session == "persistent" and self._connected_once and not resumed:
            log.warning(
                "MQTT: the broker did not keep session %r: messages published while disconnected are lost "
                "(broker restarted without persistence, or the session expired)",
                self.client_id,
            )
        self._connected_once = True
        # Re-subscribing on every (re)connect keeps the subscription after a broker restart.
        client.subscribe(self.topic, qos=self.qos)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._acks:
            self._connection += 1
            unacked = len(self._unacked)
            self._unacked.clear()
            self._acks.notify_all()
            closing = self._closing
        if closing and not reason.is_failure:
            log.debug("MQTT: disconnected from %s:%d", self.host, self.port)
            return
        pending = f"; {unacked} unacknowledged messages will be delivered again" if unacked else ""
        log.warning("MQTT: disconnected from %s:%d (%s)%s; reconnecting", self.host, self.port, reason, pending)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            self._refused = f"subscription refused: {failed[0]}"
            if self._subscribed.is_set():
                log.warning("MQTT: re-subscribing to %r refused: %s", self.topic, failed[0])
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_payload(bytes(message.payload), message.topic)

    def _on_message_durable(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        payload, topic = bytes(message.payload), message.topic
        if message.qos == 0:
            self._on_payload(payload, topic)  # nothing to acknowledge
            return
        with self._acks:
            if self._closing:
                return  # neither taken nor acknowledged: the broker delivers it again in the next session
            entry = _Unacked(message.mid, self._connection)
            self._unacked.append(entry)
            window_full = len(self._unacked) == self.ack_window
        self._submit(payload, topic, functools.partial(self._settle, entry))
        if window_full and self._request_flush is not None:
            # The broker sends no more until we acknowledge, and we acknowledge only after a flush.
            self._request_flush()

    # -- from the pipeline's flusher ---------------------------------------------------------------------------

    def _settle(self, entry: _Unacked) -> None:
        """``entry`` is durable: acknowledge it and every durable one after it, in the order they arrived.

        MQTT (3.1.1 and 5, section 4.6) has a client acknowledge QoS 1 messages in the order it received them;
        the readings and the rejections flush separately, so one may wait here for the other.
        """
        with self._acks:
            entry.durable = True
            if entry.connection != self._connection:
                return
            unacked = self._unacked
            mids: list[int] = []
            while unacked and unacked[0].durable:
                mids.append(unacked.popleft().mid)
            if mids:
                self._send_acks(mids)
            if not unacked:
                self._acks.notify_all()

    def _send_acks(self, mids: list[int]) -> None:
        """PUBACK each of ``mids`` (QoS 1 only, checked at construction), in this order; with the ack lock held.

        A flush makes a few thousand messages durable at once. ``ack()`` per message queues one 4-byte packet and
        wakes paho's network thread through its socket pair each time (a system call and a thread switch per
        message, about a tenth of the pipeline process's CPU at QoS 1); here the same bytes go as one packet
        with one wake-up, through the hand-over ``ack()`` itself uses.
        """
        if not _BATCHED_ACKS or len(mids) == 1 or not isinstance(self._client, mqtt.Client):
            for mid in mids:
                self._client.ack(mid, 1)
            return
        # The bytes ack() sends per message in every protocol version: PUBACK, remaining length 2, the id.
        data = b"".join([_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids])
        self._client._packet_queue(mqtt.PUBACK, data, mids[-1], 1)


_BATCHED_ACKS = hasattr(mqtt.Client, "_packet_queue")
"""paho's private hand-over to its network thread (paho-mqtt 2.x, pinned <3); without it each ack uses ``ack()``."""
_PUBACK = struct.Struct("!BBH")


def _session_state(resumed: bool) -> str:
    return "session resumed" if resumed else "new session"


def _check_durable(qos: int, on_payload: Callable[..., None]) -> None:
    if qos != 1:
        # QoS 0 has nothing to acknowledge; at QoS 2 paho answers PUBREC on arrival, after which the broker
        # never sends the message again: acknowledging later would protect nothing.
        raise SourceError(f"MQTT ack durable needs qos 1 (got qos {qos}): only a QoS 1 message is redelivered")
    try:
        inspect.signature(on_payload).bind(b"", "", None)
    except TypeError:
        raise SourceError(
            "MQTT ack durable: on_payload must take (payload, topic, on_durable), as Pipeline.submit does"
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin): trust it
