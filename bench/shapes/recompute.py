"""The notify-and-recompute shape under test: each strategy replays the same stream, measured three ways.

- **staleness**: a reader thread polls ``GET /status`` every ``poll_interval`` (conditional, with the last ETag)
  and logs when each new ``raw_through`` arrived; a reading's staleness is the first such answer covering its
  ingest number minus its intended send time (open model: a slow pipeline cannot hide behind a slow sender).
- **recompute cost**: the worker's CPU time per recompute against the series length then, binned into a curve,
  with a least-squares slope.
- **correctness**: after the drain, ``GET /series`` must equal :func:`pipeline.recompute.oracle` of the raw
  readings read back from the store (floating point only).

The ledger is the usual one: sent = persisted (distinct (machine, seq) read back from the raw store) + rejected +
lost.
"""

from __future__ import annotations

import bisect
import http.client
import json
import math
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.errors import ScenarioError
from bench.harness.accounting import write_run_results
from bench.harness.ledger import Ledger
from bench.harness.progress import Progress
from bench.harness.runner import RunOptions, RunOutcome, scenario_ref
from bench.results import SCHEMA_VERSION, environment
from bench.results.metrics import slope_fit
from bench.scenario import LoadedScenario, apply_overrides
from bench.shapes.recompute_settings import RecomputeSettings, RecomputeVariant
from pipeline.probes import Recorder
from pipeline.recompute import Point, RecomputeConfig, RecomputeCost, RecomputePipeline, connect, oracle, read_raw
from simulators.anomalies import inject
from simulators.stream import Message, planned_count, stream, total_duration_s

LATE_KINDS = frozenset({"out_of_order", "late"})
START_LEAD_NS = 200_000_000
"""The first send is this far after the pipeline and the reader started."""
TS_EPOCH_NS = 1_767_225_600 * 10**9
"""Payload timestamps start at 2026-01-01T00:00:00Z in every run, so payloads are the same bytes each time."""
REL_TOLERANCE = 1e-9


@dataclass
class PollLog:
    """What the reader saw: each new ``raw_through`` with the time its answer arrived (monotonic ns)."""

    received_ns: list[int] = field(default_factory=list)
    through: list[int] = field(default_factory=list)
    requests: int = 0
    not_modified: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, received_ns: int, through: int) -> None:
        # raw_through never goes back (the store takes the maximum); a list kept sorted is what bisect needs.
        if not self.through or through > self.through[-1]:
            self.received_ns.append(received_ns)
            self.through.append(through)

    def first_covering(self, ingest: int) -> int | None:
        """When the first answer whose raw_through covers ``ingest`` arrived, or None if none did."""
        i = bisect.bisect_left(self.through, ingest)
        return self.received_ns[i] if i < len(self.through) else None

    @property
    def last(self) -> int:
        return self.through[-1] if self.through else 0


