"""Retrying a SQL batch (pipeline/sql_sink.py) stores every row exactly once, whatever the strategy.

The buffer writes a failed batch again under the same batch id. The ``row`` strategy used to insert it again
from its first row: the rows it had committed itself failed on the primary key (UniqueViolation) and the batch
was given up (2,714 of 10,000 rows lost with PostgreSQL backends killed every 0.6 s).

Two kinds of failure, against real databases (SQLite in tmp_path; PostgreSQL and MariaDB on loopback, skipped
when unreachable, failed when BENCH_REQUIRE_SERVICES=1):

- the sink's own connections killed from a second connection while it writes (``pg_terminate_backend`` on its
  application_name; MariaDB ``KILL`` of the thread ids its pool checked out), retried as crash_safe does
  (:func:`pipeline.buffer.write_until_written`);
- deterministic: a commit that goes through on the server while the client sees a lost connection (the
  window a kill can hit), and a statement refused by a lost connection before its commit, made with
  SQLAlchemy's ``commit`` and ``before_cursor_execute`` events on the sink's engine.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline.buffer import SinkStall, write_until_written
from pipeline.clock import MonotonicWallClock
from pipeline.config import SqlSettings
from pipeline.errors import SinkError
from pipeline.model import Reading
from pipeline.sql_sink import SqlSink
from tests.conftest import require_service
from tests.test_sql_sink import (
    ALL,
    PG_URL,
    SERVICES,
    Db,
    agg_tuples,
    as_tuples,
    at,
    params,
    raw_tuple,
    reading,
)


def lost_connection(what: str) -> sa.exc.OperationalError:
    return sa.exc.OperationalError(what, None, ConnectionError(f"server closed the connection unexpectedly ({what})"))


class CommitThenLoseTheConnection:
    """At the ``nth`` commit of the engine: commit on the server, then fail as a dropped connection does."""

    def __init__(self, engine: sa.Engine, nth: int, *, commit: bool = True) -> None:
        self.nth, self.commit, self.count = nth, commit, 0
        sa.event.listen(engine, "commit", self)

    def __call__(self, conn: sa.Connection) -> None:
        self.count += 1
        if self.count == self.nth:
            if self.commit:
                dbapi = conn.connection.dbapi_connection
                assert dbapi is not None
                dbapi.commit()
            # Gone, as a lost connection is: closed (the server rolls back what is not committed), never reused.
            conn.invalidate()
            raise lost_connection("COMMIT")


class LoseTheConnectionAtStatement:
    """At the ``nth`` INSERT of the engine, before it reaches the server: fail as a dropped connection does."""

    def __init__(self, engine: sa.Engine, nth: int) -> None:
        self.nth, self.count = nth, 0
        sa.event.listen(engine, "before_cursor_execute", self)

    def __call__(self, conn: sa.Connection, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            self.count += 1
            if self.count == self.nth:
                conn.invalidate()
                raise lost_connection("INSERT")


# --- deterministic: the outcome of a commit the client never heard back from ------------------------------------


@pytest.mark.parametrize("backend", params([(b,) for b in ALL]))
def test_row_resumes_after_a_commit_that_went_through(make_db: Callable[[str], Db], backend: str) -> None:
    db = make_db(backend)
    sink = db.sink("row")
    rows = [reading(i) for i in range(6)]
    CommitThenLoseTheConnection(sink.engine, nth=3)  # rows 0-2 are in; the client saw the third commit fail
    with pytest.raises(SinkError, match="OperationalError"):
        sink.write_batch(rows, 1)
    assert len(db.rows(sink)) == 3
    sink.write_batch(rows, 1)  # the retry: neither row 0 nor row 2 again
    assert as_tuples(db.rows(sink)) == [raw_tuple(db, r) for r in rows]
    assert sink.rows_written == 6


@pytest.mark.parametrize("backend", params([(b,) for b in ALL]))
def test_row_resumes_after_a_statement_that_never_arrived(make_db: Callable[[str], Db], backend: str) -> None:
    db = make_db(backend)
    sink = db.sink("row")
    rows = [reading(i) for i in range(6)]
    LoseTheConnectionAtStatement(sink.engine, nth=4)  # rows 0-2 are in; row 3 never reached the server
    with pytest.raises(SinkError, match="OperationalError"):
        sink.write_batch(rows, 1)
    sink.write_batch(rows, 1)
    assert as_tuples(db.rows(sink)) == [raw_tuple(db, r) for r in rows]


@pytest.mark.parametrize(("backend", "strategy"), params([(b, s) for b in ALL for s in ("bulk", "upsert")]))
def test_a_batch_whose_commit_went_through_is_not_written_again(
    make_db: Callable[[str], Db], backend: str, strategy: str
) -> None:
    db = make_db(backend)
    sink = db.sink(strategy)
    rows = [reading(i, f"m-{i % 2}") for i in range(8)]
    CommitThenLoseTheConnection(sink.engine, nth=1)
    with pytest.raises(SinkError, match="OperationalError"):
        sink.write_batch(rows, 1)
    sink.write_batch(rows, 1)  # bulk: would fail on the primary key with its own rows
    assert sorted(as_tuples(db.rows(sink))) == sorted(raw_tuple(db, r) for r in rows)
    sink.write_batch([reading(8)], 2)  # the next batch is written as usual
    assert len(db.rows(sink)) == 9


@pytest.mark.parametrize("backend", params([(b,) for b in ALL]))
def test_bulk_writes_a_batch_whose_commit_failed(make_db: Callable[[str], Db], backend: str) -> None:
    db = make_db(backend)
    sink = db.sink("bulk")
    rows = [reading(i) for i in range(5)]
    CommitThenLoseTheConnection(sink.engine, nth=1, commit=False)  # rolled back: nothing is in
    with pytest.raises(SinkError):
        sink.write_batch(rows, 1)
    assert db.rows(sink) == []
    sink.write_batch(rows, 1)
    assert as_tuples(db.rows(sink)) == [raw_tuple(db, r) for r in rows]


@pytest.mark.parametrize(("backend", "strategy"), params([(b, "upsert") for b in ALL] + [("postgresql", "copy")]))
def test_a_retried_aggregated_batch_is_counted_once(make_db: Callable[[str], Db], backend: str, strategy: str) -> None:
    db = make_db(backend)
    sink = db.sink(strategy, aggregate="per_machine_minute")
    batch = [at(0, 1, "m1", 1.0, 10.0), at(0, 2, "m1", 3.0, 20.0)]
    CommitThenLoseTheConnection(sink.engine, nth=1, commit=False)
    with pytest.raises(SinkError):
        sink.write_batch(batch, 1)
    sink.write_batch(batch, 1)  # folding the batch into the aggregator again would make it count 4
    ((_, _, count, mean, low, high, last),) = agg_tuples(db.rows(sink))
    assert (count, mean, low, high, last) == (2, 2.0, 1.0, 3.0, 20.0)


@pytest.mark.parametrize("backend", params([(b,) for b in ALL]))
def test_a_genuine_duplicate_still_fails_on_every_retry(make_db: Callable[[str], Db], backend: str) -> None:
    db = make_db(backend)
    sink = db.sink("row")
    sink.write_batch([reading(1)], 1)
    batch = [reading(0), reading(1, bump=5.0), reading(2)]  # a different row under an existing key
    for _ in range(2):
        with pytest.raises(SinkError, match="IntegrityError"):
            sink.write_batch(batch, 2)
    assert sorted(as_tuples(db.rows(sink))) == sorted(raw_tuple(db, r) for r in (reading(0), reading(1)))


# --- for real: the sink's connections killed while it writes --------------------------------------------------


class Killer:
    """Kills the sink's server connections from a second connection, every ``every_s``, until stopped."""

    def __init__(self, backend: str, sink: SqlSink, app: str, every_s: float) -> None:
        self.backend, self.app, self.every_s = backend, app, every_s
        self.kills = 0
        self._threads: set[int] = set()
        if backend == "mariadb":
            # MariaDB has no application name: the thread ids of the connections the sink's pool hands out.
            sa.event.listen(sink.engine, "checkout", lambda dbapi, record, proxy: self._threads.add(dbapi.thread_id()))
        url = PG_URL if backend == "postgresql" else SERVICES["mariadb"][2]
        self._admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._admin.dispose()

    def _run(self) -> None:
        with self._admin.connect() as conn:
            while not self._stop.wait(self.every_s):
                if self.backend == "postgresql":
                    self.kills += conn.execute(
                        sa.text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :a"
                        ),
                        {"a": self.app},
                    ).scalar_one()
                    continue
                live = {row[0] for row in conn.execute(sa.text("SELECT ID FROM information_schema.PROCESSLIST"))}
                for thread_id in sorted(self._threads & live):
                    try:
                        conn.execute(sa.text(f"KILL {int(thread_id)}"))
                        self.kills += 1
                    except sa.exc.DBAPIError:
                        pass  # gone meanwhile


