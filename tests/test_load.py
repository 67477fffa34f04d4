"""``bench load``: locust (a master and worker processes) as the load engine, end to end on loopback.

Locust monkey-patches the process that imports it, so these tests never import
``bench.load.locustfile``: locust always runs in subprocesses, as ``bench load`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from asyncua.client.client import Client

from bench.cli import load as load_cli
from bench.errors import ScenarioError, UsageError
from bench.load import runner as load
from bench.results import SCHEMA_VERSION
from bench.results.model import read_results
from simulators.opcua_server import PlantServer
from tests.conftest import ROOT, SCENARIOS

MESSAGES = 400
OPCUA_SCENARIO = """\
name: opcua_small
seed: 5
machines: {count: 4, id: "m-{i}"}
phases:
  - {kind: steady, rate: 100, duration: 1s}
transport:
  kind: opcua
"""


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench")
    sub = parser.add_subparsers(dest="command", required=True)
    load_cli.register(sub)
    return parser.parse_args(argv)


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return {f"{row['Type']} {row['Name']}".strip(): row for row in csv.DictReader(f)}


def test_bench_load_burst_with_two_workers_reconciles(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = _parse(["load", str(SCENARIOS / "burst.yaml"), "--workers", "2", "--messages", str(MESSAGES)])
    args.out, args.quiet = run_dir, True
    assert load_cli.command(args) == 0

    # Locust ran as a master and two workers, and wrote its own reports.
    for name in ("locust.html", "locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "locust-worker-0.log").is_file() and (run_dir / "locust-worker-1.log").is_file()
    assert "2 workers connected" in (run_dir / "locust-master.log").read_text()
    plan = json.loads((run_dir / "sent" / "plan.json").read_text())
    assert sorted(w["index"] for w in plan["workers"]) == [0, 1]
    assert all(sum(w["users"].values()) > 0 for w in plan["workers"])
    assert len(list((run_dir / "sent").glob("sent-*.npz"))) == 2
    rows = _csv_rows(run_dir / "locust_stats.csv")
    assert int(rows["MQTT publish"]["Request Count"]) == MESSAGES
    assert int(rows["Aggregated"]["Failure Count"]) == 0

    # The ledger: every message published once, every one persisted.
    results = read_results(run_dir)
    variant = results.variants[0]
    ledger = variant.ledger
    assert ledger.reconciled
    assert ledger.sent == ledger.persisted == MESSAGES
    assert ledger.lost == 0
    e2e = variant.latency_ms.end_to_end
    assert e2e is not None and e2e.count == MESSAGES
    assert results.schema_version == SCHEMA_VERSION

    run = variant.load
    assert run is not None
    assert run.engine == "locust"
    assert run.workers == 2
    coverage = run.coverage
    assert (coverage.published, coverage.not_published, coverage.published_twice) == (MESSAGES, 0, 0)
    assert run.locust.by_type["MQTT publish"].requests == MESSAGES
    assert run.locust.by_type["MQTT publish"].p99_ms is not None
    assert "locust_stats.csv" in run.files and "locust.html" in run.files


async def _read_seqs(url: str, ids: dict[str, dict[str, str]]) -> dict[str, int]:
    client = Client(url)
    await client.connect()
    try:
        return {m: int(await client.get_node(fields["seq"]).read_value()) for m, fields in ids.items()}
    finally:
        await client.disconnect()


def test_opcua_user_writes_each_reading_once_into_a_plant_server(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    scenario = write_scenario(OPCUA_SCENARIO)
    sent_dir = tmp_path / "sent"
    with PlantServer([f"m-{i}" for i in range(4)]) as plant:
        command = [
            sys.executable, "-m", "locust", "-f", str(load.LOCUSTFILE), "OpcUaUser",
            "--headless", "--users", "3", "--spawn-rate", "3", "--run-time", "60s", "--only-summary",
            "--csv", str(tmp_path / "locust"), "--scenario", str(scenario), "--opcua-url", plant.url,
            "--sent-dir", str(sent_dir), "--start-lead", "1",
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        seqs = asyncio.run(_read_seqs(plant.url, plant.node_ids()))

    sent = load.collect_sent(sent_dir)
    assert sent.problems == []
    assert sent.coverage(100) == {**sent.coverage(100), "published": 100, "failed": 0, "not_published": 0}
    assert bool((sent.ack_ns >= sent.sent_ns).all())
    # Each machine's Seq node holds its last reading: machine i sends seqs i, i + 4, ..., so the last is 96 + i.
    assert seqs == {f"m-{i}": 96 + i for i in range(4)}
    assert np.array_equal(np.sort(sent.seq), np.arange(100))
    rows = _csv_rows(tmp_path / "locust_stats.csv")
    assert int(rows["OPCUA write"]["Request Count"]) == 100
    assert int(rows["OPCUA write"]["Failure Count"]) == 0


def test_missing_scenario_is_a_scenario_error(tmp_path: Path) -> None:
    args = _parse(["load", str(tmp_path / "nope.yaml")])
    with pytest.raises(ScenarioError, match=r"nope\.yaml: no such file"):
        load_cli.command(args)


def test_unsupported_transport_and_unknown_variant_are_usage_errors(
    tmp_path: Path, write_scenario: Callable[[str, str], Path]
) -> None:
    memory = write_scenario(OPCUA_SCENARIO.replace("kind: opcua", "kind: memory"), "memory.yaml")
    for argv, message in (
        ([str(memory)], "transport.kind"),
        ([str(SCENARIOS / "burst.yaml"), "--variant", "nope"], "--variant nope"),
        ([str(SCENARIOS / "burst.yaml"), "--broker", "localhost:1883"], "--broker"),
    ):
        args = _parse(["load", *argv, "--out", str(tmp_path / "never")])
        with pytest.raises(UsageError, match=message):
            load_cli.command(args)
    assert not (tmp_path / "never").exists()
