"""The notify-and-recompute shape: its strategies agree with the oracle, its measurements measure what they say."""

from __future__ import annotations

import http.client
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.cli import main as bench_main
from bench.errors import ScenarioError
from bench.harness import runner
from bench.scenario import load_scenario
from bench.shapes.recompute import PollLog, compare, cost_curve, staleness
from pipeline.recompute import (
    NS_PER_HOUR,
    PING,
    Change,
    Notifier,
    NotifyReceiver,
    NotifySender,
    RawStore,
    Reading,
    RecomputeCost,
    Recomputer,
    SeriesApi,
    connect,
    open_store,
    oracle,
    parse_reading,
    read_raw,
)

ROOT = Path(__file__).resolve().parent.parent
S = 1_000_000_000


def _derived(conn: sqlite3.Connection) -> list[tuple[str, int, int, float, float]]:
    return conn.execute(
        "SELECT machine, ts_ns, seq, value, energy FROM derived ORDER BY machine, ts_ns, seq"
    ).fetchall()


def _oracle_rows(conn: sqlite3.Connection) -> list[tuple[str, int, int, float, float]]:
    truth = oracle(r for r, _ in read_raw(conn))
    return [(p.machine, p.ts_ns, p.seq, p.value, p.energy) for pts in truth.values() for p in pts]


def _batches(seed: int) -> list[list[Reading]]:
    """Readings of three machines in commit batches; about one in five is late (behind its machine's newest)."""
    rng = random.Random(seed)
    batches: list[list[Reading]] = []
    seq = 0
    for b in range(30):
        batch = []
        for _ in range(12):
            machine = f"m{seq % 3}"
            ts = (b * 12 + seq % 12) * S // 10
            if rng.random() < 0.2:
                ts -= rng.randrange(1, 40) * S // 10  # late: up to 4 s behind
            batch.append(Reading(machine, seq, ts, round(rng.uniform(0, 100), 3)))
            seq += 1
        batches.append(batch)
    return batches


@pytest.mark.parametrize("strategy", ["full", "incremental"])
def test_each_strategy_after_each_commit_equals_the_oracle(tmp_path: Path, strategy: str) -> None:
    store = RawStore(open_store(tmp_path / "s.sqlite"))
    rec = Recomputer(connect(tmp_path / "s.sqlite"), strategy)  # type: ignore[arg-type]
    for batch in _batches(seed=3):
        earliest, through = store.add(batch)
        rec.run(Change(earliest, through))
        # Same terms added in the same order as the oracle: equal, not merely close.
        assert _derived(rec.conn) == _oracle_rows(store.conn)
        # The running count the API serves as ``points`` stays the true count.
        assert rec.conn.execute("SELECT points FROM meta").fetchone()[0] == len(_derived(rec.conn))
    assert rec.conn.execute("SELECT version, raw_through FROM meta").fetchone() == (30, store.ingest)


def test_coalesced_notifications_and_a_rerun_give_the_same_series(tmp_path: Path) -> None:
    store = RawStore(open_store(tmp_path / "s.sqlite"))
    rec = Recomputer(connect(tmp_path / "s.sqlite"), "incremental")
    notifier = Notifier(coalesce=True)
    for i, batch in enumerate(_batches(seed=5)):
        notifier.notify(Change(*store.add(batch)))
        if i % 7 == 6:  # several commits while "a recompute runs": served by one
            change = notifier.take(0)
            assert change is not None
            rec.run(change)
            before = _derived(rec.conn)
            rec.run(change)  # idempotent: serving it twice changes nothing
            assert _derived(rec.conn) == before
    change = notifier.take(0)
    assert change is not None
    rec.run(change)
    assert _derived(rec.conn) == _oracle_rows(store.conn)
    assert notifier.received == 30 and notifier.merged == 30 - 5


def test_notifier_merges_earliest_per_machine_or_queues_each() -> None:
    single = Notifier(coalesce=True)
    for change in (Change({"a": 50, "b": 9}, 3), Change({"a": 20}, 7), Change({"c": 1}, 5)):
        single.notify(change)
    assert single.take(0) == Change({"a": 20, "b": 9, "c": 1}, 7)
    assert single.take(0) is None and single.merged == 2
    pings = Notifier(coalesce=False)
    pings.notify(Change({}, 1))
    pings.notify(Change({}, 2))
    assert [pings.take(0), pings.take(0), pings.take(0)] == [Change({}, 1), Change({}, 2), None]