KILLED = [("postgresql", s) for s in ("row", "bulk", "upsert", "copy")] + [
    ("mariadb", s) for s in ("row", "bulk", "upsert")
]


@pytest.mark.parametrize(("backend", "strategy"), params(KILLED))
def test_connections_killed_while_writing_lose_and_duplicate_nothing(
    make_db: Callable[[str], Db], tmp_path: Path, backend: str, strategy: str
) -> None:
    name, port, url = SERVICES[backend]
    require_service(name, "127.0.0.1", port)
    db = make_db(backend)  # drops the table afterwards
    app = f"sql_retry_{uuid.uuid4().hex[:8]}"
    if backend == "postgresql":
        url = f"{url}?application_name={app}"
    sink = SqlSink(SqlSettings(url=url, strategy=strategy, aggregate="raw", table=db.table), tmp_path / "out")
    db.sinks.append(sink)
    size = 50 if strategy == "row" else 20
    stall = SinkStall("sql", lambda: 0)
    clock = MonotonicWallClock()
    readings: list[Reading] = []
    # New batches until three writes were cut by a kill (retried until written, as crash_safe does); bounded.
    with Killer(backend, sink, app, every_s=0.1) as killer:
        for batch_id in range(1, 2001):
            batch = [reading(i, f"m-{i % 3}") for i in range(len(readings), len(readings) + size)]
            stats, error = write_until_written([sink], batch, batch_id, "size", clock, stall=stall)
            assert error is None and stats is not None
            readings.extend(batch)
            if stall.failures >= 3:
                break
    assert stall.failures >= 3 and killer.kills >= 3
    stored = as_tuples(db.rows(sink))
    assert len(stored) == len(readings)
    assert sorted(stored) == sorted(raw_tuple(db, r) for r in readings)
    assert sink.rows_written == len(readings)
