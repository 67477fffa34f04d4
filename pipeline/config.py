"""The pipeline's settings: one pydantic model, shared by the bench and ``python -m pipeline``.

Durations are written as ``500ms``, ``1s``, ``2m``, ``1h`` or a plain number of
seconds. Every model is frozen and forbids unknown keys, so a typo in a config
file is an error that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol
from urllib.parse import unquote_plus, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from yaml.events import Event
    from yaml.nodes import MappingNode, Node

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


# What an editor checking a file against `bench schema` should accept: a number, or a duration string.
_DURATION_INPUT = float | Annotated[str, StringConstraints(pattern=_DURATION.pattern)]
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=_DURATION_INPUT)]
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


# --- credentials in URLs ------------------------------------------------------------------------------------------
#
# A URL in a settings file must not carry a secret: it is copied into the run folder and results.json, and
# echoed in errors. The drivers take credentials from the userinfo (user:password@) and, through SQLAlchemy,
# from any query parameter: libpq's password, passfile, sslpassword, oauth_client_secret, scram_client_key,
# scram_server_key; PyMySQL's password, passwd, ssl_key_password. Names are matched after percent-decoding
# (repeatedly: a doubly encoded name must not slip through) and case-insensitively, on fragments broad enough
# to cover drivers this project does not ship (pyodbc's PWD=, tokens).
_CREDENTIAL = re.compile(r"pass|pwd|secret|scram|token|credential", re.IGNORECASE)
# A credential inside a query value: "PWD=..." in an ODBC string, "password=..." in a libpq conninfo, or a
# nested URL with user:password@.
_EMBEDDED_CREDENTIAL = re.compile(
    r"(?:pass|pwd|secret|scram|token|credential)[^=;&\s]*\s*=|://[^/@\s]*:[^@\s]*@", re.IGNORECASE
)
# SQLAlchemy's grammar: a username without ':' or '/', then ':password' up to the first '@'.
_SQLALCHEMY_USERINFO = re.compile(r"[^:/]*(?::[^@]*)?@")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def _decoded(text: str) -> str:
    """``text`` percent-decoded until it no longer changes (at most a few rounds)."""
    for _ in range(5):
        plain = unquote_plus(text)
        if plain == text:
            break
        text = plain
    return text


def _userinfo_end(rest: str) -> int | None:
    """Index of the '@' ending the userinfo of ``rest`` (a URL after ``scheme://``), by any parser's reading.

    SQLAlchemy ends the password at the first '@' (it may hold '/' or '?'); urllib at the last '@' before the
    first '/', '?' or '#'. The later of the two hides what either would take for a password.
    """
    ends = []
    match = _SQLALCHEMY_USERINFO.match(rest)
    if match:
        ends.append(match.end() - 1)
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in netloc:
        ends.append(netloc.rfind("@"))
    return max(ends) if ends else None


def _query_pieces(query: str) -> list[tuple[str, str, str]]:
    """(raw piece, decoded name, decoded value) of each ``&``-separated query parameter."""
    out = []
    for piece in query.split("&"):
        name, _, value = piece.partition("=")
        out.append((piece, _decoded(name).strip(), _decoded(value)))
    return out


def _is_credential(name: str, value: str) -> bool:
    return bool(_CREDENTIAL.search(name) or _EMBEDDED_CREDENTIAL.search(value))


# A value redacted already, maybe with the punctuation of the sentence it ends ("...?password=***: error").
_REDACTED = re.compile(r"\*\*\*[:,;.)'\"]*")


def url_credential_problem(url: str) -> str | None:
    """Why ``url`` carries a credential, without quoting it; None when it carries none.

    >>> url_credential_problem("postgresql+psycopg://app@db/plant?pass%77ord=x")
    "query parameter 'password' is a credential"
    >>> url_credential_problem("mysql+pymysql://root@db/test?charset=utf8mb4") is None
    True
    """
    _, sep, rest = url.partition("://")
    if not sep:
        rest = url
    end = _userinfo_end(rest)
    if end is not None and ":" in rest[:end] and rest[rest.index(":") + 1 : end]:
        return "a password in user:password@"
    after = rest[end + 1 :] if end is not None else rest
    _, mark, query = after.partition("?")
    if not mark:
        return None
    for _, name, value in _query_pieces(query):
        if _CREDENTIAL.search(name):
            shown = f"'{name}'" if _PLAIN_NAME.fullmatch(name) else "named like a password"
            return f"query parameter {shown} is a credential"
        if _EMBEDDED_CREDENTIAL.search(value):
            shown = f"'{name}'" if _PLAIN_NAME.fullmatch(name) else "of the query"
            return f"a value of parameter {shown} embeds a credential"
    return None


def redact_url(url: str) -> str:
    """``url`` with every credential in it replaced by ``***``: fit for an error message or a result file.

    Hides the userinfo password (as SQLAlchemy or urllib would read it) and the value of every query
    parameter named like a credential or embedding one, however percent-encoded. SQLAlchemy's
    ``render_as_string(hide_password=True)`` hides the userinfo only.

    >>> redact_url("postgresql+psycopg://app:hunter2@db:5432/plant?sslmode=require&PASS%57ORD=x")
    'postgresql+psycopg://app:***@db:5432/plant?sslmode=require&PASS%57ORD=***'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    head = ""
    end = _userinfo_end(rest)
    if end is not None:
        user, colon, _ = rest[:end].partition(":")
        head = f"{user}:***@" if colon else rest[: end + 1]
        rest = rest[end + 1 :]
    base, mark, query = rest.partition("?")
    if mark:
        pieces = [
            f"{piece.partition('=')[0]}=***"
            if _is_credential(name, value) and not _REDACTED.fullmatch(value)
            else piece
            for piece, name, value in _query_pieces(query)
        ]
        base = f"{base}?{'&'.join(pieces)}"
    return f"{scheme}{sep}{head}{base}"


def url_secrets(url: str) -> list[str]:
    """The secret strings in ``url`` (raw and decoded), longest first: what :func:`scrub` removes from text."""
    found: set[str] = set()
    _, sep, rest = url.partition("://")
    if not sep:
        rest = url
    end = _userinfo_end(rest)
    if end is not None:
        _, colon, password = rest[:end].partition(":")
        if colon and password:
            found.update((password, _decoded(password)))
        rest = rest[end + 1 :]
    _, mark, query = rest.partition("?")
    if mark:
        for piece, name, value in _query_pieces(query):
            if _is_credential(name, value):
                raw = piece.partition("=")[2]
                found.update(v for v in (raw, value) if v)
    return sorted(found, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message, say) with the secrets of ``url`` and any URL in it redacted."""
    for secret in url_secrets(url):
        # Shorter than 4 characters, a "secret" would mangle the message more than it protects.
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return redact_urls_in(text)


def redact_urls_in(text: str) -> str:
    """``text`` with every URL-looking word in it passed through :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


# --- output paths ------------------------------------------------------------------------------------------------

ALLOW_OUTSIDE = "allow_outside_output"


def output_path_problem(value: str) -> str | None:
    """Why the output path ``value`` would leave the output folder, or None when it stays inside.

    Lexical, after normalisation: an absolute path, or one whose first part is ``..`` once ``a/../..`` is
    folded, leaves it. (A symlink planted inside the folder is the folder owner's business.)

    >>> output_path_problem("data"), output_path_problem("a/../../x"), output_path_problem("/tmp/x")
    (None, "climbs out with '..'", 'is absolute')
    """
    if os.path.isabs(value):
        return "is absolute"
    if Path(os.path.normpath(value)).parts[:1] == (os.pardir,):
        return "climbs out with '..'"
    return None


def check_output_path(field: str, value: str, allowed: bool, section: str) -> None:
    """Raise ValueError naming ``field`` unless ``value`` stays inside the output folder or ``allowed`` says
    it may leave it; the message names the opt-in as ``<section>.allow_outside_output``."""
    if "\x00" in value:
        # No file system takes it; refused here rather than as an OSError half-way through a run.
        raise ValueError(f"{field}: expected a path without NUL characters")
    problem = output_path_problem(value)
    if problem is not None and not allowed:
        raise ValueError(
            f"{field}: expected a path inside the output folder, got {value!r}, which {problem}; "
            f"set {section}.{ALLOW_OUTSIDE}: true to write there on purpose"
        )


def sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL as SQLAlchemy reads it (percent-decoded), or None for another backend
    or an in-memory database."""
    from sqlalchemy.engine import make_url  # SQLAlchemy only for configs that have a SQL sink

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database


def sqlite_path_problem(url: str) -> str | None:
    """Why the SQLite file of ``url`` would leave the output folder, or None (not SQLite, or inside).

    The file is resolved against the output folder (``pipeline.sql_sink.resolve_url``); a URI filename
    (``file:...`` with ``uri=true``) has its own path syntax, which is not guessed at.
    """
    database = sqlite_file(url)
    if database is None:
        return None
    _, _, query = url.partition("?")
    uri = any(name.lower() == "uri" for _, name, _ in _query_pieces(query)) if query else False
    if uri or database.startswith("file:"):
        return f"the SQLite file {database!r} is a URI filename, which cannot be checked to stay inside"
    problem = output_path_problem(database)
    return None if problem is None else f"the SQLite file {database!r} {problem}"


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
    duplicate_key: RejectOrAccept = Field(
        "reject",
        description="A name repeated in one JSON object ('machine' or 'seq' twice); accept: the last value wins.",
    )
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
    mileage_max: float = Field(
        1e9,
        gt=0,
        description="Largest believable mileage; a larger one is refused (out_of_range) and never enters the "
        "machine's history, where it would make every later reading look like mileage going backwards.",
    )
    machines_tracked: int = Field(
        100_000,
        gt=0,
        description="Per-machine history (newest time, mileage, recent seq ids) is kept for at most this many "
        "machines; beyond it the least recently seen machine's is evicted, so memory stays bounded.",
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
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: the name is looked up as a file, and a name too long for the file system says so that way.
        shown = repr(name) if len(name) <= 100 else f"{name[:100]!r}... ({len(name):,} characters)"
        raise ValueError(f"expected an IANA time zone such as 'Europe/Paris', got {shown}") from None


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
    allow_outside_output: bool = Field(
        False, description="Let path be absolute or climb out of the output folder with '..' (off: refused)."
    )

    @model_validator(mode="after")
    def _path_inside(self) -> ParquetSettings:
        check_output_path("path", self.path, self.allow_outside_output, "pipeline.parquet")
        return self


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
    allow_outside_output: bool = Field(
        False,
        description="Let a SQLite file be absolute or climb out of the output folder with '..' (off: refused, "
        "also for a URL from the environment).",
    )

    @field_validator("url")
    @classmethod
    def _no_literal_password(cls, value: str) -> str:
        if _ENV_REF.match(value):
            # The environment is where a password may live; the sink checks the resolved URL's path.
            return value
        # Never quote the URL back: whatever it holds may be a mistyped secret.
        expected = "expected a SQLAlchemy URL such as sqlite:///loading_rate.db or postgresql+psycopg://user@host/db"
        if "://" not in value:
            raise ValueError(expected)
        problem = url_credential_problem(value)
        if problem is not None:
            raise ValueError(
                f"expected no password in the URL ({problem}); put the whole URL in an environment variable "
                "and write ${BENCH_SQL_URL}"
            )
        from sqlalchemy.exc import ArgumentError

        try:
            sqlite_file(value)
        except ArgumentError:
            raise ValueError(expected) from None
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

    @model_validator(mode="after")
    def _sqlite_file_inside(self) -> SqlSettings:
        if not _ENV_REF.match(self.url):
            problem = sqlite_path_problem(self.url)
            if problem is not None and not self.allow_outside_output:
                raise ValueError(
                    f"url: expected a SQLite file inside the output folder, but {problem}; "
                    f"set pipeline.sql.{ALLOW_OUTSIDE}: true to write there on purpose"
                )
        return self

    def table_name(self) -> str:
        return self.table or ("loading_rate" if self.aggregate == "per_machine_minute" else "readings")


class QuarantineSettings(Frozen):
    """Where rejected inputs are kept, with their reason."""

    path: str = Field("quarantine", description="Folder for rejected inputs (relative to the output folder).")
    allow_outside_output: bool = Field(
        False, description="Let path be absolute or climb out of the output folder with '..' (off: refused)."
    )

    @model_validator(mode="after")
    def _path_inside(self) -> QuarantineSettings:
        check_output_path("path", self.path, self.allow_outside_output, "pipeline.quarantine")
        return self


class PipelineSettings(Frozen):
    """Everything after the source: validate -> buffer -> sinks."""

    buffer: BufferSettings = BufferSettings()
    validate_: ValidateSettings = Field(ValidateSettings(), alias="validate")
    parquet: ParquetSettings = ParquetSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    sql: SqlSettings | None = Field(None, description="Also write to a SQL database (off by default).")
    probes: bool = Field(True, description="Record lock wait/hold and producer stall histograms.")
    durability: Literal["naive", "crash_safe"] = Field(
        "naive",
        description="naive: as the pipeline always was (a crash loses what was buffered and the file being "
        "written; a restart may overwrite files). crash_safe: files a restart never overwrites, an output "
        "folder lock, flushed data kept in a journal that survives kill -9 and is recovered at start-up; "
        "an MQTT source acknowledges only once a message is durable (docs/durability.md).",
    )
    runtime: Literal["threads", "asyncio"] = Field(
        "threads",
        description="threads: thread locks and flusher threads. asyncio: the pipeline runs on an event loop "
        "(as OPC UA clients do); the loop-lag probe shows how long the loop stalls.",
    )
    fault_injection: str | None = Field(
        None,
        description="For the bench's sink_error fault: a JSON control file (relative to the output folder, "
        'inside it) such as {"sink_error": 0.3, "seed": 16}; while it says so, each sink write fails with that '
        "probability (an injected EIO, before the real sink is touched). Unset (the default): nothing is wrapped.",
    )

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("fault_injection")
    @classmethod
    def _control_file_inside(cls, value: str | None) -> str | None:
        if value is not None:
            check_fault_injection_path(value)
        return value


def check_fault_injection_path(value: str) -> None:
    """Raise ValueError unless the fault injection control file ``value`` is a path inside the output folder.

    The same check as every output path (:func:`output_path_problem`), with no opt-out: the file only ever
    comes from the bench, which writes it in the run's output folder.
    """
    if "\x00" in value or not value.strip():
        raise ValueError("fault_injection: expected a file name inside the output folder")
    problem = output_path_problem(value)
    if problem is not None:
        raise ValueError(f"fault_injection: expected a path inside the output folder, got {value!r}, which {problem}")


class MqttSourceSettings(Frozen):
    """An MQTT subscription: the pipeline's source when it runs on its own."""

    url: str = Field(description="Broker URL, e.g. mqtt://127.0.0.1:1883")
    topic: str = Field("plant/+/telemetry", description="Subscription filter.")
    qos: Literal[0, 1, 2] = 1
    client_id: str | None = None
    session: Literal["clean", "persistent"] = Field(
        "clean",
        description="persistent: the broker keeps the subscription and queues QoS 1/2 messages while the "
        "pipeline is down (needs a stable client_id); clean: a new session on every connect.",
    )
    ack: Literal["on_receive", "durable"] = Field(
        "on_receive",
        description="When a QoS 1/2 message is acknowledged: on_receive (when it reaches the buffer; a crash "
        "loses what was buffered) or durable (once its row, or its quarantine row, is on disk).",
    )
    username: str | None = Field(None, description="Literal or ${ENV_VAR}.")
    password: str | None = Field(None, description="Must be ${ENV_VAR}: secrets never live in a file.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError(f"expected mqtt://host[:port], got {redact_url(value)!r}")
        _refuse_credentials(value, "${MQTT_PASSWORD}")
        return value

    @field_validator("password")
    @classmethod
    def _password_is_reference(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_REF.match(value):
            raise ValueError("expected an environment reference such as ${MQTT_PASSWORD}")
        return value

    @model_validator(mode="after")
    def _persistent_needs_client_id(self) -> MqttSourceSettings:
        if self.session == "persistent" and not self.client_id:
            raise ValueError("session persistent needs a client_id: the broker keeps the session under that id")
        return self


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
    cert_dir: str = Field(
        "certs", description="Where the client's own key and certificate are generated (relative to the output folder)."
    )
    allow_outside_output: bool = Field(
        False, description="Let cert_dir be absolute or climb out of the output folder with '..' (off: refused)."
    )
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
            raise ValueError(f"expected opc.tcp://host:port/path, got {redact_url(value)!r}")
        # asyncua takes user:password@ from the endpoint URL: a password there would live in the file.
        _refuse_credentials(value, "${OPCUA_PASSWORD}")
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

    @model_validator(mode="after")
    def _cert_dir_inside(self) -> OpcUaSourceSettings:
        check_output_path("cert_dir", self.cert_dir, self.allow_outside_output, "source")
        return self


def _refuse_credentials(url: str, reference: str) -> None:
    problem = url_credential_problem(url)
    if problem is not None:
        raise ValueError(f"expected no password in the URL ({problem}); give username, and password as {reference}")


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
_SECRET_FIELDS = frozenset({"password", "url", "broker", "server"})


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
            shown = repr(err["input"])
            # A hostile value can be megabytes long: the line names it, it need not repeat all of it.
            shown = shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown):,} characters)"
            if f"got {shown}" not in msg:  # our own validators already say what they got
                msg = f"{msg} (got {shown})"
        # A check across fields names its own location in the message.
        line = f"{path}: {loc}: {msg}" if loc else f"{path}: {msg}"
        # Validators of other modules may quote a URL back: whatever credential it holds is hidden here.
        lines.append(redact_urls_in(line))
    return "\n".join(lines)


