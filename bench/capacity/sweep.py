"""``bench capacity SCENARIO``: step the offered rate, per pipeline worker count, until the pipeline cannot keep up.

Each step is a short run of its own, in processes of its own:

- N pipeline worker processes (:mod:`bench.capacity.pipeline_worker`), sharing one MQTT
  subscription (``$share/<group>/<filter>``) on a broker that supports it;
- P publisher processes (:mod:`bench.capacity.publish_worker`), each sending its share of
  one deterministic constant-rate stream at the intended times (open model);
- this process only starts them, shows progress, and afterwards reads back what
  was persisted, rebuilds the backlog curve from every message's send and
  durable times, and judges the step (:mod:`bench.capacity.model`).

A step that did not get its load out (publishers behind schedule) is reported
as publisher-limited, never as a pipeline limit.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import psutil
from numpy.typing import NDArray

from bench.capacity import model
from bench.capacity.publish_worker import spec_to_json
from bench.capacity.workers import READY_TIMEOUT_S, Child, ExternalWorker, WorkerPipelines
from bench.errors import ScenarioError, UsageError
from bench.harness import session as harness
from bench.harness.accounting import CommandOptions, RunRecord, write_run_results
from bench.harness.external_sut import ExternalPipeline, check_seqs_found
from bench.harness.ledger import reconcile
from bench.harness.probes import append_cost, flush_summary, lock_summary
from bench.harness.progress import StepProgress
from bench.harness.runner import make_run_dir, scenario_ref
from bench.harness.sut import Output, SinkFault
from bench.results import SCHEMA_VERSION, environment
from bench.scenario import CapacitySettings, LoadedScenario, Scenario
from pipeline.buffer import LockProbes
from pipeline.clock import MonotonicWallClock
from pipeline.model import FlushStat
from pipeline.probes import Recorder
from simulators.publisher import STALL_TIMEOUT_S, describe_not_sent
from simulators.stream import PhaseSpec

START_LEAD_S = 0.3


@dataclass(frozen=True)
class CapacityOptions(CommandOptions):
    """``bench capacity``'s options: the command line's overrides of the scenario's capacity section."""

    workers: tuple[int, ...] | None = None
    rates: tuple[float, ...] | None = None
    step_s: float | None = None
    report: bool = True
    calibration: Path | None = None
    """A ``bench calibrate`` result (calibration.json or its folder): the publisher processes' ceiling."""


@dataclass(frozen=True)
class CapacityOutcome(RunRecord):
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _settings(sc: Scenario, options: CapacityOptions, path: Path) -> CapacitySettings:
    if sc.capacity is None:
        raise ScenarioError(
            f"{path}: capacity: missing; bench capacity needs a capacity section (see scenarios/capacity.yaml)"
        )
    update: dict[str, Any] = {}
    if options.workers is not None:
        update["workers"] = options.workers
    if options.rates is not None:
        update["rates"], update["ramp"] = options.rates, None
    if options.step_s is not None:
        update["step"] = options.step_s
        update["settle"] = min(sc.capacity.settle, options.step_s / 4)
    try:
        return CapacitySettings.model_validate({**sc.capacity.model_dump(by_alias=True), **update})
    except ValueError as exc:
        raise UsageError(f"capacity options: {exc}") from None


