"""The pipeline's settings: one pydantic model, shared by the bench and ``python -m pipeline``.

Durations are written as ``500ms``, ``1s``, ``2m``, ``1h`` or a plain number of
seconds. Every model is frozen and forbids unknown keys, so a typo in a config
file is an error that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``"500ms"``, ``"2s"``, ``"1m"``, ``"1h"``, ``"7d"`` or a number.

    >>> parse_duration("1m"), parse_duration("250ms"), parse_duration(3)
    (60.0, 0.25, 3.0)
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '500ms', '2s', '1m', '1h', '7d' or seconds")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_S[match.group(2)]
    raise ValueError(f"expected a duration such as '500ms', '2s', '1m', '1h', '7d' or seconds, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written in YAML as ``500ms``, ``2s``, ``1m``, ``1h`` or a number."""

_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def resolve_env(value: str | None, field: str) -> str | None:
    """Return the value of ``${VAR}`` from the environment, or ``value`` itself.

    Secrets never live in a file: the file names the variable, this reads it.
    """
    if value is None:
        return None
    match = _ENV_REF.match(value)
    if not match:
        return value
    name = match.group(1)
    if name not in os.environ:
        raise ConfigError(f"{field}: environment variable {name} is not set (referenced as {value})")
    return os.environ[name]