class Reader:
    """Polls ``GET /status`` on a fixed schedule over one keep-alive connection."""

    def __init__(self, url: str, interval_s: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.interval_ns = round(interval_s * 1e9)
        self.log = PollLog()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="recompute-reader", daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        etag: str | None = None
        next_at = time.monotonic_ns()
        try:
            while not self.stop.is_set():
                try:
                    conn.request("GET", "/status", headers={"If-None-Match": etag} if etag else {})
                    response = conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.log.errors.append(f"GET /status: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                    if len(self.log.errors) > 100:
                        return
                else:
                    received = time.monotonic_ns()
                    self.log.requests += 1
                    if response.status == 304:
                        self.log.not_modified += 1
                    elif response.status == 200:
                        etag = response.getheader("ETag")
                        self.log.add(received, json.loads(data)["raw_through"])
                    else:
                        self.log.errors.append(f"GET /status: HTTP {response.status}")
                # A fixed schedule (not sleep-after-answer): a slow answer does not thin out the polls after it.
                next_at += self.interval_ns
                delay = next_at - time.monotonic_ns()
                if delay > 0:
                    self.stop.wait(delay / 1e9)
                else:
                    next_at = time.monotonic_ns()
        finally:
            conn.close()


def get_series(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=120)
    try:
        conn.request("GET", "/series")
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET /series: HTTP {response.status}")
        body: dict[str, Any] = json.loads(data)
        return body
    finally:
        conn.close()


def compare(api_series: dict[str, list[list[Any]]], truth: dict[str, list[Point]]) -> dict[str, Any]:
    """The ``oracle`` part: API points against the oracle's, matched by (machine, ts, seq)."""
    served = {(m, int(t), int(s)): (float(v), float(e)) for m, pts in api_series.items() for t, s, v, e in pts}
    expected = {(p.machine, p.ts_ns, p.seq): (p.value, p.energy) for pts in truth.values() for p in pts}
    mismatches = len(served.keys() ^ expected.keys())
    worst = 0.0
    for key in served.keys() & expected.keys():
        (v1, e1), (v2, e2) = served[key], expected[key]
        worst = max(worst, abs(e1 - e2))
        if v1 != v2 or not math.isclose(e1, e2, rel_tol=REL_TOLERANCE, abs_tol=1e-12):
            mismatches += 1
    return {
        "points": len(expected),
        "api_points": len(served),
        "mismatches": mismatches,
        "max_abs_error": worst,
        "equal": mismatches == 0,
    }


def staleness(ingest_of: dict[int, int], intended_ns: dict[int, int], log: PollLog) -> tuple[Recorder, list[int]]:
    """Per seq: the first covering answer's arrival minus the intended send time; the seqs never covered."""
    rec = Recorder()
    never: list[int] = []
    for seq, ingest in ingest_of.items():
        seen = log.first_covering(ingest)
        if seen is None:
            never.append(seq)
        else:
            rec.record_ns(seen - intended_ns[seq])
    return rec, sorted(never)


def cost_curve(costs: Sequence[RecomputeCost], bins: int) -> tuple[list[dict[str, Any]], float | None]:
    """Recompute cost by bins of series length (equal widths up to the longest), and the slope per 1k points."""
    if not costs:
        return [], None
    top = max(c.series_len for c in costs) or 1
    grouped: dict[int, list[RecomputeCost]] = {}
    for c in costs:
        grouped.setdefault(min(bins - 1, c.series_len * bins // (top + 1)), []).append(c)
    curve = [
        {
            "series_len": statistics.fmean(c.series_len for c in group),
            "recomputes": len(group),
            "cpu_ms": statistics.fmean(c.cpu_ns for c in group) / 1e6,
            "rows_written": statistics.fmean(c.rows_written for c in group),
        }
        for _, group in sorted(grouped.items())
    ]
    fit = slope_fit([float(c.series_len) for c in costs], [c.cpu_ns / 1e6 for c in costs])
    return curve, None if fit is None else fit.slope * 1000


def _messages(loaded: LoadedScenario, options: RunOptions) -> tuple[list[Message], int, float]:
    sc = loaded.scenario
    bad = [a.kind for a in sc.anomalies if a.kind not in LATE_KINDS]
    if bad:
        raise ScenarioError(
            f"{loaded.path}: anomalies: a recompute scenario takes late readings only "
            f"({', '.join(sorted(LATE_KINDS))}), got {', '.join(bad)}"
        )
    if sc.matrix:
        raise ScenarioError(f"{loaded.path}: matrix: a recompute scenario names its strategies in recompute.variants")
    spec = apply_overrides(sc.stream_spec(), options.messages, options.duration_s)
    messages = list(inject(stream(spec, 0, TS_EPOCH_NS), [a.spec() for a in sc.anomalies], seed=sc.seed, start_ns=0))
    return messages, planned_count(spec), total_duration_s(spec)


@dataclass
class _VariantOutcome:
    result: dict[str, Any]
    ledger: Ledger
    errors: list[str]


def _run_variant(
    variant: RecomputeVariant,
    *,
    settings: RecomputeSettings,
    messages: list[Message],
    planned: int,
    duration_s: float,
    folder: Path,
    position: tuple[int, int],
    on_progress: Callable[[Progress], None] | None,
) -> _VariantOutcome:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "series.sqlite"
    config = RecomputeConfig(variant.recompute, variant.coalesce, settings.gather_interval)
    pipe = RecomputePipeline(db, config)
    pipe.start()
    reader = Reader(pipe.url, settings.poll_interval)
    reader.thread.start()
    errors: list[str] = []
    lag = Recorder()
    intended: dict[int, int] = {}
    epoch = time.monotonic_ns() + START_LEAD_NS
    next_progress = epoch
    try:
        for sent, m in enumerate(messages, 1):
            due = epoch + m.intended_send_ns
            delay = due - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            pipe.submit(m.payload)
            now = time.monotonic_ns()
            lag.record_ns(now - due)
            intended[m.seq] = due
            if on_progress is not None and now >= next_progress:
                next_progress = now + 250_000_000
                on_progress(
                    _progress(
                        variant.name,
                        position=position,
                        planned=planned,
                        sent=sent,
                        pipe=pipe,
                        elapsed_ns=now - epoch,
                        lag_ns=now - due,
                    )
                )
        last_sent = time.monotonic_ns()
        if not pipe.drain(settings.drain_timeout):
            errors.append(
                f"the series did not reflect every reading within drain_timeout {settings.drain_timeout:g} s"
                + (f": {pipe.failure}" if pipe.failure else "")
            )
        # The reader must see the final answer too, or the last readings' staleness would be missing.
        deadline = time.monotonic() + settings.drain_timeout
        while reader.log.last < pipe.published_through() and time.monotonic() < deadline:
            time.sleep(settings.poll_interval)
        api = get_series(pipe.url)
    finally:
        reader.stop.set()
        reader.thread.join(30)
        pipe.stop()
    if pipe.failure is not None:
        errors.append(f"pipeline failed: {type(pipe.failure).__name__}: {pipe.failure}")
    errors += reader.log.errors[:5]

    conn = connect(db, read_only=True)
    try:
        raw = read_raw(conn)
    finally:
        conn.close()
    ingest_of = {r.seq: ingest for r, ingest in raw}
    truth = oracle(r for r, _ in raw)
    checked = compare(api["series"], truth)
    if not checked["equal"]:
        errors.append(f"the API's series differs from the oracle at {checked['mismatches']} point(s)")
    stale, never = staleness(ingest_of, intended, reader.log)
    if never:
        errors.append(f"{len(never)} reading(s) never reflected by an API answer; seqs include {never[:10]}")

    sent_seqs = set(intended)
    persisted = len(sent_seqs & ingest_of.keys())
    rejected = pipe.stats.rejected
    missing = sorted(sent_seqs - ingest_of.keys())
    ledger = Ledger(
        sent=len(sent_seqs),
        persisted=persisted,
        rejected=rejected,
        dropped=0,
        lost=len(sent_seqs) - persisted - rejected,
        duplicates=0,  # (machine, seq) is the raw table's key: a reading cannot be stored twice
        unexpected=len(ingest_of.keys() - sent_seqs),
        missing_seq_sample=missing[:20],
    )
    costs = pipe.stats.costs
    cpu = Recorder()
    cpu.record_all_ns(c.cpu_ns for c in costs)
    curve, slope = cost_curve(costs, settings.curve_bins)
    # Raw durability: a reading is durable when the gather commit holding it returned.
    e2e = Recorder()
    commit_through = [t for t, _ in pipe.stats.commits]
    for seq, ingest in ingest_of.items():
        i = bisect.bisect_left(commit_through, ingest)
        if i < len(commit_through) and seq in intended:
            e2e.record_ns(pipe.stats.commits[i][1] - intended[seq])
    last_commit = pipe.stats.commits[-1][1] if pipe.stats.commits else last_sent
    recompute = {
        "recompute": variant.recompute,
        "coalesce": variant.coalesce,
        "gather_interval_ms": settings.gather_interval * 1000,
        "poll_interval_ms": settings.poll_interval * 1000,
        "late_readings": sum(1 for m in messages if m.truth in LATE_KINDS),
        "staleness_ms": stale.summary(ladder=True),
        "unreflected": len(never),
        "notifications": pipe.notifier.received,
        "recomputes": len(costs),
        "coalesced": pipe.notifier.merged,
        "recompute_cpu_ms": cpu.summary(),
        "cpu_ms_total": sum(c.cpu_ns for c in costs) / 1e6,
        "rows_written_total": sum(c.rows_written for c in costs),
        "cost_curve": curve,
        "cost_slope_ms_per_1k": slope,
        "api_requests": reader.log.requests,
        "api_not_modified": reader.log.not_modified,
        "final_version": api["version"],
        "oracle": checked,
    }
    result = {
        "name": variant.name,
        "config": {
            "pipeline": {
                "shape": "recompute",
                "recompute": variant.recompute,
                "coalesce": variant.coalesce,
                "gather_interval_s": settings.gather_interval,
                "store": "sqlite",
                "api": "http.server.ThreadingHTTPServer",
            },
            "transport": {"kind": "memory"},
            "stream": {
                "planned": planned,
                "duration_s": duration_s,
                "arrival": "uniform",
                "machines": len({m.machine for m in messages}),
                "overrides": {},
            },
        },
        "ledger": ledger.to_json(),
        "throughput": {
            "offered_per_s": planned / duration_s if duration_s > 0 else None,
            "sent_per_s": len(messages) / max((last_sent - epoch) / 1e9, 1e-9),
            "persisted_per_s": persisted / max((last_commit - epoch) / 1e9, 1e-9),
        },
        "latency_ms": {"end_to_end": e2e.summary(ladder=True), "send_lag": lag.summary()},
        "probes": {},
        "recompute": recompute,
    }
    return _VariantOutcome(result, ledger, errors)


def _progress(
    name: str,
    *,
    position: tuple[int, int],
    planned: int,
    sent: int,
    pipe: RecomputePipeline,
    elapsed_ns: int,
    lag_ns: int,
) -> Progress:
    committed = pipe.committed_through()
    return Progress(
        variant=name,
        variant_index=position[0],
        variants=position[1],
        elapsed_s=elapsed_ns / 1e9,
        planned=planned,
        sent=sent,
        received=committed,
        persisted=committed,
        rejected=pipe.stats.rejected,
        # The mean over the run so far; below a second it would mostly say how early the first send was.
        send_rate=sent / (elapsed_ns / 1e9) if elapsed_ns >= 1_000_000_000 else 0.0,
        lag_s=max(0.0, lag_ns / 1e9),
        backlog=max(0, sent - committed),  # handed over, not yet committed to the raw store
        phase="recompute",
    )


def run_recompute(
    loaded: LoadedScenario,
    options: RunOptions,
    run_dir: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    """Every strategy of the scenario's ``recompute`` section on the same stream, side by side."""
    sc = loaded.scenario
    settings = sc.recompute
    assert settings is not None
    messages, planned, duration_s = _messages(loaded, options)
    run_id = f"{sc.name}-{uuid.uuid4().hex[:8]}"
    started = time.time()
    env_before = environment()
    variants: list[dict[str, Any]] = []
    ledgers: dict[str, Ledger] = {}
    errors: dict[str, list[str]] = {}
    for index, variant in enumerate(settings.variants):
        out = _run_variant(
            variant,
            settings=settings,
            messages=messages,
            planned=planned,
            duration_s=duration_s,
            folder=run_dir / variant.name,
            position=(index, len(settings.variants)),
            on_progress=on_progress,
        )
        variants.append(out.result)
        ledgers[variant.name] = out.ledger
        errors[variant.name] = out.errors
    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "scenario": scenario_ref(loaded),
        "environment": {**env_before, "host_load_after": environment()["host_load"]},
        "variants": variants,
        "failures": [],
    }
    written = write_run_results(run_dir, results)
    return RunOutcome(run_dir, written, ledgers, errors)


def summary_lines(variants: Sequence[Any]) -> list[str]:
    """Staleness, recompute cost and the oracle in words, one line per variant (printed under the summary)."""
    lines = []
    for v in variants:
        r = v.recompute
        if r is None:
            continue
        s, c = r.staleness_ms, r.recompute_cpu_ms
        curve = r.cost_curve
        growth = (
            f"{curve[0].cpu_ms:,.2f} -> {curve[-1].cpu_ms:,.2f} ms from {curve[0].series_len:,.0f} to "
            f"{curve[-1].series_len:,.0f} points"
            if curve
            else "no curve"
        )
        slope = "-" if r.cost_slope_ms_per_1k is None else f"{r.cost_slope_ms_per_1k:,.3f}"
        lines.append(
            f"{v.name}: staleness p50 {s.p50 or 0:,.0f} / p99 {s.p99 or 0:,.0f} ms (API polled every "
            f"{r.poll_interval_ms:g} ms); CPU per recompute p99 {c.p99 or 0:,.2f} ms, {growth} ({slope} ms per 1k "
            f"points); {r.recomputes:,} recomputes for {r.notifications:,} notifications ({r.coalesced:,} "
            f"coalesced); oracle {'equal' if r.oracle.equal else f'{r.oracle.mismatches:,} mismatch(es)'}"
        )
    return lines
