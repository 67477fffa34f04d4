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
import traceback
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from bench.errors import BenchError, RunFailed, ScenarioError, ServiceError, UsageError
from bench.harness.accounting import (
    Accounting,
    CommandOptions,
    Outage,
    RunRecord,
    Sends,
    account,
    pipeline_part,
    variant_parts,
    write_run_results,
)
from bench.harness.external_sut import ExternalPipeline, check_seqs_found
from bench.harness.fault_ledger import (
    STORAGE_FAULTS,
    FaultWindow,
    crash_windows,
    fault_windows,
    per_fault,
    received_latencies,
)
from bench.harness.faults import FaultContext, FaultEvent, fault_events_json, schedule
from bench.harness.ledger import (
    Ledger,
    ReadBack,
    payload_key,
    resolve_anonymous,
)
from bench.harness.probes import (
    cpu_summary,
    lock_summary,
    probe_overhead,
)
from bench.harness.process_sut import ProcessPipeline
from bench.harness.progress import Progress
from bench.harness.rig import FaultRig
from bench.harness.scoring import Decision, expect, judge_external, read_outcomes, score
from bench.harness.session import (
    QUIET_S,
    BrokerSet,
    Credentials,
    Endpoints,
    Session,
    SessionConfig,
    managed_brokers,
    service_errors,
    wait_quiet,
    wait_received,
)
from bench.harness.sut import InProcessPipeline, Output, SinkFault
from bench.results import SCHEMA_VERSION, environment
from bench.scenario import MANAGED_BROKERS, LoadedScenario, Scenario, apply_overrides
from pipeline.clock import MonotonicWallClock
from pipeline.config import PipelineSettings, SqlSettings, format_validation_error
from pipeline.errors import PipelineError
from pipeline.probes import Recorder
from simulators.anomalies import OPCUA_KINDS, inject
from simulators.publisher import DirectPublisher, PacedPublisher
from simulators.stream import Message, PhaseSpec, StreamSpec, machine_of, planned_count, stream

if TYPE_CHECKING:
    # OPC UA (asyncua) is imported only by runs that use it: it is half of a new process's import time, and
    # every gate replicate is a new process.
    from simulators.opcua_server import PlantServer

# The first send is scheduled this far after the pipeline has subscribed, so
# set-up time is not charged to the first messages' latency.
START_LEAD_NS = 200_000_000
ACK_TIMEOUT_S = 30.0
# The OPC UA reference's replay, in readings. Long enough for a steady state: at the shipped scenarios' buffer
# size (1,000 rows) seven of its eight flushes land in the timed window (at 2,000, one of two: the reference
# left out half of the storage's cost and measured 0.93 where 8,000 measure 0.90), and a window of 2-3 s
# makes the subscription's publishing interval (up to 100 ms between the last write and its notification)
# a small part of it rather than a sixth.
REFERENCE_MESSAGES = 8000
# Anomalies whose payload cannot name its seq: the quarantine row is matched to the send by payload.
UNREADABLE = frozenset({"malformed_json", "invalid_utf8", "oversize", "duplicate_key"})


@dataclass(frozen=True)
class RunOptions(CommandOptions):
    """``bench run``'s options (the command line's, or a test's)."""

    messages: int | None = None
    duration_s: float | None = None
    sql_url: str | None = None
    calibrate: bool = True
    """Measure the probes' own cost and, over OPC UA, the bare-subscription reference."""


