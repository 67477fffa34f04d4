"""A user's own test of their pipeline with the bench's pytest plugin (installed with iiot-bench: the fixtures
bench_broker, bench_scenario and bench_run need no import).

Here the pipeline under test is examples/python-takehome/pipeline.py; in your project, point the command at
yours. Runs in this project's CI (testpaths in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.harness.runner import RunOutcome
from bench.pytest_plugin import assert_no_unexplained_loss, assert_p99_below, assert_reconciled

PIPELINE = Path(__file__).resolve().parents[1] / "python-takehome" / "pipeline.py"


def scenario(rate: int, seconds: float) -> dict[str, object]:
    return {
        "name": "takehome-under-test",
        "seed": 3,
        "machines": {"count": 4},
        "transport": {"kind": "mqtt", "mqtt": {"qos": 1}},
        "system": {
            "kind": "external",
            "external": {
                "command": [
                    "{python}",
                    str(PIPELINE),
                    "--broker",
                    "{broker_url}",
                    "--topic",
                    "{topic}",
                    "--db",
                    "{out_dir}/takehome.db",
                ],
                "ready": {"log": "takehome: subscribed"},
                "output": {"format": "sql", "url": "sqlite:///{out_dir}/takehome.db", "table": "readings"},
            },
        },
        "phases": [{"kind": "steady", "rate": rate, "duration": f"{seconds}s"}],
        "run": {"drain_timeout": "5s"},
    }


def test_every_reading_is_stored_once(
    bench_scenario: Callable[..., Path], bench_run: Callable[..., RunOutcome], bench_broker: str
) -> None:
    outcome = bench_run(bench_scenario(scenario(rate=100, seconds=2)), broker=bench_broker)
    assert_reconciled(outcome)
    assert_no_unexplained_loss(outcome)


def test_a_light_load_is_stored_within_seconds(
    bench_scenario: Callable[..., Path], bench_run: Callable[..., RunOutcome], bench_broker: str
) -> None:
    # The bound is generous on purpose: latency here is observed by polling the table every 500 ms, on a
    # shared machine; a regression that matters (a stall, a lost commit) blows far past it.
    outcome = bench_run(bench_scenario(scenario(rate=50, seconds=2)), broker=bench_broker)
    assert_p99_below(outcome, 10_000)
