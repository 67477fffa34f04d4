"""SQL output through SQLAlchemy 2.x: per-minute aggregates or raw readings.

Strategies, chosen by name (:data:`SQL_STRATEGIES`):

``row``     one INSERT per transaction (the naive baseline: a commit per row)
``bulk``    one ``executemany`` INSERT in one transaction on a pooled engine
``upsert``  the same, as insert-or-update on (machine, ts): idempotent, so late
            data and replays update rows instead of failing or duplicating
``copy``    PostgreSQL COPY into a temporary table, then one upsert from it

``row`` and ``bulk`` are plain INSERTs: a second write of the same key fails on
the primary key, which is what they do in real pipelines too.

Every strategy is safe to retry: the buffer writes a failed batch again with the same batch id (naive: a few
times; crash_safe: until it is written), and the sink must then neither write a row twice nor lose one.

- The rows of a batch are built once: a retry reuses them, so an aggregated batch is folded into the
  :class:`~pipeline.aggregate.MinuteAggregator` once (folding it again would count its readings twice).
- ``row`` resumes after the last row whose commit returned, instead of inserting the batch again from its first
  row (which failed on the primary key with the rows it had committed itself, and gave the batch up: 2,714 of
  10,000 rows lost with PostgreSQL backends killed every 0.6 s).
- A commit interrupted by a lost connection may have gone through. Before writing again after such an error
  (anything but an integrity error, which is a definite refusal), ``row`` checks whether that one row is stored
  exactly as sent, and ``bulk`` whether its whole batch is (a transaction is all or nothing); if so it is not
  written again. A different row under the same key still fails on the primary key, as before.
- ``upsert`` and ``copy`` write the same values again: idempotent as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Double,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
    tuple_,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

from pipeline.aggregate import MinuteAggregator, MinuteRow
from pipeline.config import ALLOW_OUTSIDE, SqlSettings, redact_url, resolve_env, scrub, sqlite_path_problem
from pipeline.errors import ConfigError, SinkError
from pipeline.model import Reading
from pipeline.sinks import SinkTiming

SqlStrategy = Literal["row", "bulk", "upsert", "copy"]
Rows = list[dict[str, Any]]

STORED_CHECK_CHUNK = 500
"""Keys per SELECT when checking whether an interrupted commit went through (bounded statement size)."""


@dataclass
class SqlBatch:
    """One batch's rows, as built once, and how far writing them got; kept by the sink until it is written, so
    that a retry of the same batch id resumes instead of starting over."""

    batch_id: int
    rows: Rows
    committed: int = 0
    """``row``: how many rows, from the first, have been committed (a commit that returned)."""
    maybe_committed: bool = False
    """The last attempt failed in a way that may have committed what it was committing (a lost connection, not
    a refusal): the next attempt checks before writing it again."""


# Microsecond timestamps: MySQL/MariaDB DATETIME would otherwise drop the
# fraction and make distinct readings collide on the primary key.
TIMESTAMP = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# Binary, no-pad collation on MySQL/MariaDB: the default utf8mb4 collation
# ignores case and accents, and any PAD SPACE collation (utf8mb4_bin included)
# ignores trailing spaces, so "press-1", "Press-1" and "press-1 " would be one key.
_NOPAD_BIN = {True: "utf8mb4_nopad_bin", False: "utf8mb4_0900_bin"}  # keyed by is_mariadb


def _machine_type(collation: str | None) -> Any:
    if collation is None:
        return String(255)
    return String(255).with_variant(mysql.VARCHAR(255, charset="utf8mb4", collation=collation), "mysql", "mariadb")


def _table(name: str, aggregate: bool, collation: str | None = None) -> Table:
    meta = MetaData()
    key: list[Column[Any]] = [
        Column("machine", _machine_type(collation), primary_key=True),
        Column("ts", TIMESTAMP, primary_key=True),
    ]
    cols: list[Column[Any]]
    if aggregate:
        cols = [
            Column("count", BigInteger, nullable=False),
            Column("load_rate_mean", Double, nullable=False),
            Column("load_rate_min", Double, nullable=False),
            Column("load_rate_max", Double, nullable=False),
            Column("mileage_last", Double, nullable=False),
        ]
    else:
        cols = [
            # Double, not Float: MySQL/MariaDB FLOAT is 4 bytes and would round mileage.
            Column("load_rate", Double, nullable=False),
            Column("mileage", Double, nullable=False),
            Column("seq", BigInteger, nullable=False),
        ]
    return Table(name, meta, *key, *cols)


def resolve_url(url: str, output: Path, *, allow_outside_output: bool = False) -> str:
    """Expand ``${VAR}``; put a relative SQLite file under the output folder.

    A URL from the environment is checked like one from the file: its SQLite file stays inside the output
    folder unless ``allow_outside_output``. Errors never quote the URL (it may hold the password the
    environment is there to keep).
    """
    resolved = resolve_env(url, "sql.url") or url
    where = f"sql.url ({url})" if resolved != url else "sql.url"
    try:
        parsed = make_url(resolved)
    except ArgumentError:
        raise ConfigError(
            f"{where}: not a SQLAlchemy URL; expected e.g. postgresql+psycopg://user@host/db or sqlite:///file.db"
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        problem = sqlite_path_problem(resolved)
        if problem is not None and not allow_outside_output:
            raise ConfigError(
                f"{where}: expected a SQLite file inside the output folder, but {problem}; "
                f"set pipeline.sql.{ALLOW_OUTSIDE}: true to write there on purpose"
            )
        path = Path(parsed.database)
        if not path.is_absolute():
            path = output / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return parsed.set(database=str(path)).render_as_string(hide_password=False)
    return resolved


class SqlSink:
    """Write readings (raw or aggregated per machine and minute) with a chosen strategy."""

    name = "sql"

    def __init__(self, settings: SqlSettings, output: Path) -> None:
        self.settings = settings
        self.strategy = settings.strategy
        strategy = sql_strategy(settings.strategy)
        # Bound once: a flush calls the strategy's write without looking its name up.
        self._write = strategy.write
        self._aggregate = settings.aggregate == "per_machine_minute"
        self.table = _table(settings.table_name(), self._aggregate)
        self._aggregator = MinuteAggregator(int(settings.retention // 60)) if self._aggregate else None
        self.url = resolve_url(settings.url, output, allow_outside_output=settings.allow_outside_output)
        try:
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if not self.url.startswith("sqlite"):
                kwargs["pool_size"] = settings.pool_size
            self.engine: Engine = create_engine(self.url, **kwargs)
            self.dialect = self.engine.dialect.name
            if strategy.needs_postgresql and self.dialect != "postgresql":
                raise ConfigError(f"sql.strategy {self.strategy} needs PostgreSQL, got {self.dialect}")
            with self.engine.begin() as conn:
                if self.dialect in ("mysql", "mariadb"):
                    # is_mariadb is known only once connected.
                    collation = _NOPAD_BIN[bool(getattr(self.engine.dialect, "is_mariadb", False))]
                    self.table = _table(settings.table_name(), self._aggregate, collation)
                if settings.reset:
                    self.table.drop(conn, checkfirst=True)
                self.created = not self.engine.dialect.has_table(conn, self.table.name)
                self.table.create(conn, checkfirst=True)
        except SQLAlchemyError as exc:
            raise SinkError(f"cannot open SQL sink {self._safe_url()}: {self._scrubbed(exc)}") from None
        except ModuleNotFoundError as exc:
            raise SinkError(f"SQL driver missing for {self._safe_url()}: {exc}") from None
        except (TypeError, ValueError) as exc:
            # A query parameter the driver does not take (PyMySQL raises TypeError for it, unwrapped).
            raise SinkError(f"cannot open SQL sink {self._safe_url()}: {self._scrubbed(exc)}") from None
        self.rows_written = 0
        self._dbapi_error: type[Exception] = getattr(self.engine.dialect.loaded_dbapi, "Error", SQLAlchemyError)
        self._dbapi_integrity_error: type[Exception] = getattr(
            self.engine.dialect.loaded_dbapi, "IntegrityError", IntegrityError
        )
        self._unwritten: SqlBatch | None = None

    def _safe_url(self) -> str:
        # Not render_as_string(hide_password=True): that hides user:password@ only, not ?password=.
        return redact_url(self.url)

    def _scrubbed(self, exc: BaseException) -> str:
        """``exc`` in one line (class and first line of its message), without any secret of the URL."""
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
        return scrub(f"{exc.__class__.__name__}: {first_line}", self.url)

    def _ts(self, ns: int) -> datetime:
        moment = datetime.fromtimestamp(ns // 1000 / 1e6, tz=UTC).replace(microsecond=(ns // 1000) % 1_000_000)
        # PostgreSQL keeps the zone (timestamptz); the others store naive UTC.
        return moment if self.dialect == "postgresql" else moment.replace(tzinfo=None)

    def _rows(self, items: Sequence[Reading]) -> list[dict[str, Any]]:
        if self._aggregator is None:
            return [
                {
                    "machine": r.machine,
                    "ts": self._ts(r.ts_ns),
                    "load_rate": r.load_rate,
                    "mileage": r.mileage,
                    "seq": r.seq,
                }
                for r in items
            ]
        return [self._minute(m) for m in self._aggregator.add(items)]

    def _minute(self, m: MinuteRow) -> dict[str, Any]:
        return {
            "machine": m.machine,
            "ts": self._ts(m.minute_ns),
            "count": m.count,
            "load_rate_mean": m.load_rate_mean,
            "load_rate_min": m.load_rate_min,
            "load_rate_max": m.load_rate_max,
            "mileage_last": m.mileage_last,
        }

    def _upsert(self) -> Any:
        values = [c.name for c in self.table.columns if not c.primary_key]
        if self.dialect in ("postgresql", "sqlite"):
            ins = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(self.table)
            return ins.on_conflict_do_update(
                index_elements=["machine", "ts"], set_={c: ins.excluded[c] for c in values}
            )
        if self.dialect in ("mysql", "mariadb"):
            my = mysql.insert(self.table)
            return my.on_duplicate_key_update({c: my.inserted[c] for c in values})
        raise SinkError(f"upsert is not implemented for {self.dialect}")

    def write_batch(self, items: Sequence[Reading], batch_id: int) -> SinkTiming:
        start = time.perf_counter_ns()
        batch = self._unwritten
        if batch is None or batch.batch_id != batch_id:
            # A new batch (a batch the buffer gave up is replaced here, as the buffer moved on).
            batch = SqlBatch(batch_id, self._rows(items))
        build_ns = time.perf_counter_ns() - start
        if not batch.rows:
            return SinkTiming(build_ns, 0, 0)
        self._unwritten = batch
        try:
            write_ns, commit_ns = self._write(self, batch)
        except (SQLAlchemyError, self._dbapi_error) as exc:
            # An integrity error is the server's definite refusal; anything else (a lost connection above all)
            # may have struck after a commit went through.
            batch.maybe_committed = not isinstance(exc, (IntegrityError, self._dbapi_integrity_error))
            # The copy path talks to the driver directly, so driver errors arrive unwrapped.
            raise SinkError(f"SQL {self.strategy} into {self.table.name} failed: {self._scrubbed(exc)}") from None
        self._unwritten = None
        self.rows_written += len(batch.rows)
        return SinkTiming(build_ns, write_ns, commit_ns)

    def stored(self, conn: Connection, rows: Rows) -> bool:
        """Whether every row of ``rows`` is in the table exactly as given (same key, same values)."""
        c = self.table.c
        found: dict[tuple[Any, Any], dict[str, Any]] = {}
        for at in range(0, len(rows), STORED_CHECK_CHUNK):
            keys = [(r["machine"], r["ts"]) for r in rows[at : at + STORED_CHECK_CHUNK]]
            query = select(self.table).where(tuple_(c.machine, c.ts).in_(keys))
            for record in conn.execute(query).mappings():
                found[(record["machine"], record["ts"])] = dict(record)
        return all(found.get((r["machine"], r["ts"])) == r for r in rows)

    def read_back(self) -> dict[str, Any]:
        """Row count, and for aggregates the sum of counts: what the table holds now."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(self.table)).scalar_one()
            out: dict[str, Any] = {"table": self.table.name, "rows": rows, "created_by_run": self.created}
            if self._aggregate:
                total = conn.execute(select(func.coalesce(func.sum(self.table.c["count"]), 0))).scalar_one()
                out["sum_count"] = int(total)
                out["late_beyond_retention"] = self._aggregator.late_beyond_retention if self._aggregator else 0
        return out

    def close(self) -> None:
        self.engine.dispose()


