"""Tests for pipeline/sql_sink.py (SqlSink, resolve_url) and pipeline/config.py (SqlSettings).

Against real databases: SQLite (a file in tmp_path), PostgreSQL and MariaDB on loopback (skipped
when unreachable, failed when BENCH_REQUIRE_SERVICES=1). Every test uses its own table with a
random suffix and drops it afterwards, so runs can share the servers.

Float values are exact in single precision in most tests, so that they check what they are
about; test_double_precision_values_round_trip checks the columns are 8-byte doubles everywhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from pipeline.config import SqlSettings, format_validation_error
from pipeline.errors import ConfigError, SinkError
from pipeline.model import Reading
from pipeline.sql_sink import SqlSink, resolve_url
from tests.conftest import require_service

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
SERVICES = {"postgresql": ("PostgreSQL", 5432, PG_URL), "mariadb": ("MariaDB", 3306, MARIADB_URL)}
ALL = ("sqlite", "postgresql", "mariadb")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BASE_NS = 1_700_000_040_123_456_789  # 2023-11-14T22:14:00.123456789Z, inside a minute
MINUTE0_NS = 1_700_000_040 * 10**9  # the start of that minute
S = 10**9


def params(pairs: Sequence[tuple[str, ...]], xfail: dict[str, str] | None = None) -> list[Any]:
    """pytest params for (backend, ...) tuples; server backends are marked `services`.

    `xfail` maps a backend, or a whole id such as "postgresql-copy", to a known bug.
    """
    out = []
    for pair in pairs:
        marks: list[pytest.MarkDecorator] = [] if pair[0] == "sqlite" else [pytest.mark.services]
        ident = "-".join(pair)
        reason = (xfail or {}).get(ident) or (xfail or {}).get(pair[0])
        if reason:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        out.append(pytest.param(*pair, marks=marks, id=ident))
    return out


def backends(*names: str, xfail: dict[str, str] | None = None) -> list[Any]:
    return params([(n,) for n in names], xfail)


class Db:
    """One backend for one test: makes sinks on a unique table and drops what it made."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.output = tmp_path / "out"
        if backend == "sqlite":
            # Relative: the file lands in the output folder (an absolute path would need allow_outside_output).
            self.url = "sqlite:///bench.db"
        else:
            name, port, self.url = SERVICES[backend]
            require_service(name, "127.0.0.1", port)
        self.table = f"t_{uuid.uuid4().hex[:12]}"
        self.sinks: list[SqlSink] = []
        self.extra_tables: list[str] = []

    def sink(self, strategy: str = "upsert", aggregate: str = "raw", **kw: Any) -> SqlSink:
        kw.setdefault("table", self.table)
        settings = SqlSettings(url=self.url, strategy=strategy, aggregate=aggregate, **kw)
        sink = SqlSink(settings, self.output)
        self.sinks.append(sink)
        return sink

    def rows(self, sink: SqlSink) -> list[dict[str, Any]]:
        with sink.engine.connect() as conn:
            result = conn.execute(sa.select(sink.table).order_by(sink.table.c.machine, sink.table.c.ts))
            return [dict(r._mapping) for r in result]

    def ts(self, ns: int) -> datetime:
        """What the database should hand back for `ns`: UTC, naive except on PostgreSQL."""
        moment = EPOCH + timedelta(microseconds=ns // 1000)
        return moment if self.backend == "postgresql" else moment.replace(tzinfo=None)

    def close(self) -> None:
        for sink in self.sinks:
            with sink.engine.begin() as conn:
                sink.table.drop(conn, checkfirst=True)
                for name in self.extra_tables:
                    conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
            sink.close()


def reading(i: int, machine: str = "m-1", *, ts_ns: int | None = None, bump: float = 0.0) -> Reading:
    # ts steps of 1.000001001 s: every row has its own microsecond fraction (and a dropped ns part).
    ts = BASE_NS + i * 1_000_001_001 if ts_ns is None else ts_ns
    return Reading(
        machine=machine, ts_ns=ts, load_rate=i * 0.25 + bump, mileage=1000.0 + i * 0.5 + bump, seq=i, received_ns=ts
    )


def raw_tuple(db: Db, r: Reading) -> tuple[Any, ...]:
    return (r.machine, db.ts(r.ts_ns), r.load_rate, r.mileage, r.seq)


def as_tuples(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["machine"], r["ts"], r["load_rate"], r["mileage"], r["seq"]) for r in rows]


