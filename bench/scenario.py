"""Scenario files: YAML parsed once into typed, immutable, validated models.

Raw dicts never travel past :func:`load_scenario`. Unknown keys are errors; every
error names the file, the field path and what was expected. ``bench schema``
prints :func:`json_schema` for editors.
"""

from __future__ import annotations

import copy
import hashlib
import random
import re
import shlex
import string
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from bench.errors import ScenarioError, UsageError
from bench.results.metrics import COUNTERS, CounterName, MetricName
from bench.shapes.external_settings import check_placeholders
from bench.shapes.forward_settings import ForwardSettings
from bench.shapes.recompute_settings import RecomputeSettings
from bench.shapes.windows_settings import WindowsSettings
from pipeline.config import (
    Duration,
    Frozen,
    PipelineSettings,
    check_zone,
    format_validation_error,
    load_yaml_mapping,
    url_credential_problem,
)
from simulators.anomalies import OPCUA_KINDS, AnomalyKind, AnomalySpec
from simulators.stream import (
    MAX_MESSAGES,
    PhaseSpec,
    SignalSpec,
    StreamSpec,
    check_plan,
    planned_count,
    total_duration_s,
)

_ENV_REF_HELP = "an environment reference such as ${MQTT_PASSWORD}"


def redact_url(url: str) -> str:
    """``url`` with any userinfo password replaced by ***: for error messages."""
    return _URL_PASSWORD.sub(r"\1:***@", url)


def refuse_url_password(url: str, instead: str) -> None:
    """A broker or server URL carrying a password would be copied into the run folder with the scenario."""
    if _URL_PASSWORD.search(url):
        raise ValueError(
            f"a password in the URL ({redact_url(url)}) would be kept with the run; give it in {instead} as an "
            "environment reference such as ${MQTT_PASSWORD}"
        )


_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^/@:]*):[^/@]*@", re.IGNORECASE)

MAX_MACHINE_ID = 255
"""Longest machine id: the validator refuses longer ones (bad_machine_id), so a fleet cannot have them."""
MAX_OVERSIZE = 16 * 1024 * 1024
"""Largest oversize payload: far above any max_payload worth testing, small enough to build per message."""


class Machines(Frozen):
    """The simulated machines."""

    count: int = Field(10, ge=1, le=100_000, description="How many machines publish.")
    id: str = Field("machine-{i:03d}", description="Id pattern; {i} is the machine index from 0.")
    extra: tuple[str, ...] = Field(
        (),
        description="More machine ids, taken literally (quotes, SQL, path separators, non-ASCII: a fleet's real "
        "ids can be hostile). They publish like the others.",
    )
    timezone: str | tuple[str, ...] | dict[str, str] = Field(
        "UTC",
        description="IANA zone of every machine; a list is assigned round-robin; a mapping names machines "
        "(others UTC). Matters for naive local timestamps and DST anomalies.",
    )

    @field_validator("id")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if names != {"i"}:
            raise ValueError("expected a pattern using {i} (and nothing else), e.g. 'press-{i:03d}'")
        try:
            value.format(i=0)
        except (ValueError, IndexError) as exc:
            raise ValueError(f"pattern cannot be formatted: {exc}") from None
        return value

    @field_validator("extra")
    @classmethod
    def _check_extra(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for machine in value:
            _check_id(machine)
        return value

    @model_validator(mode="after")
    def _ids_fit(self) -> Machines:
        # The first id is checked alone first: '{i:>100000}' must fail before 100,000 ids of 100 kB are built.
        for i in range(self.count):
            _check_id(self.id.format(i=i), f"id: {self.id!r} gives {{i}}={i} an id that", pattern=True)
        return self

    @field_validator("timezone")
    @classmethod
    def _check_zones(cls, value: str | tuple[str, ...] | dict[str, str]) -> str | tuple[str, ...] | dict[str, str]:
        zones = [value] if isinstance(value, str) else list(value.values() if isinstance(value, dict) else value)
        if not zones:
            raise ValueError("expected at least one IANA time zone")
        for zone in zones:
            check_zone(zone)
        return value

    def ids(self) -> tuple[str, ...]:
        return tuple(self.id.format(i=i) for i in range(self.count)) + self.extra

    def zones(self) -> dict[str, str]:
        """IANA zone per machine id."""
        ids = self.ids()
        tz = self.timezone
        if isinstance(tz, str):
            return dict.fromkeys(ids, tz)
        if isinstance(tz, dict):
            return {m: tz.get(m, "UTC") for m in ids}
        return {m: tz[i % len(tz)] for i, m in enumerate(ids)}


def _check_id(machine: str, what: str = "", pattern: bool = False) -> None:
    # Ids the validator refuses outright (bad_machine_id) cannot be a fleet's real ids.
    if not machine or len(machine) > MAX_MACHINE_ID or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in machine):
        shown = f"{len(machine):,} characters long" if len(machine) > 40 else repr(machine)
        expected = f"expected ids of 1 to {MAX_MACHINE_ID} characters without control characters"
        raise ValueError(f"{what} is {shown}; {expected}" if pattern else f"{expected}, got {shown}")


