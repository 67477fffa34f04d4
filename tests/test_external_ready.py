"""ready: {subscribed: true}: an external system is ready once the broker shows its subscription.

The test pipeline (tests/data/ext_ready_pipeline.py) prints nothing useful, subscribes first to an unrelated
topic (where the broker names filters), and to the scenario's filter only a second later: with a clean
session, anything published before that is lost, so a reconciled ledger shows that ready waited for the right
subscription.
"""

from __future__ import annotations

import getpass
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.errors import ScenarioError, ServiceError
from bench.harness import runner
from bench.scenario import load_scenario
from simulators.mosquitto import free_port
from simulators.subscriptions import covers, logged_filters
from tests.test_mqtt_durable_ack import mosquitto_binary

PIPELINE = Path(__file__).resolve().parent / "data" / "ext_ready_pipeline.py"

SCENARIO = """
name: ext-ready
seed: 1
machines: {count: 4}
transport: {kind: mqtt, mqtt: {broker: BROKER, qos: 1}}
system:
  kind: external
  external:
    command: ["{python}", "PIPELINE", "{broker_url}", "{topic}", "{out_dir}/out.jsonl", ARGS]
    ready: {subscribed: true, timeout: TIMEOUT}
    output: {format: jsonl, path: "{out_dir}/out.jsonl"}
phases:
  - {kind: steady, rate: 200, duration: 1s}
run: {drain_timeout: 3s}
"""


DECOY = "--decoy, --delay, '1'"
"""An unrelated subscription first, the scenario's filter a second later."""


def _scenario(tmp_path: Path, broker: str = "embedded", args: str = DECOY, timeout: str = "30s") -> Path:
    text = SCENARIO.replace("BROKER", broker).replace("PIPELINE", str(PIPELINE))
    path = tmp_path / "scenario.yaml"
    path.write_text(text.replace("ARGS", args).replace("TIMEOUT", timeout), encoding="utf-8")
    return path


def _run(path: Path, tmp_path: Path) -> runner.RunOutcome:
    return runner.run(load_scenario(path), runner.RunOptions(out=tmp_path / "run", calibrate=False))


def _assert_reconciled(outcome: runner.RunOutcome) -> None:
    assert outcome.ok, outcome.problems()
    v = outcome.results.variants[0]
    assert v.ledger.persisted == v.ledger.sent == 200 and v.ledger.lost == 0
    assert v.system is not None and v.system.starts == 1


def test_ready_waits_for_the_subscription_on_the_embedded_broker(tmp_path: Path) -> None:
    _assert_reconciled(_run(_scenario(tmp_path), tmp_path))


def test_ready_waits_for_the_subscription_on_a_mosquitto_the_bench_starts(tmp_path: Path) -> None:
    mosquitto_binary()
    _assert_reconciled(_run(_scenario(tmp_path, "mosquitto"), tmp_path))


def _mosquitto(tmp_path: Path, extra: str) -> Iterator[str]:
    """A Mosquitto of this test's own on a free port, with ``extra`` config lines; stopped after the test."""
    binary = mosquitto_binary()
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n{extra}", encoding="utf-8"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)  # polling a port another process opens
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def counting_mosquitto(tmp_path: Path) -> Iterator[str]:
    """$SYS every second, no subscribe log: the bench can only watch the subscription count."""
    yield from _mosquitto(tmp_path, "sys_interval 1\n")


@pytest.fixture
def silent_mosquitto(tmp_path: Path) -> Iterator[str]:
    """No $SYS at all (sys_interval 0) and no subscribe log: nothing to watch."""
    yield from _mosquitto(tmp_path, "sys_interval 0\n")


def test_ready_sees_a_rise_of_the_subscription_count_where_that_is_all_the_broker_offers(
    tmp_path: Path, counting_mosquitto: str
) -> None:
    """Only the count: an unrelated subscription would be taken for it (a documented limit), so none here."""
    _assert_reconciled(_run(_scenario(tmp_path, counting_mosquitto, args="--delay, '1'"), tmp_path))


def test_never_subscribing_times_out_naming_the_setting_with_its_last_output(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as caught:
        _run(_scenario(tmp_path, args="--never", timeout="2s"), tmp_path)
    first, *rest = str(caught.value).splitlines()
    assert "not ready within 2 s" in first and "system.external.ready.subscribed" in first, first
    assert "no new subscription covering 'plant/+/telemetry'" in first, first
    assert any("ext-ready: connected" in line for line in rest), "its last output follows"


def test_a_broker_that_shows_no_subscriptions_is_named(tmp_path: Path, silent_mosquitto: str) -> None:
    with pytest.raises(ServiceError, match=r"system\.external\.ready\.subscribed") as caught:
        _run(_scenario(tmp_path, silent_mosquitto, timeout="2s"), tmp_path)
    message = str(caught.value)
    assert "publishes neither" in message and "ready: log, port or file" in message and "\n" not in message


@pytest.mark.parametrize(
    ("ready", "message"),
    [
        ("{subscribed: true, log: x}", "expected exactly one of log, port, file or subscribed, got log, subscribed"),
        ("{subscribed: false}", "system.external.ready.subscribed"),
    ],
)
def test_ready_settings_are_checked_when_read(tmp_path: Path, ready: str, message: str) -> None:
    path = _scenario(tmp_path)
    path.write_text(
        path.read_text(encoding="utf-8").replace("{subscribed: true, timeout: 30s}", ready), encoding="utf-8"
    )
    with pytest.raises(ScenarioError, match=re.escape(message)):
        load_scenario(path)


@pytest.mark.parametrize(
    ("subscribed", "wanted", "expected"),
    [
        ("plant/+/telemetry", "plant/+/telemetry", True),
        ("plant/#", "plant/+/telemetry", True),
        ("#", "plant/+/telemetry/+", True),
        ("+/+/+", "plant/+/telemetry", True),
        ("$share/workers/plant/+/telemetry", "plant/+/telemetry", True),
        ("plant/m1/telemetry", "plant/+/telemetry", False),
        ("plant/+", "plant/+/telemetry", False),
        ("plant/+/telemetry/+", "plant/+/telemetry", False),
        ("plant/+/telemetry", "plant/#", False),
    ],
)
def test_a_subscription_counts_only_if_it_covers_the_scenarios_filter(
    subscribed: str, wanted: str, expected: bool
) -> None:
    assert covers(subscribed, wanted) is expected


def test_subscribe_log_lines_are_read_with_spaces_in_ids_and_filters() -> None:
    assert list(logged_filters("1700000000: pipe 1 plant/+/tele metry")) == ["plant/+/tele metry"]
    assert "plant/+/telemetry" in list(logged_filters("1700000000: my 0 client 2 plant/+/telemetry"))
    assert list(logged_filters("not a log line")) == []
