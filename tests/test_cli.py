"""The CLI: exit codes and one-line errors for user mistakes, no tracebacks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from bench.cli import main
from bench.results.model import read_results, results_json_schema
from tests.conftest import SCENARIOS, run_module

BROKEN = "name: broken\nphases:\n  - {kind: steady, rate: fast, duration: 1s}\n"


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(SCENARIOS / "burst.yaml"), str(SCENARIOS / "steady.yaml")]) == 0
    assert capsys.readouterr().out.count(": ok") == 2


def test_validate_bad_exits_2_with_file_and_field(
    write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(BROKEN)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: phases[0].steady.rate" in err
    assert "Traceback" not in err


def test_schema_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "iiot-bench scenario"


def _memory_steady(folder: Path) -> Path:
    """scenarios/steady.yaml on the memory transport: a real run without a broker."""
    text = (SCENARIOS / "steady.yaml").read_text(encoding="utf-8")
    memory = text.replace("transport:\n  mqtt:\n    broker: embedded\n    qos: 1\n", "transport:\n  kind: memory\n")
    assert "kind: memory" in memory
    path = folder / "steady.yaml"
    path.write_text(memory, encoding="utf-8")
    return path


def test_schema_results_prints_a_json_schema_that_a_real_run_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["schema", "--results"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == results_json_schema()
    monkeypatch.setenv("BENCH_NO_REPORT", "1")  # the report has its own tests
    out = tmp_path / "run"
    assert main(["run", str(_memory_steady(tmp_path)), "--messages", "300", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("PASSED: ledger reconciled: 300 sent"), printed[:200]
    assert "steady: run " in printed and "persisted msg/s" in printed and "reconciled" in printed
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(data)
    data["variants"][0]["ledger"]["persited"] = 300
    assert not validator.is_valid(data), "a misspelt key is refused, as the model refuses it"
    # bench compare reads both sides through the model: one run a side can only be inconclusive (exit 3).
    assert main(["compare", str(out), str(out), "--json"]) == 3
    result = json.loads(capsys.readouterr().out)
    assert result["outcome"] == "inconclusive" and {"persisted_per_s", "e2e_p99_ms"} <= {
        m["metric"] for m in result["metrics"]
    }
    assert read_results(out).variants[0].ledger.persisted == 300


def test_compare_names_a_file_that_is_not_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "results.json"
    bad.write_text('{"variants": [{"name": "x"}]}', encoding="utf-8")
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"bench: error: {bad}: expected a bench results file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--messages", "0"), ("--messages", "-3"), ("--messages", "x"), ("--duration", "0"), ("--duration", "-1s")],
)
def test_non_positive_overrides_are_rejected(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", str(SCENARIOS / "burst.yaml"), f"{flag}={value}"])
    assert info.value.code == 2
    assert "expected a positive" in capsys.readouterr().err


def test_bad_broker_url_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(SCENARIOS / "burst.yaml"), "--broker", "localhost:1883", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "--broker" in capsys.readouterr().err


def test_unreachable_broker_is_reported_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on loopback is closed on these machines: connection refused at once.
    code = main(["run", str(SCENARIOS / "burst.yaml"), "--broker", "mqtt://127.0.0.1:9", "--out", str(tmp_path / "r")])
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot connect to MQTT broker 127.0.0.1:9" in err


def test_out_folder_that_is_not_empty_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old.txt").write_text("earlier run")
    assert main(["run", str(SCENARIOS / "burst.yaml"), "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_run_on_broken_scenario_exits_2_with_one_line(write_scenario: Callable[[str], Path]) -> None:
    """Through the real entry point: exit code 2, one line on stderr, no traceback."""
    path = write_scenario(BROKEN)
    proc = run_module("bench", "run", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"bench: error: {path}: phases[0].steady.rate:")


def test_missing_credential_variable_names_file_and_field(
    write_scenario: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IIOT_BENCH_TEST_PASSWORD", raising=False)
    path = write_scenario(
        "name: creds\nphases: [{kind: steady, rate: 10, duration: 1s}]\n"
        "transport: {mqtt: {username: u, password: '${IIOT_BENCH_TEST_PASSWORD}'}}\n"
    )
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: transport.mqtt.password: environment variable IIOT_BENCH_TEST_PASSWORD is not set" in err