class Frozen(BaseModel):
    """Base for settings: immutable, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class BufferSettings(Frozen):
    """The buffer between validation and the sinks."""

    size: int = Field(1000, gt=0, description="Flush when this many rows are buffered.")
    flush_interval: Duration = Field(1.0, gt=0, description="Flush when the oldest buffered row has waited this long.")
    capacity: int = Field(
        100_000,
        gt=0,
        description="Most rows held at once; what happens beyond it is the overflow policy.",
    )
    lock: Literal["coarse", "swap"] = Field(
        "swap",
        description="swap: lock only around append/swap, write outside it, single-flight flush. "
        "coarse: lock held across the whole flush (the naive baseline).",
    )
    overflow: Literal["block", "drop_oldest", "drop_newest"] = Field(
        "block", description="When full: block the producer (backpressure), or drop a row (counted, by reason)."
    )

    @model_validator(mode="after")
    def _capacity_holds_a_batch(self) -> BufferSettings:
        if self.capacity < self.size:
            raise ValueError(f"expected capacity >= size, got capacity={self.capacity}, size={self.size}")
        return self


RejectOrAccept = Literal["reject", "accept"]
RejectOrRepair = Literal["reject", "repair"]


class RulePolicies(Frozen):
    """What each validation rule does with a message it catches.

    ``reject``: to quarantine with the rule's name as the reason. ``repair``:
    fix the value, store the row and name the repair in its ``repairs`` column.
    ``accept``: the check is off. Rules that leave nothing to store (malformed
    JSON, invalid UTF-8, missing fields, NaN/inf, unparseable timestamps,
    over-long ids) always reject.
    """

    oversize: RejectOrAccept = Field("reject", description="Payload larger than max_payload bytes.")
    wrong_type: RejectOrRepair = Field(
        "reject", description="A value of the wrong JSON type; repair turns a numeric string into a number."
    )
    out_of_range: RejectOrAccept = Field("reject", description="load_rate outside load_rate_range, mileage < 0.")
    mileage_backwards: RejectOrAccept = Field(
        "reject", description="Mileage below the machine's last accepted reading (a counter never runs backwards)."
    )
    status_uncertain: RejectOrAccept = Field("reject", description="OPC UA Uncertain* status codes.")
    status_bad: RejectOrAccept = Field("reject", description="OPC UA Bad* status codes.")
    offset_timestamp: RejectOrRepair = Field(
        "repair", description="A timestamp with a UTC offset other than Z; repair normalises it to UTC."
    )
    epoch_timestamp: RejectOrRepair = Field(
        "repair", description="A number instead of an ISO string; repair reads it as epoch s/ms/us/ns by magnitude."
    )
    ambiguous_local_time: RejectOrRepair = Field(
        "reject", description="A naive local time that happens twice (DST ends); repair takes the earlier instant."
    )
    nonexistent_local_time: RejectOrRepair = Field(
        "reject", description="A naive local time that never happens (DST starts); repair shifts it by the gap."
    )
    future_timestamp: RejectOrAccept = Field("reject", description="Further ahead than future_tolerance.")
    far_past: RejectOrAccept = Field("reject", description="Further back than past_tolerance.")
    late: RejectOrAccept = Field(
        "reject", description="Older than the machine's newest reading minus the watermark (closed aggregates)."
    )
    duplicate: RejectOrAccept = Field("reject", description="Same (machine, seq) as an accepted reading.")
    unknown_machine: RejectOrAccept = Field("reject", description="A machine id not in the fleet (when one is set).")
    extra_fields: RejectOrAccept = Field("accept", description="Fields the schema does not know; never stored.")


class ValidateSettings(Frozen):
    """First-line validation of decoded messages: one rule per anomaly class, each with a policy."""

    future_tolerance: Duration = Field(
        300.0, ge=0, description="Reject timestamps further than this ahead of the pipeline clock."
    )
    past_tolerance: Duration = Field(
        7 * 86400.0, gt=0, description="Reject timestamps further back than this (backfill after an outage is fine)."
    )
    watermark: Duration = Field(
        60.0, ge=0, description="Out of order within this (behind the machine's newest reading) is accepted."
    )
    naive_timestamps: Literal["reject", "assume_utc", "assume_machine_zone"] = Field(
        "reject", description="A timestamp without a zone: refuse it, or read it as UTC or as the machine's zone."
    )
    max_payload: int = Field(65_536, gt=0, description="Bytes; larger payloads are refused before decoding.")
    load_rate_range: tuple[float, float] = Field((0.0, 100.0), description="Inclusive valid range of load_rate.")
    machines: tuple[str, ...] | None = Field(
        None, description="The fleet: ids outside it are unknown_machine. Unset: any id is accepted."
    )
    timezones: dict[str, str] = Field(
        default_factory=dict, description="IANA time zone per machine id, for naive local timestamps."
    )
    default_timezone: str = Field("UTC", description="Zone of a machine not listed in timezones.")
    dedup_window: int = Field(
        100_000, gt=0, description="Recent seq ids remembered per machine for duplicate detection."
    )
    rules: RulePolicies = RulePolicies()

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        check_zone(value)
        return value

    @field_validator("timezones")
    @classmethod
    def _zones(cls, value: dict[str, str]) -> dict[str, str]:
        for zone in value.values():
            check_zone(zone)
        return value

    @model_validator(mode="after")
    def _range(self) -> ValidateSettings:
        low, high = self.load_rate_range
        if not low <= high:
            raise ValueError(
                f"load_rate_range: expected [low, high] with low <= high, got {list(self.load_rate_range)}"
            )
        return self


def check_zone(name: str) -> None:
    """Raise ValueError unless ``name`` is an IANA time zone this machine knows."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"expected an IANA time zone such as 'Europe/Paris', got {name!r}") from None


class ParquetSettings(Frozen):
    """Parquet output: ParquetWriter row groups, one file per time window."""

    path: str = Field("data", description="Folder for accepted rows (relative to the output folder).")
    rotate: Duration = Field(
        60.0, ge=1, description="Time window per file, by reading timestamp; at least 1 s (file names are per second)."
    )
    strategy: Literal["writer", "rewrite", "dataset"] = Field(
        "writer",
        description="writer: ParquetWriter row groups (true append). rewrite: read, concat, rewrite the "
        "whole file (naive baseline). dataset: a new file per flush, hive-partitioned by machine and date.",
    )
    rotate_rows: int | None = Field(
        None, gt=0, description="Also start a new file once one holds this many rows (writer, rewrite)."
    )
    compression: Literal["snappy", "zstd", "gzip", "none"] = "snappy"
    fsync: bool = Field(True, description="fsync after each row group so 'persisted' means durable.")


