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

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import psutil

from bench.capacity import model
from bench.capacity.publish_worker import spec_to_json
from bench.errors import ScenarioError, ServiceError, UsageError
from bench.harness.ledger import ReadBack, durable_rows, read_back, reconcile
from bench.harness.probes import append_cost, flush_summary, lock_summary
from bench.harness.runner import make_run_dir, wait_received
from bench.results import SCHEMA_VERSION, environment, write_results
from bench.scenario import CapacitySettings, LoadedScenario, Scenario
from pipeline.buffer import LockProbes
from pipeline.clock import MonotonicWallClock
from pipeline.config import resolve_env
from pipeline.errors import ConfigError
from pipeline.model import FlushStat
from pipeline.probes import Recorder
from simulators.broker import EmbeddedBroker
from simulators.errors import SimulatorError
from simulators.publisher import STALL_TIMEOUT_S, describe_not_sent
from simulators.stream import PhaseSpec

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 120.0
START_LEAD_S = 0.3


@dataclass(frozen=True)
class CapacityOptions:
    out: Path | None = None
    broker: str | None = None
    workers: tuple[int, ...] | None = None
    rates: tuple[float, ...] | None = None
    step_s: float | None = None
    reports_dir: Path = Path("reports")
    report: bool = True


@dataclass(frozen=True)
class StepProgress:
    workers: int
    step: int
    steps: int
    offered_per_s: float
    elapsed_s: float
    step_s: float
    sent: int
    durable: int
    phase: str
    """"send", "drain" or the verdict of the finished step."""


