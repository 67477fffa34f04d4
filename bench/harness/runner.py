"""One run: for each variant, stream -> transport -> pipeline -> sinks; then read back, reconcile, measure.

Every variant replays the same stream (same seed, same phases). Each variant's
timeline is one :class:`~pipeline.clock.MonotonicWallClock` shared by the
publisher's pacing, the pipeline's flush triggers and the flush records, so
end-to-end latency (durable time minus *intended* send time) is computed on one
clock. Measuring from the intended send time is what keeps a stalled pipeline
from hiding behind a publisher that slowed down with it.
"""

from __future__ import annotations

import re
import resource
import shutil
import threading
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from bench.errors import RunFailed, ScenarioError, ServiceError, UsageError
from bench.harness.ledger import (
    Ledger,
    ReadBack,
    attribute_outage,
    attribute_queue_overflow,
    durable_rows,
    payload_key,
    read_back,
    reconcile,
    resolve_anonymous,
)
from bench.harness.probes import (
    append_cost,
    cpu_summary,
    flush_summary,
    lock_summary,
    probe_overhead,
    series_summary,
    sink_rows_per_s,
    timeline_json,
)
from bench.harness.scoring import Decision, expect, read_outcomes, score
from bench.results import SCHEMA_VERSION, environment, write_results
from bench.scenario import LoadedScenario, Scenario, ServerRestartFault, apply_overrides
from pipeline.clock import MonotonicWallClock
from pipeline.config import PipelineSettings, SqlSettings, format_validation_error, resolve_env
from pipeline.errors import ConfigError, PipelineError
from pipeline.model import FlushStat
from pipeline.mqtt_source import MqttSource
from pipeline.probes import Recorder
from pipeline.runtime import Pipeline
from simulators.anomalies import OPCUA_KINDS, inject
from simulators.broker import EmbeddedBroker
from simulators.errors import SimulatorError
from simulators.publisher import DirectPublisher, PacedPublisher
from simulators.stream import Message, PhaseSpec, StreamSpec, machine_of, planned_count, stream, total_duration_s

if TYPE_CHECKING:
    # OPC UA (asyncua) is imported only by runs that use it: it is half of a new process's import time, and
    # every gate replicate is a new process.
    from pipeline.opcua_source import OpcUaSource
    from simulators.opcua_server import PlantServer
    from simulators.opcua_writer import RemotePlant

# The first send is scheduled this far after the pipeline has subscribed, so
# set-up time is not charged to the first messages' latency.
START_LEAD_NS = 200_000_000
ACK_TIMEOUT_S = 30.0
REFERENCE_MESSAGES = 2000
# Anomalies whose payload cannot name its seq: the quarantine row is matched to the send by payload.
UNREADABLE = frozenset({"malformed_json", "invalid_utf8", "oversize", "duplicate_key"})


@dataclass(frozen=True)
class RunOptions:
    out: Path | None = None
    messages: int | None = None
    duration_s: float | None = None
    broker: str | None = None
    reports_dir: Path = Path("reports")
    sql_url: str | None = None
    calibrate: bool = True
    """Measure the probes' own cost and, over OPC UA, the bare-subscription reference."""


@dataclass(frozen=True)
class Progress:
    """A snapshot for the progress display."""

    variant: str
    variant_index: int
    variants: int
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
    ledgers: dict[str, Ledger]
    errors: dict[str, list[str]]

    @property
    def ledger(self) -> Ledger:
        """The first variant's ledger (the only one without a matrix)."""
        return next(iter(self.ledgers.values()))

    @property
    def ok(self) -> bool:
        return all(ledger.reconciled for ledger in self.ledgers.values()) and not any(self.errors.values())

    def problems(self) -> list[str]:
        out = []
        for name, ledger in self.ledgers.items():
            prefix = f"{name}: " if len(self.ledgers) > 1 else ""
            out += [prefix + p for p in ledger.problems()]
            # Sink failures, publisher refusals, SQL read-back and validation problems alike.
            out += [f"{prefix}error: {e}" for e in self.errors.get(name, [])]
        return out


class _Publisher(Protocol):
    def run(
        self,
        messages: Iterable[Message],
        clock: MonotonicWallClock,
        *,
        stop: threading.Event | None = None,
        on_sent: Callable[[Message, int], None] | None = None,
    ) -> int: ...


