"""Where the pipeline's messages come from, chosen by name from one registry.

``python -m pipeline`` (from its config file) and the bench (from a scenario's transport) both build their
source here, so a new source kind is added once: a factory in :data:`SOURCES` and a settings model in
:mod:`pipeline.config`. A source calls ``on_payload(payload, topic)`` for every message, from its own thread.

A source that builds each message as an object (OPC UA) hands it to ``on_fields(obj, topic)`` when given one
(:meth:`pipeline.runtime.Pipeline.submit_fields`), unencoded; the others ignore it.

A source that acknowledges only what is durable (MQTT ``ack: durable``) calls ``on_payload(payload, topic,
on_durable)`` instead (:class:`Submit`, the shape of :meth:`pipeline.runtime.Pipeline.submit`), and may call
``request_flush()`` when its broker will send nothing more until it acknowledges.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pipeline.clock import Clock
from pipeline.config import MqttSourceSettings, OpcUaSourceSettings, resolve_env
from pipeline.model import OnDurable

OnPayload = Callable[[bytes, str], None]
OnFields = Callable[[dict[str, Any], str], None]
RequestFlush = Callable[[], None]
SourceSettings = MqttSourceSettings | OpcUaSourceSettings


class Submit(Protocol):
    """``on_payload`` of a source that acknowledges durably: ``on_durable`` travels with the message."""

    def __call__(self, payload: bytes, topic: str, on_durable: OnDurable | None = None, /) -> None: ...


class Source(Protocol):
    """A running subscription: ``start`` returns once it is subscribed; ``close`` stops delivering."""

    def start(self) -> None: ...

    def close(self) -> None: ...


class SourceFactory(Protocol):
    def __call__(
        self,
        settings: Any,
        on_payload: OnPayload,
        *,
        output: Path,
        clock: Clock | None,
        request_flush: RequestFlush | None,
        on_fields: OnFields | None,
        **options: Any,
    ) -> Source: ...


def _credentials(settings: SourceSettings, section: str) -> tuple[str | None, str | None]:
    return (
        resolve_env(settings.username, f"{section}.username"),
        resolve_env(settings.password, f"{section}.password"),
    )


def _mqtt(
    settings: MqttSourceSettings,
    on_payload: OnPayload,
    *,
    output: Path,
    clock: Clock | None,
    request_flush: RequestFlush | None,
    on_fields: OnFields | None,
    **options: Any,
) -> Source:
    # MQTT messages arrive as bytes: on_fields is not needed.
    from pipeline.mqtt_source import MqttSource

    username, password = _credentials(settings, options.pop("section", "source"))
    return MqttSource(
        settings.url,
        settings.topic,
        settings.qos,
        on_payload,
        client_id=settings.client_id,
        username=username,
        password=password,
        session=settings.session,
        ack=settings.ack,
        request_flush=request_flush,
        **options,
    )


def _opcua(
    settings: OpcUaSourceSettings,
    on_payload: OnPayload,
    *,
    output: Path,
    clock: Clock | None,
    request_flush: RequestFlush | None,
    on_fields: OnFields | None,
    **options: Any,
) -> Source:
    # OPC UA has no acknowledgement window to fill: request_flush is not needed.
    # asyncua is half of a new process's import time: imported only by OPC UA sources.
    from pipeline.opcua_source import OpcUaNames, OpcUaSource

    username, password = _credentials(settings, options.pop("section", "source"))
    return OpcUaSource(
        settings.url,
        on_payload,
        on_fields=on_fields,
        names=OpcUaNames(plant=settings.plant),
        publishing_ms=settings.publishing * 1000,
        sampling_ms=settings.sampling * 1000,
        queue_size=settings.queue_size,
        discard_oldest=settings.discard_oldest,
        username=username,
        password=password,
        security_mode=None if settings.security == "None" else settings.security,
        server_certificate=Path(settings.server_certificate) if settings.server_certificate else None,
        cert_dir=output / settings.cert_dir,
        node_ids=settings.node_ids,
        clock=clock,
        **options,
    )


SOURCES: dict[str, SourceFactory] = {"mqtt": _mqtt, "opcua": _opcua}


def source_kind(settings: SourceSettings) -> str:
    return "opcua" if isinstance(settings, OpcUaSourceSettings) else "mqtt"


def make_source(
    settings: SourceSettings,
    on_payload: OnPayload,
    *,
    output: Path,
    clock: Clock | None = None,
    request_flush: RequestFlush | None = None,
    on_fields: OnFields | None = None,
    **options: Any,
) -> Source:
    """The source ``settings`` describe, not started. ``options`` go to its constructor as they are
    (e.g. ``reconnect_max_delay_s``, ``protocol``); ``section`` names the settings in credential errors.

    With MQTT ``ack: durable``, ``on_payload`` must take ``on_durable`` (:class:`Submit`:
    ``Pipeline.submit`` does) and ``request_flush`` should be ``Pipeline.request_flush``: the broker's window
    of unacknowledged messages is small (Mosquitto: 20 over MQTT 3.1.1), and without it each window waits
    for the buffer's timeout trigger. ``on_fields`` (``Pipeline.submit_fields``) spares an OPC UA source's
    readings the encode to JSON and the decode back."""
    return SOURCES[source_kind(settings)](
        settings, on_payload, output=output, clock=clock, request_flush=request_flush, on_fields=on_fields, **options
    )


def describe(settings: SourceSettings) -> str:
    if isinstance(settings, OpcUaSourceSettings):
        return f"Objects/{settings.plant} on {settings.url}"
    return f"{settings.topic!r} on {settings.url}"