MAX_YAML_DEPTH = 64
"""Deepest nesting of mappings and lists a settings file may have; real ones need fewer than ten levels.

PyYAML composes recursively, and pydantic, ``copy.deepcopy`` and ``json`` walk the result recursively too: a
file nested thousands of levels deep would end in a RecursionError (a traceback) or worse. The limit keeps
every later step far from Python's recursion limit."""
_TOO_DEEP = f"YAML nested too deeply (more than {MAX_YAML_DEPTH} levels of mappings and lists)"


MAX_YAML_MERGED = 100_000
"""Most entries merge keys (``<<: *anchor``) may copy in, all together. A merge copies (an alias shares): a
chain of anchors each merging the previous one grows quadratically, 5,000 short lines into 12 million
entries and half a minute; settings files merge a handful."""


class _Mark(Protocol):
    """Where in the text (0-based), as PyYAML's pure-Python and C marks both say."""

    line: int
    column: int


class _Refused(Exception):
    def __init__(self, problem: str, mark: _Mark | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a node nested deeper than :data:`MAX_YAML_DEPTH` and merge keys that
    copy in more than :data:`MAX_YAML_MERGED` entries."""

    _depth = 0
    _merged = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                # peek_event is untyped in types-PyYAML; it returns the Event about to become this node.
                event: Event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _Refused(_TOO_DEEP, event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def flatten_mapping(self, node: MappingNode) -> None:
        before = len(node.value)
        super().flatten_mapping(node)
        self._merged += len(node.value) - before
        if self._merged > MAX_YAML_MERGED:
            raise _Refused(f"YAML merge keys (<<) copy in more than {MAX_YAML_MERGED:,} entries", node.start_mark)


def nesting_depth(data: Any, limit: int = MAX_YAML_DEPTH) -> int | None:
    """Levels of nested mappings and lists in ``data`` (a scalar is 0), at most ``limit + 1``; None if cyclic.

    Iterative, and linear in the number of distinct containers: YAML aliases can share one list a million
    ways (a "billion laughs") or nest an anchored list inside itself, and neither may cost more than the
    file's size or recurse.

    >>> nesting_depth({"a": [1, {"b": 2}]}), nesting_depth(3)
    (3, 0)
    """

    def children(node: Any) -> list[Any]:
        values = node.values() if isinstance(node, dict) else node
        return [v for v in values if isinstance(v, dict | list | tuple)]

    if not isinstance(data, dict | list | tuple):
        return 0
    done: dict[int, int] = {}
    # Each frame: the container, its children not yet visited, the deepest child so far.
    stack: list[tuple[Any, list[Any], int]] = [(data, children(data), 0)]
    on_path = {id(data)}
    while stack:
        node, todo, deepest = stack[-1]
        if not todo:
            stack.pop()
            on_path.discard(id(node))
            done[id(node)] = depth = deepest + 1
            if stack:
                parent, rest, best = stack[-1]
                stack[-1] = (parent, rest, max(best, depth))
            continue
        child = todo.pop()
        if id(child) in on_path:
            return None
        if id(child) in done:
            stack[-1] = (node, todo, max(deepest, done[id(child)]))
            continue
        if len(stack) >= limit:
            return limit + 1
        on_path.add(id(child))
        stack.append((child, children(child), 0))
    return done[id(data)]


def load_yaml_mapping(path: Path, error: type[Exception]) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file and line, in one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_LimitedLoader)
    except _Refused as exc:
        raise error(f"{path}{exc.where}: {exc.problem}") from None
    except RecursionError:
        # A backstop: whatever else in PyYAML recurses (merge keys flattened in an unlucky order) says so.
        raise error(f"{path}: {_TOO_DEEP}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{path}{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    depth = nesting_depth(data)
    if depth is None:
        raise error(f"{path}: YAML refers to itself (an alias inside its own anchor); expected plain settings")
    if depth > MAX_YAML_DEPTH:
        # Aliases can nest an anchored subtree deeper than the text shows.
        raise error(f"{path}: {_TOO_DEEP}, counting what aliases expand to")
    return data


def load_standalone(path: Path) -> StandaloneConfig:
    """Parse and validate a standalone pipeline config file."""
    data = load_yaml_mapping(path, ConfigError)
    try:
        return StandaloneConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