@dataclass(frozen=True)
class RunOutcome(RunRecord):
    ledgers: dict[str, Ledger]
    errors: dict[str, list[str]]
    failures: dict[str, str] = field(default_factory=dict)
    """Variants that could not run to their ledger -> why (their results.json entry is in ``failures``)."""

    @property
    def ledger(self) -> Ledger:
        """The first variant's ledger (the only one without a matrix)."""
        return next(iter(self.ledgers.values()))

    @property
    def ok(self) -> bool:
        return (
            all(ledger.reconciled for ledger in self.ledgers.values())
            and not any(self.errors.values())
            and not self.failures
        )

    def problems(self) -> list[str]:
        out = [f"{name}: could not run: {why}" for name, why in self.failures.items()]
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
    # Other pipeline shapes run a harness of their own (bench/shapes/<name>.py):
    if sc.recompute is not None:
        from bench.shapes.recompute import run_recompute

        return run_recompute(loaded, options, run_dir, on_progress=on_progress)
    if sc.forward is not None:
        from bench.shapes.forward import run_forward

        return run_forward(loaded, options, run_dir, on_progress=on_progress)
    if sc.windows is not None:
        from bench.shapes.windows import run_windows

        return run_windows(loaded, options, run_dir, spec, on_progress=on_progress)
    run_id = f"{sc.name}-{uuid.uuid4().hex[:8]}"
    started_wall = time.time()
    env_before = environment()
    overhead = probe_overhead() if options.calibrate else None

    managed = {
        options.broker or v.transport.mqtt.broker for _, v in loaded.variants if v.transport.kind in ("mqtt", "both")
    } & set(MANAGED_BROKERS)
    variants: list[dict[str, Any]] = []
    ledgers: dict[str, Ledger] = {}
    errors: dict[str, list[str]] = {}
    failures: dict[str, str] = {}
    first_failure: Exception | None = None
    with managed_brokers(managed, run_dir) as brokers:
        single = len(loaded.variants) == 1
        for index, (name, variant_sc) in enumerate(loaded.variants):
            try:
                variant = _VariantRun(
                    loaded,
                    name,
                    variant_sc,
                    spec,
                    run_dir if single else run_dir / name,
                    run_id=f"{run_id}-{index}",
                    options=options,
                    on_progress=on_progress,
                    position=(index, len(loaded.variants)),
                )
                result, ledger, errs = variant.execute(brokers, progress_every_s)
            except (ScenarioError, UsageError, KeyboardInterrupt):
                raise  # the user's to fix (no results), or the user's wish
            except Exception as exc:
                # A variant that breaks (a sink that cannot start, a full disk at start-up) must not take the
                # variants that finished with it: the run goes on and its results.json says what failed.
                failures[name] = _failure(exc, run_dir / f"{name}-failure.txt")
                first_failure = first_failure or exc
                continue
            if overhead is not None:
                result["probes"]["overhead"] = overhead
            variants.append(result)
            ledgers[name] = ledger
            errors[name] = errs

    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(started_wall, UTC).isoformat(),
        "scenario": scenario_ref(loaded),
        "environment": {**env_before, "host_load_after": environment()["host_load"]},
        "variants": variants,
        "failures": [{"variant": name, "error": why} for name, why in failures.items()],
    }
    written = write_run_results(run_dir, results)
    if first_failure is not None and not variants:
        # Nothing ran: the results.json says why, and the command fails with the error itself, as it always has.
        raise first_failure
    return RunOutcome(run_dir, written, ledgers, errors, failures)


def _failure(exc: BaseException, trace: Path) -> str:
    """Why a variant could not run, in one line for results.json and the terminal; anything but a known error
    (a bug) keeps its type, and its traceback goes to ``trace`` for whoever fixes it."""
    if isinstance(exc, BenchError | PipelineError):
        return str(exc)
    trace.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    return f"{type(exc).__name__}: {exc} (traceback in {trace})"


def scenario_ref(loaded: LoadedScenario) -> dict[str, Any]:
    """results.json's ``scenario``: which file, its digest and seed, so a result can be traced to its input."""
    sc = loaded.scenario
    return {"name": sc.name, "path": str(loaded.path), "sha256": loaded.sha256, "seed": sc.seed}


def _split(messages: Iterable[Message], producers: int, machines: tuple[str, ...]) -> list[list[Message]]:
    """Each producer gets whole machines (machine index modulo producers), in send order."""
    index = {m: i % producers for i, m in enumerate(machines)}
    shares: list[list[Message]] = [[] for _ in range(producers)]
    for message in messages:
        shares[index[message.machine]].append(message)
    return shares