class Anomaly(Frozen):
    """One kind of dirt to inject (``docs/validation.md`` lists every kind and what the validator does with it)."""

    kind: AnomalyKind
    rate: float | None = Field(
        None, gt=0, le=1, description="Fraction of eligible messages hit (default 1 inside an at/duration window)."
    )
    at: Duration | None = Field(None, ge=0, description="Window start, seconds after the first send.")
    duration: Duration | None = Field(None, gt=0, description="Window length (default: to the end).")
    machines: tuple[str, ...] | None = Field(None, description="Only these machines (default: all).")
    field: Literal["load_rate", "mileage", "ts", "machine", "seq"] | None = Field(
        None,
        description="Field for nan/inf/null/missing_field, or the key duplicate_key repeats (default: they take "
        "turns).",
    )
    by: Duration | None = Field(
        None, gt=0, description="Shift for time kinds (seconds; default per kind) or km for mileage_backwards."
    )
    offset: str | None = Field(
        None, pattern=r"^[+-](0\d|1[0-4]):[0-5]\d$", description="Fixed offset for offset_timestamp, e.g. +05:30."
    )
    size: int = Field(70_000, gt=0, le=MAX_OVERSIZE, description="Payload bytes of an oversize message.")
    expect: Literal["accepted", "repaired", "rejected"] | None = Field(
        None, description="Override the decision the scorer expects from the validator's policies."
    )

    @model_validator(mode="after")
    def _when(self) -> Anomaly:
        if self.rate is None and self.at is None:
            raise ValueError("expected a rate (e.g. 0.02) or a window (at, and optionally duration)")
        if self.field == "seq" and self.kind != "duplicate_key":
            raise ValueError(f"field: seq applies to duplicate_key only, got kind {self.kind}")
        if self.field in ("ts", "machine") and self.kind not in ("missing_field", "null", "duplicate_key"):
            raise ValueError(f"field: {self.kind} applies to load_rate or mileage, got {self.field!r}")
        return self

    def spec(self) -> AnomalySpec:
        return AnomalySpec(
            self.kind,
            rate=self.rate,
            at_s=self.at,
            duration_s=self.duration,
            machines=self.machines,
            field=self.field,
            by=self.by,
            offset=self.offset,
            size=self.size,
        )


class Steady(Frozen):
    kind: Literal["steady"]
    rate: float = Field(gt=0, description="Messages per second, all machines together.")
    duration: Duration = Field(gt=0)


class Burst(Frozen):
    kind: Literal["burst"]
    rate: float = Field(gt=0, description="Messages per second during the burst.")
    duration: Duration = Field(gt=0)


class Ramp(Frozen):
    kind: Literal["ramp"]
    from_: float = Field(alias="from", ge=0, description="Rate at the start (msg/s).")
    to: float = Field(ge=0, description="Rate at the end (msg/s).")
    duration: Duration = Field(gt=0)

    @model_validator(mode="after")
    def _not_empty(self) -> Ramp:
        if self.from_ == 0 and self.to == 0:
            raise ValueError("a ramp from 0 to 0 sends nothing; use a pause")
        return self


class Pause(Frozen):
    kind: Literal["pause"]
    duration: Duration = Field(gt=0)


Phase = Annotated[Steady | Burst | Ramp | Pause, Field(discriminator="kind")]


class LoadRateSignal(Frozen):
    min: float = 0.0
    max: float = 100.0
    step: float = Field(2.5, ge=0, description="Largest change between two readings of a machine.")

    @model_validator(mode="after")
    def _ordered(self) -> LoadRateSignal:
        if self.min >= self.max:
            raise ValueError(f"expected min < max, got min={self.min}, max={self.max}")
        return self


class MileageSignal(Frozen):
    start: float = Field(1000.0, ge=0)
    per_second: float = Field(0.4, ge=0)


class Signals(Frozen):
    load_rate: LoadRateSignal = LoadRateSignal()
    mileage: MileageSignal = MileageSignal()


MANAGED_BROKERS = ("embedded", "mosquitto")
"""Broker settings naming a broker the bench starts itself (any other value is a URL)."""


SEQ_PROPERTY_NEEDS_MQTT5 = (
    "seq_property: the embedded broker (amqtt) speaks MQTT 3.1.1 only, which has no user properties; "
    "use broker: mosquitto or a broker URL such as mqtt://127.0.0.1:1883"
)


class MqttTransport(Frozen):
    broker: str = Field(
        "embedded",
        description="'embedded' (amqtt on an ephemeral loopback port), 'mosquitto' (a Mosquitto the bench starts "
        "on a free loopback port, with queues large enough for a pipeline restart; needs mosquitto installed) "
        "or mqtt://host:port.",
    )
    topic: str = Field(
        "plant/{machine}/telemetry",
        # MQTT allows 65,535 bytes; 1,024 characters leave room for the machine id and the run id.
        max_length=1024,
        description="Topic per message; {machine} is the machine id, {run} the run id, {seq} (optional, a whole "
        "level) the message's sequence id, for pipelines that keep the topic but drop unknown payload fields.",
    )
    qos: Literal[0, 1, 2] = 1
    seq_property: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Also send the seq as an MQTT 5 user property of this name (e.g. 'seq'), for pipelines that "
        "keep message properties but not unknown payload fields; the publishers then speak MQTT 5 (not with "
        "the embedded broker: it speaks MQTT 3.1.1 only). The payload keeps its seq field.",
    )
    username: str | None = Field(None, description="Literal or ${ENV_VAR}.")
    password: str | None = Field(None, description="Must be ${ENV_VAR}: secrets never live in a scenario.")

    @model_validator(mode="after")
    def _properties_need_mqtt5(self) -> MqttTransport:
        # Only when named here: a default broker may still be replaced by --broker URL (the session checks then).
        if self.seq_property is not None and self.broker == "embedded" and "broker" in self.model_fields_set:
            raise ValueError(SEQ_PROPERTY_NEEDS_MQTT5)
        return self

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        if value not in MANAGED_BROKERS and not (value.startswith(("mqtt://", "tcp://")) and len(value) > 7):
            raise ValueError(
                f"expected 'embedded', 'mosquitto' or a URL like mqtt://127.0.0.1:1883, got {redact_url(value)!r}"
            )
        refuse_url_password(value, "transport.mqtt.password")
        return value

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        if names.count("machine") != 1 or names.count("seq") > 1 or set(names) - {"machine", "run", "seq"}:
            raise ValueError(
                "expected a topic with {machine} once (and optionally {run}, and {seq} as a whole level), "
                "e.g. 'plant/{machine}/telemetry'"
            )
        if "seq" in names and "{seq}" not in value.split("/"):
            # The subscription replaces it with the wildcard +, which must be a whole level.
            raise ValueError("{seq} must be a whole topic level, e.g. 'plant/{machine}/telemetry/{seq}'")
        if "+" in value or "#" in value:
            raise ValueError("a publish topic cannot contain the wildcards + or #")
        return value

    @field_validator("password")
    @classmethod
    def _password_from_env(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("${") and value.endswith("}")):
            raise ValueError(f"expected {_ENV_REF_HELP}; secrets never live in a scenario")
        return value

    def topic_for_run(self, run_id: str) -> str:
        """The publish pattern with {run} filled in; {machine} stays for the publisher."""
        return self.topic.replace("{run}", run_id)

    def subscription(self, run_id: str) -> str:
        return self.topic_for_run(run_id).replace("{machine}", "+").replace("{seq}", "+")