def _in_one_transaction(sink: SqlSink, work: Callable[[Connection], object]) -> tuple[int, int]:
    """(write_ns, commit_ns) of ``work`` done in one transaction on a pooled connection."""
    with sink.engine.connect() as conn:
        start = time.perf_counter_ns()
        # Explicit begin: the copy path works on the driver connection
        # directly, and commit() must still commit what it did.
        conn.begin()
        work(conn)
        write_ns = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        conn.commit()
        return write_ns, time.perf_counter_ns() - start


def _write_row(sink: SqlSink, batch: SqlBatch) -> tuple[int, int]:
    """One INSERT and one commit per row: the naive baseline. A retry resumes after the last committed row."""
    write_ns = commit_ns = 0
    stmt = insert(sink.table)
    with sink.engine.connect() as conn:
        if batch.maybe_committed and batch.committed < len(batch.rows):
            # The row being committed when the connection went may be in: if it is, exactly as sent, it was ours.
            if sink.stored(conn, [batch.rows[batch.committed]]):
                batch.committed += 1
            conn.rollback()  # end the check's transaction: each row below is one of its own
            batch.maybe_committed = False
        for row in batch.rows[batch.committed :]:
            start = time.perf_counter_ns()
            conn.execute(stmt, row)
            mid = time.perf_counter_ns()
            conn.commit()
            batch.committed += 1
            write_ns += mid - start
            commit_ns += time.perf_counter_ns() - mid
    return write_ns, commit_ns


