"""Store-and-forward shape: the filter, the bounded outbox, the sender against a real upstream HTTP server
(loopback, port 0), the ledger's reconciliation, and a short `bench run` of naive beside outbox.

Determinism: faults are switched by what the upstream has seen (its request log), not by wall-clock timing,
except in the end-to-end run, whose assertions hold whatever the timing (see its comment)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.errors import ScenarioError
from bench.harness import runner
from bench.harness.ledger import Ledger
from bench.harness.progress import Progress
from bench.scenario import load_scenario
from bench.shapes.forward import _UNREADABLE, FILTER_REFUSES, FeedLog, reconcile
from bench.shapes.forward_settings import ForwardSettings, UpstreamFault
from pipeline.forward import ForwardConfig, ForwardPipeline, Outbox, SenderStats, check_reading
from pipeline.probes import Recorder
from simulators.anomalies import KINDS, AnomalySpec, inject
from simulators.forward_upstream import Stored, Upstream, UpstreamLog
from simulators.stream import Message, PhaseSpec, StreamSpec, stream

WAIT_S = 30.0  # generous: a busy shared machine must not fail a test by being slow


def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _payload(seq: int, machine: str = "m-1", load: object = 1.5) -> bytes:
    body = {"machine": machine, "ts": "2026-01-01T00:00:00Z", "load_rate": load, "mileage": 3.0, "seq": seq}
    return json.dumps(body).encode()


def test_filter_rejects_non_finite_and_unreadable() -> None:
    assert check_reading(_payload(1))[2] is None
    assert check_reading(_payload(2, load=float("nan"))) == (None, 2, "load_rate_not_finite")
    assert check_reading(_payload(3, load="7")) == (None, 3, "load_rate_not_a_number")
    assert check_reading(b"{not json") == (None, None, "malformed_json")


@pytest.mark.parametrize(
    ("policy", "kept", "dropped"), [("drop_newest", [0, 1, 2], [3, 4]), ("drop_oldest", [2, 3, 4], [0, 1])]
)
def test_outbox_overflow_policy_names_every_drop(
    tmp_path: Path, policy: str, kept: list[int], dropped: list[int]
) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=3, overflow=policy)  # type: ignore[arg-type]
    for seq in range(5):
        box.put("m", seq, {"seq": seq})
    assert [r[2] for r in box.head(10)] == kept
    box.close()
    db = sqlite3.connect(tmp_path / "o.sqlite")
    rows = db.execute("SELECT seq, reason FROM dropped ORDER BY seq").fetchall()
    db.close()
    assert rows == [(s, f"outbox_full_{policy}") for s in dropped]


def test_outbox_retries_after_lost_acks_without_duplicating(tmp_path: Path) -> None:
    upstream = Upstream(seed=1)
    upstream.start()
    upstream.lost_ack_fraction = 1.0  # every request stored, no answer
    pipe = ForwardPipeline(
        ForwardConfig(upstream.url, tmp_path / "o.sqlite", "outbox", batch_size=5, backoff_cap_s=0.05)
    )
    try:
        pipe.start()
        for seq in range(10):
            pipe.put(_payload(seq, machine=f"m-{seq % 2}"))
        _until(lambda: upstream.log.acks_lost >= 3, "a few lost acknowledgements")
        upstream.lost_ack_fraction = 0.0
        pipe.close(drain_s=WAIT_S)
    finally:
        upstream.down()
    seqs = [s.seq for s in upstream.log.stored]
    assert sorted(seqs) == list(range(10))  # each stored exactly once
    assert upstream.log.deduplicated >= 1  # the retry of a stored batch was recognised by its keys
    assert pipe.outbox.rows == 0
    assert pipe.stats.retries >= 1


def test_naive_loses_what_it_sent_while_the_upstream_was_down(tmp_path: Path) -> None:
    upstream = Upstream(seed=1)
    upstream.start()
    upstream.down()
    pipe = ForwardPipeline(ForwardConfig(upstream.url, tmp_path / "o.sqlite", "naive", batch_size=5))
    pipe.start()
    for seq in range(10):
        pipe.put(_payload(seq))
    _until(lambda: pipe.outbox.rows == 0, "the naive sender to empty its storage")
    _until(lambda: pipe.stats.failures.get("refused", 0) >= 2, "both batches refused")
    upstream.up()
    pipe.close(drain_s=1)
    upstream.down()
    assert upstream.log.stored == []  # deleted before anyone accepted it: gone


def _messages(n: int) -> list[Message]:
    return [Message(seq=i, machine=f"m-{i % 2}", intended_send_ns=i * 1_000_000_000, payload=b"") for i in range(n)]


def test_reconcile_counts_each_seq_once_and_names_losses_by_fault(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=1, overflow="drop_newest")
    box.reject(1, "load_rate_not_finite", b"x")
    box.put("m-0", 2, {})  # still queued
    box.put("m-1", 3, {})  # dropped: full
    box.close()
    log = UpstreamLog(
        stored=[
            Stored(0, "m-0", None, 5),
            Stored(0, "m-0", None, 6),
            Stored(6, "m-0", None, 7),
            Stored(4, "m-0", None, 8),
        ],
        answered_500=[5],
    )
    # Seq i is sent at i s. Seq 5 was in a request answered 500; 7..10 were sent inside the outage (8 s to 9 s,
    # widened by DOWN_SLACK_S = 1 s either side to 7 s..10 s).
    down = (UpstreamFault(kind="down", at=8, duration=1),)

    def check(strategy: str) -> tuple[dict[str, Any], Ledger, Recorder]:
        return reconcile(
            strategy,
            sent=_messages(11),
            log=log,
            outbox_file=tmp_path / "o.sqlite",
            faults=down,
            epoch_ns=0,
            stats=SenderStats(),
        )

    part, ledger, latency = check("naive")
    assert (part["delivered"], part["filtered"], part["in_outbox"], part["dropped"]) == (3, 1, 1, 1)
    assert part["duplicates"] == 1 and part["out_of_order"] == 1  # seq 0 twice; m-0 stored 6 then 4
    assert part["lost_by_fault"] == {"down": 4, "error": 1}  # 7, 8, 9, 10 within 7..10 s; 5 by the 500 log
    assert part["unexplained"] == 0 and part["lost"] == 5
    assert ledger.sent == ledger.persisted + ledger.rejected + ledger.dropped + ledger.lost
    assert latency.count == 3  # first storage of each delivered seq only
    # The same read-back under the strategy that promises delivery: every loss counts.
    part, ledger, _ = check("outbox")
    assert ledger.lost == 5 and not ledger.reconciled


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="expected a fraction"):
        UpstreamFault(kind="error", at=1, duration=1)
    with pytest.raises(ValueError, match="each at most once"):
        ForwardSettings(strategies=("naive", "naive"))


SCENARIO = """
name: fwd
seed: 3
machines: {count: 4, id: "m-{i}"}
phases: [{kind: steady, rate: 100, duration: 3s}]
anomalies: [{kind: nan, rate: 0.05}]
forward:
  batch_size: 10
  timeout: 500ms
  backoff_cap: 200ms
  drain_timeout: 10s
  faults:
    - {kind: down, at: 0.5s, duration: 1.5s}
    - {kind: lost_ack, at: 2s, duration: 1s, fraction: 0.5}
