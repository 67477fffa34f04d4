"""``bench calibrate``: the bench's own processes against bare client loops, interleaved, on this machine.

Four pairs, each measured ``repeats`` times as A B A B ... (bench, bare, bench, bare), every measurement a
fresh child process (:mod:`bench.calibrate.child`) so that its CPU is its own and a slow or busy moment of the
machine falls on both sides alike:

- publisher, QoS 0 and QoS 1: the capacity sweep's publisher process (publish_worker -> PacedPublisher, with
  its stream and send log), unpaced, against a bare paho publish loop; to a topic nobody subscribes, so the
  broker discards. Each gives CPU per 1,000 messages and the rate (messages / wall s);
- pipeline process, QoS 1, fed through the broker: the capacity sweep's pipeline worker against a bare paho
  subscriber (json.loads + append), both fed by the same publisher process; CPU per 1,000 messages;
- the pipeline's chain alone in a process (decode + validate + buffer + Parquet flush) against json.loads +
  append; CPU microseconds per message.

The generator's ceiling per process is the bench publisher's median rate at each QoS (``calibration.json``);
``bench capacity --calibration`` turns it into the publisher processes a sweep needs.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.calibrate.model import CALIBRATION_NAME, Calibration, Machine, Row, Spread
from bench.capacity.publish_worker import spec_to_json
from bench.capacity.workers import READY_TIMEOUT_S, Child
from bench.errors import ServiceError, UsageError
from bench.scenario import LoadedScenario, load_scenario
from simulators.stream import PhaseSpec, StreamSpec, stream

DEFAULT_MESSAGES = 20_000
QUICK_MESSAGES = 5_000
DEFAULT_REPEATS = 3
SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "capacity.yaml"
"""Where the stream (machines, payloads of ~100 bytes) and the pipeline settings come from: the capacity
scenario, so the calibration describes the messages and the pipeline a capacity sweep uses."""

UNPACED_RATE = 1e9
"""The offered rate of an unpaced stream: every intended send time lies within a few ms of the start, so the
publisher is always behind and sends as fast as it can (its own pacing code still runs, as in a sweep)."""

DONE_TIMEOUT_S = 300.0
STALL_S = 5.0
"""A subscriber that received nothing more for this long has everything the broker will give it."""

EMBEDDED_WARNING = (
    "mosquitto is not installed: measuring against the embedded amqtt broker, whose own ceiling (about 3,000 "
    "acknowledgements/s) dominates the QoS 1 rows; install mosquitto or pass --broker URL for figures of the "
    "bench itself"
)


@dataclass(frozen=True)
class CalibrateOptions:
    broker: str | None = None
    """A broker URL; None: a bench-managed Mosquitto (or, without one, the embedded broker)."""
    messages: int | None = None
    repeats: int | None = None
    out: Path | None = None
    quick: bool = False
    reports_dir: Path = Path("reports")
    scenario: Path = SCENARIO
    burn_us: float = 0.0
    """Tests only: the bench side burns this much CPU per message (a deliberately slower publisher/chain)."""
    only: tuple[str, ...] = ()
    """Tests only: measure just these pairs (``publisher``, ``pipeline``, ``chain``); empty: all."""

    def n_messages(self) -> int:
        return self.messages or (QUICK_MESSAGES if self.quick else DEFAULT_MESSAGES)

    def n_repeats(self) -> int:
        return self.repeats or (1 if self.quick else DEFAULT_REPEATS)


@dataclass(frozen=True)
class Measurement:
    """One child process's figures."""

    cpu_s: float
    messages: int
    wall_s: float | None = None

    @property
    def cpu_ms_per_1k(self) -> float:
        return self.cpu_s / self.messages * 1e6 if self.messages else math.nan

    @property
    def us_per_msg(self) -> float:
        return self.cpu_s / self.messages * 1e6 if self.messages else math.nan

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s if self.wall_s else math.nan


@dataclass(frozen=True)
class Progress:
    index: int
    total: int
    what: str
    text: str


@dataclass(frozen=True)
class CalibrateOutcome:
    run_dir: Path
    calibration: Calibration


@contextmanager
def _broker(options: CalibrateOptions, run_dir: Path, warn: list[str]) -> Iterator[tuple[str, str, bool]]:
    """(label, URL, speaks MQTT 5) of the broker while the block runs: the user's, or one the bench starts."""
    if options.broker is not None:
        yield options.broker, options.broker, True
        return
    from bench.harness.session import embedded_broker, service_errors
    from simulators.errors import BrokerStartError
    from simulators.mosquitto import ManagedMosquitto

    try:
        mosquitto: ManagedMosquitto | None = ManagedMosquitto(run_dir / "mosquitto")
    except BrokerStartError:
        mosquitto = None
    if mosquitto is not None:
        with service_errors():
            mosquitto.start()
        try:
            yield "mosquitto", mosquitto.url, True
        finally:
            mosquitto.close()
        return
    warn.append(EMBEDDED_WARNING)
    with embedded_broker(True, run_dir / "broker.log") as broker:
        assert broker is not None
        yield "embedded", broker.url, False