def run_capacity(
    loaded: LoadedScenario,
    options: CapacityOptions,
    on_progress: Callable[[StepProgress], None] | None = None,
) -> CapacityOutcome:
    sc = loaded.scenario
    cap = _settings(sc, options, loaded.path)
    broker_setting = _check_capacity(loaded, cap, options)
    generator = generator_plan(loaded, options)
    run_dir = make_run_dir(f"{sc.name}-capacity", options.out, options.reports_dir)
    (run_dir / "scenario.yaml").write_bytes(loaded.path.read_bytes())
    run_id = f"{sc.name}-{uuid.uuid4().hex[:8]}"
    started = time.time()
    env_before = environment()
    series: list[dict[str, Any]] = []
    variants: list[dict[str, Any]] = []
    with harness.embedded_broker(broker_setting == "embedded", run_dir / "broker.log") as broker:
        url = broker.url if broker is not None else broker_setting
        # A broker on this machine shares its cores with the sweep: its CPU is measured beside the roles'.
        local = local_broker(url) if broker is None else None
        sweep = _Sweep(
            loaded,
            cap,
            run_dir,
            run_id,
            url=url,
            broker_pid=broker.pid if broker is not None else None,
            generator=generator,
            local_broker=local,
        )
        for workers in cap.workers:
            sr, variant = sweep.series(workers, on_progress)
            series.append(sr)
            variants.append(variant)
    fit = _usl_fit(series)
    scaling = model.scaling(series, generator=generator, cores=os.cpu_count())
    scaling["broker_process"] = sweep.broker_label if sweep.broker_cpu_pid is not None else None
    advice = _advice(sc, cap, series, fit, variants)
    problems = _step_problems(series)
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "kind": "capacity",
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "scenario": scenario_ref(loaded),
        "environment": {**env_before, "host_load_after": environment()["host_load"]},
        "variants": variants,
        "capacity": {
            "settings": cap.model_dump(mode="json", by_alias=True),
            "threshold": cap.threshold,
            "step_s": cap.step,
            "transport": "mqtt",
            "broker": broker_setting,
            "qos": sc.transport.mqtt.qos,
            "series": series,
            "usl": fit,
            "recommendations": advice,
            "generator": generator,
            "scaling": scaling,
        },
    }
    return CapacityOutcome(run_dir, write_run_results(run_dir, results), problems)


def generator_plan(loaded: LoadedScenario, options: CapacityOptions) -> dict[str, Any] | None:
    """With ``--calibration``: the publisher processes the sweep's highest rate needs (model.generator_plan);
    None without one. A calibration file that cannot be read is the user's mistake, said in one line."""
    if options.calibration is None:
        return None
    from bench.calibrate.model import load_calibration

    try:
        calibration = load_calibration(options.calibration)
    except ValueError as exc:
        raise UsageError(f"--calibration: {exc}") from None
    cap = _settings(loaded.scenario, options, loaded.path)
    qos = loaded.scenario.transport.mqtt.qos
    try:
        ceiling = calibration.ceiling(qos)
    except KeyError:
        raise UsageError(
            f"--calibration {options.calibration}: no publisher ceiling at QoS {qos}; run bench calibrate in full"
        ) from None
    return model.generator_plan(
        ceiling_per_s=ceiling,
        publishers=cap.publishers,
        highest_rate=max(cap.step_rates()),
        qos=qos,
        cores=os.cpu_count(),
        source=str(options.calibration),
    )


def local_broker(url: str) -> tuple[int, str] | None:
    """The process listening on a broker URL's port when the broker runs on this machine (its pid and name), so
    its CPU can be measured beside the sweep's; None when it runs elsewhere or this user may not see it."""
    parts = urlsplit(url)
    try:
        port = parts.port or 1883
        infos = socket.getaddrinfo(parts.hostname or "127.0.0.1", port, proto=socket.IPPROTO_TCP)
        addresses = {str(info[4][0]) for info in infos}
        own = {a.address for nics in psutil.net_if_addrs().values() for a in nics}
        if not any(ipaddress.ip_address(a).is_loopback or a in own for a in addresses):
            return None
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid, psutil.Process(conn.pid).name()
    except (OSError, ValueError, psutil.Error):
        return None
    return None