@dataclass(frozen=True)
class CapacityOutcome:
    run_dir: Path
    results: dict[str, Any]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class _Child:
    """A worker process speaking JSON lines on stdout; its stderr goes to a log file."""

    def __init__(self, module: str, config: dict[str, Any], config_path: Path, log_path: Path) -> None:
        config_path.write_text(json.dumps(config), encoding="utf-8")
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self.latest: dict[str, Any] = {}
        self.events: dict[str, threading.Event] = {"ready": threading.Event(), "done": threading.Event()}
        self.error: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"{module}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if "error" in msg:
                self.error = str(msg["error"])
            for key, event in self.events.items():
                if msg.get(key):
                    event.set()
            self.latest = {**self.latest, **msg}
        # EOF: the process ended; whoever waits on an event must not wait forever.
        for event in self.events.values():
            event.set()

    def wait_for(self, what: str, timeout_s: float, role: str) -> None:
        if not self.events[what].wait(timeout_s) or self.error or not self.latest.get(what):
            why = self.error or f"no '{what}' within {timeout_s:g} s (exit code {self.proc.poll()})"
            raise ServiceError(f"{role} failed: {why}; log: {self.log_path}\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def send(self, line: str) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        if stdin is None or self.proc.poll() is not None:
            return
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float) -> None:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        self._log.close()


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
    if sc.transport.kind != "mqtt":
        raise ScenarioError(
            f"{loaded.path}: transport.kind: bench capacity drives MQTT; expected mqtt, got {sc.transport.kind}"
        )
    if sc.anomalies:
        raise ScenarioError(
            f"{loaded.path}: anomalies: a capacity sweep sends clean data only; remove them (bench run scores them)"
        )
    if sc.matrix:
        raise ScenarioError(
            f"{loaded.path}: matrix: a capacity sweep measures one pipeline configuration; remove the matrix"
        )
    mq = sc.transport.mqtt
    try:
        if resolve_env(mq.username, "transport.mqtt.username") is not None:
            raise ScenarioError(f"{loaded.path}: transport.mqtt.username: bench capacity does not pass credentials yet")
    except ConfigError as exc:
        raise ScenarioError(f"{loaded.path}: {exc}") from None
    broker_setting = options.broker or mq.broker
    if broker_setting != "embedded" and not broker_setting.startswith(("mqtt://", "tcp://")):
        raise UsageError(f"--broker: expected a URL like mqtt://127.0.0.1:1883, got {broker_setting!r}")
    if broker_setting == "embedded" and max(cap.workers) > 1:
        raise UsageError(
            f"capacity.workers {list(cap.workers)}: more than one pipeline worker shares the subscription through "
            "MQTT v5 shared subscriptions ($share/<group>/<topic>), which the embedded amqtt broker (MQTT 3.1.1) "
            "does not support; pass --broker mqtt://127.0.0.1:1883 (Mosquitto) or measure workers: [1]"
        )
    run_dir = make_run_dir(f"{sc.name}-capacity", options.out, options.reports_dir)
    (run_dir / "scenario.yaml").write_bytes(loaded.path.read_bytes())
    run_id = f"{sc.name}-{uuid.uuid4().hex[:8]}"
    started = time.time()
    env_before = environment()
    broker: EmbeddedBroker | None = None
    series: list[dict[str, Any]] = []
    variants: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        if broker_setting == "embedded":
            try:
                broker = EmbeddedBroker(log_path=run_dir / "broker.log").start()
            except SimulatorError as exc:
                raise ServiceError(str(exc)) from None
        url = broker.url if broker is not None else broker_setting
        rates = cap.step_rates()
        for workers in cap.workers:
            steps: list[dict[str, Any]] = []
            step_flushes: list[list[FlushStat]] = []
            step_steady: list[list[FlushStat]] = []
            step_locks: list[LockProbes] = []
            failed = 0
            for k, rate in enumerate(rates):
                step, flushes, steady, lock = _run_step(
                    sc,
                    cap,
                    url=url,
                    external=broker is None,
                    broker_pid=broker.pid if broker is not None else None,
                    workers=workers,
                    rate=rate,
                    index=(k, len(rates)),
                    step_dir=run_dir / f"workers-{workers}" / f"step-{k + 1:02d}-{rate:g}",
                    run_id=f"{run_id}-w{workers}-s{k + 1}",
                    on_progress=on_progress,
                )
                step["dir"] = str((run_dir / f"workers-{workers}" / f"step-{k + 1:02d}-{rate:g}").relative_to(run_dir))
                steps.append(step)
                step_flushes.append(flushes)
                step_steady.append(steady)
                step_locks.append(lock)
                if on_progress:
                    on_progress(
                        StepProgress(
                            workers,
                            k,
                            len(rates),
                            rate,
                            cap.step,
                            cap.step,
                            step["sent"],
                            step["sent"],
                            step["verdict"],
                        )
                    )
                if step["verdict"] == "publisher-limited":
                    break  # higher rates would only be further behind: the load generator is the limit here
                if step["verdict"] == "unsustainable":
                    failed += 1
                    if failed >= cap.stop_after:
                        break
            series.append(_series(workers, steps, rates))
            variants.append(
                _variant(
                    sc,
                    workers=workers,
                    steps=steps,
                    step_flushes=step_flushes,
                    step_steady=step_steady,
                    step_locks=step_locks,
                    sr=series[-1],
                )
            )
    finally:
        if broker is not None:
            broker.close()

    points = [(s["workers"], s["peak_per_s"]) for s in series if s.get("peak_per_s")]
    fit = model.usl(points) if len(points) >= 2 else None
    if fit is not None and not all(s["saturated"] for s in series):
        fit["note"] = (fit["note"] + "; " if fit["note"] else "") + (
            "some worker counts never saturated: their throughput is a lower bound and so is the fit"
        )
    if fit is not None:
        others = [s for s in series if s.get("limit") and not s["limit"].startswith("the pipeline's CPU")]
        fit["pipeline_limited"] = not others
        if others:
            fit["note"] = (fit["note"] + "; " if fit["note"] else "") + (
                "the limit was not the pipeline's CPU ("
                + "; ".join(f"workers={s['workers']}: {s['limit']}" for s in others)
                + "): the fit describes this test set-up, not the pipeline's scaling"
            )
    first = series[0] if series else None
    settings = sc.validation()
    best_steps = [s for sr in series for s in sr["steps"] if s["sustainable"]]
    flush_rec = Recorder()
    for s in best_steps:
        flush_rec.merge(Recorder.from_json(s["flush_raw"]))
    advice = model.recommendations(
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
    if first is not None and first["sustainable_per_s"] is None:
        problems.append(
            f"workers={first['workers']}: no step was sustainable (first step {first['steps'][0]['verdict']}); "
            "lower capacity.rates"
        )
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "kind": "capacity",
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "scenario": {"name": sc.name, "path": str(loaded.path), "sha256": loaded.sha256, "seed": sc.seed},
        "environment": {**env_before, "host_load_after": environment()["host_load"]},
        "variants": variants,
        "capacity": {
            "settings": cap.model_dump(mode="json", by_alias=True),
            "threshold": cap.threshold,
            "step_s": cap.step,
            "transport": "mqtt",
            "broker": broker_setting,
            "qos": mq.qos,
            "series": series,
            "usl": fit,
            "recommendations": advice,
        },
    }
    write_results(run_dir / "results.json", results)
    return CapacityOutcome(run_dir, results, problems)


