"""One run: stream -> MQTT -> pipeline -> sinks, then read back, reconcile, measure.

The run's timeline is a single :class:`~pipeline.clock.MonotonicWallClock`
shared by the publisher's pacing, the pipeline's flush triggers and the flush
records, so end-to-end latency (durable time minus *intended* send time) is
computed on one clock. Measuring from the intended send time is what keeps a
stalled pipeline from hiding behind a publisher that slowed down with it.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from array import array
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.errors import RunFailed, ScenarioError, ServiceError, UsageError
from bench.ledger import Ledger, read_back, reconcile
from bench.results import SCHEMA_VERSION, LatencyRecorder, environment, write_results
from bench.scenario import LoadedScenario, apply_overrides
from pipeline.clock import MonotonicWallClock
from pipeline.config import resolve_env
from pipeline.errors import ConfigError, PipelineError
from pipeline.model import FlushStat
from pipeline.mqtt_source import MqttSource
from pipeline.runtime import Pipeline
from simulators.broker import EmbeddedBroker
from simulators.errors import SimulatorError
from simulators.publisher import PacedPublisher
from simulators.stream import Message, planned_count, stream, total_duration_s

# The first send is scheduled this far after the pipeline has subscribed, so
# set-up time is not charged to the first messages' latency.
START_LEAD_NS = 200_000_000
ACK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunOptions:
    out: Path | None = None
    messages: int | None = None
    duration_s: float | None = None
    broker: str | None = None
    reports_dir: Path = Path("reports")


@dataclass(frozen=True)
class Progress:
    """A snapshot for the progress display."""

    elapsed_s: float
    planned: int
    sent: int
    received: int
    persisted: int
    rejected: int
    send_rate: float
    lag_s: float
    backlog: int
    phase: str


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    results: dict[str, Any]
    ledger: Ledger

    @property
    def ok(self) -> bool:
        return self.ledger.reconciled


class _SendLog:
    """Which seq ids were handed to the broker, and when they were meant to go."""

    def __init__(self, planned: int) -> None:
        self.intended = array("q", [0]) * planned
        self.sent_flags = bytearray(planned)
        self.lag = LatencyRecorder()
        self.count = 0
        self.last_intended_ns = 0
        self.last_sent_ns = 0

    def on_sent(self, message: Message, sent_ns: int) -> None:
        # Called from the publisher thread only; readers tolerate a stale value.
        self.intended[message.seq] = message.intended_send_ns
        self.sent_flags[message.seq] = 1
        self.lag.record_ns(sent_ns - message.intended_send_ns)
        self.count += 1
        self.last_intended_ns = message.intended_send_ns
        self.last_sent_ns = sent_ns

    def sent_seqs(self) -> list[int]:
        return [i for i, flag in enumerate(self.sent_flags) if flag]


def _run_dir(loaded: LoadedScenario, options: RunOptions) -> Path:
    if options.out is not None:
        run_dir = options.out
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        run_dir = options.reports_dir / f"{loaded.scenario.name}-{stamp}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"--out {run_dir}: folder exists and is not empty; choose a new one so runs never mix")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create run folder {run_dir}: {exc}") from None
    return run_dir


def run(
    loaded: LoadedScenario,
    options: RunOptions,
    on_progress: Callable[[Progress], None] | None = None,
    progress_every_s: float = 0.25,
) -> RunOutcome:
    """Run a scenario end to end; raises :class:`BenchError` subclasses on failure to run."""
    sc = loaded.scenario
    spec = apply_overrides(sc.stream_spec(), options.messages, options.duration_s)
    planned = planned_count(spec)
    run_dir = _run_dir(loaded, options)
    shutil.copyfile(loaded.path, run_dir / "scenario.yaml")
    run_id = f"{sc.name}-{uuid.uuid4().hex[:8]}"
    mq = sc.transport.mqtt
    broker_setting = options.broker or mq.broker
    clock = MonotonicWallClock()
    flushes: list[FlushStat] = []
    send_log = _SendLog(planned)
    load_before = environment()

    try:
        username = resolve_env(mq.username, "transport.mqtt.username")
        password = resolve_env(mq.password, "transport.mqtt.password")
    except ConfigError as exc:
        raise ScenarioError(f"{loaded.path}: {exc}") from None

    broker: EmbeddedBroker | None = None
    pipeline: Pipeline | None = None
    source: MqttSource | None = None
    publisher: PacedPublisher | None = None
    pipeline_closed = False
    try:
        try:
            if broker_setting == "embedded":
                broker = EmbeddedBroker(log_path=run_dir / "broker.log").start()
                url = broker.url
            else:
                url = broker_setting
            pipeline = Pipeline(sc.pipeline, run_dir, clock, on_flush=flushes.append)
            pipeline.start()
            source = MqttSource(
                url,
                mq.subscription(run_id),
                mq.qos,
                pipeline.submit,
                client_id=f"{run_id}-pipeline",
                username=username,
                password=password,
            )
            source.start()
            publisher = PacedPublisher(
                url,
                mq.topic_for_run(run_id),
                mq.qos,
                client_id=f"{run_id}-publisher",
                username=username,
                password=password,
            )
            publisher.connect()
        except (SimulatorError, PipelineError) as exc:
            raise ServiceError(str(exc)) from None

        epoch_ns = clock.now_ns() + START_LEAD_NS
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def publish() -> None:
            assert publisher is not None
            try:
                outcome["accepted"] = publisher.run(stream(spec, epoch_ns), clock, stop=stop, on_sent=send_log.on_sent)
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc

        started_wall = time.time()
        pub_thread = threading.Thread(target=publish, name="publisher", daemon=True)
        pub_thread.start()
        phase_ends = _phase_ends(spec)

        def snapshot(rate: float) -> Progress:
            assert pipeline is not None
            stats = pipeline.statistics()
            durable = sum(b.flushed_rows for b in (stats.readings, stats.rejections) if b is not None)
            now = clock.now_ns()
            elapsed = max(0.0, (now - epoch_ns) / 1e9)
            lag = (
                max(0.0, (now - send_log.last_intended_ns) / 1e9)
                if send_log.count < planned and send_log.count
                else 0.0
            )
            return Progress(
                elapsed_s=elapsed,
                planned=planned,
                sent=send_log.count,
                received=stats.received,
                persisted=stats.readings.flushed_rows if stats.readings else 0,
                rejected=stats.rejected,
                send_rate=rate,
                lag_s=lag if send_log.count < planned else 0.0,
                backlog=max(0, send_log.count - durable),
                phase=_phase_at(phase_ends, elapsed),
            )

        last_sent, last_t = 0, time.monotonic()
        try:
            while pub_thread.is_alive():
                pub_thread.join(progress_every_s)
                if on_progress:
                    now_t = time.monotonic()
                    rate = (send_log.count - last_sent) / max(now_t - last_t, 1e-9)
                    last_sent, last_t = send_log.count, now_t
                    on_progress(snapshot(rate))
        except KeyboardInterrupt:
            stop.set()
            pub_thread.join(10)
            raise
        if "error" in outcome:
            raise ServiceError(f"publisher failed: {outcome['error']}")
        sent = send_log.count
        acked = publisher.wait_acked(sent, ACK_TIMEOUT_S) if mq.qos > 0 else True

        # Drain: wait until the pipeline has received every sent message, or
        # until it makes no progress for drain_timeout (then the ledger shows the loss).
        last_received, last_change = -1, time.monotonic()
        while True:
            stats = pipeline.statistics()
            if stats.received >= sent:
                break
            if stats.received != last_received:
                last_received, last_change = stats.received, time.monotonic()
            elif time.monotonic() - last_change > sc.run.drain_timeout:
                break
            if on_progress:
                on_progress(snapshot(0.0))
            time.sleep(progress_every_s)  # polling a counter; nothing to wait on across threads
        finished_wall = time.time()
        source.close()
        source = None
        pipeline.close()
        pipeline_closed = True
        if on_progress:
            on_progress(snapshot(0.0))
        pipeline_stats = pipeline.statistics()
        pipeline_errors = [str(e) for e in pipeline.errors]
    finally:
        if source is not None:
            source.close()
        if pipeline is not None and not pipeline_closed:
            pipeline.close()  # finalise files even when the run is aborted
        if publisher is not None:
            publisher.close()
        if broker is not None:
            broker.close()

    settings = sc.pipeline
    back = read_back(run_dir / settings.parquet.path, run_dir / settings.quarantine.path)
    dropped: dict[int, str] = {}
    ledger = reconcile(send_log.sent_seqs(), back, dropped)

    durable_by_batch = {f.batch_id: f.durable_ns for f in flushes if f.sink == "parquet"}
    e2e = LatencyRecorder()
    for seq, batch in zip(back.persisted_seqs, back.persisted_batches, strict=True):
        if 0 <= seq < planned and send_log.sent_flags[seq] and batch in durable_by_batch:
            e2e.record_ns(durable_by_batch[batch] - send_log.intended[seq])

    active_s = max((finished_wall - started_wall), 1e-9)
    send_span_s = max((send_log.last_sent_ns - epoch_ns) / 1e9, 1e-9)
    last_durable = max(durable_by_batch.values(), default=epoch_ns)
    persist_span_s = max((last_durable - epoch_ns) / 1e9, 1e-9)
    variant = {
        "name": "default",
        "config": {
            "pipeline": settings.model_dump(mode="json", by_alias=True),
            "transport": {
                "kind": "mqtt",
                "broker": "embedded" if broker_setting == "embedded" else broker_setting,
                "qos": mq.qos,
                "topic": mq.topic,
            },
            "stream": {
                "planned": planned,
                "duration_s": round(total_duration_s(spec), 3),
                "arrival": spec.arrival,
                "machines": len(spec.machines),
                "overrides": {"messages": options.messages, "duration_s": options.duration_s},
            },
        },
        "ledger": ledger.to_json(),
        "throughput": {
            "sent_per_s": round(ledger.sent / send_span_s, 1),
            "persisted_per_s": round(ledger.persisted / persist_span_s, 1),
            "offered_per_s": round(planned / max(total_duration_s(spec), 1e-9), 1),
            "wall_s": round(active_s, 3),
        },
        "latency_ms": {"end_to_end": e2e.summary(), "send_lag": send_log.lag.summary()},
        "probes": {"flush": _flush_summary(flushes)},
        "publisher": {"accepted": sent, "acked": publisher.acked if publisher else 0, "all_acked": acked},
        "pipeline": {
            "received": pipeline_stats.received,
            "accepted": pipeline_stats.accepted,
            "rejected": pipeline_stats.rejected,
            "rejected_by_reason": pipeline_stats.rejected_by_reason,
            "refused_after_close": pipeline_stats.refused_after_close,
            "producer_wait_ms": round(pipeline_stats.readings.producer_wait_ns / 1e6, 3)
            if pipeline_stats.readings
            else 0,
            "errors": pipeline_errors,
        },
        "files": back.files,
    }
    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(started_wall, UTC).isoformat(),
        "scenario": {"name": sc.name, "path": str(loaded.path), "sha256": loaded.sha256, "seed": sc.seed},
        "environment": {**load_before, "host_load_after": environment()["host_load"]},
        "variants": [variant],
    }
    write_results(run_dir / "results.json", results)
    return RunOutcome(run_dir, results, ledger)


def _phase_ends(spec: Any) -> list[tuple[float, str]]:
    ends, t = [], 0.0
    for p in spec.phases:
        t += p.duration_s
        ends.append((t, p.kind))
    return ends


def _phase_at(ends: list[tuple[float, str]], elapsed: float) -> str:
    for end, kind in ends:
        if elapsed < end:
            return kind
    return "drain"


def _flush_summary(flushes: list[FlushStat]) -> dict[str, Any]:
    """Per sink and trigger kind: count, rows, and HdrHistogram percentiles of each step."""
    groups: dict[tuple[str, str], list[FlushStat]] = defaultdict(list)
    for f in flushes:
        groups[(f.sink, f.trigger)].append(f)
    out: dict[str, Any] = {}
    for (sink, trigger), items in sorted(groups.items()):
        total, build, write, commit = LatencyRecorder(), LatencyRecorder(), LatencyRecorder(), LatencyRecorder()
        for f in items:
            total.record_ns(f.total_ns)
            build.record_ns(f.build_ns)
            write.record_ns(f.write_ns)
            commit.record_ns(f.commit_ns)
        out.setdefault(sink, {})[trigger] = {
            "count": len(items),
            "rows": sum(f.rows for f in items),
            "coalesced": sum(f.coalesced for f in items),
            "total_ms": total.summary(),
            "build_ms": build.summary(),
            "write_ms": write.summary(),
            "commit_ms": commit.summary(),
        }
    return out


def fail_if_unreconciled(outcome: RunOutcome) -> None:
    if not outcome.ledger.reconciled:
        raise RunFailed("ledger does not reconcile: " + "; ".join(outcome.ledger.problems()))