def _check_capacity(loaded: LoadedScenario, cap: CapacitySettings, options: CapacityOptions) -> str:
    """What a capacity sweep cannot measure, refused before anything starts; returns the broker setting."""
    sc = loaded.scenario
    if sc.transport.kind != "mqtt":
        raise ScenarioError(
            f"{loaded.path}: transport.kind: bench capacity drives MQTT; expected mqtt, got {sc.transport.kind}"
        )
    if sc.system.kind == "process":
        # The sweep's workers already are the built-in pipeline in processes of their own.
        raise ScenarioError(
            f"{loaded.path}: system.kind: bench capacity runs the built-in pipeline as worker processes already; "
            "expected in_process (or external for your own pipeline), got process"
        )
    if sc.system.kind == "external" and tuple(cap.workers) != (1,):
        # The bench starts one instance of the user's command; scaling it out is the user's own deployment.
        raise ScenarioError(
            f"{loaded.path}: capacity.workers: an external system is measured as the one instance its command "
            f"starts; expected [1], got {list(cap.workers)}"
        )
    if sc.anomalies:
        raise ScenarioError(
            f"{loaded.path}: anomalies: a capacity sweep sends clean data only; remove them (bench run scores them)"
        )
    if sc.matrix:
        raise ScenarioError(
            f"{loaded.path}: matrix: a capacity sweep measures one pipeline configuration; remove the matrix"
        )
    if harness.Credentials.of(sc, loaded.path).mqtt_username is not None:
        raise ScenarioError(f"{loaded.path}: transport.mqtt.username: bench capacity does not pass credentials yet")
    broker_setting = options.broker or sc.transport.mqtt.broker
    if broker_setting != "embedded" and not broker_setting.startswith(("mqtt://", "tcp://")):
        raise UsageError(f"--broker: expected a URL like mqtt://127.0.0.1:1883, got {broker_setting!r}")
    if broker_setting == "embedded" and max(cap.workers) > 1:
        raise UsageError(
            f"capacity.workers {list(cap.workers)}: more than one pipeline worker shares the subscription through "
            "MQTT v5 shared subscriptions ($share/<group>/<topic>), which the embedded amqtt broker (MQTT 3.1.1) "
            "does not support; pass --broker mqtt://127.0.0.1:1883 (Mosquitto) or measure workers: [1]"
        )
    return broker_setting


@dataclass
class _Sweep:
    """The steps of one sweep, one worker count at a time, each step a session of its own."""

    loaded: LoadedScenario
    cap: CapacitySettings
    run_dir: Path
    run_id: str
    url: str
    broker_pid: int | None
    """The embedded broker's process (None: an external broker)."""
    generator: dict[str, Any] | None = None
    """The publishers' calibrated ceiling (``--calibration``; model.generator_plan), or None."""
    local_broker: tuple[int, str] | None = None
    """An external broker's process on this machine (pid, name), found by its port; None: not found."""

    @property
    def broker_cpu_pid(self) -> int | None:
        """The broker process whose CPU is measured: the embedded one, or a local external one."""
        return self.broker_pid if self.broker_pid is not None else (self.local_broker or (None, ""))[0]

    @property
    def broker_label(self) -> str:
        """What the broker's CPU figure is of, in the limit line."""
        if self.broker_pid is not None:
            return "embedded broker"
        if self.local_broker is None:
            return "broker (not on this machine)"
        pid, name = self.local_broker
        return f"broker ({name} pid {pid})"

    def series(
        self, workers: int, on_progress: Callable[[StepProgress], None] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Step the rates up for ``workers`` until the steps stop being sustainable; its series and variant."""
        cap, rates = self.cap, self.cap.step_rates()
        steps: list[dict[str, Any]] = []
        measured: list[_StepRecords] = []
        failed = 0
        for k, rate in enumerate(rates):
            step_dir = self.run_dir / f"workers-{workers}" / f"step-{k + 1:02d}-{rate:g}"
            step, records = _Step(self, workers, rate, (k, len(rates)), step_dir).run(on_progress)
            step["dir"] = str(step_dir.relative_to(self.run_dir))
            step["generator_limited"] = model.generator_limited(rate, self.generator)
            steps.append(step)
            measured.append(records)
            if on_progress:
                on_progress(
                    StepProgress(
                        workers, k, len(rates), rate, cap.step, cap.step, step["sent"], step["sent"], step["verdict"]
                    )
                )
            if step["verdict"] == "publisher-limited":
                break  # higher rates would only be further behind: the load generator is the limit here
            if step["verdict"] == "unsustainable":
                failed += 1
                if failed >= cap.stop_after:
                    break
        external = self.loaded.scenario.system.external is not None
        sr = _series(
            workers,
            steps,
            rates,
            "external system" if external else "pipeline worker",
            generator=self.generator,
            broker=self.broker_label,
        )
        variant = _variant(
            self.loaded.scenario,
            workers=workers,
            steps=steps,
            step_flushes=[r.flushes for r in measured],
            step_steady=[r.steady for r in measured],
            step_locks=[r.locks for r in measured],
            sr=sr,
            step_systems=[r.system for r in measured],
        )
        return sr, variant


@dataclass(frozen=True)
class _StepRecords:
    """A step's flushes (all, and those after the settle time: the step table's flush population) and locks."""

    flushes: list[FlushStat]
    steady: list[FlushStat]
    locks: LockProbes
    system: dict[str, Any] | None = None
    """An external system's part of the results (starts, how durability was seen, CPU and memory)."""


