"""The seq as an MQTT 5 user property (transport.mqtt.seq_property): a pipeline that keeps message properties
but drops unknown payload fields still reconciles; the payload keeps its seq; MQTT 3.1.1-only brokers are
refused with one line."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from bench.errors import ScenarioError
from bench.harness.external_sut import ExternalPipeline
from bench.harness.ledger import reconcile
from bench.harness.session import Credentials, Session, SessionConfig, embedded_broker, wait_received
from bench.scenario import load_scenario
from pipeline.clock import MonotonicWallClock
from simulators.publisher import PacedPublisher, UserProperty
from simulators.stream import stream

PIPELINE = Path(__file__).resolve().parent / "data" / "ext_prop_pipeline.py"

SCENARIO = """
name: ext-prop
seed: 3
machines: {count: 4}
transport:
  kind: mqtt
  mqtt: {broker: "BROKER", qos: 1, seq_property: seq, topic: "iiot-bench-test/{run}/{machine}/telemetry"}
system:
  kind: external
  external:
    command: ["{python}", "PIPELINE", "{broker_url}", "{topic}", "{out_dir}/out.jsonl", seq]
    ready: {log: "subscribed", timeout: 30s}
    output: {format: jsonl, path: "{out_dir}/out.jsonl"}
phases:
  - {kind: steady, rate: 300, duration: 1s}
