"""The store-and-forward shape's harness: generator -> filter -> outbox -> sender -> an upstream with faults.

For each strategy of the scenario's ``forward:`` section, on the same seeded stream:

1. start the fake upstream (simulators.forward_upstream, port 0) and the pipeline (pipeline.forward) with its
   SQLite outbox in the variant's folder;
2. feed the stream's payloads to the pipeline in process, each at its intended send time (open model; the stream
   does not travel over MQTT here: the shape under test starts at the filter, and an MQTT hop would only add a
   transport this shape does not exercise), while a timeline thread switches the upstream's faults on and off;
3. let the sender drain (``drain_timeout`` without progress), stop it, stop the upstream;
4. reconcile from what was *stored*, never from the sender's counters: delivered and duplicates from the
   upstream's store, filtered / dropped / still queued from the outbox file.

A lost seq is named by a fault when there is evidence: the upstream answered 500 to a request that held it (its
own log), or it was sent while the upstream was down (intended send time inside the outage, widened by
``DOWN_SLACK_S`` either side for the batch in flight when the listener closed and reopened). The naive strategy's
named losses are its expected failure (``expected_loss``) and do not fail the run; anything unexplained does,
and for the outbox strategy any loss, duplicate or reordering does.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import ScenarioError
from bench.harness.accounting import write_run_results
from bench.harness.ledger import Ledger
from bench.results import SCHEMA_VERSION, environment
from bench.scenario import LoadedScenario, apply_overrides
from bench.shapes.forward_settings import ForwardSettings, UpstreamFault
from pipeline.forward import ForwardConfig, ForwardPipeline, SenderStats
from pipeline.probes import Recorder
from simulators.anomalies import inject
from simulators.forward_upstream import Upstream, UpstreamLog
from simulators.stream import Message, planned_count, stream, total_duration_s

if TYPE_CHECKING:  # the runner imports this module lazily; importing it back at load time would be a cycle
    from bench.harness.runner import RunOptions, RunOutcome

START_LEAD_NS = 200_000_000
DOWN_SLACK_S = 1.0
"""Seconds either side of an outage within which a lost seq counts as in flight during it."""
# Anomalies whose payload cannot name its seq: the filter's rejects table could not be matched to the send.
_UNREADABLE = frozenset({"malformed_json", "invalid_utf8", "oversize", "duplicate_key"})


def _timeline(
    upstream: Upstream, faults: tuple[UpstreamFault, ...], epoch_ns: int
) -> list[tuple[int, Callable[[], None]]]:
    """(monotonic ns, action) pairs that switch each fault on at ``at`` and off after ``duration``."""
    events: list[tuple[int, Callable[[], None]]] = []
    for f in faults:
        start, end = epoch_ns + round(f.at * 1e9), epoch_ns + round((f.at + f.duration) * 1e9)
        if f.kind == "down":
            events += [(start, upstream.down), (end, upstream.up)]
        elif f.kind == "error":
            events += [(start, _setter(upstream, "error_fraction", f.fraction or 0.0))]
            events += [(end, _setter(upstream, "error_fraction", 0.0))]
        elif f.kind == "lost_ack":
            events += [(start, _setter(upstream, "lost_ack_fraction", f.fraction or 0.0))]
            events += [(end, _setter(upstream, "lost_ack_fraction", 0.0))]
        else:
            events += [(start, _setter(upstream, "delay_s", f.delay or 0.0))]
            events += [(end, _setter(upstream, "delay_s", 0.0))]
    return sorted(events, key=lambda e: e[0])


def _setter(upstream: Upstream, name: str, value: float) -> Callable[[], None]:
    return lambda: setattr(upstream, name, value)


def _play(events: list[tuple[int, Callable[[], None]]], stop: threading.Event) -> None:
    for at_ns, action in events:
        while (wait := at_ns - time.monotonic_ns()) > 0:
            if stop.wait(min(wait / 1e9, 0.05)):
                break
        action()  # also when stopped early: every fault is switched off again


def _read_outbox(path: Path) -> tuple[set[int], set[int], Counter[str], set[int]]:
    """(filtered seqs, dropped seqs, dropped by reason, seqs still in the outbox), read back from the file."""
    db = sqlite3.connect(path)
    try:
        filtered = {s for (s,) in db.execute("SELECT seq FROM rejected WHERE seq IS NOT NULL")}
        dropped_rows = db.execute("SELECT seq, reason FROM dropped").fetchall()
        queued = {s for (s,) in db.execute("SELECT seq FROM outbox")}
    finally:
        db.close()
    return filtered, {s for s, _ in dropped_rows}, Counter(r for _, r in dropped_rows), queued


def reconcile(
    strategy: str,
    *,
    sent: list[Message],
    log: UpstreamLog,
    outbox_file: Path,
    faults: tuple[UpstreamFault, ...],
    epoch_ns: int,
    stats: SenderStats,
) -> tuple[dict[str, Any], Ledger, Recorder]:
    """The variant's ``forward`` part, its generic ledger, and delivery latency (intended send -> stored)."""
    intended = {m.seq: m.intended_send_ns for m in sent}
    filtered, dropped, dropped_by_reason, queued = _read_outbox(outbox_file)
    stored = Counter(s.seq for s in log.stored)
    delivered = set(stored) & intended.keys()
    unexpected = len(set(stored) - intended.keys())
    duplicates = sum(1 for s, n in stored.items() if n > 1)
    latency = Recorder()
    first: set[int] = set()
    last_by_machine: dict[str, int] = {}
    out_of_order = 0
    for s in log.stored:
        if s.seq in intended and s.seq not in first:
            first.add(s.seq)
            latency.record_ns(s.at_ns - intended[s.seq])
        if s.seq < last_by_machine.get(s.machine, -1):
            out_of_order += 1
        last_by_machine[s.machine] = max(s.seq, last_by_machine.get(s.machine, -1))
    # A seq is counted once, in the first place that explains it: delivered, then filtered, dropped, queued.
    explained = delivered | filtered | dropped | queued
    missing = sorted(intended.keys() - explained)
    refused_500 = set(log.answered_500)
    outages = [
        (epoch_ns + round((f.at - DOWN_SLACK_S) * 1e9), epoch_ns + round((f.at + f.duration + DOWN_SLACK_S) * 1e9))
        for f in faults
        if f.kind == "down"
    ]
    by_fault: Counter[str] = Counter()
    unexplained: list[int] = []
    for seq in missing:
        if seq in refused_500:
            by_fault["error"] += 1
        elif any(lo <= intended[seq] <= hi for lo, hi in outages):
            by_fault["down"] += 1
        else:
            unexplained.append(seq)
    expected_loss = strategy == "naive"
    n_filtered = len(filtered - delivered)
    n_dropped = len(dropped - delivered - filtered)
    n_queued = len(queued - delivered - filtered - dropped)
    part = {
        "strategy": strategy,
        "sent": len(intended),
        "filtered": n_filtered,
        "dropped": n_dropped,
        "delivered": len(delivered),
        "duplicates": duplicates,
        "deduplicated": log.deduplicated,
        "in_outbox": n_queued,
        "lost": len(missing),
        "lost_by_fault": dict(sorted(by_fault.items())),
        "unexplained": len(unexplained),
        "expected_loss": expected_loss,
        "out_of_order": out_of_order,
        "requests": stats.requests,
        "retries": stats.retries,
        "failed_requests": dict(sorted(stats.failures.items())),
        "acks_lost": log.acks_lost,
        "lost_sample": missing[:20],
    }
    # The generic ledger: named losses of the baseline are set aside by name (like a fault the configuration
    # never promised to survive); what is still queued is named too. Everything else missing is lost.
    named = {f"deleted_before_ack:{k}": n for k, n in by_fault.items()} if expected_loss else {}
    reasons = dict(dropped_by_reason)
    if n_queued:
        reasons["still_in_outbox"] = n_queued
    reasons.update(named)
    lost = len(unexplained) if expected_loss else len(missing)
    ledger = Ledger(
        sent=len(intended),
        persisted=len(delivered),
        rejected=n_filtered,
        dropped=n_dropped + n_queued + sum(named.values()),
        lost=lost,
        duplicates=duplicates,
        unexpected=unexpected,
        missing_seq_sample=(unexplained if expected_loss else missing)[:20],
        dropped_by_reason=reasons,
    )
    return part, ledger, latency