"""


def test_bench_run_naive_loses_during_the_outage_outbox_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "fwd.yaml"
    path.write_text(SCENARIO)
    seen: list[Progress] = []
    outcome = runner.run(load_scenario(path), runner.RunOptions(out=tmp_path / "run"), on_progress=seen.append)
    by_name = {v.name: v for v in outcome.results.variants}
    naive, retry, outbox = by_name["naive"].forward, by_name["retry"].forward, by_name["outbox"].forward
    assert naive is not None and retry is not None and outbox is not None
    # Progress through the runner's callback, for each variant in turn, while it sends.
    assert next(p.variant for p in seen if p.phase == "forward") == "naive"
    assert {p.variant for p in seen} == {"naive", "retry", "outbox"} and max(p.sent for p in seen) > 1
    # Timing-independent: the outbox strategy deletes only acknowledged rows and re-sends with keys, so whatever
    # the scheduling it ends with everything delivered once (the drain waits 10 s without progress).
    assert (outbox.lost, outbox.duplicates, outbox.in_outbox, outbox.out_of_order) == (0, 0, 0, 0)
    assert outbox.delivered + outbox.filtered == outbox.sent and outbox.filtered > 0
    # The listener is closed for 1.5 s while 150 readings arrive; the naive sender polls every 20 ms, so it loses
    # some unless its thread got no CPU for the whole outage, which would also be the bench failing to measure.
    assert naive.lost > 0 and naive.lost_by_fault.get("down", 0) > 0 and naive.unexplained == 0
    assert naive.expected_loss and not outbox.expected_loss
    # retry loses nothing either; its duplicates (if the lost_ack fault hit a request) are all named by the fault.
    assert (retry.lost, retry.in_outbox, retry.out_of_order, retry.unexplained_duplicates) == (0, 0, 0, 0)
    assert retry.duplicates == sum(retry.duplicates_by_fault.values()) and retry.deduplicated == 0
    assert outcome.ok, outcome.problems()  # named, expected losses of the baseline do not fail the run
    assert json.loads((tmp_path / "run" / "results.json").read_text())["variants"][2]["forward"]["lost"] == 0


def test_unreadable_anomalies_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "fwd.yaml"
    path.write_text(SCENARIO.replace("kind: nan", "kind: malformed_json"))
    with pytest.raises(ScenarioError, match="malformed_json hide the seq"):
        runner.run(load_scenario(path), runner.RunOptions(out=tmp_path / "run"))


def test_retry_without_keys_duplicates_after_lost_acks(tmp_path: Path) -> None:
    upstream = Upstream(seed=1)
    upstream.start()
    upstream.lost_ack_fraction = 1.0  # every request stored, no answer
    pipe = ForwardPipeline(
        ForwardConfig(upstream.url, tmp_path / "o.sqlite", "retry", batch_size=5, backoff_cap_s=0.05)
    )
    try:
        pipe.start()
        for seq in range(10):
            pipe.put(_payload(seq, machine=f"m-{seq % 2}"))
        _until(lambda: upstream.log.acks_lost >= 3, "a few lost acknowledgements")
        upstream.lost_ack_fraction = 0.0
        pipe.close(drain_s=WAIT_S)
    finally:
        upstream.down()
    seqs = [s.seq for s in upstream.log.stored]
    assert set(seqs) == set(range(10)) and pipe.outbox.rows == 0  # nothing lost: deleted after the 2xx only
    # Three requests stored without an answer, each re-sent with no key to recognise it by: stored again.
    assert len(seqs) > 10 and upstream.log.deduplicated == 0
    assert all(s.key is None for s in upstream.log.stored)


@pytest.mark.parametrize("kind", sorted(set(KINDS) - _UNREADABLE))
def test_truth_labels_judged_as_refused_are_what_the_built_in_filter_refuses(kind: str) -> None:
    # External pipelines are judged by truth label (FILTER_REFUSES); the labels must say what a filter of this
    # shape refuses, which the built-in one decides from the payload.
    spec = StreamSpec(seed=2, machines=("m-0", "m-1"), phases=(PhaseSpec("steady", 20.0, 5.0),))
    hit = [m for m in inject(stream(spec, 0), [AnomalySpec(kind, rate=0.5)], seed=2) if m.truth == kind]
    if not hit:
        pytest.skip(f"{kind}: no reading of this stream qualifies (it needs a clock change in its window)")
    refused = {check_reading(m.payload)[2] is not None for m in hit}
    assert refused == {kind in FILTER_REFUSES}


def test_settings_name_external_pipelines_and_kills_clearly() -> None:
    ext = {"name": "outbox", "command": "{python} -m pipeline.forward --upstream {upstream_url} --db {dir}/o"}
    with pytest.raises(ValueError, match="'outbox' is used twice"):
        ForwardSettings.model_validate({"strategies": ["naive", "outbox"], "external": [ext]})
    with pytest.raises(ValueError, match=r"forward\.external lists none"):
        ForwardSettings.model_validate({"faults": [{"kind": "kill", "at": 1, "restart_after": 1}]})
    with pytest.raises(ValueError, match="expected restart_after"):
        UpstreamFault.model_validate({"kind": "kill", "at": 1})
    with pytest.raises(ValueError, match="expected a duration"):
        UpstreamFault.model_validate({"kind": "down", "at": 1})
    with pytest.raises(ValueError, match="unknown placeholder"):
        ForwardSettings.model_validate({"external": [{"name": "x", "command": "run {upstream}"}]})
    ok = ForwardSettings.model_validate(
        {"strategies": [], "external": [ext], "faults": [{"kind": "kill", "at": "7s", "restart_after": "1s"}]}
    )
    assert ok.faults[0].end == 8.0


def test_scenario_error_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "fwd.yaml"
    path.write_text(SCENARIO.replace("  batch_size: 10", "  strategies: [naive, retry, naive]\n  batch_size: 10"))
    with pytest.raises(ScenarioError, match=r"fwd\.yaml.*forward.*each at most once"):
        load_scenario(path)


def test_reconcile_names_duplicates_by_evidence_and_kill_losses(tmp_path: Path) -> None:
    # An external pipeline (no outbox file): seq 1 stored twice in a request whose ack was withheld, seq 2 twice
    # across a kill (before it at 4 s, after the restart at 6 s), seq 3 twice for no reason the bench can name.
    # Seq 4 (a NaN) should be refused; seq 5 was handed over 0.5 s before the kill and never delivered.
    sent = [
        Message(seq=i, machine="m-0", intended_send_ns=i * 10**9, payload=b"", truth="nan" if i == 4 else "valid")
        for i in range(6)
    ]
    log = UpstreamLog(
        stored=[
            Stored(0, "m-0", None, 1),
            Stored(1, "m-0", None, 2),
            Stored(1, "m-0", None, 3),
            Stored(2, "m-0", None, 3 * 10**9),
            Stored(3, "m-0", None, 4),
            Stored(3, "m-0", None, 5),
            Stored(2, "m-0", None, 7 * 10**9),
        ],
        lost_ack_seqs=[1],
    )
    feed = FeedLog(kills=[(4 * 10**9, 6 * 10**9)], handed_ns={5: 35 * 10**8})
    part, ledger, _ = reconcile(
        "external", sent=sent, log=log, outbox_file=None, faults=(), epoch_ns=0, stats=None, baseline=False, feed=feed
    )
    assert part["duplicates_by_fault"] == {"kill": 1, "lost_ack": 1} and part["unexplained_duplicates"] == 1
    assert part["lost_by_fault"] == {"kill": 1} and part["filtered"] == 1 and part["in_outbox"] is None
    assert ledger.duplicates == 3 and ledger.lost == 1 and ledger.not_persisted_by_truth == {"nan": 1}
    assert ledger.sent == ledger.persisted + ledger.dropped + ledger.lost + (ledger.not_persisted_expected or 0)
    # The same as a baseline: named duplicates and losses are set aside, the unexplained duplicate still counts.
    part, ledger, _ = reconcile(
        "external", sent=sent, log=log, outbox_file=None, faults=(), epoch_ns=0, stats=None, baseline=True, feed=feed
    )
    assert ledger.duplicates == 1 and ledger.lost == 0 and ledger.dropped_by_reason == {"deleted_before_ack:kill": 1}