class _SendLog:
    """Which seq ids were handed to the transport and when they were meant to go.

    One shard per producer thread: shards write distinct indexes of the shared
    arrays and keep their own counters, so producers never share a lock here.
    """

    def __init__(self, intended: array[int], sent_flags: bytearray) -> None:
        self.intended = intended
        self.sent_flags = sent_flags
        self.lag = Recorder()
        self.count = 0
        self.last_intended_ns = 0
        self.last_sent_ns = 0
        self.copies: Counter[int] = Counter()
        # Only messages carrying an anomaly are kept whole (few); a clean one is known from its seq.
        self.anomalous: dict[int, list[Message]] = {}
        self.payloads: dict[bytes, int] = {}

    def on_sent(self, message: Message, sent_ns: int) -> None:
        if message.truth != "valid":
            self.anomalous.setdefault(message.seq, []).append(message)
            if message.truth in UNREADABLE:
                self.payloads[payload_key(message.payload)] = message.seq
        if message.copy:
            self.copies[message.seq] += 1
        else:
            self.intended[message.seq] = message.intended_send_ns
            self.sent_flags[message.seq] = 1
        self.lag.record_ns(sent_ns - message.intended_send_ns)
        self.count += 1
        self.last_intended_ns = message.intended_send_ns
        self.last_sent_ns = sent_ns


def make_run_dir(name: str, out: Path | None, reports_dir: Path) -> Path:
    """``out``, or reports_dir/<name>-<UTC time>/; refuses a folder that already holds something."""
    if out is not None:
        run_dir = out
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        run_dir = reports_dir / f"{name}-{stamp}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: is a file; expected a folder (new, or empty)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"--out {run_dir}: folder exists and is not empty; choose a new one so runs never mix")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create run folder {run_dir}: {exc}") from None
    return run_dir


@contextmanager
def removed_on_user_error(run_dir: Path, existed: bool = False) -> Iterator[None]:
    """Remove ``run_dir`` (new or empty before, see :func:`make_run_dir`) when a user mistake stops the run.

    A mistake found only once the run has started (an unset ${VAR}, a setting the transport cannot honour)
    must not leave a half-made folder behind that makes the same ``--out`` fail after the mistake is fixed.
    Any other failure keeps the folder: its logs are the evidence.
    """
    try:
        yield
    except (ScenarioError, UsageError):
        if existed:  # the user's own empty folder: empty it again, keep it
            for child in run_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def run(
    loaded: LoadedScenario,
    options: RunOptions,
    on_progress: Callable[[Progress], None] | None = None,
    progress_every_s: float = 0.25,
) -> RunOutcome:
    """Run every variant of a scenario end to end; raises :class:`BenchError` subclasses on failure to run."""
    spec = apply_overrides(loaded.scenario.stream_spec(), options.messages, options.duration_s)
    existed = options.out is not None and options.out.is_dir()
    run_dir = make_run_dir(loaded.scenario.name, options.out, options.reports_dir)
    with removed_on_user_error(run_dir, existed):
        return _run_in(loaded, options, spec, run_dir, on_progress=on_progress, progress_every_s=progress_every_s)


def _run_in(
    loaded: LoadedScenario,
    options: RunOptions,
    spec: StreamSpec,
    run_dir: Path,
    *,
    on_progress: Callable[[Progress], None] | None,
    progress_every_s: float,
) -> RunOutcome:
    sc = loaded.scenario
    shutil.copyfile(loaded.path, run_dir / "scenario.yaml")
    run_id = f"{sc.name}-{uuid.uuid4().hex[:8]}"
    started_wall = time.time()
    env_before = environment()
    overhead = probe_overhead() if options.calibrate else None

    needs_embedded = any(
        v.transport.kind in ("mqtt", "both") and (options.broker or v.transport.mqtt.broker) == "embedded"
        for _, v in loaded.variants
    )
    broker: EmbeddedBroker | None = None
    variants: list[dict[str, Any]] = []
    ledgers: dict[str, Ledger] = {}
    errors: dict[str, list[str]] = {}
    try:
        if needs_embedded:
            try:
                broker = EmbeddedBroker(log_path=run_dir / "broker.log").start()
            except SimulatorError as exc:
                raise ServiceError(str(exc)) from None
        single = len(loaded.variants) == 1
        for index, (name, variant_sc) in enumerate(loaded.variants):
            result, ledger, errs = _run_variant(
                loaded,
                name,
                variant_sc,
                spec,
                run_dir if single else run_dir / name,
                run_id=f"{run_id}-{index}",
                broker_url=broker.url if broker else None,
                options=options,
                on_progress=on_progress,
                position=(index, len(loaded.variants)),
                progress_every_s=progress_every_s,
            )
            if overhead is not None:
                result["probes"]["overhead"] = overhead
            variants.append(result)
            ledgers[name] = ledger
            errors[name] = errs
    finally:
        if broker is not None:
            broker.close()

    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(started_wall, UTC).isoformat(),
        "scenario": {"name": sc.name, "path": str(loaded.path), "sha256": loaded.sha256, "seed": sc.seed},
        "environment": {**env_before, "host_load_after": environment()["host_load"]},
        "variants": variants,
    }
    write_results(run_dir / "results.json", results)
    return RunOutcome(run_dir, results, ledgers, errors)