def _problems(part: dict[str, Any]) -> list[str]:
    """What fails the run beyond the ledger, for the strategy that promises delivery: any loss (named or not) and
    any reordering. The baseline's reordering is expected (a timed-out batch still being stored while the next one
    is), like its named losses."""
    out: list[str] = []
    if part["expected_loss"]:
        return out
    if part["out_of_order"]:
        out.append(f"{part['out_of_order']} record(s) stored upstream out of per-machine order")
    if part["lost"]:
        out.append(f"{part['lost']} lost during faults {part['lost_by_fault']} by a strategy that promises none")
    return out


def _run_variant(
    strategy: str, settings: ForwardSettings, messages: list[Message], *, seed: int, folder: Path, epoch_ns: int
) -> tuple[SenderStats, UpstreamLog, Recorder]:
    folder.mkdir(parents=True, exist_ok=True)
    upstream = Upstream(seed=seed)
    upstream.start()
    config = ForwardConfig(
        upstream=upstream.url,
        db_path=folder / "outbox.sqlite",
        strategy="naive" if strategy == "naive" else "outbox",
        batch_size=settings.batch_size,
        max_rows=settings.max_rows,
        overflow=settings.overflow,
        timeout_s=settings.timeout,
        backoff_base_s=settings.backoff_base,
        backoff_cap_s=settings.backoff_cap,
        seed=seed,
    )
    pipeline = ForwardPipeline(config)
    stop = threading.Event()
    timeline = threading.Thread(
        target=_play, args=(_timeline(upstream, settings.faults, epoch_ns), stop), name="upstream-faults", daemon=True
    )
    send_lag = Recorder()
    try:
        pipeline.start()
        timeline.start()
        for m in messages:
            while (wait := m.intended_send_ns - time.monotonic_ns()) > 0:
                time.sleep(wait / 1e9)
            send_lag.record_ns(time.monotonic_ns() - m.intended_send_ns)
            pipeline.put(m.payload)
        # Every fault ends before the drain is judged: an outage past the stream's end is still an outage.
        timeline.join()
        pipeline.close(settings.drain_timeout)
    finally:
        stop.set()
        timeline.join()
        upstream.down()
    return pipeline.stats, upstream.log, send_lag