# --- raw mode ---------------------------------------------------------------------

RAW_STRATEGIES = [(b, s) for b in ALL for s in ("row", "bulk", "upsert")] + [("postgresql", "copy")]


@pytest.mark.parametrize(("backend", "strategy"), params(RAW_STRATEGIES))
def test_raw_writes_exactly_the_rows(make_db: Callable[[str], Db], backend: str, strategy: str) -> None:
    db = make_db(backend)
    sink = db.sink(strategy)
    readings = [reading(i, f"m-{i % 3}") for i in range(12)]
    sink.write_batch(readings[:5], 1)
    timing = sink.write_batch(readings[5:], 2)
    assert timing.write_ns > 0

    rows = db.rows(sink)
    assert sorted(as_tuples(rows)) == sorted(raw_tuple(db, r) for r in readings)
    for row in rows:
        if backend == "postgresql":
            assert row["ts"].utcoffset() == timedelta(0)  # timestamptz, read back in UTC
        else:
            assert row["ts"].tzinfo is None  # naive UTC
    # Microseconds kept (DATETIME(6) on MariaDB), nanoseconds truncated.
    assert {r["ts"].microsecond for r in rows} == {(r.ts_ns // 1000) % 10**6 for r in readings}
    assert len({r["ts"].microsecond for r in rows}) == 12
    assert sink.rows_written == 12
    assert sink.read_back() == {"table": db.table, "rows": 12, "created_by_run": True}


@pytest.mark.parametrize(("backend", "strategy"), params([(b, "upsert") for b in ALL] + [("postgresql", "copy")]))
def test_upsert_twice_updates_instead_of_duplicating(make_db: Callable[[str], Db], backend: str, strategy: str) -> None:
    db = make_db(backend)
    sink = db.sink(strategy)
    first = [reading(i, f"m-{i % 2}") for i in range(6)]
    second = [reading(i, f"m-{i % 2}", bump=100.0) for i in range(6)]  # same keys, new values
    sink.write_batch(first, 1)
    sink.write_batch(second, 2)
    assert sink.read_back()["rows"] == 6  # count unchanged
    assert sorted(as_tuples(db.rows(sink))) == sorted(raw_tuple(db, r) for r in second)  # the second values won
    sink.write_batch(second, 3)  # a replay: idempotent
    assert sorted(as_tuples(db.rows(sink))) == sorted(raw_tuple(db, r) for r in second)


@pytest.mark.parametrize(("backend", "strategy"), params([(b, s) for b in ALL for s in ("row", "bulk")]))
def test_plain_insert_strategies_fail_on_a_repeated_key(
    make_db: Callable[[str], Db], backend: str, strategy: str
) -> None:
    db = make_db(backend)
    sink = db.sink(strategy)
    sink.write_batch([reading(0), reading(1)], 1)
    with pytest.raises(SinkError, match=f"SQL {strategy} into {db.table} failed: IntegrityError") as info:
        sink.write_batch([reading(2), reading(1, bump=5.0)], 2)
    assert "\n" not in str(info.value)  # one line for the user, not a driver dump
    expected = [reading(0), reading(1)]
    if strategy == "row":
        expected.append(reading(2))  # a commit per row: the row before the duplicate stays
    assert sorted(as_tuples(db.rows(sink))) == sorted(raw_tuple(db, r) for r in expected)  # bulk: atomic
    assert sink.rows_written == 2


# --- aggregated mode --------------------------------------------------------------


def at(minute: int, second: float, machine: str, load_rate: float, mileage: float) -> Reading:
    ts = MINUTE0_NS + minute * 60 * S + int(second * S)
    return Reading(machine=machine, ts_ns=ts, load_rate=load_rate, mileage=mileage, seq=0, received_ns=ts)


def agg_tuples(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    names = ("machine", "ts", "count", "load_rate_mean", "load_rate_min", "load_rate_max", "mileage_last")
    return [tuple(r[n] for n in names) for r in rows]


@pytest.mark.parametrize(("backend", "strategy"), params([(b, "upsert") for b in ALL] + [("postgresql", "copy")]))
def test_aggregated_minutes_and_late_data(make_db: Callable[[str], Db], backend: str, strategy: str) -> None:
    db = make_db(backend)
    sink = db.sink(strategy, aggregate="per_machine_minute")
    assert sink.table.name == db.table
    sink.write_batch(
        [
            at(0, 0, "m1", 1.0, 10.0),
            at(0, 30, "m1", 2.0, 40.0),  # latest ts of m1's minute 0
            at(0, 10, "m1", 6.0, 20.0),  # arrives last, but is older
            at(1, 5, "m1", 4.0, 50.0),
            at(0, 59.999999, "m2", 8.0, 99.0),
        ],
        1,
    )
    m0, m1 = db.ts(MINUTE0_NS), db.ts(MINUTE0_NS + 60 * S)
    assert agg_tuples(db.rows(sink)) == [
        ("m1", m0, 3, 3.0, 1.0, 6.0, 40.0),
        ("m1", m1, 1, 4.0, 4.0, 4.0, 50.0),
        ("m2", m0, 1, 8.0, 8.0, 8.0, 99.0),
    ]
    assert sink.read_back() == {
        "table": db.table,
        "rows": 3,
        "created_by_run": True,
        "sum_count": 5,
        "late_beyond_retention": 0,
    }

    # Late data for m1's minute 0, already written: the row is recomputed from all 5 readings.
    sink.write_batch([at(0, 45, "m1", 11.0, 45.0), at(0, 1, "m1", 0.0, 11.0)], 2)
    assert agg_tuples(db.rows(sink)) == [
        ("m1", m0, 5, 4.0, 0.0, 11.0, 45.0),
        ("m1", m1, 1, 4.0, 4.0, 4.0, 50.0),  # untouched
        ("m2", m0, 1, 8.0, 8.0, 8.0, 99.0),
    ]
    figures = sink.read_back()
    assert (figures["rows"], figures["sum_count"]) == (3, 7)


def test_aggregated_late_beyond_retention_is_counted(make_db: Callable[[str], Db]) -> None:
    db = make_db("sqlite")
    sink = db.sink("upsert", aggregate="per_machine_minute", retention="2m")
    sink.write_batch([at(0, 1, "m1", 1.0, 1.0), at(10, 1, "m1", 2.0, 2.0)], 1)
    sink.write_batch([at(0, 2, "m1", 3.0, 3.0)], 2)  # minute 0 is 10 minutes behind: evicted
    figures = sink.read_back()
    assert (figures["rows"], figures["sum_count"], figures["late_beyond_retention"]) == (2, 2, 1)
    assert [r["count"] for r in db.rows(sink)] == [1, 1]  # the old minute was not overwritten with a partial


# --- reset, read_back -------------------------------------------------------------


@pytest.mark.parametrize("backend", backends(*ALL))
def test_reset_drops_existing_rows(make_db: Callable[[str], Db], backend: str) -> None:
    db = make_db(backend)
    db.sink().write_batch([reading(i) for i in range(3)], 1)
    again = db.sink()
    assert again.read_back() == {"table": db.table, "rows": 3, "created_by_run": False}  # kept, not created
    fresh = db.sink(reset=True)
    assert fresh.read_back() == {"table": db.table, "rows": 0, "created_by_run": True}
    fresh.write_batch([reading(7)], 1)
    assert as_tuples(db.rows(fresh)) == [raw_tuple(db, reading(7))]


# --- hostile machine ids ----------------------------------------------------------


@pytest.mark.parametrize(("backend", "strategy"), params([(b, "upsert") for b in ALL] + [("postgresql", "copy")]))
def test_hostile_machine_ids_are_stored_verbatim(make_db: Callable[[str], Db], backend: str, strategy: str) -> None:
    db = make_db(backend)
    sink = db.sink(strategy)
    canary = f"x_{uuid.uuid4().hex[:12]}"
    db.extra_tables.append(canary)
    with sink.engine.begin() as conn:
        sa.Table(canary, sa.MetaData(), sa.Column("id", sa.Integer)).create(conn)
    ids = [
        f"'; DROP TABLE {canary}; --",
        f'"; DROP TABLE {canary}; --',
        "O'Brien \"press\" \\' \\",
        "tab\tnew\nline",
        "Maschine-Ü-東京",
        "🏭",
        "%s %(x)s ? :name",  # paramstyle markers of every driver
    ]
    readings = [reading(i, m) for i, m in enumerate(ids)]
    sink.write_batch(readings, 1)
    assert sorted(as_tuples(db.rows(sink))) == sorted(raw_tuple(db, r) for r in readings)
    with sink.engine.connect() as conn:
        assert sa.inspect(conn).has_table(canary)


@pytest.mark.parametrize("backend", backends(*ALL))
def test_machine_ids_differing_in_case_accent_or_space_stay_distinct(
    make_db: Callable[[str], Db], backend: str
) -> None:
    db = make_db(backend)
    sink = db.sink("upsert")
    same_ts = BASE_NS
    ids = ["Press-1", "press-1", "presse", "pressé", "p", "p "]
    readings = [reading(i, m, ts_ns=same_ts) for i, m in enumerate(ids)]
    sink.write_batch(readings, 1)
    assert sorted(as_tuples(db.rows(sink))) == sorted(raw_tuple(db, r) for r in readings)


@pytest.mark.parametrize("backend", backends(*ALL))
def test_double_precision_values_round_trip(make_db: Callable[[str], Db], backend: str) -> None:
    db = make_db(backend)
    sink = db.sink("upsert")
    r = Reading(machine="m", ts_ns=BASE_NS, load_rate=0.1, mileage=1234567.89, seq=1, received_ns=BASE_NS)
    sink.write_batch([r], 1)
    (row,) = db.rows(sink)
    assert (row["load_rate"], row["mileage"]) == (0.1, 1234567.89)


@pytest.mark.parametrize("backend", backends(*ALL))
def test_seq_up_to_int64_is_stored(make_db: Callable[[str], Db], backend: str) -> None:
    db = make_db(backend)
    sink = db.sink("upsert")
    r = Reading(machine="m", ts_ns=BASE_NS, load_rate=1.0, mileage=2.0, seq=2**31, received_ns=BASE_NS)
    sink.write_batch([r], 1)
    assert [row["seq"] for row in db.rows(sink)] == [2**31]


@pytest.mark.parametrize(
    ("backend", "strategy"),
    params([(b, "upsert") for b in ALL] + [("postgresql", "copy")]),
)
def test_duplicate_key_within_one_batch(make_db: Callable[[str], Db], backend: str, strategy: str) -> None:
    """An at-least-once source can deliver one reading twice in a batch: upsert keeps the last."""
    db = make_db(backend)
    sink = db.sink(strategy)
    sink.write_batch([reading(1), reading(1, bump=5.0)], 1)
    assert as_tuples(db.rows(sink)) == [raw_tuple(db, reading(1, bump=5.0))]


@pytest.mark.parametrize(
    ("backend", "strategy"),
    params(
        [("postgresql", "upsert"), ("postgresql", "copy"), ("mariadb", "upsert")],
    ),
)
def test_database_errors_surface_as_sink_errors(make_db: Callable[[str], Db], backend: str, strategy: str) -> None:
    # A machine id longer than the VARCHAR(255) key: the server refuses it (SQLite would not).
    db = make_db(backend)
    sink = db.sink(strategy)
    with pytest.raises(SinkError, match=f"SQL {strategy} into {db.table} failed"):
        sink.write_batch([reading(1, "x" * 300)], 1)
    sink.write_batch([reading(2)], 2)  # the sink (and its pool) still works afterwards
    assert sink.read_back()["rows"] == 1


# --- SqlSettings and resolve_url (no database) ------------------------------------


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://postgres:s3cret@127.0.0.1:5432/test", "mysql+pymysql://root:pw@127.0.0.1/test"],
)
def test_settings_refuse_a_literal_password(url: str) -> None:
    with pytest.raises(ValidationError, match="expected no password in the URL") as info:
        SqlSettings(url=url)
    assert "${BENCH_SQL_URL}" in str(info.value)


@pytest.mark.parametrize("url", ["${BENCH_SQL_URL}", PG_URL, MARIADB_URL, "sqlite:///x.db", "sqlite://"])
def test_settings_accept_urls_without_password(url: str) -> None:
    assert SqlSettings(url=url).url == url


SECRET = "hunter2xyz"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?password={SECRET}",
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?pass%77ord={SECRET}",  # percent-encoded name
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?pass%2577ord={SECRET}",  # encoded twice
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?PassWord={SECRET}",
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?sslmode=require&sslpassword={SECRET}",
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?passfile=/home/u/{SECRET}",
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?oauth_client_secret={SECRET}",
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?scram_client_key={SECRET}",
        f"mysql+pymysql://root@127.0.0.1:3306/test?passwd={SECRET}",
        f"mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4&ssl_key_password={SECRET}",
        f"mssql+pyodbc://h/db?odbc_connect=DRIVER%3Dx%3BPWD%3D{SECRET}",  # a credential inside a value
        f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:5432/test",
        # SQLAlchemy ends the password at the first '@': '/' and '?' in it hid it from urllib's reading.
        f"postgresql+psycopg://postgres:a/{SECRET}@127.0.0.1:5432/test",
        f"postgresql+psycopg://postgres:a?{SECRET}@127.0.0.1:5432/test",
    ],
)
def test_settings_refuse_every_credential_without_quoting_it(url: str) -> None:
    with pytest.raises(ValidationError) as info:
        SqlSettings(url=url)
    message = format_validation_error("s.yaml", info.value)
    assert message.startswith("s.yaml: url: expected no password in the URL (")
    assert "${BENCH_SQL_URL}" in message and "\n" not in message
    assert SECRET not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres@127.0.0.1:5432/test?sslmode=require&application_name=passenger-app",
        "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4&ssl_key=/etc/client-key.pem",
        "postgresql+psycopg://postgres:@127.0.0.1:5432/test",  # an empty password is no secret
    ],
)
def test_settings_accept_urls_whose_parameters_are_no_credentials(url: str) -> None:
    assert SqlSettings(url=url).url == url