class MemoryTransport(Frozen):
    producers: int = Field(
        1,
        ge=1,
        le=64,
        description="Producer threads handing messages straight to the pipeline, each its share of machines.",
    )


class OpcUaTransport(Frozen):
    server: str = Field(
        "embedded",
        description="embedded: an asyncua plant server on an ephemeral loopback port; or opc.tcp://host:port/path "
        "of a server exposing writable Objects/<plant>/<machine>/{LoadRate, Mileage, Status, Seq}.",
    )

    @field_validator("server")
    @classmethod
    def _check_server(cls, value: str) -> str:
        if value != "embedded" and not value.startswith("opc.tcp://"):
            raise ValueError(f"expected 'embedded' or opc.tcp://host:port/path, got {redact_url(value)!r}")
        refuse_url_password(value, "transport.opcua.password")
        return value

    publishing: Duration = Field(0.1, gt=0, description="Subscription publishing interval.")
    sampling: Duration = Field(0.0, ge=0, description="Sampling interval; 0 = report every change.")
    queue_size: int = Field(1000, ge=1, description="Per monitored item.")
    discard_oldest: bool = Field(
        True,
        description="When a queue is full, drop its oldest value (else the newest); asyncua's server always "
        "drops the oldest.",
    )
    plant: str = Field("Plant", description="Browse name of the folder holding one object per machine.")
    security: Literal["None", "Sign", "SignAndEncrypt"] = Field(
        "None",
        description="Basic256Sha256 in this mode; certificates are generated into the run folder. The server "
        "then offers only this policy.",
    )
    username: str | None = Field(None, description="Literal or ${ENV_VAR}; the plant server then requires it.")
    password: str | None = Field(None, description="Must be ${ENV_VAR}: secrets never live in a scenario.")

    @field_validator("password")
    @classmethod
    def _password_from_env(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("${") and value.endswith("}")):
            raise ValueError(f"expected {_ENV_REF_HELP}; secrets never live in a scenario")
        return value


class Transport(Frozen):
    kind: Literal["mqtt", "memory", "opcua", "both"] = Field(
        "mqtt",
        description="mqtt: over a broker. opcua: a plant server and a subscription. both: half the machines "
        "over each, into one pipeline. memory: payloads handed to the pipeline in-process, paced the same "
        "way; for measuring the pipeline's own hot path.",
    )
    mqtt: MqttTransport = MqttTransport()
    memory: MemoryTransport = MemoryTransport()
    opcua: OpcUaTransport = OpcUaTransport()


class RunSettings(Frozen):
    arrival: Literal["uniform", "poisson"] = Field(
        "uniform", description="Evenly spaced sends, or a seeded Poisson process at the same rate."
    )
    drain_timeout: Duration = Field(
        15.0,
        gt=0,
        description="After the last send, how long the pipeline may go without progress before the run ends.",
    )
    start: datetime | None = Field(
        None,
        description="Fixed UTC time of the first reading's timestamp (ISO 8601 with a zone), so two runs write "
        "identical keys; default: the run's start time.",
    )

    @field_validator("start")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("expected a time with a zone, e.g. 2026-01-01T00:00:00Z")
        return value


class SlowSinkFault(Frozen):
    kind: Literal["slow_sink"]
    delay: Duration = Field(0.0, ge=0, description="Added to every flush of the Parquet sink.")
    factor: float = Field(
        0.0, ge=0, le=100, description="Adds this fraction of each flush's own time (0.1: storage 10% slower)."
    )

    @model_validator(mode="after")
    def _some_slowdown(self) -> SlowSinkFault:
        if self.delay == 0 and self.factor == 0:
            raise ValueError("expected delay (e.g. 50ms) or factor (e.g. 0.1 for 10% slower), or both")
        return self


class ServerRestartFault(Frozen):
    kind: Literal["server_restart"]
    at: Duration = Field(ge=0, description="Seconds after the first send.")
    down_for: Duration = Field(gt=0, description="How long the server stays off the network.")


class _Repeated(Frozen):
    """A fault that strikes at ``at``, optionally ``times`` times ``every`` seconds, each at a seeded random
    moment up to ``jitter`` later."""

    at: Duration = Field(ge=0, description="Seconds after the first send.")
    times: int = Field(1, ge=1, le=100, description="How many times the fault happens.")
    every: Duration | None = Field(
        None, gt=0, description="Seconds between one occurrence and the next (needed when times > 1)."
    )
    jitter: Duration = Field(
        0.0,
        ge=0,
        description="Each occurrence strikes at a random moment up to this many seconds later (seeded by the "
        "scenario's seed), so a fault does not always land at the same point of a flush cycle.",
    )

    def _lasts(self) -> float:
        """How long one occurrence keeps the system from normal (the next may not start before it ends)."""
        return 0.0

    @model_validator(mode="after")
    def _repeat(self) -> _Repeated:
        if self.times > 1 and self.every is None:
            raise ValueError("times > 1 needs every (seconds between occurrences)")
        if self.every is not None and self.every <= self._lasts() + self.jitter:
            what = "restart_after" if isinstance(self, _ProcessFault) else "duration"
            raise ValueError(
                f"every ({self.every:g} s) must be longer than {what} + jitter ({self._lasts() + self.jitter:g} s)"
            )
        return self

    def moments(self, seed: int) -> list[float]:
        """Seconds after the first send at which the fault strikes (the same for the same seed)."""
        rng = random.Random(f"{seed}-{type(self).__name__}-{self.at}")
        return [self.at + i * (self.every or 0.0) + rng.uniform(0.0, self.jitter) for i in range(self.times)]


class _ProcessFault(_Repeated):
    restart_after: Duration = Field(
        1.0, ge=0, description="Seconds the system under test stays down before the bench starts it again."
    )

    def _lasts(self) -> float:
        return self.restart_after


