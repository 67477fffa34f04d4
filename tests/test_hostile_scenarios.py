"""Hostile scenario input: each gives one line naming file and field, exit 2, at once; nothing hangs or is made.

Every case here is a reproduction that once hung at full CPU, traced back, or was accepted and then failed the
run (or allocated ~100 GB). "At once" is checked in CPU time, not wall time, so a busy neighbour cannot fail it:
the hangs burnt a full core, so a hang shows up in CPU time as surely as in wall time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.cli import main
from bench.errors import ScenarioError
from bench.scenario import json_schema, load_scenario
from simulators.stream import MAX_MESSAGES, PhaseSpec, StreamSpec, planned_count
from tests.conftest import SCENARIOS

STEADY = "  - {kind: steady, rate: 10, duration: 1}\n"

HOSTILE = {
    "rate_1e12": ("name: x\nphases:\n  - {kind: steady, rate: 1e12, duration: 10}\n", "phases", "100,000,000"),
    "rate_inf": ("name: x\nphases:\n  - {kind: steady, rate: .inf, duration: 10}\n", "phases", "finite"),
    "rate_nan": ("name: x\nphases:\n  - {kind: steady, rate: .nan, duration: 10}\n", "rate", ""),
    "duration_inf": ("name: x\nphases:\n  - {kind: steady, rate: 10, duration: .inf}\n", "phases", "finite"),
    "burst_1e308": ("name: x\nphases:\n" + STEADY + "  - {kind: burst, rate: 1e308, duration: 1}\n", "phases", ""),
    "ramp_to_1e308": ("name: x\nphases:\n  - {kind: ramp, from: 1, to: 1e308, duration: 1}\n", "phases", ""),
    "oversize_100gb": (
        "name: x\nanomalies: [{kind: oversize, size: 100000000000, rate: 0.1}]\nphases:\n" + STEADY,
        "anomalies[0].size",
        "16777216",
    ),
    "id_pattern_100k": (
        "name: x\nmachines: {id: '{i:>100000}'}\nphases:\n" + STEADY,
        "machines",
        "100,000 characters",
    ),
    "id_control_char": ("name: x\nmachines: {id: '{i:c}', count: 3}\nphases:\n" + STEADY, "machines", "control"),
    "topic_too_long": (
        "name: x\ntransport: {mqtt: {topic: 'a/" + "b" * 2000 + "/{machine}'}}\nphases:\n" + STEADY,
        "transport.mqtt.topic",
        "1024",
    ),
    "server_restart_on_mqtt": (
        "name: x\nfaults: [{kind: server_restart, at: 1, down_for: 1}]\nphases:\n" + STEADY,
        "faults[0]",
        "transport.kind opcua or both",
    ),
    "capacity_step_1e12": (
        "name: x\ncapacity: {rates: [10, 1e12]}\nphases:\n" + STEADY,
        "capacity",
        "100,000,000",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(HOSTILE), ids=str)
def test_hostile_scenario_is_refused_at_once(
    case: str, write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text, field, expected = HOSTILE[case]
    path = write_scenario(text)
    cpu = time.process_time()
    assert main(["validate", str(path)]) == 2
    spent = time.process_time() - cpu
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and field in err and expected in err, err
    assert "Traceback" not in err
    assert spent < 1.0, f"validate took {spent:.2f} s of CPU"


def test_planned_count_of_the_largest_plan_is_exact_and_immediate() -> None:
    # 10^6 msg/s for 100 s: the closed form must give exactly MAX_MESSAGES without iterating them.
    spec = StreamSpec(seed=0, machines=("m",), phases=(PhaseSpec("steady", 100.0, 1_000_000.0),))
    cpu = time.process_time()
    assert planned_count(spec) == MAX_MESSAGES
    assert time.process_time() - cpu < 0.5


def test_override_beyond_the_plan_limit_is_a_usage_error(
    write_scenario: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario("name: x\nphases:\n" + STEADY)
    out = tmp_path / "run"
    assert main(["run", str(path), "--messages", str(MAX_MESSAGES + 1), "--out", str(out), "--quiet"]) == 2
    assert "--messages" in capsys.readouterr().err
    assert not out.exists()


def test_out_naming_a_file_is_a_usage_error(
    write_scenario: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario("name: x\nphases:\n" + STEADY)
    existing = tmp_path / "a-file"
    existing.write_text("keep me", encoding="utf-8")
    assert main(["run", str(path), "--out", str(existing), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err and str(existing) in err, err
    assert existing.read_text(encoding="utf-8") == "keep me"


def test_a_mistake_found_after_start_leaves_no_half_made_folder(
    write_scenario: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An unset ${VAR} is only found when the run resolves it, after the run folder was made.
    monkeypatch.delenv("BENCH_TEST_UNSET_USER", raising=False)
    path = write_scenario("name: x\ntransport: {mqtt: {username: '${BENCH_TEST_UNSET_USER}'}}\nphases:\n" + STEADY)
    out = tmp_path / "run"
    for _ in range(2):  # the same --out fails the same way again, not with "folder is not empty"
        assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "BENCH_TEST_UNSET_USER" in err and "not empty" not in err, err
        assert not out.exists()
    out.mkdir()  # a folder the user made for the run stays, empty as it was
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert out.is_dir() and not any(out.iterdir())


def _schema_validator() -> jsonschema.protocols.Validator:
    schema = json_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_satisfies_the_exported_schema(path: Path) -> None:
    load_scenario(path)  # and the bench itself accepts it
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _schema_validator().iter_errors(data)]
    assert not errors, errors


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name: x\ncolour: red\nphases:\n" + STEADY, []),
        ("name: x\nphases:\n  - {kind: steady, rate: 10, duration: soon}\n", ["phases", 0]),
        ("name: x\nmatrix: [{pipeline.buffer.size: 5}]\nphases:\n" + STEADY, ["matrix", 0]),
        ("name: x\nmatrix: [{name: a, seed: 5}]\nphases:\n" + STEADY, ["matrix", 0]),
    ],
)
def test_the_exported_schema_refuses_what_the_bench_refuses(
    text: str, where: list[object], write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # The schema must not pass everything: an editor should flag what `bench validate` refuses.
    assert main(["validate", str(write_scenario(text))]) == 2
    errors = list(_schema_validator().iter_errors(yaml.safe_load(text)))
    assert errors and any(list(e.absolute_path)[: len(where)] == where for e in errors), errors


def test_bench_schema_prints_the_schema_the_tests_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


def _leaves(node: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))] or [path]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaves(v, (*path, i))] or [path]
    return [path]


def _replaced(node: object, path: tuple[object, ...], value: object) -> object:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {k: _replaced(v, rest, value) if k == head else v for k, v in node.items()}
    assert isinstance(node, list)
    return [_replaced(v, rest, value) if i == head else v for i, v in enumerate(node)]


HOSTILE_VALUES: st.SearchStrategy[object] = st.sampled_from(
    [
        float("inf"),
        float("-inf"),
        float("nan"),
        1e308,
        -1e308,
        10**30,
        -(10**30),
        0,
        -1,
        "",
        "x" * 10_000,
        "{i:>100000}",
        "../../../../tmp/escape",
        "/tmp/escape",
        None,
        [],
        {},
        [[[[[[]]]]]],
        True,
        "1e308s",
        "99999999999999999999d",
    ]
)
SHIPPED = sorted(SCENARIOS.glob("*.yaml"))


@pytest.mark.timeout(300)
# No shrinking: a failing example is already small (one leaf, one value) and shrinking it costs minutes.
@settings(
    max_examples=300,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), value=HOSTILE_VALUES)
def test_one_hostile_value_anywhere_in_a_shipped_scenario_is_refused_or_bounded(
    data: st.DataObject, value: object, tmp_path: Path
) -> None:
    # Every leaf of every shipped scenario is a place a user can type something absurd: validation must end
    # quickly with either a ScenarioError or a scenario whose plan the run can carry out.
    source = data.draw(st.sampled_from(SHIPPED), label="scenario")
    base = yaml.safe_load(source.read_text(encoding="utf-8"))
    leaf = data.draw(st.sampled_from(_leaves(base)), label="leaf")
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(_replaced(base, leaf, value)), encoding="utf-8")
    cpu = time.process_time()
    try:
        loaded = load_scenario(path)
    except ScenarioError as exc:
        # One line per problem, each naming the file (a value can break several fields of a union at once).
        assert all(line.startswith(str(path)) for line in str(exc).strip().splitlines()), exc
    else:
        for _, variant in loaded.variants:
            assert planned_count(variant.stream_spec()) <= MAX_MESSAGES
            assert all(0 < len(m) <= 255 for m in variant.machines.ids())
    assert time.process_time() - cpu < 2.0, f"{source.name} {leaf} = {value!r}"


@pytest.mark.parametrize(
    "transport",
    [
        "{mqtt: {broker: 'mqtt://plant:s3cr3t-pw@127.0.0.1:1883'}}",
        "{mqtt: {broker: 'tcp://plant:s3cr3t-pw@broker.local:1883'}}",
        "{kind: opcua, opcua: {server: 'opc.tcp://plant:s3cr3t-pw@127.0.0.1:4840/'}}",
    ],
)
def test_a_password_in_a_broker_or_server_url_is_refused_without_echoing_it(
    transport: str, write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(f"name: x\ntransport: {transport}\nphases:\n" + STEADY)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "s3cr3t-pw" not in err and "***" in err and "password" in err, err


def test_a_password_in_the_broker_flag_is_refused_without_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["run", str(SCENARIOS / "burst.yaml"), "--broker", "mqtt://u:s3cr3t-pw@127.0.0.1:1883", "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "s3cr3t-pw" not in err and "--broker" in err, err
    assert not out.exists()


def test_a_refused_value_is_quoted_once(
    write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario("name: x\nanomalies: [{kind: late, by: 1e308, rate: 0.5}]\nphases:\n" + STEADY)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("'1e308'") == 1, err
