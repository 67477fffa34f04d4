"""The notify-and-recompute shape under test: each strategy replays the same stream, measured four ways.

- **staleness**: a reader thread polls ``GET /status`` every ``poll_interval`` (conditional, with the last ETag)
  and logs when each new ``raw_through`` arrived; a reading's staleness is the first such answer covering its
  ingest number minus its intended send time (open model: a slow pipeline cannot hide behind a slow sender). An
  external pipeline is read by its ``seq_through`` instead (the readings go out in increasing seq order).
- **API latency under concurrent readers**: ``readers.users`` locust ``HttpUser``s in a subprocess
  (``recompute_readers``) read ``GET /series?machine=ID`` and ``GET /status`` while the readings are sent.
- **recompute cost**: the worker's CPU time per recompute against the series length then, binned into a curve,
  with a least-squares slope.
- **correctness**: after the drain, ``GET /series`` must equal :func:`pipeline.recompute.oracle` of the raw
  readings read back from the store (floating point only).

The ledger is the usual one: sent = persisted (distinct (machine, seq) read back from the raw store) + rejected +
lost.

External pipelines (``recompute.external``) run after the built-in variants on the same stream: the readings go to
their standard input as JSON lines at their intended send times, and everything is read from their HTTP API (the
contract is in docs/recompute.md). Their oracle is a recompute of the readings sent, their ledger's persisted the
readings present in their final series, and their recompute cost curve is not measurable from outside (empty).
"""

from __future__ import annotations

import bisect
import http.client
import json
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.errors import ScenarioError, ServiceError
from bench.harness.ledger import Ledger
from bench.harness.progress import Progress
from bench.harness.runner import RunOptions, RunOutcome
from bench.results.metrics import slope_fit
from bench.scenario import LoadedScenario, apply_overrides
from bench.shapes.external import ShapeProcess
from bench.shapes.external_settings import ShapeExternal
from bench.shapes.recompute_readers import Readers
from bench.shapes.recompute_settings import RecomputeSettings, RecomputeVariant
from bench.shapes.run_file import ShapeRunFile
from pipeline.probes import Recorder
from pipeline.recompute import (
    Point,
    Reading,
    RecomputeConfig,
    RecomputeCost,
    RecomputePipeline,
    connect,
    oracle,
    parse_reading,
    read_raw,
)
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
    """Polls ``GET /status`` on a fixed schedule over one keep-alive connection and logs ``key`` (``raw_through``
    for the built-in pipeline, ``seq_through`` for an external one; an answer without it, or with null, is no
    progress)."""

    def __init__(self, url: str, interval_s: float, key: str = "raw_through") -> None:
        self.key = key
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
                        through = _through(data, self.key)
                        if isinstance(through, int):
                            self.log.add(received, through)
                        elif through is None and len(self.log.errors) < 10:
                            self.log.errors.append(f"GET /status: no integer (or null) {self.key} in {data[:80]!r}")
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


_NOTHING_YET = object()
"""``key`` present and null: nothing reflected yet (no progress, not an error)."""


def _through(data: bytes, key: str) -> int | object | None:
    """The integer ``key`` of a /status answer, :data:`_NOTHING_YET` for null, None when absent or not a number."""
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    value = body.get(key, None)
    if value is None:
        return _NOTHING_YET if key in body else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def get_series(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=120)
    try:
        conn.request("GET", "/series")
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET /series: HTTP {response.status}")
        body = json.loads(data)
        if not isinstance(body, dict) or not isinstance(body.get("series"), dict):
            raise RuntimeError(
                'GET /series: expected {"series": {machine: [[ts_ns, seq, value, energy], ...]}}, '
                f"got {data[:80]!r}"
            )
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


@dataclass
class _Sent:
    """What the sender did: per seq its intended send time (monotonic ns), the lag, and the seqs it could not
    hand over (an external pipeline's standard input was gone)."""

    epoch: int
    intended: dict[int, int] = field(default_factory=dict)
    lag: Recorder = field(default_factory=Recorder)
    failed: list[int] = field(default_factory=list)
    last_ns: int = 0


PROGRESS_EVERY_NS = 250_000_000