def test_settings_never_quote_a_malformed_url() -> None:
    with pytest.raises(ValidationError) as info:
        SqlSettings(url=f"host=db user=app password={SECRET}")
    message = format_validation_error("s.yaml", info.value)
    assert message.startswith("s.yaml: url: expected a SQLAlchemy URL")
    assert SECRET not in message


@pytest.mark.services
# PyMySQL still takes passwd, with a warning: that it takes it is the point here.
@pytest.mark.filterwarnings("ignore:'passwd' is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("service", "url", "shown"),
    [
        (
            ("PostgreSQL", 5432),
            f"postgresql+psycopg://postgres@127.0.0.1:5432/no_such_db?password={SECRET}",
            "no_such_db?password=***",
        ),
        (("PostgreSQL", 5432), f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:1/test", "postgres:***@127.0.0.1:1"),
        (("MariaDB", 3306), f"mysql+pymysql://root@127.0.0.1:3306/no_such_db?passwd={SECRET}", "passwd=***"),
    ],
)
def test_a_connection_error_never_shows_the_environment_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, service: tuple[str, int], url: str, shown: str
) -> None:
    require_service(service[0], "127.0.0.1", service[1])
    monkeypatch.setenv("BENCH_SQL_URL", url)
    settings = SqlSettings(url="${BENCH_SQL_URL}")
    # What results.json records of the settings is the reference, never the resolved URL.
    assert settings.model_dump(mode="json")["url"] == "${BENCH_SQL_URL}"
    with pytest.raises(SinkError) as info:
        SqlSink(settings, tmp_path)
    message = str(info.value)
    assert message.startswith("cannot open SQL sink ") and shown in message, message
    assert SECRET not in message and "\n" not in message