class _Step:
    """One constant-rate step: pipeline worker processes behind the broker, publisher processes in front."""

    def __init__(self, sweep: _Sweep, workers: int, rate: float, index: tuple[int, int], step_dir: Path) -> None:
        self.sweep, self.workers, self.rate, self.index, self.step_dir = sweep, workers, rate, index, step_dir
        sc = sweep.loaded.scenario
        self.sc, self.cap = sc, sweep.cap
        self.run_id = f"{sweep.run_id}-w{workers}-s{index[0] + 1}"
        self.clock = MonotonicWallClock()
        self.epoch_ns = 0
        self.broker_cpu: list[tuple[int, float]] = []
        self.bench_cpu: list[tuple[int, float]] = []
        self.machine_cpu: list[tuple[int, float, float]] = []
        self.pubs: list[Child] = []
        step_dir.mkdir(parents=True, exist_ok=True)
        self.sut: WorkerPipelines | ExternalWorker
        if sc.system.external is not None:
            # A fresh start per step, on the step's folder: each step is read back from its own output alone.
            system = ExternalPipeline(sc.system.external, sweep.loaded.path.parent, step_dir, self.clock)
            self.sut = ExternalWorker(system)
            return
        # On a real broker every worker count goes through the shared-subscription path, one worker included,
        # so 1 and N workers are measured the same way.
        self.sut = WorkerPipelines(
            sc.validation(),
            step_dir,
            workers,
            shared=sweep.broker_pid is None,
            group=self.run_id,
            sink=SinkFault.of(sc),
        )

    def session_config(self) -> harness.SessionConfig:
        return harness.SessionConfig(
            scenario=self.sc,
            scenario_path=self.sweep.loaded.path,
            run_id=self.run_id,
            out_dir=self.step_dir,
            broker_url=self.sweep.url,
            opcua_machines=(),
            credentials=harness.Credentials(None, None, None, None),
            clock=self.clock,
        )

    def start_publishers(self, session: harness.Session) -> None:
        mq, cap = self.sc.transport.mqtt, self.cap
        spec = replace(self.sc.stream_spec(), phases=(PhaseSpec("steady", cap.step, self.rate),))
        session.on_close(self.close_publishers)
        for p in range(cap.publishers):
            config = {
                "spec": spec_to_json(spec),
                "broker": self.sweep.url,
                "topic": mq.topic_for_run(self.run_id),
                "qos": mq.qos,
                "client_id": f"{self.run_id}-publisher-{p}",
                "seq_property": mq.seq_property,
                "share": p,
                "shares": cap.publishers,
                "final_path": str(self.step_dir / f"publisher-{p}.json"),
            }
            d = self.step_dir
            self.pubs.append(
                Child(
                    "bench.capacity.publish_worker", config, d / f"publisher-{p}.config.json", d / f"publisher-{p}.log"
                )
            )
        for child in self.pubs:
            child.wait_for("ready", READY_TIMEOUT_S, "publisher")

    def close_publishers(self) -> None:
        for c in self.pubs:
            c.send("")
            if c.alive:
                c.proc.terminate()
            c.wait(10)

    def progress(self, on_progress: Callable[[StepProgress], None] | None, phase: str) -> None:
        if on_progress is None:
            return
        k, n = self.index
        on_progress(
            StepProgress(
                self.workers,
                k,
                n,
                self.rate,
                max(0.0, (self.clock.now_ns() - self.epoch_ns) / 1e9),
                self.cap.step,
                sum(int(c.latest.get("sent", 0)) for c in self.pubs),
                self.sut.durable(),
                phase,
            )
        )

    def sample_cpu(self) -> None:
        busy = machine_busy_s()
        if busy is not None:
            self.machine_cpu.append((self.clock.now_ns(), *busy))
        broker = self.sweep.broker_cpu_pid
        if broker is not None:
            # The broker's CPU tells whether it, not the pipeline, was the limit, and how much of the cores it took.
            cpu = process_cpu_s(broker)
            if cpu is not None:
                self.broker_cpu.append((self.clock.now_ns(), cpu))
        # This process too shares the cores (progress, the workers' pipes): counted so the rest is others' work.
        own = process_cpu_s(os.getpid())
        if own is not None:
            self.bench_cpu.append((self.clock.now_ns(), own))

    def run(self, on_progress: Callable[[StepProgress], None] | None) -> tuple[dict[str, Any], _StepRecords]:
        """Run the step; its metrics and its flush and lock records."""
        with harness.Session(self.session_config(), self.sut) as session:
            session.start()
            self.start_publishers(session)
            self.epoch_ns = self.clock.now_ns() + int(START_LEAD_S * 1e9)
            for child in self.pubs:
                child.send(str(self.epoch_ns))
            while not all(c.events["done"].is_set() for c in self.pubs):
                self.sample_cpu()
                self.progress(on_progress, "send")
                self.sut.check_alive()
                time.sleep(0.25)
            for c in self.pubs:
                c.wait_for("done", 1.0, "publisher")
            total_sent = sum(int(c.latest.get("sent", 0)) for c in self.pubs)
            # Drain: until the workers received everything, or made no progress for the scenario's drain timeout.
            harness.wait_received(
                self.sut.received,
                total_sent,
                self.sc.run.drain_timeout,
                lambda: self.progress(on_progress, "drain"),
                0.25,
            )
            session.stop()
        step, flushes, locks = _analyse(self, self.sut.read_back())
        start, end = self.epoch_ns + self.cap.settle * 1e9, self.epoch_ns + self.cap.step * 1e9
        step["broker_cpu_pct"] = _cpu_pct(self.broker_cpu, start, end)
        step["bench_process_cpu_pct"] = _cpu_pct(self.bench_cpu, start, end)
        cores = [c for c in self.machine_cpu if start <= c[0] <= end]
        # All cores together, 100 = every core busy: on a small machine publishers, broker and pipeline compete.
        step["machine_cpu_pct"] = (
            round((cores[-1][1] - cores[0][1]) / max(cores[-1][2] - cores[0][2], 1e-9) * 100, 1)
            if len(cores) >= 2
            else None
        )
        steady = [f for f in flushes if start <= f.started_ns <= end]
        system = None
        if isinstance(self.sut, ExternalWorker):
            extras = self.sut.extras()
            cpu_s, sent = extras.get("cpu_s"), step["sent"]
            per_1k = None if cpu_s is None or not sent else round(cpu_s / sent * 1000, 4)
            system = {"kind": "external", **extras, "cpu_s_per_1k": per_1k}
        return step, _StepRecords(flushes, steady, locks, system)