class _Calibrator:
    def __init__(
        self,
        loaded: LoadedScenario,
        options: CalibrateOptions,
        *,
        run_dir: Path,
        url: str,
        mqtt5: bool,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.sc = loaded.scenario
        self.options, self.run_dir, self.url, self.mqtt5 = options, run_dir, url, mqtt5
        self.on_progress = on_progress
        self.n = options.n_messages()
        base = self.sc.stream_spec()
        self.spec = StreamSpec(
            seed=base.seed,
            machines=base.machines,
            phases=(PhaseSpec("steady", self.n / UNPACED_RATE * 1.01, UNPACED_RATE),),
            signals=base.signals,
            arrival="uniform",
            limit=self.n,
        )
        self.topic = self.sc.transport.mqtt.topic
        self.count = 0
        """Child processes started (numbers their files)."""
        self.done = 0
        self.total = 0

    def child(self, name: str, module: str, config: dict[str, Any]) -> Child:
        folder = self.run_dir / "children"
        folder.mkdir(exist_ok=True)
        self.count += 1
        stem = f"{self.count:03d}-{name}"
        return Child(module, config, folder / f"{stem}.json", folder / f"{stem}.log")

    def topic_of(self, tag: str) -> str:
        return self.topic.replace("{run}", f"calibrate-{tag}-{uuid.uuid4().hex[:8]}")

    def _pub_config(self, kind: str, qos: int, topic: str, burn_us: float) -> dict[str, Any]:
        tag = f"{self.count + 1:03d}"
        return {
            "kind": kind,
            "spec": spec_to_json(self.spec),
            "broker": self.url,
            "topic": topic,
            "qos": qos,
            "client_id": f"calibrate-{kind}-{tag}-{uuid.uuid4().hex[:6]}",
            "seq_property": None,
            "share": 0,
            "shares": 1,
            "final_path": str(self.run_dir / "children" / f"{tag}-{kind}.final.json"),
            "burn_us": burn_us,
        }

    def _run_publisher(self, child: Child) -> dict[str, Any]:
        child.wait_for("ready", READY_TIMEOUT_S, "publisher")
        child.send(str(time.time_ns()))
        child.wait_for("done", DONE_TIMEOUT_S, "publisher")
        child.send("")
        child.wait(30)
        return child.latest

    def publisher(self, side: str, qos: int, topic: str | None = None) -> Measurement:
        """The bench's publisher process or the bare loop, unpaced, to ``topic`` (default: one nobody reads)."""
        burn = self.options.burn_us if side == "bench" else 0.0
        kind = "bench_publisher" if side == "bench" else "bare_publisher"
        config = self._pub_config(kind, qos, topic or self.topic_of("void"), burn)
        child = self.child(f"{kind}-qos{qos}", "bench.calibrate.child", config)
        latest = self._run_publisher(child)
        if side == "bare":
            if not latest.get("all_acked"):
                raise ServiceError(f"bare publisher: not every publish was acknowledged; log: {child.log_path}")
            return Measurement(float(latest["cpu_s"]), int(latest["sent"]), float(latest["wall_s"]))
        final = json.loads(Path(config["final_path"]).read_text(encoding="utf-8"))
        if final.get("not_sent") or not final.get("all_acked", True):
            raise ServiceError(
                f"bench publisher: not every message went out ({final.get('not_sent')}); log: {child.log_path}"
            )
        end_ns = final["acked_ns"] if qos else final["finished_ns"]
        wall_s = (end_ns - int(latest["t0_ns"])) / 1e9
        return Measurement(float(final["cpu_s"]) - float(latest["cpu0_s"]), int(final["sent"]), wall_s)

    def subscriber(self, side: str) -> Measurement:
        """The capacity sweep's pipeline worker or a bare subscriber, fed by one bench publisher at QoS 1."""
        topic = self.topic_of("sub")
        run_id = uuid.uuid4().hex[:8]
        plain = topic.replace("{machine}", "+").replace("{seq}", "+")
        # As the sweep subscribes: on a v5 broker through a shared subscription, even for one worker.
        subscription = f"$share/calibrate-{run_id}/{plain}" if self.mqtt5 else plain
        qos = 1
        tag = f"{self.count + 1:03d}"
        wdir = self.run_dir / "children" / f"{tag}-pipeline"
        config: dict[str, Any] = {
            "broker": self.url,
            "subscription": subscription,
            "qos": qos,
            "client_id": f"calibrate-sub-{run_id}",
            "protocol": 5 if self.mqtt5 else 4,
            "sample_every_s": 0.25,
        }
        if side == "bench":
            wdir.mkdir(parents=True, exist_ok=True)
            config.update(
                pipeline=self.sc.validation().model_dump(mode="json", by_alias=True),
                out_dir=str(wdir),
                final_path=str(wdir / "final.json"),
            )
            sub = self.child("pipeline_worker", "bench.capacity.pipeline_worker", config)
        else:
            config["kind"] = "bare_subscriber"
            sub = self.child("bare_subscriber", "bench.calibrate.child", config)
        try:
            sub.wait_for("ready", READY_TIMEOUT_S, f"{side} subscriber")
            cpu0 = self._first_sample(sub)
            pub_config = self._pub_config("bench_publisher", qos, topic, 0.0)
            pub = self.child("feed_publisher", "bench.calibrate.child", pub_config)
            sent = int(self._run_publisher(pub).get("sent", 0))
            last = self._until_durable(sub, sent)
        finally:
            sub.send("stop")
            sub.wait_for("done", 120, f"{side} subscriber") if sub.alive else None
            sub.send("")
            sub.wait(30)
        # Per message received: a message the pipeline rejected cost it CPU too (the stream is clean: none are).
        return Measurement(float(last["cpu_s"]) - cpu0, int(last["received"]))

    @staticmethod
    def _first_sample(sub: Child) -> float:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "cpu_s" not in sub.latest:
            if time.monotonic() > deadline or not sub.alive:
                raise ServiceError(f"subscriber reported no CPU sample; log: {sub.log_path}\n{sub.log_tail()}")
            time.sleep(0.02)  # polling the child's next sample (every 0.25 s)
        return float(sub.latest["cpu_s"])

    @staticmethod
    def _until_durable(sub: Child, sent: int) -> dict[str, Any]:
        """The subscriber's sample at which all ``sent`` were durable, or its last before it stalled."""
        seen, since = -1, time.monotonic()
        deadline = since + DONE_TIMEOUT_S
        while time.monotonic() < deadline:
            latest = dict(sub.latest)
            durable = int(latest.get("durable", 0))
            if durable >= sent:
                return latest
            if durable != seen:
                seen, since = durable, time.monotonic()
            elif time.monotonic() - since > STALL_S:
                return latest
            if not sub.alive:
                raise ServiceError(f"subscriber exited early; log: {sub.log_path}\n{sub.log_tail()}")
            time.sleep(0.05)  # polling the child's samples (every 0.25 s)
        return dict(sub.latest)

    def chain(self, side: str) -> Measurement:
        tag = f"{self.count + 1:03d}"
        wdir = self.run_dir / "children" / f"{tag}-chain"
        wdir.mkdir(parents=True, exist_ok=True)
        config = {
            "kind": f"chain_{side}",
            "spec": spec_to_json(self.spec),
            "topic": self.topic_of("chain"),
            "pipeline": self.sc.validation().model_dump(mode="json", by_alias=True),
            "out_dir": str(wdir),
            "burn_us": self.options.burn_us if side == "bench" else 0.0,
        }
        child = self.child(f"chain_{side}", "bench.calibrate.child", config)
        child.wait_for("ready", READY_TIMEOUT_S, "chain")
        child.send(str(time.time_ns()))
        child.wait_for("done", DONE_TIMEOUT_S, "chain")
        child.send("")
        child.wait(30)
        latest = child.latest
        if int(latest.get("kept", 0)) != int(latest.get("sent", -1)):
            raise ServiceError(
                f"chain {side}: kept {latest.get('kept')} of {latest.get('sent')} messages; log: {child.log_path}"
            )
        return Measurement(float(latest["cpu_s"]), int(latest["sent"]))

    def progress(self, what: str, text: str) -> None:
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(Progress(self.done, self.total, what, text))


PAIRS = ("publisher_qos0", "publisher_qos1", "pipeline", "chain")


def run_calibrate(
    options: CalibrateOptions,
    on_progress: Callable[[Progress], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> CalibrateOutcome:
    if options.repeats is not None and options.repeats < 1:
        raise UsageError(f"--repeats: expected 1 or more, got {options.repeats}")
    from bench.harness.runner import make_run_dir

    loaded = load_scenario(options.scenario)
    run_dir = make_run_dir("calibrate", options.out, options.reports_dir)
    warnings: list[str] = []
    repeats, n = options.n_repeats(), options.n_messages()
    pairs = [p for p in PAIRS if not options.only or p.split("_")[0] in options.only]
    load_before = list(os.getloadavg())
    created = datetime.now(UTC).isoformat()
    values: dict[str, dict[str, list[Measurement]]] = {p: {"bench": [], "bare": []} for p in pairs}
    with _broker(options, run_dir, warnings) as (label, url, mqtt5):
        for w in warnings:
            if on_warning is not None:
                on_warning(w)
        cal = _Calibrator(loaded, options, run_dir=run_dir, url=url, mqtt5=mqtt5, on_progress=on_progress)
        cal.total = len(pairs) * 2 * repeats
        for r in range(repeats):
            for pair in pairs:
                for side in ("bench", "bare"):  # A B A B: both sides see the same moments of a busy machine
                    m = _measure(cal, pair, side)
                    values[pair][side].append(m)
                    cal.progress(f"{pair} {side}", f"repeat {r + 1}/{repeats}: {_describe(pair, m)}")
    payloads = [len(m.payload) for m in stream(replace(cal.spec, limit=min(n, 1000)), 0)]
    rows = _rows(values)
    ceiling = {
        str(q): next(row.bench.median for row in rows if row.key == f"publisher_rate_qos{q}")
        for q in (0, 1)
        if any(row.key == f"publisher_rate_qos{q}" for row in rows)
    }
    calibration = Calibration(
        created_at=created,
        broker=label,
        broker_url=url,
        messages=n,
        repeats=repeats,
        payload_bytes_mean=round(sum(payloads) / len(payloads), 1),
        machine=_machine(load_before),
        rows=rows,
        generator_ceiling_per_s=ceiling,
        warnings=warnings,
    )
    (run_dir / CALIBRATION_NAME).write_text(calibration.model_dump_json(indent=2), encoding="utf-8")
    return CalibrateOutcome(run_dir, calibration)


def _measure(cal: _Calibrator, pair: str, side: str) -> Measurement:
    if pair.startswith("publisher"):
        return cal.publisher(side, int(pair[-1]))
    if pair == "pipeline":
        return cal.subscriber(side)
    return cal.chain(side)


def _describe(pair: str, m: Measurement) -> str:
    if pair.startswith("publisher"):
        return f"{m.cpu_ms_per_1k:,.1f} ms CPU/1k msgs, {m.rate:,.0f} msg/s ({m.messages:,} msgs)"
    if pair == "pipeline":
        return f"{m.cpu_ms_per_1k:,.1f} ms CPU/1k msgs ({m.messages:,} msgs durable/received)"
    return f"{m.us_per_msg:,.2f} us CPU/msg ({m.messages:,} msgs)"


ROWS: tuple[tuple[str, str, str, str, str, bool], ...] = (
    # key, pair, label, unit, figure, higher is better
    ("publisher_cpu_qos0", "publisher_qos0", "publisher CPU per 1k msgs, QoS 0", "ms/1k msgs", "cpu", False),
    ("publisher_rate_qos0", "publisher_qos0", "publisher max rate, QoS 0", "msg/s", "rate", True),
    ("publisher_cpu_qos1", "publisher_qos1", "publisher CPU per 1k msgs, QoS 1", "ms/1k msgs", "cpu", False),
    ("publisher_rate_qos1", "publisher_qos1", "publisher max rate, QoS 1", "msg/s", "rate", True),
    ("pipeline_cpu_qos1", "pipeline", "pipeline process CPU per 1k msgs, QoS 1 via broker", "ms/1k msgs", "cpu", False),
    ("chain_us_per_msg", "chain", "chain in process (decode+validate+buffer+flush)", "us/msg", "us", False),
)


def _rows(values: dict[str, dict[str, list[Measurement]]]) -> list[Row]:
    rows = []
    for key, pair, label, unit, figure, higher in ROWS:
        if pair not in values:
            continue

        def of(m: Measurement, figure: str = figure) -> float:
            return {"cpu": m.cpu_ms_per_1k, "rate": m.rate, "us": m.us_per_msg}[figure]

        bench = Spread.of([round(of(m), 4) for m in values[pair]["bench"]])
        bare = Spread.of([round(of(m), 4) for m in values[pair]["bare"]])
        ratio = bench.median / bare.median if bare.median > 0 else math.inf
        rows.append(
            Row(key=key, label=label, unit=unit, higher_is_better=higher, bench=bench, bare=bare, ratio=round(ratio, 3))
        )
    return rows


def _machine(load_before: list[float]) -> Machine:
    try:
        paho = importlib.metadata.version("paho-mqtt")
    except importlib.metadata.PackageNotFoundError:
        paho = None
    return Machine(
        cores=os.cpu_count(),
        python=platform.python_version(),
        platform=platform.platform(),
        paho=paho,
        load_before=[round(x, 2) for x in load_before],
        load_after=[round(x, 2) for x in os.getloadavg()],
    )