class ProcessKillFault(_ProcessFault):
    """SIGKILL to the system under test (a crash: nothing flushed that was not already), then a restart."""

    kind: Literal["process_kill"]


class ProcessRestartFault(_ProcessFault):
    """SIGTERM to the system under test (a graceful stop: it flushes and exits), then a restart."""

    kind: Literal["process_restart"]


class _WindowFault(_Repeated):
    duration: Duration = Field(gt=0, description="How long each occurrence lasts.")

    def _lasts(self) -> float:
        return self.duration


class BrokerRestartFault(_WindowFault):
    """The bench's own broker (embedded amqtt or a bench-managed Mosquitto) stops for ``duration`` and starts
    again on the same port; publishers and the system under test must reconnect."""

    kind: Literal["broker_restart"]
    persistence: bool = Field(
        True,
        description="Mosquitto: keep sessions and queued messages across the restart (its persistence file); "
        "false deletes that file while the broker is down, as a broker without persistence would lose them. "
        "The embedded amqtt broker keeps nothing across a restart whatever this says.",
    )


class BrokerPartitionFault(_WindowFault):
    """The network between the system under test and its broker fails for ``duration``: the bench puts a TCP
    proxy between them (publishers still reach the broker directly)."""

    kind: Literal["broker_partition"]
    mode: Literal["drop", "half_open", "delay", "throttle"] = Field(
        "drop",
        description="drop: connections cut and refused. half_open: connections stay open but nothing passes "
        "(only keepalive notices). delay: every byte arrives `delay` late. throttle: at most `rate` bytes/s.",
    )
    delay: Duration = Field(0.5, gt=0, description="mode delay: the added latency.")
    rate: int = Field(20_000, gt=0, description="mode throttle: bytes per second each way.")


class DbOutageFault(_WindowFault):
    """The SQL database is unreachable for ``duration``: the bench puts a TCP proxy between the pipeline and
    the database (the machine's own server is never stopped)."""

    kind: Literal["db_outage"]
    mode: Literal["down", "flap"] = Field(
        "down",
        description="down: every connection cut, new ones refused. flap: every connection cut every "
        "`reset_every` seconds, new ones accepted (backends killed under a running writer).",
    )
    reset_every: Duration = Field(0.6, gt=0, description="mode flap: seconds between connection cuts.")


class DiskFullFault(_WindowFault):
    """The data folder runs out of space for ``duration``: the bench mounts a tmpfs of ``volume`` MB over it for
    the run (root only) and fills it; then frees the space again."""

    kind: Literal["disk_full"]
    volume_mb: float = Field(256.0, gt=1, le=65536, description="Size of the tmpfs mounted over the data folder.")


class SinkErrorFault(_WindowFault):
    """A fraction of the pipeline's sink writes fail (an I/O error before anything is written) for
    ``duration``; needs the pipeline's cooperation (pipeline.fault_injection, set by the bench)."""

    kind: Literal["sink_error"]
    fraction: float = Field(0.5, gt=0, le=1, description="Share of writes that fail while the fault lasts.")


Fault = Annotated[
    SlowSinkFault
    | ServerRestartFault
    | ProcessKillFault
    | ProcessRestartFault
    | BrokerRestartFault
    | BrokerPartitionFault
    | DbOutageFault
    | DiskFullFault
    | SinkErrorFault,
    Field(discriminator="kind"),
]
PROCESS_FAULTS = (ProcessKillFault, ProcessRestartFault)
WINDOW_FAULTS = (BrokerRestartFault, BrokerPartitionFault, DbOutageFault, DiskFullFault, SinkErrorFault)


PLACEHOLDERS = (
    "broker_url",
    "host",
    "port",
    "topic",
    "opcua_url",
    "out_dir",
    "sql_url",
    "sql_host",
    "sql_port",
    "python",
)
"""What the bench fills into an external system's command, environment and output paths."""
SQL_PLACEHOLDERS = frozenset({"sql_url", "sql_host", "sql_port"})
"""The database's address (system.external.database): through the bench's proxy during a db_outage."""