def _run_step(
    sc: Scenario,
    cap: CapacitySettings,
    *,
    url: str,
    external: bool,
    broker_pid: int | None,
    workers: int,
    rate: float,
    index: tuple[int, int],
    step_dir: Path,
    run_id: str,
    on_progress: Callable[[StepProgress], None] | None,
) -> tuple[dict[str, Any], list[FlushStat], list[FlushStat], LockProbes]:
    """Run one step; its metrics, every flush, the flushes after the settle time (the population of the step
    table's flush p99) and the lock probes."""
    step_dir.mkdir(parents=True, exist_ok=True)
    mq = sc.transport.mqtt
    settings = sc.validation()
    spec = replace(sc.stream_spec(), phases=(PhaseSpec("steady", cap.step, rate),))
    subscription = mq.subscription(run_id)
    if external:
        # On a real broker every worker count goes through the shared-subscription path, one worker included,
        # so 1 and N workers are measured the same way.
        subscription = f"$share/{run_id}/{subscription}"
    clock = MonotonicWallClock()
    broker_cpu: list[tuple[int, float]] = []
    machine_cpu: list[tuple[int, float, float]] = []
    pipes: list[_Child] = []
    pubs: list[_Child] = []
    try:
        for w in range(workers):
            wdir = step_dir / f"worker-{w}"
            wdir.mkdir(exist_ok=True)
            config = {
                "pipeline": settings.model_dump(mode="json", by_alias=True),
                "out_dir": str(wdir),
                "broker": url,
                "subscription": subscription,
                "qos": mq.qos,
                "client_id": f"{run_id}-pipeline-{w}",
                "protocol": 5 if external else 4,
                "final_path": str(wdir / "final.json"),
                "sink_delay_s": sc.sink_delay_s(),
                "sink_slowdown": sc.sink_slowdown(),
            }
            pipes.append(_Child("bench.capacity.pipeline_worker", config, wdir / "config.json", wdir / "worker.log"))
        for child in pipes:
            child.wait_for("ready", READY_TIMEOUT_S, "pipeline worker")
        for p in range(cap.publishers):
            config = {
                "spec": spec_to_json(spec),
                "broker": url,
                "topic": mq.topic_for_run(run_id),
                "qos": mq.qos,
                "client_id": f"{run_id}-publisher-{p}",
                "share": p,
                "shares": cap.publishers,
                "final_path": str(step_dir / f"publisher-{p}.json"),
            }
            pubs.append(
                _Child(
                    "bench.capacity.publish_worker",
                    config,
                    step_dir / f"publisher-{p}.config.json",
                    step_dir / f"publisher-{p}.log",
                )
            )
        for child in pubs:
            child.wait_for("ready", READY_TIMEOUT_S, "publisher")
        epoch_ns = clock.now_ns() + int(START_LEAD_S * 1e9)
        for child in pubs:
            child.send(str(epoch_ns))

        def progress(phase: str) -> None:
            if on_progress is None:
                return
            on_progress(
                StepProgress(
                    workers,
                    index[0],
                    index[1],
                    rate,
                    max(0.0, (clock.now_ns() - epoch_ns) / 1e9),
                    cap.step,
                    sum(int(c.latest.get("sent", 0)) for c in pubs),
                    sum(int(c.latest.get("durable", 0)) for c in pipes),
                    phase,
                )
            )

        while not all(c.events["done"].is_set() for c in pubs):
            busy = machine_busy_s()
            if busy is not None:
                machine_cpu.append((clock.now_ns(), *busy))
            if broker_pid is not None:
                # The embedded broker's CPU tells whether it, not the pipeline, was the limit.
                cpu = process_cpu_s(broker_pid)
                if cpu is not None:
                    broker_cpu.append((clock.now_ns(), cpu))
            progress("send")
            for c in pipes:
                if not c.alive:
                    raise ServiceError(f"pipeline worker exited early; log: {c.log_path}\n{c.log_tail()}")
            time.sleep(0.25)
        for c in pubs:
            c.wait_for("done", 1.0, "publisher")
        total_sent = sum(int(c.latest.get("sent", 0)) for c in pubs)
        # Drain: until the workers received everything, or made no progress for the scenario's drain timeout.
        wait_received(
            lambda: sum(int(c.latest.get("received", 0)) for c in pipes),
            total_sent,
            sc.run.drain_timeout,
            lambda: progress("drain"),
            0.25,
        )
        for c in pipes:
            c.send("stop")
        for c in pipes:
            c.wait_for("done", STOP_TIMEOUT_S, "pipeline worker")
    finally:
        for c in pubs + pipes:
            c.send("")
            if c.alive and c in pubs:
                c.proc.terminate()
            c.wait(STOP_TIMEOUT_S if c in pipes else 10)
    step, flushes, locks = _analyse(
        sc, cap, step_dir, rate=rate, workers=workers, epoch_ns=epoch_ns, publishers=len(pubs)
    )
    start, end = epoch_ns + cap.settle * 1e9, epoch_ns + cap.step * 1e9
    window = [c for c in broker_cpu if start <= c[0] <= end]
    step["broker_cpu_pct"] = (
        round((window[-1][1] - window[0][1]) / ((window[-1][0] - window[0][0]) / 1e9) * 100, 1)
        if len(window) >= 2
        else None
    )
    cores = [c for c in machine_cpu if start <= c[0] <= end]
    # All cores together, 100 = every core busy: on a small machine publishers, broker and pipeline compete.
    step["machine_cpu_pct"] = (
        round((cores[-1][1] - cores[0][1]) / max(cores[-1][2] - cores[0][2], 1e-9) * 100, 1)
        if len(cores) >= 2
        else None
    )
    steady = [f for f in flushes if start <= f.started_ns <= end]
    return step, flushes, steady, locks


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