class _Sending:
    """The send phase of one variant: producer threads, progress snapshots, the queue-depth samples."""

    def __init__(self, run: _VariantRun, publishers: list[_Publisher], shares: list[Iterable[Message]]) -> None:
        self.run = run
        self.stop = threading.Event()
        self.done = threading.Event()
        """Set once every message was sent (faults' recovery watch: nothing left to receive is back)."""
        self.failures: list[BaseException] = []
        self.samples: list[tuple[float, int, int]] = []
        self.timeline: list[tuple[float, int, int]] = []  # (elapsed s, sent, durable): throughput over time
        self.phase_ends = _phase_ends(run.spec)
        self.threads = [
            threading.Thread(target=self._publish, args=(p, share, log), name=f"producer-{i}", daemon=True)
            for i, (p, share, log) in enumerate(zip(publishers, shares, run.logs, strict=True))
        ]

    def _publish(self, publisher: _Publisher, share: Iterable[Message], log: _SendLog) -> None:
        try:
            publisher.run(share, self.run.clock, stop=self.stop, on_sent=log.on_sent)
        except BaseException as exc:  # reported by the main thread
            self.failures.append(exc)

    def sent(self) -> int:
        return sum(log.count for log in self.run.logs)

    def snapshot(self, rate: float) -> Progress:
        r = self.run
        received, persisted, rejected, buffered, durable = r.counters()
        now = r.clock.now_ns()
        elapsed = max(0.0, (now - r.epoch_ns) / 1e9)
        sent = self.sent()
        last_intended = max(log.last_intended_ns for log in r.logs)
        lag = max(0.0, (now - last_intended) / 1e9) if 0 < sent < r.planned else 0.0
        backlog = max(0, sent - durable)
        self.samples.append((elapsed, buffered, backlog))
        self.timeline.append((elapsed, sent, durable))
        return Progress(
            variant=r.name,
            variant_index=r.position[0],
            variants=r.position[1],
            elapsed_s=elapsed,
            planned=r.planned,
            sent=sent,
            received=received,
            persisted=persisted,
            rejected=rejected,
            send_rate=rate,
            lag_s=lag,
            backlog=backlog,
            phase=_phase_at(self.phase_ends, elapsed),
        )

    def tick(self) -> None:
        progress = self.snapshot(0.0)  # also records the queue-depth sample
        if self.run.on_progress:
            self.run.on_progress(progress)

    def run_until_sent(self, every_s: float) -> None:
        for t in self.threads:
            t.start()
        last_sent, last_t = 0, time.monotonic()
        try:
            while any(t.is_alive() for t in self.threads):
                self.threads[0].join(every_s)
                now_t = time.monotonic()
                sent = self.sent()
                rate = (sent - last_sent) / max(now_t - last_t, 1e-9)
                last_sent, last_t = sent, now_t
                progress = self.snapshot(rate)
                if self.run.on_progress:
                    self.run.on_progress(progress)
        except KeyboardInterrupt:
            self.stop.set()
            for t in self.threads:
                t.join(10)
            raise
        self.done.set()
        if self.failures:
            raise ServiceError(f"publisher failed: {self.failures[0]}")


@dataclass(frozen=True)
class _Measured:
    """What one variant measured, put together for its results.json entry."""

    extras: dict[str, Any]
    opcua: dict[str, Any] | None
    publisher: dict[str, Any]
    sending: _Sending
    output: Output
    accounting: Accounting
    send_lag: Recorder
    validation: dict[str, Any] | None
    errors: list[str]


