"""A database outage against a pipeline the user brings: the bench gives it its database's URL as {sql_url}
through a proxy it can cut, reads the output back from the database itself, and reports per fault what was
lost, duplicated and how long the system took to be back.

The pipeline under test is tests/data/ext_db_pipeline.py, one insert per message into a table of its own
(unique per test, dropped afterwards) in the loopback PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bench.errors import ScenarioError
from bench.harness import runner
from bench.harness.external_sut import ExternalPipeline
from bench.scenario import ExternalSystem, load_scenario
from pipeline.clock import MonotonicWallClock
from tests.conftest import require_service

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PIPELINE = Path(__file__).parent / "data" / "ext_db_pipeline.py"

SCENARIO = """
name: ext-db-outage
seed: 5
machines: {count: 4}
transport: {kind: mqtt, mqtt: {qos: 1}}
system:
  kind: external
  external:
    command: ["{python}", PIPELINE, "{broker_url}", "{topic}", "{sql_url}", TABLE, --on-error, ON_ERROR]
    database: PG_URL
    ready: {log: "subscribed", timeout: 30s}
    output: {format: sql, url: "{sql_url}", table: TABLE, columns: {durable_at: stored_at}}
phases:
  - {kind: steady, rate: 100, duration: 4s}
faults:
  - {kind: db_outage, at: 1s, duration: 2s, mode: down}
run: {drain_timeout: 3s}
"""


@pytest.fixture
def table() -> Iterator[str]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"ext_db_{uuid.uuid4().hex[:12]}"
    yield name
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    engine.dispose()


def _run(write_scenario: Callable[[str], Path], tmp_path: Path, table: str, on_error: str) -> runner.RunOutcome:
    text = (
        SCENARIO.replace("PIPELINE", str(PIPELINE))
        .replace("PG_URL", PG_URL)
        .replace("TABLE", table)
        .replace("ON_ERROR", on_error)
    )
    return runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "run", calibrate=False))


def _rows(table: str) -> int:
    engine = sa.create_engine(PG_URL)
    with engine.connect() as conn:
        count = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
    engine.dispose()
    return int(count)


def test_a_pipeline_that_retries_its_inserts_loses_nothing_in_a_database_outage(
    write_scenario: Callable[[str], Path], tmp_path: Path, table: str
) -> None:
    outcome = _run(write_scenario, tmp_path, table, "retry")
    led = outcome.ledger
    assert outcome.ok, outcome.problems()
    assert led.sent == 400 and led.persisted == 400 and led.lost == 0 and led.duplicates == 0
    assert _rows(table) == 400, "read back from the database itself"
    v = outcome.results.variants[0]
    (event,) = v.fault_events or []
    assert event.kind == "db_outage" and event.detail == "mode down" and event.error is None
    assert event.lost == 0 and event.duplicated == 0 and event.expected_loss is False
    # Back once new rows show after the outage ended: never before the 2 s it lasted.
    assert event.duration_s is not None and event.duration_s >= 2
    assert event.recovered_s is not None and event.recovered_s >= event.duration_s
    log = (outcome.run_dir / "system.log").read_text()
    assert "retrying" in log, "its inserts failed: the outage reached it through the proxy"


def test_a_pipeline_that_drops_on_error_shows_its_losses_in_the_outage(
    write_scenario: Callable[[str], Path], tmp_path: Path, table: str
) -> None:
    """The bench cannot know what a user's pipeline promised: every loss in the fault's window is lost."""
    outcome = _run(write_scenario, tmp_path, table, "drop")
    led = outcome.ledger
    assert not outcome.ok
    assert led.lost > 0 and led.persisted + led.lost == led.sent == 400
    assert _rows(table) == led.persisted
    (event,) = outcome.results.variants[0].fault_events or []
    assert event.kind == "db_outage" and event.error is None and event.expected_loss is False
    assert event.lost == led.lost, "every loss falls in the outage's window"
    assert event.recovered_s is not None
    assert "dropped seq" in (outcome.run_dir / "system.log").read_text()


def test_the_system_is_given_the_proxy_and_the_bench_reads_the_database(tmp_path: Path) -> None:
    """{sql_url}, {sql_host}, {sql_port} point the system at the proxy; the read-back, with the same {sql_url}
    in output.url, goes to the database itself (else it would suffer the outage too). No service needed: an
    attached system is not started, and nothing connects before the first poll."""
    spec = ExternalSystem.model_validate(
        {
            "attach": True,
            "database": PG_URL,
            "output": {"format": "sql", "url": "{sql_url}", "table": "t"},
        }
    )
    proxied = "postgresql+psycopg://postgres@127.0.0.1:40001/test"
    system = ExternalPipeline(spec, tmp_path, tmp_path, MonotonicWallClock(), sql_url=proxied)
    system.start([])
    try:
        assert system.values["sql_url"] == proxied
        assert (system.values["sql_host"], system.values["sql_port"]) == ("127.0.0.1", "40001")
        assert system.watcher is not None and system.watcher.pattern == PG_URL
        assert system.direct_values["sql_port"] == "5432"
    finally:
        system.stop()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("    database: PG_URL\n", ""), "stands for database, which is not set"),
        (lambda t: t.replace('"{sql_url}", TABLE, --on', "pg, TABLE, --on"), "without {sql_url}"),
        (lambda t: t.replace("database: PG_URL", "database: 'sqlite:///x.db'"), "SQLite"),
        (lambda t: t.replace("database: PG_URL", "database: 'postgresql://u:secret@db/x'"), "no password"),
    ],
    ids=["no-database", "not-given-to-it", "sqlite", "password"],
)
def test_a_database_outage_that_cannot_reach_the_system_is_refused(
    write_scenario: Callable[[str], Path], edit: Callable[[str], str], message: str
) -> None:
    text = edit(SCENARIO).replace("PIPELINE", "p.py").replace("PG_URL", PG_URL).replace("TABLE", "t")
    with pytest.raises(ScenarioError, match=message) as caught:
        load_scenario(write_scenario(text.replace("ON_ERROR", "retry")))
    assert "secret" not in str(caught.value), "a credential is never quoted back"
