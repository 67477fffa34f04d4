"""The bench in a user's own test suite: a pytest plugin (entry point ``pytest11``, loaded once iiot-bench is
installed).

Fixtures:

- ``bench_broker``: an embedded MQTT broker (amqtt) on a free loopback port for the test session; its URL.
- ``bench_scenario``: writes a scenario (YAML text or a dict) into the test's folder; returns its path. A
  relative ``cwd`` or ``command`` in it is then relative to that folder, so pass absolute paths for the
  user's own program (``Path(__file__).parent / ...``).
- ``bench_run``: runs a scenario end to end (``bench run``) into the test's folder; returns the outcome, whose
  ``results`` are the typed results.json.

Assertions, with messages that say what went wrong: :func:`assert_reconciled`, :func:`assert_no_unexplained_loss`,
:func:`assert_p99_below`. See examples/pytest/ for a complete test file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from bench.harness.runner import RunOutcome


@pytest.fixture(scope="session")
def bench_broker() -> Iterator[str]:
    """An embedded MQTT broker on an ephemeral loopback port, for the whole test session: its mqtt:// URL."""
    from simulators.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.url


@pytest.fixture
def bench_scenario(tmp_path: Path) -> Callable[..., Path]:
    """``bench_scenario(text_or_dict, name="scenario.yaml") -> Path``: a scenario file in the test's folder."""

    def write(scenario: str | dict[str, Any], name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        text = scenario if isinstance(scenario, str) else yaml.safe_dump(scenario, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def bench_run(tmp_path: Path) -> Callable[..., RunOutcome]:
    """``bench_run(path, broker=None, messages=None, duration_s=None) -> RunOutcome``: ``bench run`` of a
    scenario, its run folder under the test's folder. ``broker`` replaces the scenario's (e.g. bench_broker)."""
    from bench.harness import runner
    from bench.scenario import load_scenario

    runs = iter(range(1_000_000))

    def run(
        path: str | Path, *, broker: str | None = None, messages: int | None = None, duration_s: float | None = None
    ) -> RunOutcome:
        options = runner.RunOptions(
            out=tmp_path / f"run-{next(runs)}",
            broker=broker,
            messages=messages,
            duration_s=duration_s,
            calibrate=False,
        )
        return runner.run(load_scenario(Path(path)), options)

    return run


def assert_reconciled(outcome: RunOutcome) -> None:
    """Every message sent is persisted, rejected with a reason, or dropped by a named cause; nothing else wrong."""
    if not outcome.ok:
        problems = "\n  - ".join(outcome.problems())
        raise AssertionError(f"the run did not reconcile ({outcome.run_dir / 'results.json'}):\n  - {problems}")


def assert_no_unexplained_loss(outcome: RunOutcome) -> None:
    """No message lost without a cause, in any variant (named losses, e.g. QoS 0 in a partition, are allowed)."""
    lost = {name: ledger.lost for name, ledger in outcome.ledgers.items() if ledger.lost}
    if lost or outcome.failures:
        detail = "; ".join(
            [f"{name}: {n} lost, e.g. seq {outcome.ledgers[name].missing_seq_sample[:5]}" for name, n in lost.items()]
            + [f"{name}: could not run: {why}" for name, why in outcome.failures.items()]
        )
        raise AssertionError(f"unexplained loss ({outcome.run_dir / 'results.json'}): {detail}")


def assert_p99_below(outcome: RunOutcome, bound_ms: float, metric: str = "end_to_end") -> None:
    """The p99 of a latency (``end_to_end`` by default) is below ``bound_ms`` in every variant."""
    for variant in outcome.results.variants:
        summary = getattr(variant.latency_ms, metric, None)
        if summary is None or summary.p99 is None:
            raise AssertionError(f"{variant.name}: no {metric} latency was measured")
        if summary.p99 >= bound_ms:
            raise AssertionError(
                f"{variant.name}: {metric} p99 {summary.p99:,.1f} ms is not below {bound_ms:,.1f} ms "
                f"(p50 {summary.p50:,.1f} ms, max {summary.max:,.1f} ms, {summary.count:,} samples)"
            )