@pytest.mark.services
def test_a_parameter_the_driver_refuses_is_a_sink_error(tmp_path: Path) -> None:
    require_service("MariaDB", "127.0.0.1", 3306)
    # PyMySQL raises a plain TypeError for an unknown keyword: still one line, no traceback.
    with pytest.raises(SinkError, match=r"TypeError: .*unexpected keyword argument 'bogus'"):
        SqlSink(SqlSettings(url=f"{MARIADB_URL}?bogus=1"), tmp_path)


def test_settings_copy_needs_postgres() -> None:
    with pytest.raises(ValidationError, match="strategy copy needs a PostgreSQL URL"):
        SqlSettings(url="sqlite:///x.db", strategy="copy")
    assert SqlSettings(url=PG_URL, strategy="copy").strategy == "copy"


def test_sink_refuses_copy_when_the_env_url_is_not_postgres(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ${VAR} hides the backend from the settings check; the sink must catch it once resolved.
    monkeypatch.setenv("BENCH_SQL_URL", "sqlite:///x.db")
    settings = SqlSettings(url="${BENCH_SQL_URL}", strategy="copy")
    with pytest.raises(ConfigError, match="copy needs PostgreSQL, got sqlite"):
        SqlSink(settings, tmp_path)


@pytest.mark.parametrize("table", ["x; drop table y", "x y", 'x"', "1abc", "", "a" * 64, "loading-rate"])
def test_settings_refuse_unsafe_table_names(table: str) -> None:
    with pytest.raises(ValidationError, match="expected a plain identifier"):
        SqlSettings(table=table)


@pytest.mark.parametrize("table", ["loading_rate", "_x", "a" * 63, "run_{variant}"])
def test_settings_accept_plain_table_names(table: str) -> None:
    assert SqlSettings(table=table).table == table


def test_settings_refuse_a_table_name_with_trailing_newline() -> None:
    with pytest.raises(ValidationError):
        SqlSettings(table="readings\n")


def test_default_table_names() -> None:
    assert SqlSettings().table_name() == "loading_rate"
    assert SqlSettings(aggregate="raw").table_name() == "readings"
    assert SqlSettings(table="mine").table_name() == "mine"


def test_resolve_url_puts_relative_sqlite_under_output(tmp_path: Path) -> None:
    out = tmp_path / "run" / "out"
    assert resolve_url("sqlite:///loading_rate.db", out) == f"sqlite:///{out / 'loading_rate.db'}"
    assert out.is_dir()  # created, so SQLite can create the file
    for url in ("sqlite://", "sqlite:///:memory:", PG_URL):
        assert resolve_url(url, out) == url
    absolute = f"sqlite:///{tmp_path / 'abs.db'}"
    assert resolve_url(absolute, out, allow_outside_output=True) == absolute


@pytest.mark.parametrize("database", ["/tmp/x.db", "../../../../tmp/x.db", "a/../../x.db", "%2E%2E/x.db"])
def test_resolve_url_keeps_an_environment_sqlite_file_inside_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str
) -> None:
    # The settings cannot see through ${BENCH_SQL_URL}: the resolved URL meets the same rule when the sink opens.
    monkeypatch.setenv("BENCH_SQL_URL", f"sqlite:///{database}")
    with pytest.raises(
        ConfigError, match=r"^sql\.url \(\$\{BENCH_SQL_URL\}\): expected a SQLite file inside the output"
    ):
        resolve_url("${BENCH_SQL_URL}", tmp_path / "out")
    with pytest.raises(ConfigError, match="allow_outside_output: true"):
        SqlSink(SqlSettings(url="${BENCH_SQL_URL}"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    resolved = resolve_url("${BENCH_SQL_URL}", tmp_path / "out", allow_outside_output=True)
    assert resolved.startswith("sqlite:///")


def test_sink_writes_an_absolute_sqlite_file_with_the_opt_in(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "shared.db"
    settings = SqlSettings(url=f"sqlite:///{target}", aggregate="raw", allow_outside_output=True)
    sink = SqlSink(settings, tmp_path / "out")
    try:
        sink.write_batch([reading(1)], 1)
    finally:
        sink.close()
    assert target.is_file()


def test_resolve_url_expands_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_SQL_URL", "sqlite:///from_env.db")
    assert resolve_url("${BENCH_SQL_URL}", tmp_path) == f"sqlite:///{tmp_path / 'from_env.db'}"
    monkeypatch.delenv("BENCH_SQL_URL")
    with pytest.raises(ConfigError, match="BENCH_SQL_URL is not set"):
        resolve_url("${BENCH_SQL_URL}", tmp_path)
    with pytest.raises(ConfigError, match="not a SQLAlchemy URL"):
        resolve_url("not a url", tmp_path)


def test_resolve_url_never_quotes_an_unparseable_environment_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENCH_SQL_URL", "host=db password=hunter2")
    with pytest.raises(ConfigError) as info:
        resolve_url("${BENCH_SQL_URL}", tmp_path)
    assert "hunter2" not in str(info.value)
    assert str(info.value).startswith("sql.url (${BENCH_SQL_URL}): not a SQLAlchemy URL")


def test_sink_creates_relative_sqlite_file_under_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = SqlSink(SqlSettings(url="sqlite:///rel.db", aggregate="raw"), out)
    try:
        sink.write_batch([reading(1)], 1)
        assert sink.read_back()["rows"] == 1
    finally:
        sink.close()
    assert (out / "rel.db").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sink_creates_relative_sqlite_file_in_a_subfolder(tmp_path: Path) -> None:
    sink = SqlSink(SqlSettings(url="sqlite:///sub/x.db", aggregate="raw"), tmp_path)
    sink.close()
    assert (tmp_path / "sub" / "x.db").is_file()