def _send_all(
    messages: Sequence[Message],
    send: Callable[[bytes], bool],
    epoch: int,
    progress: Callable[[int, int, int], None] | None,
) -> _Sent:
    """Hand each message to ``send`` at its intended time (open model); ``progress(sent, elapsed_ns, lag_ns)``
    every quarter second."""
    out = _Sent(epoch)
    next_progress = epoch
    for sent, m in enumerate(messages, 1):
        due = epoch + m.intended_send_ns
        delay = due - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        if not send(m.payload):
            out.failed.append(m.seq)
        now = time.monotonic_ns()
        out.lag.record_ns(now - due)
        out.intended[m.seq] = due
        if progress is not None and now >= next_progress:
            next_progress = now + PROGRESS_EVERY_NS
            progress(sent, now - epoch, now - due)
    out.last_ns = time.monotonic_ns()
    return out


def _start_readers(
    settings: RecomputeSettings, url: str, machines: Sequence[str], folder: Path, duration_s: float
) -> tuple[Readers | None, list[str]]:
    """The concurrent API readers (None when ``readers.users`` is 0 or locust did not start: then an error)."""
    if settings.readers.users == 0:
        return None, []
    readers = Readers(url, machines, settings.readers.users, settings.readers.wait, folder)
    # Its own --run-time: the stream, the drain and a margin, so it ends even if the bench never stops it.
    if not readers.start(START_LEAD_NS / 1e9 + duration_s + settings.drain_timeout + 120):
        return None, readers.errors
    return readers, []


def _stop_readers(readers: Readers | None, errors: list[str]) -> dict[str, Any] | None:
    if readers is None:
        return None
    summary = readers.stop()
    errors += readers.errors
    return summary


def _machines(messages: Sequence[Message]) -> list[str]:
    return sorted({m.machine for m in messages})


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
    readers: Readers | None = None
    readers_summary: dict[str, Any] | None = None

    def progress(sent: int, elapsed_ns: int, lag_ns: int) -> None:
        assert on_progress is not None
        committed = pipe.committed_through()
        on_progress(
            _progress(
                variant.name,
                position=position,
                planned=planned,
                sent=sent,
                received=committed,
                rejected=pipe.stats.rejected,
                elapsed_ns=elapsed_ns,
                lag_ns=lag_ns,
            )
        )

    try:
        readers, problems = _start_readers(settings, pipe.url, _machines(messages), folder, duration_s)
        errors += problems
        epoch = time.monotonic_ns() + START_LEAD_NS

        def submit(payload: bytes) -> bool:
            pipe.submit(payload)
            return True

        sent = _send_all(messages, submit, epoch, progress if on_progress is not None else None)
        # The readers' window is the sending: the drain after it is the pipeline catching up, not serving load.
        readers_summary, readers = _stop_readers(readers, errors), None
        last_sent = sent.last_ns
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
        if readers is not None:
            readers.stop()
        reader.stop.set()
        reader.thread.join(30)
        pipe.stop()
    if pipe.failure is not None:
        errors.append(f"pipeline failed: {type(pipe.failure).__name__}: {pipe.failure}")
    errors += reader.log.errors[:5]
    intended, lag = sent.intended, sent.lag

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
        "notification_bytes": pipe.receiver.bytes,
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
        "readers": readers_summary,
    }
    result = {
        "name": variant.name,
        "config": {
            "pipeline": {
                "shape": "recompute",
                "recompute": variant.recompute,
                "coalesce": variant.coalesce,
                "gather_interval_s": settings.gather_interval,
                "notify": "tcp 127.0.0.1 " + ("ping" if variant.recompute == "full" else "json line"),
                "store": "sqlite",
                "api": "http.server.ThreadingHTTPServer",
            },
            "transport": {"kind": "memory"},
            "stream": _stream_config(planned, duration_s, messages),
        },
        "ledger": ledger.to_json(),
        "throughput": {
            "offered_per_s": planned / duration_s if duration_s > 0 else None,
            "sent_per_s": len(messages) / max((last_sent - sent.epoch) / 1e9, 1e-9),
            "persisted_per_s": persisted / max((last_commit - sent.epoch) / 1e9, 1e-9),
        },
        "latency_ms": {"end_to_end": e2e.summary(ladder=True), "send_lag": lag.summary()},
        "probes": {},
        "recompute": recompute,
    }
    return _VariantOutcome(result, ledger, errors)


def _stream_config(planned: int, duration_s: float, messages: Sequence[Message]) -> dict[str, Any]:
    return {
        "planned": planned,
        "duration_s": duration_s,
        "arrival": "uniform",
        "machines": len({m.machine for m in messages}),
        "overrides": {},
    }