def _over_the_wire(coalesce: bool, changes: list[Change]) -> tuple[Notifier, NotifyReceiver]:
    """Send ``changes`` over a real loopback connection while nobody takes them (a recompute "runs"), then wait
    until the receiver has read them all (counts, not a sleep: it holds whatever the machine's load)."""
    notifier = Notifier(coalesce)
    receiver = NotifyReceiver(notifier)
    thread = threading.Thread(target=receiver.serve, daemon=True)
    thread.start()
    sender = NotifySender(receiver.address)
    for change in changes:
        sender.send(change)
    deadline = time.monotonic() + 60
    while notifier.received < len(changes) and time.monotonic() < deadline:
        time.sleep(0.01)
    sender.close()
    thread.join(60)
    assert notifier.closed and sender.bytes == receiver.bytes
    return notifier, receiver


def test_notifications_cross_a_tcp_socket_and_coalesce_on_the_receiving_side() -> None:
    # Naive: a bare ping is one byte, no content; five of them while a recompute runs merge into one (single flight).
    pings, wire = _over_the_wire(True, [Change({}, 0)] * 5)
    assert wire.bytes == 5 * len(PING) == 5
    assert (pings.received, pings.merged) == (5, 4)
    assert pings.take(0) == Change({}, 0) and pings.take(0) is None  # closed and empty: at once, no wait
    # Improved: the earliest changed time per machine and the ingest number through, merged the same way.
    changes = [Change({"a": 50, "b": 9}, 3), Change({"a": 20}, 7), Change({"c": 1}, 5)]
    merged, wire = _over_the_wire(True, changes)
    assert merged.take(0) == Change({"a": 20, "b": 9, "c": 1}, 7) and merged.merged == 2
    assert wire.bytes > 3 * len(PING)
    # Without coalescing each one is served on its own, in the order sent.
    queued, _ = _over_the_wire(False, changes)
    assert [queued.take(0) for _ in range(4)] == [*changes, None] and queued.merged == 0