def _write_bulk(sink: SqlSink, batch: SqlBatch) -> tuple[int, int]:
    def work(conn: Connection) -> None:
        # All or nothing: an interrupted commit either stored the whole batch, or none of it.
        if batch.maybe_committed and sink.stored(conn, batch.rows):
            return
        conn.execute(insert(sink.table), batch.rows)

    return _in_one_transaction(sink, work)


def _write_upsert(sink: SqlSink, batch: SqlBatch) -> tuple[int, int]:
    return _in_one_transaction(sink, lambda conn: conn.execute(sink._upsert(), batch.rows))


def _write_copy(sink: SqlSink, batch: SqlBatch) -> tuple[int, int]:
    return _in_one_transaction(sink, lambda conn: _copy(conn, sink.table, batch.rows))


def _copy(conn: Connection, table: Table, rows: Rows) -> None:
    # One INSERT ... ON CONFLICT cannot touch a key twice; keep the last row
    # of each key, as a sequence of upserts would.
    rows = list({(r["machine"], r["ts"]): r for r in rows}.values())
    names = [c.name for c in table.columns]
    staging = f"_stage_{table.name}"
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur:
        cur.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{staging}" (LIKE "{table.name}" INCLUDING DEFAULTS) '
            "ON COMMIT DELETE ROWS"
        )
        cols = ", ".join(f'"{n}"' for n in names)
        with cur.copy(f'COPY "{staging}" ({cols}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row([row[n] for n in names])
        updates = ", ".join(f'"{n}" = EXCLUDED."{n}"' for n in names if n not in ("machine", "ts"))
        cur.execute(
            f'INSERT INTO "{table.name}" ({cols}) SELECT {cols} FROM "{staging}" '
            f"ON CONFLICT (machine, ts) DO UPDATE SET {updates}"
        )


@dataclass(frozen=True, slots=True)
class SqlWriteStrategy:
    """How a batch of rows reaches the table: ``write(sink, batch)`` returns (write_ns, commit_ns).

    Called again with the same :class:`SqlBatch` when the buffer retries it: it must resume, not repeat."""

    write: Callable[[SqlSink, SqlBatch], tuple[int, int]]
    needs_postgresql: bool = False


SQL_STRATEGIES: dict[SqlStrategy, SqlWriteStrategy] = {
    "row": SqlWriteStrategy(_write_row),
    "bulk": SqlWriteStrategy(_write_bulk),
    "upsert": SqlWriteStrategy(_write_upsert),
    "copy": SqlWriteStrategy(_write_copy, needs_postgresql=True),
}
"""Every write strategy by name; ``pipeline.sql.strategy`` accepts exactly these keys."""


def sql_strategy(name: str) -> SqlWriteStrategy:
    """The write strategy called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    if name not in SQL_STRATEGIES:
        raise ConfigError(f"sql.strategy: expected one of {', '.join(SQL_STRATEGIES)}, got {name!r}")
    return SQL_STRATEGIES[name]