_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class SqlSettings(Frozen):
    """A SQL sink through SQLAlchemy: aggregated (table loading_rate) or raw rows."""

    url: str = Field(
        "sqlite:///loading_rate.db",
        description="SQLAlchemy URL; a relative SQLite path is under the output folder. A password must come "
        "from the environment: write the whole URL as ${BENCH_SQL_URL}.",
    )
    strategy: Literal["row", "bulk", "upsert", "copy"] = Field(
        "upsert",
        description="row: one row per transaction (naive). bulk: executemany in one transaction. upsert: "
        "idempotent insert-or-update on (machine, ts). copy: PostgreSQL COPY into a staging table, then upsert.",
    )
    aggregate: Literal["per_machine_minute", "raw"] = Field(
        "per_machine_minute",
        description="per_machine_minute: count, mean/min/max load_rate, last mileage per machine and minute; "
        "raw: every reading.",
    )
    table: str | None = Field(
        None,
        description="Table name; default loading_rate (aggregated) or readings (raw). "
        "In a bench matrix, {variant} is replaced by the variant's name.",
    )
    reset: bool = Field(False, description="Drop and re-create the table when the pipeline starts.")
    pool_size: int = Field(5, ge=1, le=100)
    retention: Duration = Field(
        7200.0, gt=0, description="How far back late data can still update an aggregated minute."
    )

    @field_validator("url")
    @classmethod
    def _no_literal_password(cls, value: str) -> str:
        if _ENV_REF.match(value):
            return value
        parts = urlsplit(value.replace("+", "-", 1)) if "://" in value else None
        if parts is None or not parts.scheme:
            raise ValueError(f"expected a SQLAlchemy URL such as sqlite:///loading_rate.db, got {value!r}")
        if parts.password or "password=" in parts.query.lower():
            raise ValueError(
                "expected no password in the URL; put the whole URL in an environment variable "
                "and write ${BENCH_SQL_URL}"
            )
        return value

    @field_validator("table")
    @classmethod
    def _safe_table(cls, value: str | None) -> str | None:
        # {variant} is filled in by the bench with the matrix variant's name.
        if value is not None and not _TABLE.fullmatch(value.replace("{variant}", "v")):
            raise ValueError("expected a plain identifier (letters, digits, '_'; at most 63 characters)")
        return value

    @model_validator(mode="after")
    def _copy_needs_postgres(self) -> SqlSettings:
        if self.strategy == "copy" and not (self.url.startswith("postgresql") or _ENV_REF.match(self.url)):
            raise ValueError("strategy copy needs a PostgreSQL URL (postgresql+psycopg://...)")
        return self

    def table_name(self) -> str:
        return self.table or ("loading_rate" if self.aggregate == "per_machine_minute" else "readings")


class QuarantineSettings(Frozen):
    """Where rejected inputs are kept, with their reason."""

    path: str = Field("quarantine", description="Folder for rejected inputs.")


