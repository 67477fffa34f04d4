"""Tests for the run harness: registries, the system-under-test seam, teardown, and a ledger from files alone."""

from __future__ import annotations

import inspect
import signal
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bench.capacity.workers import WorkerPipelines
from bench.errors import ServiceError
from bench.harness import runner
from bench.harness.accounting import Sends, account
from bench.harness.faults import FAULTS
from bench.harness.ledger import ReadBack, read_back
from bench.harness.session import TRANSPORTS, Credentials, Session, SessionConfig, embedded_broker
from bench.harness.sut import InProcessPipeline, Output, SourceSpec, SystemUnderTest
from bench.scenario import Fault, Transport, load_scenario
from pipeline.clock import MonotonicWallClock
from pipeline.config import MqttSourceSettings, OpcUaSourceSettings, PipelineSettings
from pipeline.errors import PipelineError
from pipeline.mqtt_source import MqttSource
from pipeline.sources import SOURCES, make_source
from simulators.stream import planned_count

MEMORY = """
name: harness
seed: 3
machines: {count: 3}
transport: {kind: memory}
phases:
  - {kind: steady, rate: 2000, duration: 0.5}
pipeline:
  buffer: {size: 200, flush_interval: 0.1}
"""


def test_every_transport_kind_of_the_scenario_schema_has_one_registered_transport() -> None:
    kinds = typing.get_args(Transport.model_fields["kind"].annotation)
    assert set(TRANSPORTS) == set(kinds)


def test_every_timed_fault_kind_is_registered_and_the_rest_are_settings() -> None:
    (union,) = typing.get_args(Fault)[:1]
    kinds = {typing.get_args(m.model_fields["kind"].annotation)[0] for m in typing.get_args(union)}
    # slow_sink is a setting of the system under test (Scenario.sink_delay_s), not a timed action.
    assert set(FAULTS) == kinds - {"slow_sink"}


def test_the_source_registry_builds_each_kind_of_source_from_its_settings(tmp_path: Path) -> None:
    assert set(SOURCES) == {"mqtt", "opcua"}
    mqtt = make_source(MqttSourceSettings(url="mqtt://127.0.0.1:1", topic="t/+"), lambda p, t: None, output=tmp_path)
    assert isinstance(mqtt, MqttSource)
    from pipeline.opcua_source import OpcUaSource

    ua = make_source(OpcUaSourceSettings(url="opc.tcp://127.0.0.1:1/"), lambda p, t: None, output=tmp_path)
    assert isinstance(ua, OpcUaSource)


def test_both_implementations_satisfy_the_system_under_test_protocol(tmp_path: Path) -> None:
    methods = [name for name in vars(SystemUnderTest) if not name.startswith("_")]
    assert set(methods) == {"start", "received", "stop", "kill", "read_back", "extras"}
    in_process = InProcessPipeline(PipelineSettings(), tmp_path / "a", MonotonicWallClock())
    workers = WorkerPipelines(PipelineSettings(), tmp_path / "b", 1, shared=False, group="g")
    try:
        for sut in (in_process, workers):
            for name in methods:
                # The same parameters as the protocol's method: the harness calls them by these names.
                theirs = inspect.signature(getattr(type(sut), name)).parameters
                ours = inspect.signature(getattr(SystemUnderTest, name)).parameters
                assert list(theirs) == list(ours), f"{type(sut).__name__}.{name}{list(theirs)}"
    finally:
        in_process.stop()


class _Recording:
    """A system under test that records what the session asks of it, and can fail on cue."""

    def __init__(self, fail_start: bool = False, fail_stop: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_start, self.fail_stop = fail_start, fail_stop

    def start(self, sources: Sequence[SourceSpec]) -> None:
        self.calls.append("start")
        if self.fail_start:
            raise PipelineError("cannot open the sink")

    def received(self) -> int:
        return 0

    def stop(self) -> None:
        self.calls.append("stop")
        if self.fail_stop:
            raise RuntimeError("stop failed too")

    def kill(self) -> None:
        self.calls.append("kill")

    def read_back(self) -> Output:
        return Output(ReadBack([], [], [], [], 0, []), durable=[])

    def extras(self) -> dict[str, Any]:
        return {}


def _config(tmp_path: Path, write_scenario: Any) -> SessionConfig:
    loaded = load_scenario(write_scenario(MEMORY))
    return SessionConfig(
        scenario=loaded.scenario,
        scenario_path=loaded.path,
        run_id="r",
        out_dir=tmp_path,
        broker_url=None,
        opcua_machines=(),
        credentials=Credentials(None, None, None, None),
        clock=MonotonicWallClock(),
    )


def test_a_system_that_fails_to_start_is_a_service_error_and_is_stopped_once(
    tmp_path: Path, write_scenario: Any
) -> None:
    sut = _Recording(fail_start=True)
    with (
        pytest.raises(ServiceError, match="cannot open the sink"),
        Session(_config(tmp_path, write_scenario), sut) as s,
    ):
        s.start()
    assert sut.calls == ["start", "stop"]


def test_a_failing_teardown_does_not_hide_the_first_error(tmp_path: Path, write_scenario: Any) -> None:
    sut = _Recording(fail_stop=True)
    with pytest.raises(KeyError, match="first"), Session(_config(tmp_path, write_scenario), sut) as s:
        s.start()
        raise KeyError("first")
    assert sut.calls == ["start", "stop"]


def test_a_normal_stop_then_the_block_end_stops_once(tmp_path: Path, write_scenario: Any) -> None:
    sut = InProcessPipeline(PipelineSettings(), tmp_path, MonotonicWallClock())
    closes: list[str] = []
    original = sut.pipeline.close

    def counted_close() -> None:
        closes.append("close")
        original()

    sut.pipeline.close = counted_close  # type: ignore[method-assign]
    with Session(_config(tmp_path, write_scenario), sut) as s:
        s.start()
        s.stop()
    assert closes == ["close"]


def test_the_ledger_needs_only_the_files_not_the_pipelines_hooks(tmp_path: Path, write_scenario: Any) -> None:
    """What the harness reconciles comes from the output read back; durable times are an extra that only
    latency needs. Dropping them (as an external pipeline would have none) leaves the ledger as it was."""
    loaded = load_scenario(write_scenario(MEMORY))
    outcome = runner.run(loaded, runner.RunOptions(out=tmp_path / "run", calibrate=False))
    planned = planned_count(loaded.scenario.stream_spec())
    settings = loaded.scenario.validation()
    back = read_back(tmp_path / "run" / settings.parquet.path, tmp_path / "run" / settings.quarantine.path)
    sends = Sends(list(range(planned)), [0] * planned, lambda seq: True)
    spec = loaded.scenario.stream_spec()
    from_files = account(sends, Output(back, durable=[]), spec).ledger
    assert from_files == outcome.ledger
    assert from_files.reconciled and from_files.persisted == planned


def test_worker_pipelines_are_killed_for_real(tmp_path: Path) -> None:
    """kill() is SIGKILL to the worker processes: nothing flushes, the processes end with -9."""
    with embedded_broker(True, tmp_path / "broker.log") as broker:
        assert broker is not None
        sut = WorkerPipelines(PipelineSettings(), tmp_path / "step", 1, shared=False, group="g")
        source = MqttSourceSettings(url=broker.url, topic="plant/+/telemetry", client_id="kill-test")
        sut.start([SourceSpec(source)])
        assert all(c.alive for c in sut.children)
        sut.kill()
        assert [c.proc.returncode for c in sut.children] == [-signal.SIGKILL]
        assert not (tmp_path / "step" / "worker-0" / "final.json").exists(), "a killed worker wrote no final report"