def _cpu_pct(samples: list[tuple[int, float]], start: float, end: float) -> float | None:
    window = [c for c in samples if start <= c[0] <= end]
    if len(window) < 2:
        return None
    return round((window[-1][1] - window[0][1]) / ((window[-1][0] - window[0][0]) / 1e9) * 100, 1)


def _usl_fit(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Universal Scalability Law over the worker counts' peak throughputs, with what it may not say."""
    points = [(s["workers"], s["peak_per_s"]) for s in series if s.get("peak_per_s")]
    fit = model.usl(points) if len(points) >= 2 else None
    if fit is None:
        return None
    if not all(s["saturated"] for s in series):
        fit["note"] = (fit["note"] + "; " if fit["note"] else "") + (
            "some worker counts never saturated: their throughput is a lower bound and so is the fit"
        )
    others = [s for s in series if s.get("limit") and not s["limit"].startswith("the pipeline's CPU")]
    fit["pipeline_limited"] = not others
    if others:
        fit["note"] = (fit["note"] + "; " if fit["note"] else "") + (
            "the limit was not the pipeline's CPU ("
            + "; ".join(f"workers={s['workers']}: {s['limit']}" for s in others)
            + "): the fit describes this test set-up, not the pipeline's scaling"
        )
    return fit


def _advice(
    sc: Scenario,
    cap: CapacitySettings,
    series: list[dict[str, Any]],
    fit: dict[str, Any] | None,
    variants: list[dict[str, Any]],
) -> Any:
    settings = sc.validation()
    flush_rec = Recorder()
    for s in (s for sr in series for s in sr["steps"] if s["sustainable"]):
        flush_rec.merge(Recorder.from_json(s["flush_raw"]))
    return model.recommendations(
        series=series,
        fit=fit,
        append=variants[0]["probes"]["append_cost"] if variants else None,
        flush_ms=flush_rec.summary() if flush_rec.count else None,
        flush_interval_s=settings.buffer.flush_interval,
        buffer_size=settings.buffer.size,
        rotate_s=settings.parquet.rotate,
        target_rate=cap.target_rate,
        headroom=cap.headroom,
    )


def _step_problems(series: list[dict[str, Any]]) -> list[str]:
    """What fails the sweep: a loss in a sustainable step, a step's errors, no sustainable first series.
    A loss in an overloaded step is a warning on its series (a broker's queue limit), not a failure."""
    problems: list[str] = []
    for sr in series:
        for s in sr["steps"]:
            s.pop("flush_raw", None)
            if s["lost"] and not s["sustainable"]:
                note = f"step {s['offered_per_s']:g} msg/s: {s['lost']} message(s) lost in overload"
                sr.setdefault("warnings", []).append(note)
            if s["lost"] and s["sustainable"]:
                problems.append(
                    f"workers={sr['workers']} step {s['offered_per_s']:g} msg/s lost {s['lost']} message(s)"
                )
            problems.extend(f"workers={sr['workers']} step {s['offered_per_s']:g}: {e}" for e in s["errors"])
    first = series[0] if series else None
    if first is not None and first["sustainable_per_s"] is None:
        problems.append(
            f"workers={first['workers']}: no step was sustainable (first step {first['steps'][0]['verdict']}); "
            "lower capacity.rates"
        )
    return problems


def _publisher_records(
    step_dir: Path, publishers: int, epoch_ns: int
) -> tuple[NDArray[np.int64], Recorder, float, list[str]]:
    """The publishers' side: (seq, intended, sent) per send, their send lag, CPU share and problems."""
    triples = array("q")
    lag = Recorder()
    pub_cpu = 0.0
    errors: list[str] = []
    for p in range(publishers):
        final = json.loads((step_dir / f"publisher-{p}.json").read_text(encoding="utf-8"))
        if final.get("not_sent"):
            unsent = describe_not_sent(
                final["not_sent"], window=final["window"]["size"], stall_timeout_s=STALL_TIMEOUT_S
            )
            errors.append(f"publisher {p}: {unsent}")
        chunk = array("q")
        chunk.frombytes((step_dir / f"publisher-{p}.json.sent").read_bytes())
        triples.extend(chunk)
        lag.merge(Recorder.from_json(final["send_lag"]))
        pub_cpu += final["cpu_s"] / max((final["finished_ns"] - epoch_ns) / 1e9, 1e-9)
    sent = np.frombuffer(triples.tobytes(), dtype=np.int64).reshape(-1, 3)
    return sent, lag, pub_cpu, errors


def _worker_records(
    finals: list[dict[str, Any]], start: int, end: int
) -> tuple[LockProbes, float | None, float | None, list[str]]:
    """The pipeline workers' own reports: lock probes, CPU % and peak memory in the window (None: no samples,
    e.g. an external system the bench attached to), errors."""
    locks = LockProbes.new()
    cpu_pct = rss = 0.0
    sampled = False
    errors: list[str] = []
    for final in finals:
        errors.extend(final["errors"])
        if final["lock"]:
            for name in ("wait", "hold", "stall"):
                getattr(locks, name).merge(Recorder.from_json(final["lock"][name]))
        window = [s for s in final["samples"] if start <= s[0] <= end] or final["samples"]
        if len(window) >= 2:
            sampled = True
            cpu_pct += (window[-1][1] - window[0][1]) / ((window[-1][0] - window[0][0]) / 1e9) * 100
        rss += max((s[2] for s in window), default=0) / 1e6
    return locks, cpu_pct if sampled else None, rss if sampled else None, errors


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) another process has used so far; None when it is gone or not ours to read."""
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(times.user + times.system)


def machine_busy_s() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, all cores; None where psutil cannot tell."""
    try:
        times = psutil.cpu_times()
    except (OSError, NotImplementedError):
        return None
    fields = times._asdict()
    # guest and guest_nice (Linux) are already counted in user and nice.
    total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))
    idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
    return total - idle, total