class _VariantRun:
    """One variant of ``bench run``: a session, the paced publishers, the drain, then the accounting."""

    def __init__(
        self,
        loaded: LoadedScenario,
        name: str,
        sc: Scenario,
        spec: StreamSpec,
        out_dir: Path,
        *,
        run_id: str,
        options: RunOptions,
        on_progress: Callable[[Progress], None] | None,
        position: tuple[int, int],
    ) -> None:
        self.loaded, self.name, self.spec, self.out_dir = loaded, name, spec, out_dir
        self.sc = _resolve_sql(sc, name, options.sql_url)
        self.run_id, self.options, self.on_progress, self.position = run_id, options, on_progress, position
        self.planned = planned_count(spec)
        self.clock = MonotonicWallClock()
        self.intended = array("q", [0]) * self.planned
        self.flags = bytearray(self.planned)
        kind = self.sc.transport.kind
        # "both": machines take turns between the transports (even index MQTT, odd OPC UA).
        self.producers = {"memory": self.sc.transport.memory.producers, "both": 2}.get(kind, 1)
        self.opcua_machines: list[str] = (
            list(spec.machines[1::2] if kind == "both" else spec.machines) if kind in ("opcua", "both") else []
        )
        self.logs = [_SendLog(self.intended, self.flags) for _ in range(self.producers)]
        # The fleet and its zones filled in from the scenario: the validator knows what the plant is.
        self.settings = self.sc.validation()
        self.replay_offset_ns = 0
        self.epoch_ns = 0
        self.mqtt_publisher: PacedPublisher | None = None
        out_dir.mkdir(parents=True, exist_ok=True)
        self.credentials = Credentials.of(self.sc, loaded.path)
        # Before the system under test exists: a proxied database URL, a full-able volume, injected errors.
        self.rig = FaultRig(self.sc, self.settings, out_dir)
        self.settings = self.rig.settings
        self.sut: InProcessPipeline | ProcessPipeline | ExternalPipeline
        try:
            if self.sc.system.external is not None:
                self.sut = ExternalPipeline(
                    self.sc.system.external,
                    loaded.path.parent,
                    out_dir,
                    self.clock,
                    sql_url=self.rig.external_sql_url,  # the proxy in front of its database, for a db_outage
                )
            elif self.sc.system.kind == "process":
                self.sut = ProcessPipeline(self.settings, out_dir)
            else:
                with service_errors():
                    self.sut = InProcessPipeline(self.settings, out_dir, self.clock, SinkFault.of(self.sc))
        except BaseException:
            self.rig.close()  # a mounted volume, a proxy: never left behind
            raise
        self.fault_events: list[FaultEvent] = []
        self.fault_costs: list[dict[str, Any]] = []
        self.named_damage: list[str] = []

    def counters(self) -> tuple[int, int, int, int, int]:
        """(received, persisted, rejected, buffered, durable) for the progress display; a pipeline in another
        process reports only what it received (the ledger reads its files afterwards)."""
        if isinstance(self.sut, ProcessPipeline):
            received = self.sut.received()
            return received, 0, 0, 0, received
        if isinstance(self.sut, ExternalPipeline):
            seen = self.sut.received()  # rows its output shows: received, persisted and durable at once
            return seen, seen, 0, 0, seen
        stats = self.sut.pipeline.statistics()
        durable = sum(b.flushed_rows + b.dropped for b in (stats.readings, stats.rejections) if b is not None)
        persisted = stats.readings.flushed_rows if stats.readings else 0
        buffered = stats.readings.buffered if stats.readings else 0
        return stats.received, persisted, stats.rejected, buffered, durable

    def session_config(self, brokers: dict[str, str]) -> SessionConfig:
        setting = self.options.broker or self.sc.transport.mqtt.broker
        servers = brokers.servers if isinstance(brokers, BrokerSet) else {}
        return SessionConfig(
            scenario=self.sc,
            scenario_path=self.loaded.path,
            run_id=self.run_id,
            out_dir=self.out_dir,
            broker_url=brokers.get(setting, setting),
            opcua_machines=self.opcua_machines,
            credentials=self.credentials,
            clock=self.clock,
            broker=servers.get(setting),
            partition=self.rig.partition,
        )

    def publishers(self, session: Session, endpoints: Endpoints) -> list[_Publisher]:
        kind, mq, creds = self.sc.transport.kind, self.sc.transport.mqtt, self.credentials
        if kind == "memory":
            assert isinstance(self.sut, InProcessPipeline)  # the scenario refuses memory with system process
            return [DirectPublisher(self.sut.submit, mq.topic_for_run(self.run_id)) for _ in range(self.producers)]
        publishers: list[_Publisher] = []
        if endpoints.mqtt_url is not None:
            with service_errors():
                publisher = PacedPublisher(
                    endpoints.mqtt_url,
                    mq.topic_for_run(self.run_id),
                    mq.qos,
                    client_id=f"{self.run_id}-publisher",
                    username=creds.mqtt_username,
                    password=creds.mqtt_password,
                    seq_property=mq.seq_property,
                )
                session.on_close(publisher.close)
                publisher.connect()
            self.mqtt_publisher = publisher
            publishers.append(publisher)
        if endpoints.writer is not None:
            publishers.append(endpoints.writer)
        return publishers

    def messages(self) -> list[Iterable[Message]]:
        """The stream, with its anomalies, from the epoch on; split between the producers."""
        sc, spec = self.sc, self.spec
        self.epoch_ns = self.clock.now_ns() + START_LEAD_NS
        ts_epoch = None if sc.run.start is None else int(sc.run.start.timestamp() * 1e9)
        if ts_epoch is not None:
            # Replaying another time: the validator's clock reads that time too, or every reading would be far past.
            self.replay_offset_ns = ts_epoch - self.epoch_ns
            if isinstance(self.sut, InProcessPipeline):
                self.sut.pipeline.replay_offset_ns = self.replay_offset_ns
        messages: Iterable[Message] = stream(spec, self.epoch_ns, ts_epoch)
        if sc.anomalies:
            on_opcua_only = set(self.opcua_machines) if sc.transport.kind == "both" else set()
            messages = inject(
                messages,
                [a.spec() for a in sc.anomalies],
                seed=sc.seed,
                start_ns=self.epoch_ns,
                zones=sc.machines.zones(),
                eligible=lambda kind, machine: kind in OPCUA_KINDS or machine not in on_opcua_only,
            )
        return [messages] if self.producers == 1 else list(_split(messages, self.producers, spec.machines))

    def execute(self, brokers: dict[str, str], every_s: float) -> tuple[dict[str, Any], Ledger, list[str]]:
        try:
            return self._execute(brokers, every_s)
        finally:
            self.rig.close()

    def _execute(self, brokers: dict[str, str], every_s: float) -> tuple[dict[str, Any], Ledger, list[str]]:
        with Session(self.session_config(brokers), self.sut) as session:
            endpoints = session.start()
            sending = _Sending(self, self.publishers(session, endpoints), self.messages())
            context = FaultContext(
                endpoints,
                self.sut,
                self.epoch_ns,
                self.clock,
                sending.stop,
                self.fault_events,
                self.sc.seed,
                broker=endpoints.broker,
                mqtt_proxy=endpoints.mqtt_proxy,
                db_proxy=self.rig.db_proxy,
                volume=self.rig.volume,
                injection_file=self.rig.injection_file,
                sending_done=sending.done.is_set,
            )
            faults = schedule(self.sc.faults, context)
            sending.run_until_sent(every_s)
            sent = sending.sent()
            # The MQTT publisher is the first producer; with "both" it sent only its share.
            mqtt = self.mqtt_publisher
            acked = (
                mqtt.wait_acked(self.logs[0].count, ACK_TIMEOUT_S) if mqtt and self.sc.transport.mqtt.qos > 0 else True
            )
            # Drain: wait until the pipeline has received every sent message, or until it makes no progress
            # for drain_timeout (then the ledger shows the loss).
            for timer in faults:
                # A process fault's last restart comes before the drain: what the broker kept for the
                # restarted pipeline must have its chance to arrive.
                timer.join(max(5.0, self.sc.run.drain_timeout))
            wait_received(self.sut.received, sent, self.sc.run.drain_timeout, sending.tick, every_s)
            if self.fault_events:
                # Redelivered copies make "received" reach "sent" early: wait until nothing more arrives.
                wait_quiet(self.sut.received, QUIET_S, self.sc.run.drain_timeout, sending.tick, every_s)
            if isinstance(self.sut, InProcessPipeline):
                self.sut.close_sources()
            opcua = self.opcua_stats()
            session.stop()
            final = sending.snapshot(0.0)
            if self.on_progress:
                self.on_progress(final)
            extras = self.sut.extras()
            publisher = self.publisher_part(endpoints, acked)
            writer = endpoints.plant
        self.rig.release_storage()
        if opcua is not None and self.options.calibrate and writer is not None:
            opcua["reference"] = self.opcua_reference()
        return self.account(extras, opcua, publisher, sending, writer)

    def opcua_stats(self) -> dict[str, Any] | None:
        if not self.opcua_machines or not isinstance(self.sut, InProcessPipeline):
            return None
        from pipeline.opcua_source import OpcUaSource

        source = next((s for s in self.sut.closed_sources if isinstance(s, OpcUaSource)), None)
        if source is None:
            return None
        ua = self.sc.transport.opcua
        stats = asdict(source.stats)
        stats["security"] = {
            "policy_uri": source.security_policy_uri,
            "mode": ua.security,
            "username": self.credentials.opcua_username is not None,
        }
        elapsed_s = max((self.clock.now_ns() - self.epoch_ns) / 1e9, 1e-9)
        stats["notifications_per_s"] = round(source.stats.notifications / elapsed_s, 1)
        return stats

    def opcua_reference(self) -> dict[str, Any]:
        """The library's own speed on this machine, beside the pipeline's: same run, same server code.
        Always the same size, whatever the scenario's length: REFERENCE_MESSAGES readings, all due at once."""
        from bench.harness import opcua_reference

        spec = self.spec
        ref_spec = StreamSpec(spec.seed, spec.machines, (PhaseSpec("steady", 1.0, float(REFERENCE_MESSAGES)),))
        on_opcua = set(self.opcua_machines)
        # Timestamps of now, as a run's: from 0 (1970) every reading was refused as far_past, and the reference
        # timed the quarantine path instead of the one a run's readings take. Each trial has a pipeline of its own.
        reference = [m for m in stream(ref_spec, 0, time.time_ns() - 10**9) if m.machine in on_opcua]
        return opcua_reference.measure(
            spec.machines, reference, self.sc.transport.opcua.publishing * 1000, self.sc.pipeline
        )

    def publisher_part(self, endpoints: Endpoints, acked: bool) -> dict[str, Any]:
        mqtt, writer = self.mqtt_publisher, endpoints.writer
        return {
            "accepted": sum(log.count for log in self.logs),
            "not_sent": {
                **({"server_down": len(writer.unsent)} if writer is not None and writer.unsent else {}),
                **(mqtt.not_sent if mqtt else {}),
            },
            "window": mqtt.window_stats() if mqtt else None,
            "acked": mqtt.acked if mqtt else None,
            "all_acked": acked,
        }

    def sends(self) -> tuple[Sends, dict[int, list[Message]]]:
        copies: Counter[int] = Counter()
        anomalous: dict[int, list[Message]] = {}
        payloads: dict[bytes, int] = {}
        for log in self.logs:
            copies.update(log.copies)
            payloads.update(log.payloads)
            for seq, sent_messages in log.anomalous.items():
                anomalous.setdefault(seq, []).extend(sent_messages)
        seqs = [i for i, f in enumerate(self.flags) if f]
        flags = self.flags
        return Sends(seqs, self.intended, lambda seq: bool(flags[seq]), copies, payloads), anomalous

    def account(
        self,
        extras: dict[str, Any],
        opcua: dict[str, Any] | None,
        publisher: dict[str, Any],
        sending: _Sending,
        plant: PlantServer | None,
    ) -> tuple[dict[str, Any], Ledger, list[str]]:
        output = self.sut.read_back()
        sends, anomalous = self.sends()
        outage = (
            Outage(plant.stopped_at_ns, opcua["resumed_at_ns"], self.sc.transport.opcua.publishing)
            if plant is not None and opcua is not None
            else None
        )
        windows = self.fault_windows()
        accounting = account(
            sends,
            output,
            self.spec,
            opcua_machines=self.opcua_machines,
            outage=outage,
            crashes=crash_windows(windows),
        )
        ledger = accounting.ledger
        if isinstance(self.sut, ExternalPipeline):
            check_seqs_found(output.back, ledger.persisted, self.sut.spec.output)
        damaged = [*ledger.unreadable_files, *(f"{f} (unfinalised)" for f in ledger.unfinalised_files)]
        breakers = sorted({w.event.kind for w in windows if w.expected and w.event.kind in FILE_BREAKERS})
        if damaged and breakers:
            # Files broken by faults this configuration never promised to survive (a naive writer killed, or
            # failing on a full disk): named damage, shown with its cause, not an unexplained failure.
            ledger = replace(ledger, unreadable_files=[], unfinalised_files=[])
            accounting = Accounting(ledger, accounting.e2e)
            self.named_damage = [f"{f}: named by {', '.join(breakers)} (not promised)" for f in damaged]
        if windows:
            if output.durable:
                latencies = {seq: at - sends.intended_ns[seq] for seq, at in output.durable if sends.sent(seq)}
                kind = "end_to_end"
            else:
                latencies = received_latencies(self.out_dir / self.settings.parquet.path, sends)
                kind = "receive"
            self.fault_costs = per_fault(windows, sends, output.back, latencies, kind)
        errors = list(extras.get("errors", []))
        errors += [
            f"{e.kind} at {(e.struck_ns - self.epoch_ns) / 1e9:.1f} s: {e.error}" for e in self.fault_events if e.error
        ]
        if self.mqtt_publisher is not None and (unsent := self.mqtt_publisher.not_sent_problem()):
            # Offered but never handed to the broker: the run must say so, not only the counters.
            errors.append(unsent)
        sql_back = extras.get("sql_back")
        if sql_back is not None:
            problem = _check_sql(
                sql_back, ledger.persisted, self.settings.sql.aggregate if self.settings.sql else "raw"
            )
            named = sorted({w.event.kind for w in windows if w.expected and w.event.kind in STORAGE_FAULTS})
            named += sorted({w.event.kind for w in windows if w.expected and w.event.kind in PROCESS_KINDS})
            if problem and named:
                # Two sinks of a pipeline that never promised to survive these faults differ: a finding the
                # results show (sql.check), not an unexplained loss.
                sql_back["check"] = f"MISMATCH, named by {', '.join(named)} (not promised)"
            elif problem:
                errors.append(problem)
        # Scoring reads the built-in pipeline's columns. An external system is judged by truth label alone: a
        # message missing from its output is lost only when its truth says it should have been stored.
        scored = self.sc.anomalies and not isinstance(self.sut, ExternalPipeline)
        validation = self.validation(output, sends, anomalous, ledger, errors) if scored else None
        truth = None
        if self.sc.system.external is not None:
            ledger, truth = judge_external(
                ledger,
                output.back,
                sends.seqs,
                anomalous,
                expect_rejected=self.sc.system.external.expect_rejected,
                anomaly_expect={a.kind: a.expect for a in self.sc.anomalies if a.expect is not None},
                rejects_kept=self.sc.system.external.rejects is not None,
            )
            accounting = Accounting(ledger, accounting.e2e)
        send_lag = Recorder()
        for log in self.logs:
            send_lag.merge(log.lag)
        measured = _Measured(extras, opcua, publisher, sending, output, accounting, send_lag, validation, errors)
        result = self.result(measured)
        if truth is not None:
            result["truth"] = truth
        return result, ledger, errors

    def fault_windows(self) -> list[FaultWindow]:
        """Each fault that happened, with whether this configuration promised to survive it (see
        :mod:`bench.harness.fault_ledger`): losses in a window it never promised to survive are named by it."""
        mq = self.sc.transport.mqtt
        return fault_windows(
            self.fault_events,
            self.sc.faults,
            self.settings,
            qos=mq.qos,
            broker=self.options.broker or mq.broker,
            now_ns=self.clock.now_ns(),
            # The bench cannot know what a user's pipeline promised: every loss in a fault is reported as lost.
            promises_all=isinstance(self.sut, ExternalPipeline),
        )

    def validation(
        self, output: Output, sends: Sends, anomalous: dict[int, list[Message]], ledger: Ledger, errors: list[str]
    ) -> dict[str, Any]:
        spec = self.spec
        validation = _score_validation(
            self.sc,
            self.settings,
            self.out_dir,
            output.back,
            sent_seqs=sends.seqs,
            anomalous=anomalous,
            sent_payloads=sends.payloads,
            intended=self.intended,
            machine=lambda seq: machine_of(spec, seq),
            replay_offset_ns=self.replay_offset_ns,
        )
        validation["quarantine_rows"] = ledger.quarantine_rows
        if ledger.quarantine_rows != ledger.rejected + ledger.redelivered:
            validation["problems"].append(
                f"quarantine holds {ledger.quarantine_rows} rows, the ledger accounts for {ledger.rejected} "
                f"rejected + {ledger.redelivered} redelivered"
            )
        errors.extend(f"validation: {p}" for p in validation["problems"])
        return validation

    def result(self, m: _Measured) -> dict[str, Any]:
        extras, output, accounting = m.extras, m.output, m.accounting
        sc, mq, kind = self.sc, self.sc.transport.mqtt, self.sc.transport.kind
        on_mqtt = kind in ("mqtt", "both")
        stats = extras.get("statistics")
        pipeline = None
        if stats is not None:
            wait_ms = round(stats.readings.producer_wait_ns / 1e6, 3) if stats.readings else 0
            pipeline = {**pipeline_part(extras, m.errors), "producer_wait_ms": wait_ms}
        result = variant_parts(
            self.name,
            sc,
            self.settings,
            self.spec,
            transport={
                "kind": kind,
                "broker": (self.options.broker or mq.broker) if on_mqtt else None,
                "qos": mq.qos if on_mqtt else None,
                "producers": self.producers,
                "topic": mq.topic,
            },
            overrides={"messages": self.options.messages, "duration_s": self.options.duration_s},
            ledger=accounting.ledger,
            latency={"end_to_end": accounting.e2e, "send_lag": m.send_lag},
            flushes=output.flushes,
            epoch_ns=self.epoch_ns,
            last_sent_ns=max(log.last_sent_ns for log in self.logs),
            timeline=m.sending.timeline,
            samples=m.sending.samples,
            lock=lock_summary(extras.get("lock_probes"), sc.pipeline.buffer.lock),
            pipeline=pipeline,
            files=output.back.files,
        )
        if self.named_damage:
            result["unreadable_files"] = self.named_damage
        result["probes"]["loop_lag_ms"] = extras.get("loop_lag")
        result["probes"]["cpu"] = cpu_summary(output.flushes, extras.get("hot_path_cpu"))
        result["publisher"] = m.publisher
        result["validation"] = m.validation
        result["opcua"] = m.opcua
        result["sql"] = extras.get("sql_back")
        if isinstance(self.sut, ProcessPipeline):
            result["system"] = {"kind": "process", **{k: v for k, v in extras.items() if k != "sql_back"}}
        elif isinstance(self.sut, ExternalPipeline):
            cpu_s, sent = extras.get("cpu_s"), accounting.ledger.sent
            per_1k = None if cpu_s is None or not sent else round(cpu_s / sent * 1000, 4)
            result["system"] = {"kind": "external", **extras, "cpu_s_per_1k": per_1k}
        if self.fault_events:
            result["fault_events"] = fault_events_json(self.fault_events, self.epoch_ns, self.fault_costs)
        # Bytes of the finished Parquet data files: for the same stream and code, the same every run (a gate counter).
        data = self.out_dir / self.settings.parquet.path
        result["data_bytes"] = sum(f.stat().st_size for f in data.rglob("*.parquet")) if data.is_dir() else 0
        # This process, pipeline included (the embedded broker is a child of its own): what a service level on
        # memory would bound. Peak since the process started, so a later variant inherits an earlier's peak.
        result["resources"] = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        return result


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


PROCESS_KINDS = ("process_kill", "process_restart")
FILE_BREAKERS = (*PROCESS_KINDS, "disk_full", "sink_error")
"""Faults that can leave a naive writer's file unfinalised or unreadable."""


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
