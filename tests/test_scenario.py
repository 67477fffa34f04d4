"""The scenario model: good files load, bad files give one precise error each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.errors import ScenarioError
from bench.scenario import Scenario, apply_overrides, json_schema, load_scenario
from simulators.stream import planned_count, total_duration_s
from tests.conftest import SCENARIOS

MINIMAL = """
name: tiny
phases:
  - {kind: steady, rate: 10, duration: 2s}
"""


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_scenarios_load(path: Path) -> None:
    loaded = load_scenario(path)
    assert loaded.scenario.name == path.stem
    assert len(loaded.sha256) == 64
    assert planned_count(loaded.scenario.stream_spec()) > 0


def test_burst_is_a_few_thousand_messages_in_well_under_a_minute() -> None:
    spec = load_scenario(SCENARIOS / "burst.yaml").scenario.stream_spec()
    assert 2_000 <= planned_count(spec) <= 10_000
    assert total_duration_s(spec) <= 40
    rates = [p.rate for p in spec.phases]
    assert max(rates) >= 3 * min(rates), "bursts must be several times the base rate"


def test_defaults_fill_in(write_scenario: Callable[[str], Path]) -> None:
    sc = load_scenario(write_scenario(MINIMAL)).scenario
    assert sc.transport.mqtt.broker == "embedded"
    assert sc.pipeline.buffer.size == 1000
    assert sc.pipeline.parquet.rotate == 60.0
    assert sc.machines.ids()[:2] == ("machine-000", "machine-001")


def test_models_are_immutable(write_scenario: Callable[[str], Path]) -> None:
    sc = load_scenario(write_scenario(MINIMAL)).scenario
    with pytest.raises(ValidationError):
        sc.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        (MINIMAL + "colour: red\n", "colour", "unknown key"),
        ("name: x\nphases:\n  - {kind: steady, rate: -5, duration: 1s}\n", "phases[0].steady.rate", "greater than 0"),
        ("name: x\nphases:\n  - {kind: steady, rate: 5, duration: soon}\n", "phases[0].steady.duration", "'500ms'"),
        ("name: x\nphases:\n  - {kind: sprint, rate: 5, duration: 1s}\n", "phases[0]", "steady"),
        ("name: x\nphases: []\n", "phases", "at least 1"),
        ("phases:\n  - {kind: pause, duration: 1s}\n", "name", "Field required"),
        ("name: 'a b'\nphases:\n  - {kind: pause, duration: 1s}\n", "name", "pattern"),
        (MINIMAL + "machines: {id: 'm-{n}'}\n", "machines.id", "{i}"),
        (MINIMAL + "transport: {mqtt: {qos: 3}}\n", "transport.mqtt.qos", "0, 1 or 2"),
        (MINIMAL + "transport: {mqtt: {broker: 'http://x'}}\n", "transport.mqtt.broker", "mqtt://"),
        (MINIMAL + "transport: {mqtt: {topic: 'plant/all'}}\n", "transport.mqtt.topic", "{machine}"),
        (MINIMAL + "transport: {mqtt: {password: hunter2}}\n", "transport.mqtt.password", "environment"),
        (MINIMAL + "pipeline: {buffer: {size: 0}}\n", "pipeline.buffer.size", "greater than 0"),
        (MINIMAL + "pipeline: {buffer: {flush_intervall: 1s}}\n", "pipeline.buffer.flush_intervall", "unknown key"),
        (MINIMAL + "signals: {load_rate: {min: 5, max: 1}}\n", "signals.load_rate", "min < max"),
        ("name: x\nphases:\n  - {kind: ramp, from: 0, to: 0, duration: 1s}\n", "phases[0].ramp", "pause"),
    ],
)
def test_bad_scenarios_name_file_field_and_expectation(
    write_scenario: Callable[[str], Path], text: str, where: str, expected: str
) -> None:
    path = write_scenario(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}"), message
    assert expected in message


def test_yaml_syntax_error_names_line(write_scenario: Callable[[str], Path]) -> None:
    path = write_scenario("name: x\nphases: [\n  {kind: steady\n")
    with pytest.raises(ScenarioError, match=rf"^{path}:\d+:\d+: invalid YAML"):
        load_scenario(path)


def test_missing_file_and_non_mapping(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "nope.yaml")
    with pytest.raises(ScenarioError, match="expected a mapping"):
        load_scenario(write_scenario("- just\n- a list\n"))


def test_phases_that_send_nothing_are_refused(write_scenario: Callable[[str], Path]) -> None:
    with pytest.raises(ScenarioError, match="send no message"):
        load_scenario(write_scenario("name: x\nphases:\n  - {kind: pause, duration: 1s}\n"))


def test_json_schema_lists_sections() -> None:
    schema = json_schema()
    assert {"name", "phases", "transport", "pipeline", "machines"} <= set(schema["properties"])
    assert "additionalProperties" in str(schema)


def test_overrides_messages_keeps_rates_and_cuts_exactly() -> None:
    spec = load_scenario(SCENARIOS / "burst.yaml").scenario.stream_spec()
    for n in (1, 7, 150, 12_345):
        cut = apply_overrides(spec, messages=n)
        assert planned_count(cut) == n
        assert [p.rate for p in cut.phases] == [p.rate for p in spec.phases]


def test_overrides_duration_keeps_rates() -> None:
    spec = load_scenario(SCENARIOS / "steady.yaml").scenario.stream_spec()
    longer = apply_overrides(spec, duration_s=30)
    assert total_duration_s(longer) == pytest.approx(30)
    assert planned_count(longer) == pytest.approx(2 * planned_count(spec), abs=1)


def test_overrides_both_scale_rates_into_the_duration() -> None:
    spec = load_scenario(SCENARIOS / "steady.yaml").scenario.stream_spec()
    both = apply_overrides(spec, messages=500, duration_s=5)
    assert planned_count(both) == 500
    assert total_duration_s(both) == pytest.approx(5)


def test_scenario_model_direct() -> None:
    sc = Scenario.model_validate({"name": "d", "phases": [{"kind": "ramp", "from": 0, "to": 100, "duration": "10s"}]})
    assert planned_count(sc.stream_spec()) == 500