def run_forward(
    loaded: LoadedScenario,
    options: RunOptions,
    run_dir: Path,
    *,
    on_progress: Callable[..., None] | None = None,
) -> RunOutcome:
    """``bench run`` for a scenario with a ``forward:`` section: one variant per strategy, side by side."""
    from bench.harness.runner import RunOutcome, scenario_ref  # the runner imports this module lazily

    del on_progress  # a short run; the summary table is the report
    sc = loaded.scenario
    settings = sc.forward
    assert settings is not None
    if len(loaded.variants) > 1:
        raise ScenarioError(f"{loaded.path}: matrix: not used with forward:, list forward.strategies instead")
    bad = sorted({a.kind for a in sc.anomalies} & _UNREADABLE)
    if bad:
        raise ScenarioError(
            f"{loaded.path}: anomalies: {', '.join(bad)} hide the seq, which forward: needs to reconcile; "
            "expected kinds whose payload keeps its seq (nan, inf, null, out_of_range, ...)"
        )
    spec = apply_overrides(sc.stream_spec(), options.messages, options.duration_s)
    run_id = f"{sc.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    started_wall = time.time()
    env_before = environment()
    variants: list[dict[str, Any]] = []
    ledgers: dict[str, Ledger] = {}
    errors: dict[str, list[str]] = {}
    ts_epoch = time.time_ns()
    for strategy in settings.strategies:
        epoch = time.monotonic_ns() + START_LEAD_NS
        messages = list(inject(stream(spec, epoch, ts_epoch), [a.spec() for a in sc.anomalies], seed=sc.seed))
        sent = [m for m in messages if not m.copy]
        folder = run_dir / strategy
        stats, log, send_lag = _run_variant(strategy, settings, messages, seed=sc.seed, folder=folder, epoch_ns=epoch)
        part, ledger, latency = reconcile(
            strategy,
            sent=sent,
            log=log,
            outbox_file=folder / "outbox.sqlite",
            faults=settings.faults,
            epoch_ns=epoch,
            stats=stats,
        )
        ledgers[strategy] = ledger
        errors[strategy] = _problems(part)
        duration_s = total_duration_s(spec)
        last_ns = max((s.at_ns for s in log.stored), default=epoch)
        variants.append(
            {
                "name": strategy,
                "config": {
                    "pipeline": {"shape": "forward", "strategy": strategy, **settings.model_dump(mode="json")},
                    "stream": {
                        "planned": planned_count(spec),
                        "duration_s": duration_s,
                        "arrival": spec.arrival,
                        "machines": len(spec.machines),
                        "overrides": {"messages": options.messages, "duration_s": options.duration_s},
                    },
                },
                "ledger": ledger.to_json(),
                "throughput": {
                    "offered_per_s": round(planned_count(spec) / duration_s, 3) if duration_s else None,
                    "sent_per_s": round(len(sent) / duration_s, 3) if duration_s else None,
                    "persisted_per_s": round(
                        len(set(s.seq for s in log.stored)) / max((last_ns - epoch) / 1e9, 1e-9), 3
                    ),
                },
                "latency_ms": {"end_to_end": latency.summary(ladder=True), "send_lag": send_lag.summary()},
                "probes": {},
                "forward": part,
            }
        )
    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(started_wall)),
        "scenario": scenario_ref(loaded),
        "environment": {**env_before, "host_load_after": environment()["host_load"]},
        "variants": variants,
        "failures": [],
    }
    written = write_run_results(run_dir, results)
    return RunOutcome(run_dir, written, ledgers, errors)


def summary_lines(variants: Iterable[Any]) -> list[str]:
    """The store-and-forward ledger in words, one line per variant (the CLI prints it under the summary)."""
    lines = []
    for v in variants:
        f = v.forward
        if f is None:
            continue
        by_fault = ", ".join(f"{k} {n:,}" for k, n in f.lost_by_fault.items()) or "none"
        lines.append(
            f"{v.name}: delivered {f.delivered:,} of {f.sent:,} (filtered {f.filtered:,}, dropped {f.dropped:,}); "
            f"lost {f.lost:,} (by fault: {by_fault}; unexplained {f.unexplained:,})"
            + (" as this baseline is expected to" if f.expected_loss and f.lost else "")
            + f"; duplicates upstream {f.duplicates:,} ({f.deduplicated:,} repeats recognised by key); "
            f"left in outbox {f.in_outbox:,}; out of order {f.out_of_order:,}; retries {f.retries:,}"
        )
    return lines