def _analyse(step: _Step, output: Output) -> tuple[dict[str, Any], list[FlushStat], LockProbes]:
    cap, epoch_ns, workers = step.cap, step.epoch_ns, step.workers
    sent, lag, pub_cpu, errors = _publisher_records(step.step_dir, len(step.pubs), epoch_ns)
    start = epoch_ns + int(cap.settle * 1e9)
    end = epoch_ns + int(cap.step * 1e9)
    locks, cpu_pct, rss, worker_errors = _worker_records(step.sut.finals, start, end)
    errors.extend(worker_errors)
    ledger = reconcile(sent[:, 0].tolist(), output.back)
    if isinstance(step.sut, ExternalWorker):
        check_seqs_found(output.back, ledger.persisted, step.sut.system.spec.output)
    durable_of = dict(output.durable)
    durable = np.array([durable_of.get(int(seq), -1) for seq in sent[:, 0]], dtype=np.int64)
    metrics = model.step_metrics(
        model.StepInput(
            offered_per_s=step.rate,
            epoch_ns=epoch_ns,
            step_s=cap.step,
            settle_s=cap.settle,
            seqs=sent[:, 0].copy(),
            intended_ns=sent[:, 1].copy(),
            sent_ns=sent[:, 2].copy(),
            durable_ns=durable,
            send_lag_p99_ms=lag.percentile_ms(99) if lag.count else 0.0,
            lost=ledger.lost,
        ),
        threshold=cap.threshold,
        backlog_growth=cap.backlog_growth,
    )
    flush_rec = Recorder()
    for f in output.flushes:
        if f.sink == "parquet" and start <= f.started_ns <= end:
            flush_rec.record_ns(f.total_ns)
    # An external system has no flush or lock probes: absent, not zero.
    external = isinstance(step.sut, ExternalWorker)
    metrics.update(
        {
            "workers": workers,
            "ledger": ledger.to_json(),
            "flush_ms": None if external else flush_rec.summary(ladder=True),
            "flush_raw": flush_rec.to_json(),
            "lock_wait_ms": None if external else locks.wait.summary(ladder=True),
            "cpu_pct": None if cpu_pct is None else round(cpu_pct, 1),
            "cpu_pct_per_worker": None if cpu_pct is None else round(cpu_pct / workers, 1),
            "rss_mb": None if rss is None else round(rss, 1),
            "publisher_cpu_pct": round(pub_cpu * 100, 1),
            "errors": errors,
        }
    )
    return metrics, output.flushes, locks