def _placeholders_in(value: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError:
        return set()  # _check_placeholders reports a malformed one


def _check_placeholders(value: str, where: str) -> str:
    return check_placeholders(value, where, PLACEHOLDERS)


READY_SIGNALS = ("log", "port", "file", "subscribed")
"""The ways an external system shows it is ready; a ready setting names exactly one."""


class ReadySettings(Frozen):
    """How the bench knows an external system is ready to receive."""

    log: str | None = Field(None, description="A regular expression its stdout or stderr prints once ready.")
    port: int | None = Field(None, ge=1, le=65535, description="A TCP port on 127.0.0.1 that opens once ready.")
    file: str | None = Field(None, description="A file that appears once ready (placeholders allowed).")
    subscribed: Literal[True] | None = Field(
        None,
        description="true: ready once the broker shows a new subscription covering the scenario's topic filter "
        "(the bench's own brokers and a Mosquitto with 'log_dest topic' and 'log_type subscribe' report each "
        "SUBSCRIBE at once; another Mosquitto only a rise of $SYS/broker/subscriptions/count, every sys_interval).",
    )
    timeout: Duration = Field(30.0, gt=0, description="How long to wait before giving up with its last output.")

    @model_validator(mode="after")
    def _one_signal(self) -> ReadySettings:
        given = [k for k in READY_SIGNALS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of log, port, file or subscribed, got {', '.join(given) or 'none'}")
        if self.log is not None:
            try:
                re.compile(self.log)
            except re.error as exc:
                raise ValueError(f"log: not a regular expression: {exc}") from None
        if self.file is not None:
            _check_placeholders(self.file, "file")
        return self


class ColumnMap(Frozen):
    """Which field of the system's output holds what the ledger needs."""

    seq: str = Field("seq", description="The field holding the sequence id the bench sent.")
    seq_pattern: str | None = Field(
        None,
        description="A regular expression with one group that finds the seq inside that field's text, e.g. "
        "'/(\\d+)$' when the field is the topic and the scenario's topic ends in /{seq}.",
    )

    @field_validator("seq_pattern")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                groups = re.compile(value).groups
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
            if groups != 1:
                raise ValueError(f"expected exactly one group (the seq), got {groups}")
        return value

    machine: str | None = Field("machine", description="The machine id (optional).")
    ts: str | None = Field("ts", description="The reading's time (optional).")
    durable_at: str | None = Field(
        None,
        description="A time the row became durable (ISO 8601 or epoch seconds/ms/us/ns); when given, end-to-end "
        "latency is measured from it instead of by watching the output.",
    )


class OutputSettings(Frozen):
    """Where an external system's accepted rows land, and how to read them back."""

    format: Literal["parquet", "jsonl", "csv", "sql"] = Field(description="How the output is read back.")
    path: str | None = Field(
        None, description="parquet/jsonl/csv: a glob (placeholders allowed), e.g. '{out_dir}/data/*.jsonl'."
    )
    url: str | None = Field(None, description="sql: a SQLAlchemy URL (placeholders allowed; ${ENV} for secrets).")
    table: str | None = Field(None, description="sql: the table to read (or give query).")
    query: str | None = Field(None, description="sql: a SELECT returning the mapped columns.")
    columns: ColumnMap = ColumnMap()

    @model_validator(mode="after")
    def _where(self) -> OutputSettings:
        if self.format == "sql":
            if self.url is None or (self.table is None) == (self.query is None):
                raise ValueError("format sql needs url and exactly one of table or query")
            _check_placeholders(self.url, "url")
        else:
            if self.path is None:
                raise ValueError(f"format {self.format} needs path (a glob of its files)")
            _check_placeholders(self.path, "path")
        return self


class RejectsSettings(OutputSettings):
    """Where the system keeps what it refused, if it does: the same kinds of output, plus the reason field."""

    reason: str | None = Field(None, description="The field holding why a message was refused.")


class ExternalSystem(Frozen):
    """A pipeline the user brings: a command the bench starts (or one already running), read back from its output."""

    command: tuple[str, ...] | str | None = Field(
        None,
        description="What to run: a list of arguments, or one string split like a shell would (no shell runs). "
        "Placeholders: " + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS) + ".",
    )
    cwd: str | None = Field(None, description="Working directory, relative to the scenario file.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables; a value may be ${ENV_VAR} (secrets)."
    )
    attach: bool = Field(False, description="It is already running: the bench neither starts nor stops it.")
    database: str | None = Field(
        None,
        description="The SQL database it writes to, a SQLAlchemy URL (the whole URL as ${ENV_VAR} when it holds "
        "a password). The bench gives it as {sql_url}, {sql_host} and {sql_port}; with a db_outage fault these "
        "point at the bench's proxy in front of the database, while the bench reads back from the database itself.",
    )
    ready: ReadySettings | None = Field(None, description="How the bench knows it is ready (needed to start it).")
    output: OutputSettings
    rejects: RejectsSettings | None = Field(
        None, description="Where it keeps refused messages; absent: it drops them without a trace."
    )
    expect_rejected: tuple[AnomalyKind, ...] | None = Field(
        None,
        description="Anomaly kinds (truth labels) it is expected not to store: a message of one of them missing "
        "from the output is 'not persisted, expected by its truth label', not lost. Default: the kinds the "
        "built-in validator rejects by default (every kind but offset_timestamp, epoch_seconds, epoch_millis, "
        "out_of_order and extra_fields). An anomaly's own expect: decides for its kind.",
    )

    @model_validator(mode="after")
    def _startable(self) -> ExternalSystem:
        if self.attach and self.command is not None:
            raise ValueError("attach: true means the bench does not start it; remove command")
        if not self.attach:
            if not self.command:
                raise ValueError("expected command (what to run), or attach: true for one already running")
            if self.ready is None:
                raise ValueError("expected ready (log, port, file or subscribed): how the bench knows it is ready")
            args = [self.command] if isinstance(self.command, str) else list(self.command)
            for i, arg in enumerate(args):
                _check_placeholders(arg, f"command[{i}]" if not isinstance(self.command, str) else "command")
            for key, value in self.env.items():
                if not value.startswith("${"):
                    _check_placeholders(value, f"env.{key}")
        return self

    @field_validator("database")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None or value.startswith("${"):
            return value
        if "://" not in value:
            raise ValueError("expected a SQLAlchemy URL such as postgresql+psycopg://user@127.0.0.1:5432/db")
        problem = url_credential_problem(value)
        if problem is not None:
            raise ValueError(
                f"expected no password in the URL ({problem}); put the whole URL in an environment variable "
                "and write ${DB_URL}"
            )
        return value

    @model_validator(mode="after")
    def _database_given(self) -> ExternalSystem:
        used = sorted(set().union(*(_placeholders_in(text) for text in self.texts())) & SQL_PLACEHOLDERS)
        if used and self.database is None:
            raise ValueError(
                f"{{{used[0]}}} stands for database, which is not set; expected database: the SQLAlchemy URL of "
                "the database the system writes to"
            )
        return self

    def texts(self, *, given_to_it: bool = False) -> list[str]:
        """Its settings that take placeholders; ``given_to_it``: only what the system itself sees (command, env)."""
        command = [self.command] if isinstance(self.command, str) else list(self.command or ())
        out = [*command, *(v for v in self.env.values() if not v.startswith("${"))]
        if given_to_it:
            return out
        for where in (self.output, self.rejects):
            if where is not None:
                out += [t for t in (where.url, where.path) if t is not None]
        if self.ready is not None and self.ready.file is not None:
            out.append(self.ready.file)
        return out

    def argv(self) -> list[str]:
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command or ())


class SystemSettings(Frozen):
    """What the bench measures: the built-in pipeline (in the bench's process or its own), or the user's."""

    kind: Literal["in_process", "process", "external"] = Field(
        "in_process",
        description="in_process: threads of the bench's process (lock, flush and CPU probes available). "
        "process: `python -m pipeline` as a child process, which process faults can kill and restart; "
        "the ledger comes from its files alone. external: the user's pipeline (system.external), any language, "
        "started by command and read back from its own output.",
    )
    external: ExternalSystem | None = Field(None, description="kind external: what to run and where to look.")

    @model_validator(mode="after")
    def _external_given(self) -> SystemSettings:
        if self.kind == "external" and self.external is None:
            raise ValueError("kind external needs external: {command, ready, output}")
        if self.kind != "external" and self.external is not None:
            raise ValueError(f"external is for kind external, got kind {self.kind}")
        return self