def _external_process(
    spec: ShapeExternal, index: int, loaded: LoadedScenario, run_dir: Path, *, check_only: bool = False
) -> ShapeProcess:
    proc = ShapeProcess(
        spec,
        where=f"{loaded.path}: recompute.external[{index}]",
        scenario_dir=loaded.path.parent,
        folder=run_dir / spec.name,
        values={"seed": str(loaded.scenario.seed)},
    )
    if check_only:
        # Before any variant runs: a command that is not there, or a bad placeholder, is a one-line error now
        # rather than after the built-in variants' minutes (the same check start() makes).
        proc.check()
    return proc


def _sent_readings(messages: Sequence[Message], sent: _Sent) -> list[Reading]:
    """The readings the external pipeline was given, the last one per (machine, seq) (a later one corrects it)."""
    failed = set(sent.failed)
    latest: dict[tuple[str, int], Reading] = {}
    for m in messages:
        if m.seq in sent.intended and m.seq not in failed:
            r = parse_reading(m.payload)
            latest[(r.machine, r.seq)] = r
    return list(latest.values())


def _run_external(
    spec: ShapeExternal,
    index: int,
    *,
    loaded: LoadedScenario,
    settings: RecomputeSettings,
    messages: list[Message],
    planned: int,
    duration_s: float,
    run_dir: Path,
    position: tuple[int, int],
    on_progress: Callable[[Progress], None] | None,
) -> _VariantOutcome | str:
    """One ``recompute.external`` entry: its outcome, or why it could not start (one line)."""
    proc = _external_process(spec, index, loaded, run_dir)
    folder = proc.folder
    try:
        proc.start()
    except ServiceError as exc:
        # It exited or was never ready: a failure of this variant, in one line (its output is in system.log);
        # the variants that ran before it keep their results.
        first = str(exc).splitlines()[0].split("; its last output")[0]
        return f"{first}; its output: {proc.log_path}"
    reader = Reader(proc.url, settings.poll_interval, key="seq_through")
    reader.thread.start()
    errors: list[str] = []
    readers: Readers | None = None
    readers_summary: dict[str, Any] | None = None
    api: dict[str, Any] | None = None
    sent_list: list[int] = []
    """The seqs sent so far, increasing: how many of them the last seq_through covers (progress)."""

    def progress(sent: int, elapsed_ns: int, lag_ns: int) -> None:
        assert on_progress is not None
        through = reader.log.through[-1] if reader.log.through else None
        reflected = 0 if through is None else bisect.bisect_right(sent_list, through)
        on_progress(
            _progress(
                spec.name,
                position=position,
                planned=planned,
                sent=sent,
                received=reflected,
                rejected=0,
                elapsed_ns=elapsed_ns,
                lag_ns=lag_ns,
                phase="recompute (external)",
            )
        )

    seq_iter = iter(m.seq for m in messages)

    def send_seq(payload: bytes) -> bool:
        sent_list.append(next(seq_iter))  # _send_all hands the messages over in order: this is its seq
        return proc.send(payload)

    exit_code: int | None = None
    try:
        readers, problems = _start_readers(settings, proc.url, _machines(messages), folder, duration_s)
        errors += problems
        epoch = time.monotonic_ns() + START_LEAD_NS
        sent = _send_all(messages, send_seq, epoch, progress if on_progress is not None else None)
        readers_summary, readers = _stop_readers(readers, errors), None
        if sent.failed:
            errors.append(
                f"{len(sent.failed)} reading(s) could not be written to its standard input (it had exited); "
                f"seqs include {sent.failed[:10]}"
            )
        top = max((seq for seq in sent.intended if seq not in set(sent.failed)), default=None)
        deadline = time.monotonic() + settings.drain_timeout
        while top is not None and time.monotonic() < deadline and proc.alive():
            if reader.log.through and reader.log.through[-1] >= top:
                break
            time.sleep(settings.poll_interval)  # the reader thread polls; this waits for what it saw
        else:
            if top is not None and not (reader.log.through and reader.log.through[-1] >= top):
                errors.append(
                    f"GET /status's seq_through did not reach the last seq sent ({top}) within drain_timeout "
                    f"{settings.drain_timeout:g} s (last seen: {reader.log.through[-1] if reader.log.through else None}"
                    ")"
                )
        try:
            api = get_series(proc.url)
        except (OSError, http.client.HTTPException, RuntimeError, ValueError) as exc:
            errors.append(f"GET /series: {exc}")
        if not proc.alive():
            errors.append(f"it exited before its standard input was closed (see {proc.log_path})")
    finally:
        if readers is not None:
            readers.stop()
        reader.stop.set()
        reader.thread.join(30)
        exit_code = proc.finish()
    errors += reader.log.errors[:5]
    usage = proc.usage()

    truth = oracle(_sent_readings(messages, sent))
    expected_points = sum(len(pts) for pts in truth.values())
    served: set[tuple[str, int]] = set()
    checked: dict[str, Any] = {
        "points": expected_points,
        "api_points": 0,
        "mismatches": expected_points,
        "max_abs_error": 0.0,
        "equal": False,
    }
    if api is not None:
        try:
            checked = compare(api["series"], truth)
            served = {(str(m), int(pt[1])) for m, pts in api["series"].items() for pt in pts}
        except (TypeError, ValueError, IndexError) as exc:
            errors.append(f"GET /series: points are not [ts_ns, seq, value, energy]: {exc}")
    if not checked["equal"]:
        errors.append(f"the API's series differs from the oracle at {checked['mismatches']} point(s)")
    seqs = {seq: seq for seq in sent.intended}
    stale, never = staleness(seqs, sent.intended, reader.log)
    if never:
        errors.append(f"{len(never)} reading(s) never covered by GET /status's seq_through; seqs include {never[:10]}")

    sent_keys = {(m.machine, m.seq) for m in messages if m.seq in sent.intended}
    persisted_keys = sent_keys & served
    missing = sorted(seq for _, seq in sent_keys - served)
    ledger = Ledger(
        sent=len(sent_keys),
        persisted=len(persisted_keys),
        rejected=0,
        dropped=0,
        lost=len(sent_keys) - len(persisted_keys),
        duplicates=0,
        unexpected=len(served - sent_keys),
        missing_seq_sample=missing[:20],
    )
    command = " ".join(spec.argv())
    last_seen = reader.log.received_ns[-1] if reader.log.received_ns else sent.last_ns
    recompute = {
        "recompute": "external",
        "poll_interval_ms": settings.poll_interval * 1000,
        "late_readings": sum(1 for m in messages if m.truth in LATE_KINDS),
        "staleness_ms": stale.summary(ladder=True),
        "unreflected": len(never),
        "cost_curve": [],
        "cost_slope_ms_per_1k": None,  # a recompute's cost is not visible from outside the process
        "api_requests": reader.log.requests,
        "api_not_modified": reader.log.not_modified,
        "final_version": _int_or_none(api.get("version")) if api is not None else None,
        "oracle": checked,
        "readers": readers_summary,
        "external": {
            "command": command,
            "cpu_s": usage["cpu_s"],
            "cpu_s_per_1k": usage["cpu_s"] / len(sent_keys) * 1000 if sent_keys else None,
            "peak_rss_mb": usage["peak_rss_mb"],
            "exit_code": exit_code,
        },
    }
    result = {
        "name": spec.name,
        "config": {
            "pipeline": {"shape": "recompute", "external": command, "url": proc.url},
            "transport": {"kind": "stdin"},
            "stream": _stream_config(planned, duration_s, messages),
        },
        "ledger": ledger.to_json(),
        "throughput": {
            "offered_per_s": planned / duration_s if duration_s > 0 else None,
            "sent_per_s": len(messages) / max((sent.last_ns - sent.epoch) / 1e9, 1e-9),
            "persisted_per_s": len(persisted_keys) / max((last_seen - sent.epoch) / 1e9, 1e-9),
        },
        "latency_ms": {"send_lag": sent.lag.summary()},
        "probes": {},
        "recompute": recompute,
    }
    return _VariantOutcome(result, ledger, errors)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _progress(
    name: str,
    *,
    position: tuple[int, int],
    planned: int,
    sent: int,
    received: int,
    rejected: int,
    elapsed_ns: int,
    lag_ns: int,
    phase: str = "recompute",
) -> Progress:
    """``received``: readings committed to the raw store (built-in) or covered by seq_through (external)."""
    return Progress(
        variant=name,
        variant_index=position[0],
        variants=position[1],
        elapsed_s=elapsed_ns / 1e9,
        planned=planned,
        sent=sent,
        received=received,
        persisted=received,
        rejected=rejected,
        # The mean over the run so far; below a second it would mostly say how early the first send was.
        send_rate=sent / (elapsed_ns / 1e9) if elapsed_ns >= 1_000_000_000 else 0.0,
        lag_s=max(0.0, lag_ns / 1e9),
        backlog=max(0, sent - received),  # handed over, not yet committed (or reflected)
        phase=phase,
    )