def _analyse(
    sc: Scenario, cap: CapacitySettings, step_dir: Path, *, rate: float, workers: int, epoch_ns: int, publishers: int
) -> tuple[dict[str, Any], list[FlushStat], LockProbes]:
    settings = sc.validation()
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
    flushes: list[FlushStat] = []
    locks = LockProbes.new()
    backs: list[ReadBack] = []
    durable_of: dict[int, int] = {}
    cpu_pct = rss = 0.0
    start = epoch_ns + int(cap.settle * 1e9)
    end = epoch_ns + int(cap.step * 1e9)
    for w in range(workers):
        wdir = step_dir / f"worker-{w}"
        final = json.loads((wdir / "final.json").read_text(encoding="utf-8"))
        errors.extend(final["errors"])
        mine = [FlushStat(**f) for f in final["flushes"]]
        flushes.extend(mine)
        if final["lock"]:
            for name in ("wait", "hold", "stall"):
                getattr(locks, name).merge(Recorder.from_json(final["lock"][name]))
        back = read_back(wdir / settings.parquet.path, wdir / settings.quarantine.path, wdir / "dropped")
        backs.append(back)
        durable_of.update(durable_rows(back, mine))
        window = [s for s in final["samples"] if start <= s[0] <= end] or final["samples"]
        if len(window) >= 2:
            cpu_pct += (window[-1][1] - window[0][1]) / ((window[-1][0] - window[0][0]) / 1e9) * 100
        rss += max((s[2] for s in window), default=0) / 1e6
    combined = ReadBack(
        persisted_seqs=[s for b in backs for s in b.persisted_seqs],
        persisted_batches=[s for b in backs for s in b.persisted_batches],
        rejected_seqs=[s for b in backs for s in b.rejected_seqs],
        rejected_reasons=[s for b in backs for s in b.rejected_reasons],
        files=sum(b.files for b in backs),
        unfinalised=[s for b in backs for s in b.unfinalised],
        dropped_seqs=[s for b in backs for s in b.dropped_seqs],
        dropped_reasons=[s for b in backs for s in b.dropped_reasons],
    )
    ledger = reconcile(sent[:, 0].tolist(), combined)
    durable = np.array([durable_of.get(int(seq), -1) for seq in sent[:, 0]], dtype=np.int64)
    metrics = model.step_metrics(
        model.StepInput(
            offered_per_s=rate,
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
    for f in flushes:
        if f.sink == "parquet" and start <= f.started_ns <= end:
            flush_rec.record_ns(f.total_ns)
    metrics.update(
        {
            "workers": workers,
            "ledger": ledger.to_json(),
            "flush_ms": flush_rec.summary(ladder=True),
            "flush_raw": flush_rec.to_json(),
            "lock_wait_ms": locks.wait.summary(ladder=True),
            "cpu_pct": round(cpu_pct, 1),
            "cpu_pct_per_worker": round(cpu_pct / workers, 1),
            "rss_mb": round(rss, 1),
            "publisher_cpu_pct": round(pub_cpu * 100, 1),
            "errors": errors,
        }
    )
    return metrics, flushes, locks


def _series(workers: int, steps: list[dict[str, Any]], rates: tuple[float, ...]) -> dict[str, Any]:
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
    return {
        "workers": workers,
        "limit": _limit(steps),
        "steps": steps,
        "sustainable_per_s": max((s["offered_per_s"] for s in ok), default=None),
        "sustainable_step": max((i for i, s in enumerate(steps) if s["sustainable"]), default=None),
        "peak_per_s": max((s["persisted_per_s"] for s in judged), default=None),
        "saturated": any(s["verdict"] == "unsustainable" for s in steps),
        "knee": model.knee(judged),
        "stopped": stopped,
    }


# A role using this much of one core at the first unsustainable step is taken to be the limit.
BUSY_PCT = 85.0


def _limit(steps: list[dict[str, Any]]) -> str | None:
    """Who was busiest at the first step the pipeline could not take: the evidence for 'what to scale'."""
    bad = next((s for s in steps if s["verdict"] != "sustainable"), None)
    if bad is None:
        return None
    if bad["verdict"] == "publisher-limited":
        return f"publishers (send lag p99 {bad['send_lag_p99_ms']:,.0f} ms at {bad['offered_per_s']:g} msg/s)"
    per_worker = bad["cpu_pct_per_worker"]
    roles = [f"pipeline worker {per_worker:.0f}% of a core", f"publishers {bad['publisher_cpu_pct']:.0f}%"]
    if bad.get("broker_cpu_pct") is not None:
        roles.append(f"embedded broker {bad['broker_cpu_pct']:.0f}%")
    if bad.get("machine_cpu_pct") is not None:
        roles.append(f"machine {bad['machine_cpu_pct']:.0f}% of all {os.cpu_count()} cores")
    busy = ", ".join(roles)
    if per_worker >= BUSY_PCT:
        return f"the pipeline's CPU ({busy})"
    if (bad.get("broker_cpu_pct") or 0) >= BUSY_PCT:
        return f"the embedded broker, not the pipeline ({busy}); measure against Mosquitto with --broker"
    if (bad.get("machine_cpu_pct") or 0) >= BUSY_PCT:
        return f"the machine's cores, shared by every role ({busy}); spread the roles over more cores or machines"
    return f"not one busy core ({busy}): I/O or the broker's delivery"


def _variant(
    sc: Scenario,
    *,
    workers: int,
    steps: list[dict[str, Any]],
    step_flushes: list[list[FlushStat]],
    step_steady: list[list[FlushStat]],
    step_locks: list[LockProbes],
    sr: dict[str, Any],
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
    }