def _series(
    workers: int,
    steps: list[dict[str, Any]],
    rates: tuple[float, ...],
    role: str,
    *,
    generator: dict[str, Any] | None = None,
    broker: str = "embedded broker",
) -> dict[str, Any]:
    ok = [s for s in steps if s["sustainable"]]
    judged = [s for s in steps if s["verdict"] != "publisher-limited"]
    last = steps[-1] if steps else None
    if last is None:
        stopped = "no steps"
    elif last["verdict"] == "publisher-limited":
        stopped = (
            f"publishers could not offer {last['offered_per_s']:g} msg/s (send lag p99 {last['send_lag_p99_ms']:g} ms)"
        )
    elif last["verdict"] == "unsustainable":
        stopped = f"unsustainable at {last['offered_per_s']:g} msg/s"
    else:
        stopped = f"all {len(rates)} steps sustainable: raise capacity.rates to find the limit"
    kind, limit = model.limit_of(steps, role=role, generator=generator, cores=os.cpu_count(), broker=broker)
    return {
        "workers": workers,
        "limit": limit,
        "limit_kind": kind,
        "steps": steps,
        "sustainable_per_s": max((s["offered_per_s"] for s in ok), default=None),
        "sustainable_step": max((i for i, s in enumerate(steps) if s["sustainable"]), default=None),
        "peak_per_s": max((s["persisted_per_s"] for s in judged), default=None),
        "saturated": any(s["verdict"] == "unsustainable" for s in steps),
        "knee": model.knee(judged),
        "stopped": stopped,
    }