"""


def _scenario(tmp_path: Path, broker: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(SCENARIO.replace("BROKER", broker).replace("PIPELINE", str(PIPELINE)), encoding="utf-8")
    return path


def test_the_seq_travels_as_a_user_property_and_the_ledger_reconciles(tmp_path: Path, mosquitto_url: str) -> None:
    """Through the harness's own pieces (session, external system, paced publisher, read-back, ledger)."""
    path = _scenario(tmp_path, mosquitto_url)
    sc = load_scenario(path).scenario
    assert sc.system.external is not None and sc.transport.mqtt.seq_property == "seq"
    clock = MonotonicWallClock()
    out_dir = tmp_path / "run"
    sut = ExternalPipeline(sc.system.external, path.parent, out_dir, clock)
    config = SessionConfig(
        scenario=sc,
        scenario_path=path,
        run_id=f"prop-{uuid.uuid4().hex[:8]}",  # its own topic on a broker others use too
        out_dir=out_dir,
        broker_url=mosquitto_url,
        opcua_machines=(),
        credentials=Credentials(None, None, None, None),
        clock=clock,
    )
    with Session(config, sut) as session:
        endpoints = session.start()
        assert endpoints.mqtt_url is not None and endpoints.mqtt_topic is not None
        publisher = PacedPublisher(
            endpoints.mqtt_url, endpoints.mqtt_topic, 1, seq_property=sc.transport.mqtt.seq_property
        )
        session.on_close(publisher.close)
        publisher.connect()
        messages = list(stream(sc.stream_spec(), clock.now_ns() + 200_000_000))
        sent = publisher.run(messages, clock)
        assert sent == len(messages) == 300
        assert publisher.wait_acked(sent, 60)
        wait_received(sut.received, sent, idle_timeout_s=15, tick=lambda: None, every_s=0.05)
        session.stop()
        output = sut.read_back()
    ledger = reconcile([m.seq for m in messages], output.back)
    assert ledger.reconciled, ledger
    assert ledger.persisted == 300 and ledger.duplicates == ledger.unexpected == 0

    rows = [json.loads(line) for line in (out_dir / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    # The payload keeps its seq (the same stream whatever the carrier), and the property carries the same one.
    assert all(row["payload_seq"] is not None and int(row["seq"]) == row["payload_seq"] for row in rows), rows[:3]


def test_bench_run_and_capacity_send_the_property(tmp_path: Path, mosquitto_url: str) -> None:
    """The commands a user runs: bench run's paced publisher and bench capacity's publisher processes both carry
    the seq as a user property, so a pipeline that reads it from there reconciles under each."""
    from bench.capacity import sweep
    from bench.harness import runner

    path = _scenario(tmp_path, mosquitto_url)
    outcome = runner.run(load_scenario(path), runner.RunOptions(out=tmp_path / "run", calibrate=False))
    assert outcome.ok, outcome.problems()
    (v,) = outcome.results.variants
    assert v.ledger.persisted == v.ledger.sent == 300 and v.ledger.lost == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["seq"] == str(r["payload_seq"]) for r in rows), "the property carried each message's own seq"

    with path.open("a", encoding="utf-8") as f:
        f.write("capacity: {rates: [100], step: 2s, settle: 0.5s, threshold: 0.5, workers: [1], publishers: 1}\n")
    cap = sweep.run_capacity(load_scenario(path), sweep.CapacityOptions(out=tmp_path / "cap", report=False))
    assert cap.results.capacity is not None
    (step,) = cap.results.capacity.series[0].steps
    assert step.ledger is not None and step.ledger.sent == step.ledger.persisted == 200, cap.problems


def test_bench_load_sends_the_property(tmp_path: Path, mosquitto_url: str) -> None:
    """The locust users speak MQTT 5 too: a pipeline that reads the seq from the property reconciles."""
    from bench.load.runner import LoadOptions, run_load

    path = _scenario(tmp_path, mosquitto_url)
    outcome = run_load(load_scenario(path), LoadOptions(out=tmp_path / "load", workers=1))
    assert outcome.ok, outcome.problems
    (v,) = outcome.results.variants
    assert v.ledger.persisted == v.ledger.sent == 300 and v.ledger.lost == 0
    rows = [json.loads(line) for line in (tmp_path / "load" / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["seq"] == str(r["payload_seq"]) for r in rows), "the property carried each message's own seq"


def test_the_property_is_packed_as_paho_packs_it() -> None:
    from paho.mqtt import properties
    from paho.mqtt.packettypes import PacketTypes

    make: Any = properties.Properties  # paho's Properties has no type hints
    for name, value in [("seq", "0"), ("seq", "1234567"), ("séq" * 50, "9" * 20)]:
        theirs = make(PacketTypes.PUBLISH)
        theirs.UserProperty = (name, value)
        assert UserProperty(name, value).pack() == theirs.pack()
        back = make(PacketTypes.PUBLISH)
        back.unpack(UserProperty(name, value).pack())
        assert back.UserProperty == [(name, value)]


def test_the_embedded_broker_is_refused_with_one_line(tmp_path: Path) -> None:
    """Named in the scenario: refused when it is read. Left at the default: refused by the session, before the
    system under test starts (a --broker URL could still have replaced it)."""
    text = SCENARIO.replace("PIPELINE", str(PIPELINE))
    named = tmp_path / "named.yaml"
    named.write_text(text.replace('"BROKER"', "embedded"), encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"transport.mqtt: seq_property: the embedded broker") as caught:
        load_scenario(named)
    assert "mosquitto" in str(caught.value) and "\n" not in str(caught.value)

    default = tmp_path / "default.yaml"
    default.write_text(text.replace('broker: "BROKER", ', ""), encoding="utf-8")
    sc = load_scenario(default).scenario
    assert sc.system.external is not None
    clock = MonotonicWallClock()
    sut = ExternalPipeline(sc.system.external, tmp_path, tmp_path / "run", clock)
    with embedded_broker(True, tmp_path / "broker.log") as broker:
        assert broker is not None
        config = SessionConfig(
            sc,
            default,
            "prop",
            tmp_path / "run",
            broker.url,
            (),
            Credentials(None, None, None, None),
            clock,
            broker=broker,
        )
        with (
            pytest.raises(ScenarioError, match=r"transport.mqtt.seq_property: the embedded broker"),
            Session(config, sut) as session,
        ):
            session.start()
    assert not sut.starts, "refused before the system under test started"


def test_a_broker_without_mqtt5_is_named_by_the_publisher(tmp_path: Path) -> None:
    """Any MQTT 3.1.1-only broker (here the embedded amqtt, reached by URL): the publisher says what is missing."""
    from simulators.errors import SimulatorError

    with embedded_broker(True, tmp_path / "broker.log") as broker:
        assert broker is not None
        publisher = PacedPublisher(broker.url, "t/{machine}", 1, seq_property="seq")
        with pytest.raises(SimulatorError, match=r"does not speak MQTT 5.*seq_property"):
            publisher.connect()