def run_recompute(
    loaded: LoadedScenario,
    options: RunOptions,
    run_dir: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    """Every strategy of the scenario's ``recompute`` section, then every external pipeline, on the same stream."""
    sc = loaded.scenario
    settings = sc.recompute
    assert settings is not None
    messages, planned, duration_s = _messages(loaded, options)
    for i, spec in enumerate(settings.external):
        _external_process(spec, i, loaded, run_dir, check_only=True)
    run_file = ShapeRunFile.begin(loaded)
    variants: list[dict[str, Any]] = []
    ledgers: dict[str, Ledger] = {}
    errors: dict[str, list[str]] = {}
    failures: dict[str, str] = {}
    total = len(settings.variants) + len(settings.external)
    for index, variant in enumerate(settings.variants):
        out = _run_variant(
            variant,
            settings=settings,
            messages=messages,
            planned=planned,
            duration_s=duration_s,
            folder=run_dir / variant.name,
            position=(index, total),
            on_progress=on_progress,
        )
        variants.append(out.result)
        ledgers[variant.name] = out.ledger
        errors[variant.name] = out.errors
    for i, spec in enumerate(settings.external):
        got = _run_external(
            spec,
            i,
            loaded=loaded,
            settings=settings,
            messages=messages,
            planned=planned,
            duration_s=duration_s,
            run_dir=run_dir,
            position=(len(settings.variants) + i, total),
            on_progress=on_progress,
        )
        if isinstance(got, str):
            failures[spec.name] = got
            continue
        variants.append(got.result)
        ledgers[spec.name] = got.ledger
        errors[spec.name] = got.errors
    written = run_file.write(loaded, run_dir, variants, failures)
    return RunOutcome(run_dir, written, ledgers, errors, failures)


def summary_lines(variants: Sequence[Any]) -> list[str]:
    """Staleness, recompute cost, the API under readers and the oracle in words, one line per variant (printed
    under the summary)."""
    lines = []
    for v in variants:
        r = v.recompute
        if r is None:
            continue
        s = r.staleness_ms
        parts = [
            f"staleness p50 {s.p50 or 0:,.0f} / p99 {s.p99 or 0:,.0f} ms (API polled every {r.poll_interval_ms:g} ms)"
        ]
        if r.external is not None:
            e = r.external
            per_1k = "-" if e.cpu_s_per_1k is None else f"{e.cpu_s_per_1k:,.3f}"
            parts.append(
                f"external: {per_1k} CPU s per 1k readings, peak RSS {e.peak_rss_mb:,.0f} MB, recompute cost not "
                "measurable from outside"
            )
        else:
            c = r.recompute_cpu_ms
            curve = r.cost_curve
            growth = (
                f"{curve[0].cpu_ms:,.2f} -> {curve[-1].cpu_ms:,.2f} ms from {curve[0].series_len:,.0f} to "
                f"{curve[-1].series_len:,.0f} points"
                if curve
                else "no curve"
            )
            slope = "-" if r.cost_slope_ms_per_1k is None else f"{r.cost_slope_ms_per_1k:,.3f}"
            p99 = c.p99 if c is not None and c.p99 is not None else 0
            parts.append(f"CPU per recompute p99 {p99:,.2f} ms, {growth} ({slope} ms per 1k points)")
            parts.append(
                f"{r.recomputes or 0:,} recomputes for {r.notifications or 0:,} notifications "
                f"({r.coalesced or 0:,} coalesced"
                + (f", {r.notification_bytes:,} bytes on the wire" if r.notification_bytes is not None else "")
                + ")"
            )
        if r.readers is not None:
            a = r.readers
            lat = a.latency_ms
            parts.append(
                f"API under {a.users} readers: p50 {lat.p50 or 0:,.1f} / p99 {lat.p99 or 0:,.1f} / max "
                f"{lat.max or 0:,.1f} ms, {a.requests:,} requests ({a.requests_per_s:,.0f}/s), {a.failures:,} failed"
            )
        parts.append(f"oracle {'equal' if r.oracle.equal else f'{r.oracle.mismatches:,} mismatch(es)'}")
        lines.append(f"{v.name}: " + "; ".join(parts))
    return lines