def _limit(
    steps: list[dict[str, Any]],
    role: str = "pipeline worker",
    generator: dict[str, Any] | None = None,
    broker: str = "embedded broker",
) -> str | None:
    """The limit line of a series (model.limit_of on this machine's cores)."""
    return model.limit_of(steps, role=role, generator=generator, cores=os.cpu_count(), broker=broker)[1]


def _variant(
    sc: Scenario,
    *,
    workers: int,
    steps: list[dict[str, Any]],
    step_flushes: list[list[FlushStat]],
    step_steady: list[list[FlushStat]],
    step_locks: list[LockProbes],
    sr: dict[str, Any],
    step_systems: list[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """One run-shaped variant per worker count, so a report draws flush, lock and append plots for it too.

    Its ledger, flush, lock and append figures cover the same steps, those the verdict rests on (the
    sustainable ones, or every step when none was), so the counts agree inside a report: an overloaded step's
    puts and slow flushes would otherwise swell the lock and flush populations beside a ledger without them.
    Flushes are those after each step's settle time, as in the step table and the flush advice. Latency,
    throughput and timeline are the highest sustainable step's (after its settle time), as the capacity
    tables show it.
    """
    best = steps[sr["sustainable_step"]] if sr["sustainable_step"] is not None else (steps[0] if steps else {})
    keys = ("sent", "persisted", "rejected", "dropped", "lost", "duplicates")
    # The ledger of the steps the verdict rests on; what overloaded steps lost (a broker's queue limit) is
    # counted apart, so a report does not show a sweep's planned overload as a failed ledger.
    judged_index = [i for i, s in enumerate(steps) if s["sustainable"]] or list(range(len(steps)))
    judged = [steps[i] for i in judged_index]
    totals = {k: sum(int(s["ledger"][k]) for s in judged) for k in keys}
    flushes = [f for i in judged_index for f in step_steady[i]]
    locks = LockProbes.new()
    for i in judged_index:
        for name in ("wait", "hold", "stall"):
            getattr(locks, name).merge(getattr(step_locks[i], name))
    # Append cost against file size: of the judged steps, the one that wrote the most rows grew its files most.
    longest = max(
        (step_flushes[i] for i in judged_index),
        key=lambda fs: sum(f.rows for f in fs if f.sink == "parquet"),
        default=[],
    )
    lock = (
        lock_summary(locks, sc.pipeline.buffer.lock)
        if locks.wait.count
        else {"strategy": sc.pipeline.buffer.lock, "enabled": False}
    )
    timeline = best.get("timeline", {})
    best_index = sr["sustainable_step"] if sr["sustainable_step"] is not None else 0
    system = step_systems[best_index] if step_systems and best_index < len(step_systems) else None
    return {
        "name": f"workers-{workers}",
        "config": {"pipeline": sc.validation().model_dump(mode="json", by_alias=True), "workers": workers},
        "ledger": {
            **totals,
            "reconciled": all(s["ledger"]["reconciled"] for s in judged),
            "steps": len(judged),
            "steps_offered_per_s": [s["offered_per_s"] for s in judged],
            "lost_in_overloaded_steps": sum(int(s["ledger"]["lost"]) for s in steps if s not in judged),
        },
        "throughput": {
            "offered_per_s": best.get("offered_per_s"),
            "sent_per_s": best.get("sent_per_s"),
            "persisted_per_s": best.get("persisted_per_s"),
        },
        "latency_ms": best.get("latency_ms", {}),
        "timeline": {k: timeline.get(k, []) for k in ("t_s", "sent", "durable")},
        "probes": {
            "flush": flush_summary(flushes),
            "lock": lock,
            "append_cost": append_cost(longest),
        },
        "capacity_step": best.get("dir"),
        # An external system: the highest sustainable step's process figures and how its latency was seen.
        **({"system": system} if system is not None else {}),
    }