class PipelineSettings(Frozen):
    """Everything after the source: validate -> buffer -> sinks."""

    buffer: BufferSettings = BufferSettings()
    validate_: ValidateSettings = Field(ValidateSettings(), alias="validate")
    parquet: ParquetSettings = ParquetSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    sql: SqlSettings | None = Field(None, description="Also write to a SQL database (off by default).")
    probes: bool = Field(True, description="Record lock wait/hold and producer stall histograms.")
    runtime: Literal["threads", "asyncio"] = Field(
        "threads",
        description="threads: thread locks and flusher threads. asyncio: the pipeline runs on an event loop "
        "(as OPC UA clients do); the loop-lag probe shows how long the loop stalls.",
    )

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class MqttSourceSettings(Frozen):
    """An MQTT subscription: the pipeline's source when it runs on its own."""

    url: str = Field(description="Broker URL, e.g. mqtt://127.0.0.1:1883")
    topic: str = Field("plant/+/telemetry", description="Subscription filter.")
    qos: Literal[0, 1, 2] = 1
    client_id: str | None = None
    username: str | None = Field(None, description="Literal or ${ENV_VAR}.")
    password: str | None = Field(None, description="Must be ${ENV_VAR}: secrets never live in a file.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError(f"expected mqtt://host[:port], got {value!r}")
        return value

    @field_validator("password")
    @classmethod
    def _password_is_reference(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_REF.match(value):
            raise ValueError("expected an environment reference such as ${MQTT_PASSWORD}")
        return value


class OpcUaSourceSettings(Frozen):
    """An OPC UA subscription: browse Objects/<plant>/<machine>/{LoadRate, Mileage, Status, Seq}."""

    url: str = Field(description="Server endpoint, e.g. opc.tcp://127.0.0.1:4840/")
    plant: str = Field("Plant", description="Browse name of the folder holding one object per machine.")
    publishing: Duration = Field(0.1, gt=0)
    sampling: Duration = Field(0.0, ge=0)
    queue_size: int = Field(1000, ge=1)
    discard_oldest: bool = True
    security: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    server_certificate: str | None = Field(None, description="Server certificate file, needed with security.")
    cert_dir: str = Field("certs", description="Where the client's own certificate is generated.")
    username: str | None = Field(None, description="Literal or ${ENV_VAR}.")
    password: str | None = Field(None, description="Must be ${ENV_VAR}: secrets never live in a file.")
    node_ids: dict[str, dict[str, str]] | None = Field(
        None,
        description="machine -> {load_rate, mileage, seq[, status]} -> node id (e.g. 'ns=2;i=7'); "
        "without it the source browses Objects/<plant>.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith("opc.tcp://"):
            raise ValueError(f"expected opc.tcp://host:port/path, got {value!r}")
        return value

    @field_validator("password")
    @classmethod
    def _password_is_reference(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_REF.match(value):
            raise ValueError("expected an environment reference such as ${OPCUA_PASSWORD}")
        return value

    @model_validator(mode="after")
    def _security_needs_certificate(self) -> OpcUaSourceSettings:
        if self.security != "None" and not self.server_certificate:
            raise ValueError("security needs server_certificate (the server's certificate file)")
        return self


def _source_kind(value: Any) -> str:
    """Pick the source model by URL scheme, so a config needs no extra 'kind' key."""
    url = value.get("url", "") if isinstance(value, dict) else getattr(value, "url", "")
    return "opcua" if str(url).startswith("opc.tcp://") else "mqtt"


class StandaloneConfig(Frozen):
    """The file given to ``python -m pipeline --config FILE``."""

    source: Annotated[
        Annotated[MqttSourceSettings, Tag("mqtt")] | Annotated[OpcUaSourceSettings, Tag("opcua")],
        Discriminator(_source_kind),
    ]
    output: str = Field("pipeline-out", description="Output folder for data/ and quarantine/.")
    pipeline: PipelineSettings = PipelineSettings()


# Never echoed back in an error: they may carry a secret the user mistyped.
_SECRET_FIELDS = frozenset({"password", "url", "broker"})


def format_validation_error(path: Path | str, exc: ValidationError) -> str:
    """One line per problem: ``file: field.path: what was expected``."""
    lines = []
    errors = exc.errors()
    locs = [tuple(e["loc"]) for e in errors]
    for err in errors:
        loc_t = tuple(err["loc"])
        # A parent's complaint that follows from a child's (a tuple "too short"
        # after its only item failed) is noise: report the child only.
        if any(other[: len(loc_t)] == loc_t and other != loc_t for other in locs):
            continue
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
        loc = loc.replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        secret = bool(loc_t) and loc_t[-1] in _SECRET_FIELDS
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the JSON Schema for allowed keys)"
        elif (
            "input" in err
            and not secret
            and err["type"] not in ("missing",)
            and not isinstance(err["input"], dict | list)
        ):
            msg = f"{msg} (got {err['input']!r})"
        # A check across fields names its own location in the message.
        lines.append(f"{path}: {loc}: {msg}" if loc else f"{path}: {msg}")
    return "\n".join(lines)


def load_yaml_mapping(path: Path, error: type[Exception]) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{path}{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def load_standalone(path: Path) -> StandaloneConfig:
    """Parse and validate a standalone pipeline config file."""
    data = load_yaml_mapping(path, ConfigError)
    try:
        return StandaloneConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