def wait_received(
    received: Callable[[], int], expected: int, idle_timeout_s: float, tick: Callable[[], Any], every_s: float
) -> None:
    """Drain: wait until ``received()`` reaches ``expected``, or makes no progress for ``idle_timeout_s``.

    Stopping on no progress rather than on a fixed deadline lets a slow pipeline finish a long backlog while a
    loss (nothing more will come) ends the wait; the ledger then shows what is missing.
    """
    last, last_change = -1, time.monotonic()
    while True:
        now_received = received()
        if now_received >= expected:
            return
        if now_received != last:
            last, last_change = now_received, time.monotonic()
        elif time.monotonic() - last_change > idle_timeout_s:
            return
        tick()
        time.sleep(every_s)  # polling a counter; nothing to wait on across threads or processes


def _split(messages: Iterable[Message], producers: int, machines: tuple[str, ...]) -> list[list[Message]]:
    """Each producer gets whole machines (machine index modulo producers), in send order."""
    index = {m: i % producers for i, m in enumerate(machines)}
    shares: list[list[Message]] = [[] for _ in range(producers)]
    for message in messages:
        shares[index[message.machine]].append(message)
    return shares


def _run_variant(
    loaded: LoadedScenario,
    name: str,
    sc: Scenario,
    spec: StreamSpec,
    out_dir: Path,
    *,
    run_id: str,
    broker_url: str | None,
    options: RunOptions,
    on_progress: Callable[[Progress], None] | None,
    progress_every_s: float,
    position: tuple[int, int] = (0, 1),
) -> tuple[dict[str, Any], Ledger, list[str]]:
    planned = planned_count(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    sc = _resolve_sql(sc, name, options.sql_url)
    transport = sc.transport
    mq = transport.mqtt
    clock = MonotonicWallClock()
    flushes: list[FlushStat] = []
    intended = array("q", [0]) * planned
    flags = bytearray(planned)
    try:
        username = resolve_env(mq.username, "transport.mqtt.username")
        password = resolve_env(mq.password, "transport.mqtt.password")
        ua_user = resolve_env(transport.opcua.username, "transport.opcua.username")
        ua_password = resolve_env(transport.opcua.password, "transport.opcua.password")
    except ConfigError as exc:
        raise ScenarioError(f"{loaded.path}: {exc}") from None

    broker_setting = options.broker or mq.broker
    url = broker_url if broker_setting == "embedded" else broker_setting
    pipeline: Pipeline | None = None
    source: MqttSource | None = None
    mqtt_publisher: PacedPublisher | None = None
    plant: PlantServer | None = None
    remote_plant: RemotePlant | None = None
    opcua_source: OpcUaSource | None = None
    pipeline_closed = False
    # "both": machines take turns between the transports (even index MQTT, odd OPC UA).
    producers = {"memory": transport.memory.producers, "both": 2}.get(transport.kind, 1)
    opcua_machines = list(spec.machines[1::2] if transport.kind == "both" else spec.machines)
    logs = [_SendLog(intended, flags) for _ in range(producers)]
    samples: list[tuple[float, int, int]] = []
    timeline: list[tuple[float, int, int]] = []  # (elapsed s, sent, durable): throughput over time
    opcua_stats: dict[str, Any] | None = None
    # The fleet and its zones filled in from the scenario: the validator knows what the plant is.
    settings = sc.validation()
    replay_offset_ns = 0
    try:
        try:
            pipeline = Pipeline(
                settings,
                out_dir,
                clock,
                on_flush=flushes.append,
                sink_delay_s=sc.sink_delay_s(),
                sink_slowdown=sc.sink_slowdown(),
            )
            pipeline.start()
            publishers: list[_Publisher] = []
            if transport.kind in ("mqtt", "both"):
                assert url is not None
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
                mqtt_publisher = PacedPublisher(
                    url,
                    mq.topic_for_run(run_id),
                    mq.qos,
                    client_id=f"{run_id}-publisher",
                    username=username,
                    password=password,
                )
                mqtt_publisher.connect()
                publishers.append(mqtt_publisher)
            if transport.kind in ("opcua", "both"):
                from pipeline.opcua_source import OpcUaNames, OpcUaSource
                from simulators.opcua_server import NodeNames, PlantServer
                from simulators.opcua_writer import RemotePlant

                ua_cfg = transport.opcua
                secure = None if ua_cfg.security == "None" else ua_cfg.security
                certs = out_dir / "certs"
                if ua_cfg.server == "embedded":
                    plant = PlantServer(
                        opcua_machines,
                        names=NodeNames(plant=ua_cfg.plant),
                        security_mode=secure,
                        cert_dir=certs,
                        users={ua_user: ua_password or ""} if ua_user is not None else None,
                    ).start()
                    ua_url, server_cert = plant.url, plant.server_cert
                    writer: PlantServer | RemotePlant = plant
                else:
                    if secure is not None:
                        raise ScenarioError(
                            f"{loaded.path}: transport.opcua.security: with an external server, run the pipeline "
                            "on its own (python -m pipeline) with the server's certificate"
                        )
                    ua_url, server_cert = ua_cfg.server, None
                    remote = RemotePlant(
                        ua_url, names=NodeNames(plant=ua_cfg.plant), username=ua_user, password=ua_password
                    ).start()
                    remote_plant = remote
                    writer = remote
                opcua_source = OpcUaSource(
                    ua_url,
                    pipeline.submit,
                    names=OpcUaNames(plant=ua_cfg.plant),
                    publishing_ms=ua_cfg.publishing * 1000,
                    sampling_ms=ua_cfg.sampling * 1000,
                    queue_size=ua_cfg.queue_size,
                    discard_oldest=ua_cfg.discard_oldest,
                    # A plant server restart should cost seconds, not the library's 30 s backoff cap.
                    reconnect_max_delay_s=2.0,
                    username=ua_user,
                    password=ua_password,
                    security_mode=secure,
                    server_certificate=server_cert,
                    cert_dir=certs,
                    clock=clock,
                )
                opcua_source.start()
                publishers.append(writer)
            if transport.kind == "memory":
                publishers = [DirectPublisher(pipeline.submit, mq.topic_for_run(run_id)) for _ in range(producers)]
        except (SimulatorError, PipelineError) as exc:
            raise ServiceError(str(exc)) from None

        epoch_ns = clock.now_ns() + START_LEAD_NS
        ts_epoch = None if sc.run.start is None else int(sc.run.start.timestamp() * 1e9)
        if ts_epoch is not None:
            # Replaying another time: the validator's clock reads that time too, or every reading would be far past.
            replay_offset_ns = ts_epoch - epoch_ns
            pipeline.replay_offset_ns = replay_offset_ns
        messages: Iterable[Message] = stream(spec, epoch_ns, ts_epoch)
        if sc.anomalies:
            on_opcua_only = set(opcua_machines) if transport.kind == "both" else set()
            messages = inject(
                messages,
                [a.spec() for a in sc.anomalies],
                seed=sc.seed,
                start_ns=epoch_ns,
                zones=sc.machines.zones(),
                eligible=lambda kind, machine: kind in OPCUA_KINDS or machine not in on_opcua_only,
            )
        shares: list[Iterable[Message]] = (
            [messages] if producers == 1 else list(_split(messages, producers, spec.machines))
        )
        stop = threading.Event()
        failures: list[BaseException] = []

        def publish(publisher: _Publisher, share: Iterable[Message], log: _SendLog) -> None:
            try:
                publisher.run(share, clock, stop=stop, on_sent=log.on_sent)
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        threads = [
            threading.Thread(target=publish, args=(p, share, log), name=f"producer-{i}", daemon=True)
            for i, (p, share, log) in enumerate(zip(publishers, shares, logs, strict=True))
        ]
        for t in threads:
            t.start()
        faults = _schedule_faults(sc, plant, epoch_ns, clock, stop)
        phase_ends = _phase_ends(spec)

        def sent_count() -> int:
            return sum(log.count for log in logs)

        def snapshot(rate: float) -> Progress:
            assert pipeline is not None
            stats = pipeline.statistics()
            durable = sum(b.flushed_rows + b.dropped for b in (stats.readings, stats.rejections) if b is not None)
            now = clock.now_ns()
            elapsed = max(0.0, (now - epoch_ns) / 1e9)
            sent = sent_count()
            last_intended = max(log.last_intended_ns for log in logs)
            lag = max(0.0, (now - last_intended) / 1e9) if 0 < sent < planned else 0.0
            backlog = max(0, sent - durable)
            samples.append((elapsed, stats.readings.buffered if stats.readings else 0, backlog))
            timeline.append((elapsed, sent, durable))
            return Progress(
                variant=name,
                variant_index=position[0],
                variants=position[1],
                elapsed_s=elapsed,
                planned=planned,
                sent=sent,
                received=stats.received,
                persisted=stats.readings.flushed_rows if stats.readings else 0,
                rejected=stats.rejected,
                send_rate=rate,
                lag_s=lag,
                backlog=backlog,
                phase=_phase_at(phase_ends, elapsed),
            )

        last_sent, last_t = 0, time.monotonic()
        try:
            while any(t.is_alive() for t in threads):
                threads[0].join(progress_every_s)
                now_t = time.monotonic()
                sent = sent_count()
                rate = (sent - last_sent) / max(now_t - last_t, 1e-9)
                last_sent, last_t = sent, now_t
                progress = snapshot(rate)
                if on_progress:
                    on_progress(progress)
        except KeyboardInterrupt:
            stop.set()
            for t in threads:
                t.join(10)
            raise
        if failures:
            raise ServiceError(f"publisher failed: {failures[0]}")
        sent = sent_count()
        # The MQTT publisher is the first producer; with "both" it sent only its share.
        acked = mqtt_publisher.wait_acked(logs[0].count, ACK_TIMEOUT_S) if mqtt_publisher and mq.qos > 0 else True

        # Drain: wait until the pipeline has received every sent message, or
        # until it makes no progress for drain_timeout (then the ledger shows the loss).
        def tick() -> None:
            progress = snapshot(0.0)  # also records the queue-depth sample
            if on_progress:
                on_progress(progress)

        running = pipeline
        wait_received(lambda: running.statistics().received, sent, sc.run.drain_timeout, tick, progress_every_s)
        for timer in faults:
            timer.join(5)
        if source is not None:
            source.close()
            source = None
        if opcua_source is not None:
            opcua_source.close()
            opcua_stats = asdict(opcua_source.stats)
            opcua_stats["security"] = {
                "policy_uri": opcua_source.security_policy_uri,
                "mode": transport.opcua.security,
                "username": ua_user is not None,
            }
            opcua_stats["notifications_per_s"] = round(
                opcua_source.stats.notifications / max((clock.now_ns() - epoch_ns) / 1e9, 1e-9), 1
            )
            opcua_source = None
        pipeline.close()
        pipeline_closed = True
        final = snapshot(0.0)
        if on_progress:
            on_progress(final)
        pipeline_stats = pipeline.statistics()
        pipeline_errors = [str(e) for e in pipeline.errors]
        if mqtt_publisher is not None and (unsent := mqtt_publisher.not_sent_problem()):
            # Offered but never handed to the broker: the run must say so, not only the counters.
            pipeline_errors.append(unsent)
        sql_back = pipeline.sql.read_back() if pipeline.sql is not None else None
        lock = lock_summary(pipeline.lock_probes, sc.pipeline.buffer.lock)
        loop_lag = pipeline.loop_lag_recorder.summary() if pipeline.loop_lag_recorder is not None else None
        hot_path_cpu = pipeline.hot_path_cpu.statistics()
    finally:
        if opcua_source is not None:
            opcua_source.close()
        if plant is not None:
            plant.close()
        if remote_plant is not None:
            remote_plant.close()
        if source is not None:
            source.close()
        if pipeline is not None and not pipeline_closed:
            pipeline.close()  # finalise files even when the run is aborted
        if mqtt_publisher is not None:
            mqtt_publisher.close()

    if opcua_stats is not None and options.calibrate and plant is not None:
        # The library's own speed on this machine, beside the pipeline's: same run, same server code.
        # Always the same size, whatever the scenario's length: 2,000 readings, all due at once.
        ref_spec = StreamSpec(spec.seed, spec.machines, (PhaseSpec("steady", 1.0, float(REFERENCE_MESSAGES)),))
        on_opcua = set(opcua_machines)
        reference = [m for m in stream(ref_spec, 0) if m.machine in on_opcua]
        from bench.harness import opcua_reference

        opcua_stats["reference"] = opcua_reference.measure(
            spec.machines, reference, transport.opcua.publishing * 1000, sc.pipeline
        )
    back = read_back(out_dir / settings.parquet.path, out_dir / settings.quarantine.path, out_dir / "dropped")
    sent_seqs = [i for i, f in enumerate(flags) if f]
    copies: Counter[int] = Counter()
    anomalous: dict[int, list[Message]] = {}
    sent_payloads: dict[bytes, int] = {}
    for log in logs:
        copies.update(log.copies)
        sent_payloads.update(log.payloads)
        for seq, sent_messages in log.anomalous.items():
            anomalous.setdefault(seq, []).extend(sent_messages)
    ledger = reconcile(sent_seqs, back, copies=copies, sent_payloads=sent_payloads)
    if transport.kind in ("opcua", "both") and ledger.lost:
        dropped = {s: r for s, r in zip(back.dropped_seqs, back.dropped_reasons, strict=True) if s is not None}
        on_opcua = set(opcua_machines)
        opcua_sent = [seq for seq in sent_seqs if machine_of(spec, seq) in on_opcua]
        dropped.update(attribute_queue_overflow(opcua_sent, back, lambda seq: machine_of(spec, seq)))
        if plant is not None and opcua_stats is not None:
            dropped.update(
                attribute_outage(
                    opcua_sent,
                    back,
                    intended_ns=intended,
                    stopped_at_ns=plant.stopped_at_ns,
                    resumed_at_ns=opcua_stats["resumed_at_ns"],
                    publishing_s=transport.opcua.publishing,
                )
            )
        ledger = reconcile(sent_seqs, back, dropped, copies=copies, sent_payloads=sent_payloads)
    if sql_back is not None:
        problem = _check_sql(sql_back, ledger.persisted, settings.sql.aggregate if settings.sql else "raw")
        if problem:
            pipeline_errors.append(problem)

    validation: dict[str, Any] | None = None
    if sc.anomalies:
        validation = _score_validation(
            sc,
            settings,
            out_dir,
            back,
            sent_seqs=sent_seqs,
            anomalous=anomalous,
            sent_payloads=sent_payloads,
            intended=intended,
            machine=lambda seq: machine_of(spec, seq),
            replay_offset_ns=replay_offset_ns,
        )
        validation["quarantine_rows"] = ledger.quarantine_rows
        if ledger.quarantine_rows != ledger.rejected + ledger.redelivered:
            validation["problems"].append(
                f"quarantine holds {ledger.quarantine_rows} rows, the ledger accounts for {ledger.rejected} "
                f"rejected + {ledger.redelivered} redelivered"
            )
        pipeline_errors.extend(f"validation: {p}" for p in validation["problems"])

    e2e = Recorder()
    for seq, durable_ns in durable_rows(back, flushes):
        if 0 <= seq < planned and flags[seq]:
            e2e.record_ns(durable_ns - intended[seq])
    send_lag = Recorder()
    for log in logs:
        send_lag.merge(log.lag)

    last_sent_ns = max(log.last_sent_ns for log in logs)
    send_span_s = max((last_sent_ns - epoch_ns) / 1e9, 1e-9)
    last_durable = max((f.durable_ns for f in flushes if f.sink == "parquet"), default=epoch_ns)
    persist_span_s = max((last_durable - epoch_ns) / 1e9, 1e-9)
    duration_s = total_duration_s(spec)
    result: dict[str, Any] = {
        "name": name,
        "config": {
            "pipeline": settings.model_dump(mode="json", by_alias=True),
            "transport": {
                "kind": transport.kind,
                "broker": broker_setting if transport.kind in ("mqtt", "both") else None,
                "qos": mq.qos if transport.kind in ("mqtt", "both") else None,
                "producers": producers,
                "topic": mq.topic,
            },
            "stream": {
                "planned": planned,
                "duration_s": round(duration_s, 3),
                "arrival": spec.arrival,
                "machines": len(spec.machines),
                "overrides": {"messages": options.messages, "duration_s": options.duration_s},
            },
        },
        "ledger": ledger.to_json(),
        "throughput": {
            "offered_per_s": round(planned / max(duration_s, 1e-9), 1),
            "sent_per_s": round(ledger.sent / send_span_s, 1),
            "persisted_per_s": round(ledger.persisted / persist_span_s, 1),
            "sink_rows_per_s": sink_rows_per_s(flushes),
        },
        "latency_ms": {"end_to_end": e2e.summary(), "send_lag": send_lag.summary()},
        "timeline": timeline_json(timeline),
        "probes": {
            "flush": flush_summary(flushes),
            "lock": lock,
            "append_cost": append_cost(flushes),
            "queue_depth": series_summary(samples),
            "loop_lag_ms": loop_lag,
            "cpu": cpu_summary(flushes, hot_path_cpu),
        },
        "publisher": {
            "accepted": sent,
            "not_sent": {
                **({"server_down": len(w.unsent)} if (w := plant or remote_plant) is not None and w.unsent else {}),
                **(mqtt_publisher.not_sent if mqtt_publisher else {}),
            },
            "window": mqtt_publisher.window_stats() if mqtt_publisher else None,
            "acked": mqtt_publisher.acked if mqtt_publisher else None,
            "all_acked": acked,
        },
        "pipeline": {
            "received": pipeline_stats.received,
            "accepted": pipeline_stats.accepted,
            "rejected": pipeline_stats.rejected,
            "rejected_by_reason": pipeline_stats.rejected_by_reason,
            "refused_after_close": pipeline_stats.refused_after_close,
            "dropped_by_reason": pipeline.drops.counts(),
            "producer_wait_ms": round(pipeline_stats.readings.producer_wait_ns / 1e6, 3)
            if pipeline_stats.readings
            else 0,
            "errors": pipeline_errors,
        },
        "validation": validation,
        "opcua": opcua_stats,
        "sql": sql_back,
        "faults": [f.model_dump(mode="json") for f in sc.faults],
        "files": back.files,
        # Bytes of the finished Parquet data files: for the same stream and code, the same every run (a gate counter).
        "data_bytes": sum(f.stat().st_size for f in (out_dir / settings.parquet.path).rglob("*.parquet")),
        # This process, pipeline included (the embedded broker is a child of its own): what a service level on
        # memory would bound. Peak since the process started, so a later variant inherits an earlier's peak.
        "resources": {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
    }
    return result, ledger, pipeline_errors


def _score_validation(
    sc: Scenario,
    settings: PipelineSettings,
    out_dir: Path,
    back: ReadBack,
    *,
    sent_seqs: list[int],
    anomalous: dict[int, list[Message]],
    sent_payloads: dict[bytes, int],
    intended: array[int],
    machine: Callable[[int], str],
    replay_offset_ns: int,
) -> dict[str, Any]:
    """The confusion table of truth against decision, and the checks on what was persisted."""
    v = settings.validate_
    rejected = zip(resolve_anonymous(back, sent_payloads), back.rejected_reasons, strict=True)
    dropped = {s: r for s, r in zip(back.dropped_seqs, back.dropped_reasons, strict=True) if s is not None}
    outcomes = read_outcomes(
        out_dir / settings.parquet.path,
        rejected,
        dropped,
        future_tolerance_s=v.future_tolerance,
        replay_offset_ns=replay_offset_ns,
    )

    def clean(seq: int) -> Message:
        # A clean message's payload says exactly its intended instant (shifted to the replayed time).
        at = intended[seq]
        return Message(seq, machine(seq), at, b"", ts_ns=(at + replay_offset_ns) // 1000 * 1000)

    def sends() -> Iterator[tuple[int, list[Message]]]:
        for seq in sent_seqs:
            sent = anomalous.get(seq)
            if sent is None:
                yield seq, [clean(seq)]
            elif all(m.copy for m in sent):
                yield seq, [clean(seq), *sent]
            else:
                yield seq, sent

    overrides: dict[str, Decision] = {a.kind: a.expect for a in sc.anomalies if a.expect is not None}
    result = score(sends(), outcomes, lambda m: expect(m, v, m.intended_send_ns + replay_offset_ns), overrides)
    out = result.to_json()
    problems: list[str] = []
    if result.mismatches:
        worst = ", ".join(f"{k} {n}" for k, n in result.mismatches_by_class.most_common(5))
        problems.append(f"{result.mismatches} decision(s) differ from the truth ({worst}); see mismatch_sample")
    checks = {
        "rows_read_back": outcomes.rows,
        "non_finite_values": outcomes.non_finite_rows,
        "files_with_naive_timestamps": outcomes.naive_ts_files,
        "beyond_future_tolerance": outcomes.beyond_future_tolerance,
    }
    if outcomes.non_finite_rows:
        problems.append(f"{outcomes.non_finite_rows} persisted value(s) are NaN or infinite")
    if outcomes.naive_ts_files:
        problems.append(f"{outcomes.naive_ts_files} file(s) store timestamps without a zone")
    if outcomes.beyond_future_tolerance and v.rules.future_timestamp == "reject":
        problems.append(f"{outcomes.beyond_future_tolerance} persisted row(s) are beyond the future tolerance")
    out["output_checks"] = checks
    out["problems"] = problems
    return out


def _schedule_faults(
    sc: Scenario, plant: PlantServer | None, epoch_ns: int, clock: MonotonicWallClock, stop: threading.Event
) -> list[threading.Thread]:
    """Start a thread per timed fault; each waits for its moment on the run's clock."""
    timers = []
    for fault in sc.faults:
        if not isinstance(fault, ServerRestartFault):
            continue
        if plant is None:
            raise ScenarioError("faults: server_restart needs the embedded OPC UA server (transport opcua or both)")

        def restart(server: PlantServer = plant, at_s: float = fault.at, down_s: float = fault.down_for) -> None:
            if stop.wait(max(0.0, (epoch_ns + at_s * 1e9 - clock.now_ns()) / 1e9)):
                return
            server.stopped_at_ns.append(clock.now_ns())
            server.stop_server()
            stop.wait(down_s)  # the fault's own duration, not a guess
            server.restart_server()

        timer = threading.Thread(target=restart, name="fault-server-restart", daemon=True)
        timer.start()
        timers.append(timer)
    return timers


def _resolve_sql(sc: Scenario, variant: str, url: str | None) -> Scenario:
    """Fill {variant} into the SQL table name and apply --sql-url."""
    sql = sc.pipeline.sql
    if sql is None:
        return sc
    update: dict[str, Any] = {}
    if sql.table and "{variant}" in sql.table:
        update["table"] = sql.table.replace("{variant}", re.sub(r"[^A-Za-z0-9_]", "_", variant))
    if url is not None:
        update["url"] = url
        # A file named on the command line for this run is the user saying where it goes, explicitly.
        update["allow_outside_output"] = True
    if not update:
        return sc
    try:
        new_sql = SqlSettings.model_validate({**sql.model_dump(), **update})
    except ValidationError as exc:
        raise UsageError(format_validation_error("--sql-url", exc)) from None
    return sc.model_copy(update={"pipeline": sc.pipeline.model_copy(update={"sql": new_sql})})


def _check_sql(back: dict[str, Any], persisted: int, aggregate: str) -> str | None:
    """The SQL table, read back, must hold what the Parquet data holds (when the run created it)."""
    if not back["created_by_run"]:
        back["check"] = "skipped: the table existed before the run (set sql.reset: true to check)"
        return None
    if aggregate == "raw":
        ok, held = back["rows"] == persisted, f"{back['rows']} rows"
    else:
        expected = persisted - back.get("late_beyond_retention", 0)
        ok, held = back["sum_count"] == expected, f"sum(count) = {back['sum_count']}"
    back["check"] = "ok" if ok else "MISMATCH"
    return None if ok else f"SQL table {back['table']} holds {held}; the Parquet data holds {persisted} readings"


def _phase_ends(spec: StreamSpec) -> list[tuple[float, str]]:
    ends: list[tuple[float, str]] = []
    t = 0.0
    for p in spec.phases:
        t += p.duration_s
        ends.append((t, p.kind))
    return ends


def _phase_at(ends: list[tuple[float, str]], elapsed: float) -> str:
    for end, kind in ends:
        if elapsed < end:
            return kind
    return "drain"


def fail_if_unreconciled(outcome: RunOutcome) -> None:
    if not outcome.ok:
        raise RunFailed("run failed its checks: " + "; ".join(outcome.problems()))