class RateRamp(Frozen):
    from_: float = Field(alias="from", gt=0, description="First step's offered rate (msg/s).")
    to: float = Field(gt=0, description="Last step's offered rate (msg/s).")
    steps: int = Field(ge=2, le=100, description="Number of steps from `from` to `to`.")
    spacing: Literal["linear", "geometric"] = Field(
        "geometric", description="geometric: each step the same factor higher (finer where rates are low)."
    )

    @model_validator(mode="after")
    def _rising(self) -> RateRamp:
        if self.to <= self.from_:
            raise ValueError(f"to: expected more than from ({self.from_:g}), got {self.to:g}")
        return self

    def rates(self) -> tuple[float, ...]:
        n = self.steps - 1
        if self.spacing == "linear":
            return tuple(round(self.from_ + (self.to - self.from_) * i / n, 1) for i in range(self.steps))
        return tuple(round(self.from_ * (self.to / self.from_) ** (i / n), 1) for i in range(self.steps))


class CapacitySettings(Frozen):
    """A capacity sweep (``bench capacity``): constant-rate steps, each a short run of its own."""

    rates: tuple[float, ...] | None = Field(None, description="Offered rates of the steps, msg/s, rising.")
    ramp: RateRamp | None = Field(None, description="Or: generate the steps' rates from `from` to `to`.")
    step: Duration = Field(15.0, gt=0, description="How long each step offers its rate.")
    settle: Duration = Field(
        3.0, ge=0, description="Start of each step left out of the slopes and percentiles (warm-up, first flushes)."
    )
    workers: tuple[int, ...] = Field(
        (1,), min_length=1, description="Pipeline worker processes to measure; more than 1 needs shared subscriptions."
    )
    publishers: int = Field(2, ge=1, le=64, description="Publisher processes offering the load.")
    threshold: float = Field(0.98, gt=0, le=1, description="Sustainable: achieved >= threshold x offered.")
    backlog_growth: float = Field(
        0.02, gt=0, description="Backlog growing: its slope exceeds this fraction of the offered rate."
    )
    stop_after: int = Field(1, ge=1, description="Stop a series after this many unsustainable steps.")
    target_rate: float | None = Field(None, gt=0, description="The plant's future rate (msg/s), for the advice.")
    headroom: float = Field(0.3, ge=0, lt=5, description="Spare capacity to keep above the target (0.3 = 30%).")

    @model_validator(mode="after")
    def _one_ladder(self) -> CapacitySettings:
        if (self.rates is None) == (self.ramp is None):
            raise ValueError("expected exactly one of rates: [...] or ramp: {from, to, steps}")
        rates = self.step_rates()
        if any(r <= 0 for r in rates) or list(rates) != sorted(set(rates)):
            raise ValueError(f"rates: expected positive, strictly rising rates, got {list(rates)}")
        if self.settle >= self.step:
            raise ValueError(f"settle: expected less than step ({self.step:g} s), got {self.settle:g} s")
        if any(w < 1 for w in self.workers) or list(self.workers) != sorted(set(self.workers)):
            raise ValueError(f"workers: expected rising worker counts >= 1, got {list(self.workers)}")
        return self

    def step_rates(self) -> tuple[float, ...]:
        if self.ramp is not None:
            return self.ramp.rates()
        return self.rates or ()


class GateMetric(Frozen):
    tolerance: float | None = Field(None, ge=0, lt=10, description="Smallest change that fails (0.05 = 5%).")
    confidence: float | None = Field(None, gt=0.5, lt=1, description="Confidence for this metric (default: gates').")
    gate: bool = Field(True, description="false: reported, never fails the gate.")


def _default_gate_metrics() -> dict[MetricName, GateMetric]:
    return {"flush_mean_ms": GateMetric(), "e2e_p99_ms": GateMetric()}


class GateSettings(Frozen):
    """How ``bench gate`` judges this scenario: replicates, confidence, tolerances, counters, service levels."""

    replicates: int = Field(8, ge=3, le=200, description="A/B pairs (or runs per side against a stored baseline).")
    confidence: float = Field(0.90, gt=0.5, lt=1, description="A regression must be significant at this level.")
    tolerance: float = Field(0.05, ge=0, lt=10, description="... and at least this much worse (0.05 = 5%).")
    erratic_cv: float = Field(
        0.25, gt=0, description="A metric whose coefficient of variation exceeds this is erratic: shown, not gated."
    )
    metrics: dict[MetricName, GateMetric] = Field(
        default_factory=_default_gate_metrics,
        description="Timing metrics to compare; see docs/gates.md for the list.",
    )
    counters: dict[CounterName, float] = Field(
        # data_bytes: rows carry their received_at time, which compresses a little differently every run.
        # flushes: a flush delayed by a stall serves two size triggers at once (coalesced), one flush fewer.
        default_factory=lambda: {**dict.fromkeys(COUNTERS, 0.0), "data_bytes": 0.02, "flushes": 0.1},
        description="Deterministic counters and their tolerance (0 = exact; 0.01 = 1%). lost > 0 always fails.",
    )
    bounds: dict[MetricName, float] = Field(
        default_factory=dict, description="Service levels the candidate's worst replicate must meet, e.g. peak_rss_mb."
    )