def test_incremental_rewrites_only_from_the_earliest_change(tmp_path: Path) -> None:
    """The cost measure: full rewrites the whole series, incremental the points at or after the change."""
    store = RawStore(open_store(tmp_path / "s.sqlite"))
    full = Recomputer(connect(tmp_path / "s.sqlite"), "full")
    inc = Recomputer(connect(tmp_path / "s.sqlite"), "incremental")
    store.add([Reading("m", i, i * S, 10.0) for i in range(1000)])
    inc.run(Change({"m": 0}, store.ingest))
    # One late reading 5 points before the newest: 6 points follow from it (itself and the 5 after).
    change = Change(*store.add([Reading("m", 1000, 994 * S + S // 2, 10.0)]))
    assert change.earliest == {"m": 994 * S + S // 2}
    assert inc.run(change).rows_written == 6
    assert full.run(change).rows_written == 1001
    # 1000 s at load 10 with a step of 1 s: 999 s * 10 / 3600 s/h, exact in the oracle and the store alike.
    assert _derived(inc.conn)[-1][4] == pytest.approx(999 * S * 10.0 / NS_PER_HOUR, rel=1e-12)


def test_a_corrected_reading_that_moves_is_recomputed_from_its_old_time(tmp_path: Path) -> None:
    store = RawStore(open_store(tmp_path / "s.sqlite"))
    rec = Recomputer(connect(tmp_path / "s.sqlite"), "incremental")
    rec.run(Change(*store.add([Reading("m", i, i * S, float(i)) for i in range(10)])))
    change = Change(*store.add([Reading("m", 3, 8 * S + S // 2, 99.0)]))  # seq 3 corrected: moved and new value
    assert change.earliest == {"m": 3 * S}
    rec.run(change)
    assert _derived(rec.conn) == _oracle_rows(store.conn)
    assert len(_derived(rec.conn)) == 10


def test_api_serves_versions_with_etags(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    store = RawStore(open_store(db))
    rec = Recomputer(connect(db), "incremental")
    rec.run(Change(*store.add([Reading("m1", 1, S, 5.0), Reading("m2", 2, 2 * S, 6.0)])))
    api = SeriesApi(db)
    api.start()
    try:
        host, port = api.server.server_address[:2]
        conn = http.client.HTTPConnection(str(host), port, timeout=30)

        def get(path: str, etag: str | None = None) -> tuple[int, str | None, bytes]:
            conn.request("GET", path, headers={"If-None-Match": etag} if etag else {})
            r = conn.getresponse()
            return r.status, r.getheader("ETag"), r.read()

        status, etag, body = get("/status")
        assert (status, etag, json.loads(body)) == (
            200,
            '"v1"',
            {"version": 1, "raw_through": 2, "seq_through": 2, "points": 2},
        )
        assert get("/status", etag)[:2] == (304, '"v1"')  # same keep-alive connection, nothing new
        status, _, body = get("/series?machine=m2")
        assert json.loads(body)["series"] == {"m2": [[2 * S, 2, 6.0, 0.0]]}
        rec.run(Change(*store.add([Reading("m1", 3, 3 * S, 7.0)])))
        status, etag, body = get("/series", etag)
        data = json.loads(body)
        assert (status, etag, data["version"]) == (200, '"v2"', 2)
        assert compare(data["series"], oracle(r for r, _ in read_raw(store.conn)))["equal"]
        assert get("/nothing")[0] == 404
        conn.close()
    finally:
        api.stop()


def test_parse_reading_takes_the_instant_the_timestamp_says() -> None:
    r = parse_reading(b'{"machine":"m","ts":"2026-01-01T00:00:01.000002+01:00","load_rate":1.5,"seq":4}')
    assert r == Reading("m", 4, (1_767_225_600 - 3600 + 1) * S + 2000, 1.5)


def test_staleness_is_the_first_covering_answer_minus_the_intended_send() -> None:
    log = PollLog()
    for received, through in ((100, 0), (150, 2), (170, 2), (230, 5)):
        log.add(received, through)
    assert log.through == [0, 2, 5]  # an unchanged raw_through is not a new answer
    rec, never = staleness({10: 1, 11: 2, 12: 5, 13: 6}, {10: 90, 11: 140, 12: 130, 13: 200}, log)
    assert never == [13]
    assert rec.count == 3
    assert rec.percentile_ns(0) == pytest.approx(10, abs=1) and rec.percentile_ns(100) == pytest.approx(100, abs=1)


def test_cost_curve_bins_by_series_length_and_fits_the_slope() -> None:
    costs = [RecomputeCost(n, n, n * 2000, 0, 0) for n in range(0, 10_000, 100)]  # 2 us per point
    curve, slope = cost_curve(costs, bins=5)
    assert [p["recomputes"] for p in curve] == [20] * 5
    assert curve[0]["cpu_ms"] == pytest.approx(0.95 * 2, rel=1e-9)
    assert slope == pytest.approx(2.0, rel=1e-9)  # ms per 1,000 points


SMALL = """
name: recompute-small
seed: 3
machines: {count: 4, id: "m-{i}"}
phases: [{kind: steady, rate: 200, duration: 2s}]
anomalies: [{kind: out_of_order, rate: 0.1, by: 1s}]
recompute: {gather_interval: 50ms, poll_interval: 20ms, curve_bins: 4}
"""


def test_bench_run_measures_both_strategies_against_the_oracle(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    outcome = runner.run(load_scenario(write_scenario(SMALL)), runner.RunOptions(out=tmp_path / "run"))
    assert outcome.ok, outcome.problems()
    naive, improved = outcome.results.variants
    assert (naive.name, improved.name) == ("naive", "improved")
    for v in (naive, improved):
        rc = v.recompute
        assert rc is not None and v.ledger.sent == 400 and v.ledger.persisted == 400 and v.ledger.lost == 0
        assert rc.oracle.equal and rc.oracle.points == 400 == rc.oracle.api_points
        assert rc.staleness_ms.count == 400 and rc.unreflected == 0
        assert rc.late_readings > 0
        # Every staleness is at least zero: the reading cannot be reflected before it was sent.
        assert rc.staleness_ms.below_zero is None
    assert naive.recompute is not None and improved.recompute is not None
    assert naive.recompute.coalesced == 0 and naive.recompute.recomputes == naive.recompute.notifications
    # Naive's notifications are bare pings: one byte each on the wire.
    assert naive.recompute.notification_bytes == naive.recompute.notifications
    for rc in (naive.recompute, improved.recompute):
        readers = rc.readers  # the default readers: locust HttpUsers in a subprocess
        assert readers is not None and readers.users == 4 and readers.failures == 0
        assert readers.requests == readers.latency_ms.count > 0
        assert set(readers.by_request) == {"/series?machine", "/status"}
    # Full rewrites the whole series on each of its recomputes; incremental only what followed a change. Counts,
    # not times: at 20 commits of 20 readings, full writes 20+40+...+400 = 4,200 rows, incremental at most 400 +
    # the late readings' followers (a 1 s lag at 50 readings/s per machine: about 50 each).
    assert naive.recompute.rows_written_total is not None and improved.recompute.rows_written_total is not None
    assert naive.recompute.rows_written_total > 2 * improved.recompute.rows_written_total
    assert (tmp_path / "run" / "naive" / "series.sqlite").exists()


def test_shipped_scenario_validates_and_bad_sections_are_refused(
    write_scenario: Callable[..., Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    loaded = load_scenario(ROOT / "scenarios" / "recompute.yaml")
    assert loaded.scenario.recompute is not None
    assert [v.name for v in loaded.scenario.recompute.variants] == ["naive", "full-coalesced", "improved"]
    assert loaded.scenario.recompute.readers.users > 0
    dup = SMALL.replace(
        "curve_bins: 4}",
        "variants: [{name: a, recompute: full, coalesce: false}, {name: a, recompute: full, coalesce: true}]}",
    )
    with pytest.raises(ScenarioError, match="names must be unique"):
        load_scenario(write_scenario(dup, "dup.yaml"))
    with pytest.raises(ScenarioError, match="poll_interval"):
        load_scenario(write_scenario(SMALL.replace("poll_interval: 20ms", "poll_interval: 0s"), "zero.yaml"))
    nan = write_scenario(SMALL.replace("out_of_order, rate: 0.1, by: 1s", "nan, rate: 0.1"), "nan.yaml")
    assert bench_main(["run", str(nan), "--out", str(tmp_path / "nan")]) == 2
    assert "late readings only" in capsys.readouterr().err


def test_the_pipeline_runs_on_its_own(tmp_path: Path) -> None:
    """``python -m pipeline.recompute``: readings on stdin, the series on its API (a process of its own)."""
    lines = [
        json.dumps({"machine": "m", "ts": f"2026-01-01T00:00:0{i}Z", "load_rate": 36.0, "seq": i}) for i in range(5)
    ]
    lines.insert(2, "not json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.recompute", "--db", str(tmp_path / "s.sqlite")],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stderr is not None
        url = proc.stderr.readline().split()[1].removesuffix("/series")
        proc.stdin.write("\n".join(lines) + "\n")
        proc.stdin.close()
        assert "1 line(s) were not readings" in proc.stderr.readline()  # printed once everything is reflected
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=30)
        conn.request("GET", "/series?machine=m")
        body = json.loads(conn.getresponse().read())
        conn.close()
        # 36 %·s per second of the 4 s after the first reading: 4 * 36 / 3600 load-%·hours.
        assert body["points"] == 5 and body["series"]["m"][-1][3] == pytest.approx(0.04, rel=1e-12)
    finally:
        proc.kill()  # it serves until interrupted; this test's own child, by its handle
        proc.wait(30)


def test_api_is_quiet_about_a_reader_that_hangs_up_but_not_about_faults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "s.sqlite"
    open_store(db).close()
    api = SeriesApi(db)
    try:
        for exc in (BrokenPipeError(32, "Broken pipe"), RuntimeError("a real fault")):
            try:
                raise exc
            except (BrokenPipeError, RuntimeError):
                api.server.handle_error(None, ("127.0.0.1", 1))
    finally:
        api.server.server_close()
    err = capsys.readouterr().err
    assert "Broken pipe" not in err and "a real fault" in err