class Scenario(Frozen):
    """A runnable scenario: what to send, over what, into which pipeline."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Used in run folder names.")
    description: str = ""
    seed: int = 0
    machines: Machines = Machines()
    signals: Signals = Signals()
    phases: tuple[Phase, ...] = Field(min_length=1)
    transport: Transport = Transport()
    system: SystemSettings = SystemSettings()
    pipeline: PipelineSettings = PipelineSettings()
    anomalies: tuple[Anomaly, ...] = Field(
        (), description="Bad data injected on purpose; every message carries its truth label and is scored."
    )
    faults: tuple[Fault, ...] = Field((), description="Faults injected during the run (slow_sink: slow storage).")
    run: RunSettings = RunSettings()
    capacity: CapacitySettings | None = Field(None, description="The sweep `bench capacity` runs.")
    gates: GateSettings | None = Field(None, description="How `bench gate` and `bench compare` judge this scenario.")
    # Other pipeline shapes (a section each; its settings live in bench/shapes/<name>.py):
    recompute: RecomputeSettings | None = Field(
        None, description="Notify and recompute a derived series with an HTTP read API (bench/shapes/recompute.py)."
    )
    forward: ForwardSettings | None = Field(
        None, description="Store-and-forward shape: filter -> outbox -> sender -> upstream (docs/forward.md)."
    )
    windows: WindowsSettings | None = Field(
        None, description="Sliding-window metrics behind a bounded buffer, naive beside improved (docs/windows.md)."
    )
    matrix: tuple[dict[str, Any], ...] = Field(
        (),
        description="Variants run on the same stream: each has a name and dotted keys under pipeline. or "
        "transport., e.g. {name: coarse, pipeline.buffer.lock: coarse}.",
        # Typed for editors; the values are checked when each variant is validated as a whole scenario.
        json_schema_extra={
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"}},
                "propertyNames": {"pattern": r"^(name|faults(\\..+)?|pipeline\..+|transport\..+|system\..+)$"},
            }
        },
    )

    @model_validator(mode="after")
    def _anomalies_fit_the_transport(self) -> Scenario:
        if self.transport.kind == "opcua":
            for i, anomaly in enumerate(self.anomalies):
                if anomaly.kind not in OPCUA_KINDS:
                    raise ValueError(
                        f"anomalies[{i}].kind: {anomaly.kind} cannot travel over OPC UA; expected one of "
                        f"{', '.join(sorted(OPCUA_KINDS))}, or transport mqtt, memory or both"
                    )
        fleet = set(self.machines.ids())
        for i, anomaly in enumerate(self.anomalies):
            unknown = sorted(set(anomaly.machines or ()) - fleet)
            if unknown:
                raise ValueError(f"anomalies[{i}].machines: not machines of this scenario: {unknown[:5]}")
        return self

    @model_validator(mode="after")
    def _faults_fit_the_transport(self) -> Scenario:
        for i, fault in enumerate(self.faults):
            if isinstance(fault, ServerRestartFault) and (
                self.transport.kind not in ("opcua", "both") or self.transport.opcua.server != "embedded"
            ):
                raise ValueError(
                    f"faults[{i}]: server_restart restarts the embedded OPC UA server; expected transport.kind "
                    f"opcua or both with transport.opcua.server: embedded, got {self.transport.kind}"
                    + (f" with {self.transport.opcua.server}" if self.transport.kind in ("opcua", "both") else "")
                )
            ext = self.system.external
            if isinstance(fault, PROCESS_FAULTS) and (
                self.system.kind not in ("process", "external") or (ext is not None and ext.attach)
            ):
                raise ValueError(
                    f"faults[{i}]: {fault.kind} stops the pipeline's process; expected system.kind: process, "
                    "or external with a command the bench starts, got "
                    + ("external with attach: true" if ext is not None and ext.attach else self.system.kind)
                )
            if self.system.kind == "external" and isinstance(fault, DiskFullFault | SinkErrorFault):
                raise ValueError(
                    f"faults[{i}]: {fault.kind} acts on the built-in pipeline's storage (pipeline.parquet, "
                    "pipeline.fault_injection); not available for system.kind external"
                )
            if isinstance(fault, DbOutageFault) and ext is not None:
                given = set().union(*(_placeholders_in(t) for t in ext.texts(given_to_it=True)))
                problem = None
                if ext.attach:
                    problem = "attach: true (the bench must start it to point it at its proxy)"
                elif ext.database is None:
                    problem = "no database"
                elif ext.database.startswith("sqlite"):
                    problem = "SQLite (a file: it has no outage)"
                elif not given & SQL_PLACEHOLDERS:
                    # A system that finds its database by itself would never go through the proxy.
                    problem = "a command and env without {sql_url}, {sql_host} or {sql_port}"
                if problem is not None:
                    raise ValueError(
                        f"faults[{i}]: db_outage cuts the system off its database through the bench's proxy; "
                        "expected system.external.database with a server URL (PostgreSQL or MySQL), given to a "
                        f"command the bench starts as {{sql_url}} (or {{sql_host}} and {{sql_port}}), got {problem}"
                    )
            if isinstance(fault, BrokerRestartFault | BrokerPartitionFault) and self.transport.kind != "mqtt":
                raise ValueError(
                    f"faults[{i}]: {fault.kind} acts on the MQTT broker; expected transport.kind mqtt, "
                    f"got {self.transport.kind}"
                )
            if isinstance(fault, BrokerRestartFault) and self.transport.mqtt.broker not in MANAGED_BROKERS:
                raise ValueError(
                    f"faults[{i}]: broker_restart restarts a broker the bench started; expected "
                    "transport.mqtt.broker embedded or mosquitto, got a URL"
                )
            if (
                isinstance(fault, DbOutageFault)
                and ext is None
                and (self.pipeline.sql is None or self.pipeline.sql.url.startswith("sqlite"))
            ):
                raise ValueError(
                    f"faults[{i}]: db_outage cuts the pipeline off its SQL database; expected pipeline.sql with "
                    "a server URL (PostgreSQL or MySQL), got "
                    + ("no pipeline.sql" if self.pipeline.sql is None else "SQLite (a file: it has no outage)")
                )
        if self.system.kind in ("process", "external") and self.transport.kind != "mqtt":
            raise ValueError(
                f"system.kind: {self.system.kind} subscribes over MQTT; expected transport.kind mqtt, "
                f"got {self.transport.kind}"
            )
        return self

    @model_validator(mode="after")
    def _fleet_fits_the_history(self) -> Scenario:
        # The scoring oracle assumes every machine's history is kept for the run: a fleet larger than the
        # validator keeps would make evicted machines' history anomalies look like mismatches.
        fleet, kept = len(self.machines.ids()), self.pipeline.validate_.machines_tracked
        if kept < fleet:
            raise ValueError(
                f"pipeline.validate.machines_tracked: {kept} is smaller than the fleet ({fleet} machines); "
                "expected at least the number of machines"
            )
        return self

    @model_validator(mode="after")
    def _plan_fits(self) -> Scenario:
        # Before anything counts or builds the stream: an absurd rate would otherwise spin for hours.
        check_plan(self.stream_spec())
        if self.capacity is not None:
            rates = self.capacity.step_rates()
            if max(rates) * self.capacity.step > MAX_MESSAGES:
                raise ValueError(
                    f"capacity: a step of {self.capacity.step:g} s at {max(rates):g} msg/s plans more than the "
                    f"{MAX_MESSAGES:,} messages one run may send; lower the rates or the step"
                )
        return self

    def validation(self) -> PipelineSettings:
        """The pipeline settings with what the scenario knows filled in: the fleet and its time zones."""
        v = self.pipeline.validate_
        update: dict[str, Any] = {}
        if v.machines is None:
            update["machines"] = self.machines.ids()
        if not v.timezones:
            update["timezones"] = {m: z for m, z in self.machines.zones().items() if z != v.default_timezone}
        return self.pipeline.model_copy(update={"validate_": v.model_copy(update=update)})

    def sink_delay_s(self) -> float:
        return sum(f.delay for f in self.faults if isinstance(f, SlowSinkFault))

    def sink_slowdown(self) -> float:
        return sum(f.factor for f in self.faults if isinstance(f, SlowSinkFault))

    def stream_spec(self) -> StreamSpec:
        phases = []
        for p in self.phases:
            if isinstance(p, Ramp):
                phases.append(PhaseSpec("ramp", p.duration, p.from_, p.to))
            elif isinstance(p, Pause):
                phases.append(PhaseSpec("pause", p.duration))
            else:
                phases.append(PhaseSpec(p.kind, p.duration, p.rate))
        s = self.signals
        return StreamSpec(
            seed=self.seed,
            machines=self.machines.ids(),
            phases=tuple(phases),
            signals=SignalSpec(
                s.load_rate.min, s.load_rate.max, s.load_rate.step, s.mileage.start, s.mileage.per_second
            ),
            arrival=self.run.arrival,
        )


@dataclass(frozen=True)
class LoadedScenario:
    scenario: Scenario
    path: Path
    sha256: str
    variants: tuple[tuple[str, Scenario], ...] = ()
    """(name, scenario with the variant applied); one ``default`` entry without a matrix."""


_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VARIABLE_PREFIXES = ("pipeline.", "transport.", "system.", "faults")


def _apply_variant(path: Path, index: int, base: dict[str, Any], variant: dict[str, Any]) -> tuple[str, Scenario]:
    where = f"{path}: matrix[{index}]"
    name = variant.get("name")
    if not isinstance(name, str) or not _VARIANT_NAME.match(name):
        raise ScenarioError(f"{where}.name: expected a name of letters, digits, '_', '.', '-', got {name!r}")
    data = copy.deepcopy(base)
    data.pop("matrix", None)
    for key, value in variant.items():
        if key == "name":
            continue
        if not key.startswith(_VARIABLE_PREFIXES):
            raise ScenarioError(
                f"{where}.{key}: only pipeline.*, transport.*, system.* and faults may vary, "
                "so every variant replays the same stream"
            )
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ScenarioError(f"{where}.{key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    try:
        return name, Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(format_validation_error(f"{where} ({name})", exc)) from None


def load_scenario(path: Path | str) -> LoadedScenario:
    """Read, parse and validate a scenario file and each matrix variant; raises :class:`ScenarioError`."""
    path = Path(path)
    data = load_yaml_mapping(path, ScenarioError)
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(format_validation_error(path, exc)) from None
    if planned_count(scenario.stream_spec()) == 0:
        raise ScenarioError(f"{path}: phases: the phases send no message; give at least one steady, burst or ramp")
    variants = tuple(_apply_variant(path, i, data, v) for i, v in enumerate(scenario.matrix))
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{path}: matrix: variant names must be unique, got {names}")
    return LoadedScenario(
        scenario, path, hashlib.sha256(path.read_bytes()).hexdigest(), variants or (("default", scenario),)
    )


def json_schema() -> dict[str, Any]:
    schema = Scenario.model_json_schema(by_alias=True)
    schema["title"] = "iiot-bench scenario"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _scale(spec: StreamSpec, time_factor: float = 1.0, rate_factor: float = 1.0) -> StreamSpec:
    phases = tuple(
        PhaseSpec(
            p.kind,
            p.duration_s * time_factor,
            p.rate * rate_factor,
            None if p.rate_to is None else p.rate_to * rate_factor,
        )
        for p in spec.phases
    )
    return replace(spec, phases=phases)


def apply_overrides(spec: StreamSpec, messages: int | None = None, duration_s: float | None = None) -> StreamSpec:
    """Stretch a stream to ``duration_s`` (rates kept) and/or cut it to ``messages``.

    ``--messages`` alone keeps the rates and changes how long the phases last, so
    the load shape stays the same; with ``--duration`` too, the rates are scaled
    to fit that many messages into that time.
    """
    try:
        if messages is not None and messages > MAX_MESSAGES:
            raise ValueError(f"expected at most {MAX_MESSAGES:,} messages, got {messages:,}")
        spec = _overridden(spec, messages, duration_s)
        check_plan(spec)
    except ValueError as exc:
        raise UsageError(f"--messages/--duration: {exc}") from None
    return spec


def _overridden(spec: StreamSpec, messages: int | None, duration_s: float | None) -> StreamSpec:
    if duration_s is not None:
        spec = _scale(spec, time_factor=duration_s / total_duration_s(spec))
    if messages is not None:
        have = planned_count(spec)
        factor = messages / have
        while True:
            candidate = _scale(spec, rate_factor=factor) if duration_s is not None else _scale(spec, time_factor=factor)
            if planned_count(candidate) >= messages:
                break
            factor *= 1.01  # rounding per phase can leave a message or two short
        spec = replace(candidate, limit=messages)
    return spec
