"""OPC UA: the plant server's address space, the source's conversion, reconnect after a restart."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pyarrow.dataset as ds
import pytest
from asyncua import ua
from asyncua.crypto.uacrypto import load_certificate, load_private_key
from asyncua.sync import Client
from asyncua.ua.status_codes import StatusCodes

from bench.harness import runner
from bench.scenario import load_scenario
from pipeline.clock import FakeClock, MonotonicWallClock
from pipeline.errors import SourceError
from pipeline.opcua_source import OpcUaSource, ReadingAssembler, _iso, status_name
from simulators.opcua_security import make_certificate
from simulators.opcua_server import NodeNames, PlantServer
from simulators.stream import Message

BASE_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll a condition owned by another thread until it holds; fail after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(0.02)


def message(seq: int, machine: str, ts: str, status: str | None = None) -> Message:
    body: dict[str, object] = {
        "machine": machine,
        "ts": ts,
        "load_rate": 10.0 + seq,
        "mileage": 100.0 + seq,
        "seq": seq,
    }
    if status is not None:
        body["status"] = status
    return Message(seq=seq, machine=machine, intended_send_ns=0, payload=json.dumps(body).encode())


# --- pure conversion ------------------------------------------------------------------


def test_assembler_joins_values_of_one_source_timestamp() -> None:
    asm = ReadingAssembler()
    assert asm.add("m", "load_rate", 1.5, "T1", "Good") == []
    assert asm.add("m", "mileage", 9.0, "T1", "Good") == []
    (reading,) = asm.add("m", "seq", 7, "T1", "Good")
    assert reading == {"machine": "m", "ts": "T1", "load_rate": 1.5, "mileage": 9.0, "seq": 7}


def test_assembler_flushes_an_older_reading_that_can_no_longer_complete() -> None:
    """Queues are FIFO per item: once T2 completes, T1's missing value was discarded."""
    asm = ReadingAssembler()
    asm.add("m", "seq", 1, "T1", "Good")  # T1 lost its load_rate and mileage
    for field, value in (("load_rate", 2.0), ("mileage", 3.0)):
        asm.add("m", field, value, "T2", "Good")
    out = asm.add("m", "seq", 2, "T2", "Good")
    assert out == [
        {"machine": "m", "ts": "T1", "seq": 1},
        {"machine": "m", "ts": "T2", "load_rate": 2.0, "mileage": 3.0, "seq": 2},
    ]
    assert asm.incomplete == 1
    assert asm.drain() == []


def test_assembler_keeps_a_non_good_status() -> None:
    asm = ReadingAssembler()
    asm.add("m", "load_rate", 1.0, "T", "UncertainLastUsableValue")
    asm.add("m", "mileage", 1.0, "T", "Good")
    (reading,) = asm.add("m", "seq", 1, "T", "Good")
    assert reading["status"] == "UncertainLastUsableValue"


def test_timestamps_and_status_names() -> None:
    assert _iso(datetime(2026, 1, 1, 5, 30)) == "2026-01-01T05:30:00.000000Z"  # naive OPC UA DateTime is UTC
    assert _iso(datetime(2026, 1, 1, 5, 30, tzinfo=UTC)) == "2026-01-01T05:30:00.000000Z"
    assert status_name(ua.StatusCode(cast(ua.UInt32, StatusCodes.Good))) == "Good"
    assert status_name(ua.StatusCode(cast(ua.UInt32, StatusCodes.BadSensorFailure))) == "BadSensorFailure"


# --- the plant server ----------------------------------------------------------------


def test_address_space_has_a_folder_per_machine_with_its_variables() -> None:
    machines = [f"press-{i:03d}" for i in range(250)]
    with PlantServer(machines, names=NodeNames(plant="Line7")) as plant, Client(plant.url) as client:
        line = client.nodes.objects.get_child([f"{client.get_namespace_index('urn:iiot-bench:plant')}:Line7"])
        children = line.get_children()
        assert sorted(c.read_browse_name().Name for c in children) == machines
        names = {v.read_browse_name().Name for v in children[0].get_children()}
        assert names == {"LoadRate", "Mileage", "Status", "Seq"}
        assert sum(len(c.get_children()) for c in children) == 1000  # 250 machines x 4 variables
        seq = children[0].get_child([f"{line.nodeid.NamespaceIndex}:Seq"])
        # Before the first reading the value says so, the OPC UA way.
        assert seq.read_data_value(raise_on_bad_status=False).StatusCode.name == "BadWaitingForInitialData"


def test_reset_values_shows_a_new_client_placeholders_again_not_the_last_reading() -> None:
    """The OPC UA reference runs both of its sides on one server: the second side must not take the first
    replay's last values for a reading."""
    received: list[dict[str, object]] = []
    with PlantServer(["m-1"]) as plant:
        plant.run([message(0, "m-1", "2026-01-01T00:00:00Z")], MonotonicWallClock())
        with Client(plant.url) as client:
            seq = client.get_node(plant.node_ids()["m-1"]["seq"])
            assert seq.read_data_value(raise_on_bad_status=False).Value.Value == 0
            plant.reset_values()
            assert seq.read_data_value(raise_on_bad_status=False).StatusCode.name == "BadWaitingForInitialData"
        source = OpcUaSource(plant.url, lambda p, t: received.append(json.loads(p)), publishing_ms=20)
        source.start()
        try:
            wait_until(lambda: source.stats.placeholders == 4)
            plant.run([message(1, "m-1", "2026-01-01T00:00:01Z")], MonotonicWallClock())
            wait_until(lambda: len(received) >= 1)
        finally:
            source.close()
    assert [r["seq"] for r in received] == [1]


def test_source_converts_source_timestamp_and_status(tmp_path: Path) -> None:
    """Offsets normalise to UTC via the SourceTimestamp; Uncertain values reach the validator as such."""
    received: list[dict[str, object]] = []
    lock = threading.Lock()

    def collect(payload: bytes, topic: str) -> None:
        with lock:
            received.append(json.loads(payload))

    clock = MonotonicWallClock()
    with PlantServer(["m-1", "m-2"]) as plant:
        source = OpcUaSource(plant.url, collect, publishing_ms=20)
        source.start()
        try:
            plant.run(
                [
                    message(0, "m-1", "2026-01-01T05:30:00+05:30"),
                    message(1, "m-2", "2026-01-01T00:00:01Z", status="UncertainLastUsableValue"),
                    message(2, "m-1", "2026-01-01T00:00:02.250000Z"),
                ],
                clock,
            )
            wait_until(lambda: len(received) >= 3)
        finally:
            source.close()
    by_seq = {r["seq"]: r for r in received}
    assert by_seq[0]["ts"] == "2026-01-01T00:00:00.000000Z"
    assert by_seq[2]["ts"] == "2026-01-01T00:00:02.250000Z"
    assert by_seq[1]["status"] == "UncertainLastUsableValue"
    assert "status" not in by_seq[0]
    assert (by_seq[0]["load_rate"], by_seq[0]["mileage"], by_seq[0]["machine"]) == (10.0, 100.0, "m-1")
    assert source.stats.placeholders == 8  # 2 machines x 4 variables, skipped and counted


def test_source_reconnects_after_a_server_restart() -> None:
    received: list[int] = []
    clock = MonotonicWallClock()
    # The source's own clock stands still: the resume time must come from it (the ledger compares it with the
    # outage start taken from the run's clock), not from time.time_ns().
    source_clock = FakeClock(start_ns=5_000_000_000)
    with PlantServer(["m-1"]) as plant:
        source = OpcUaSource(
            plant.url,
            lambda p, t: received.append(json.loads(p)["seq"]),
            publishing_ms=20,
            reconnect_max_delay_s=1,
            clock=source_clock,
        )
        source.start()
        try:
            plant.run([message(0, "m-1", "2026-01-01T00:00:00Z")], clock)
            wait_until(lambda: received == [0])
            plant.stop_server()
            wait_until(lambda: source.stats.connection_losses >= 1)
            # A value written while the server is down cannot be read by anyone.
            assert plant.run([message(1, "m-1", "2026-01-01T00:00:01Z")], clock) == 0
            plant.restart_server()
            # Keep writing until the re-created subscription delivers: reconnect takes the backoff.
            deadline = time.monotonic() + 30
            seq = 2
            while not any(s >= 2 for s in received):
                assert time.monotonic() < deadline, "no reading after the restart"
                ts = (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seq)).isoformat()
                plant.run([message(seq, "m-1", ts)], clock)
                seq += 1
                time.sleep(0.2)
        finally:
            source.close()
    assert 1 not in received
    assert source.stats.connection_losses >= 1
    assert source.stats.resumed_at_ns and set(source.stats.resumed_at_ns) == {5_000_000_000}


OPCUA = """
name: ua
seed: 2
machines: {count: 5, id: "m-{i}"}
phases:
  - {kind: steady, rate: 200, duration: 1.5s}
transport: {kind: opcua, opcua: {publishing: 50ms}}
pipeline:
  buffer: {size: 100, flush_interval: 200ms}
  parquet: {fsync: false}
"""


def test_bench_run_over_opcua_reconciles(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    outcome = runner.run(load_scenario(write_scenario(OPCUA)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    assert outcome.ok, outcome.problems()
    ledger = outcome.ledger
    assert (ledger.sent, ledger.persisted, ledger.lost) == (300, 300, 0)
    stats = outcome.results.variants[0].opcua
    assert stats is not None and stats.readings == 300 and stats.incomplete == 0
    assert ds.dataset(tmp_path / "r" / "data", format="parquet").count_rows() == 300


def test_both_transports_into_one_pipeline_reconcile(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    text = OPCUA.replace("transport: {kind: opcua, opcua: {publishing: 50ms}}", "transport: {kind: both}")
    outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    assert outcome.ok, outcome.problems()
    assert (outcome.ledger.sent, outcome.ledger.persisted) == (300, 300)
    stats = outcome.results.variants[0].opcua
    # Machines m-1 and m-3 (odd index) are on OPC UA: 2 of every 5 messages.
    assert stats is not None and stats.readings == 120 and stats.machines == 2


def test_queue_overflow_is_counted_as_a_named_drop(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    """A burst into 2-value queues published every 500 ms must overflow; the ledger names the cause."""
    # Drops mean the pipeline never receives everything sent: a short drain_timeout ends the run sooner.
    text = (
        OPCUA.replace("{publishing: 50ms}", "{publishing: 500ms, queue_size: 2}").replace(
            "rate: 200, duration: 1.5s", "rate: 600, duration: 2s"
        )
        + "run: {drain_timeout: 2s}\n"
    )
    outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    ledger = outcome.ledger
    assert ledger.reconciled, ledger.problems()
    # 120 changes per machine per 500 ms publish against a queue of 2: overflow is certain.
    assert ledger.dropped_by_reason.get("opcua_queue_overflow", 0) > 0
    assert ledger.sent == ledger.persisted + ledger.rejected + ledger.dropped


def test_secured_server_accepts_only_encrypted_clients_with_the_password(tmp_path: Path) -> None:
    received: list[int] = []
    clock = MonotonicWallClock()
    with PlantServer(
        ["m-1"], security_mode="SignAndEncrypt", cert_dir=tmp_path / "certs", users={"operator": "s3cret"}
    ) as plant:
        # No unsecured endpoint: a plain client is turned away.
        with pytest.raises(Exception), Client(plant.url, timeout=5):  # noqa: B017 - any refusal will do
            pass
        wrong = OpcUaSource(
            plant.url,
            lambda p, t: None,
            username="operator",
            password="nope",
            security_mode="SignAndEncrypt",
            server_certificate=plant.server_cert,
            cert_dir=tmp_path / "certs",
        )
        with pytest.raises(SourceError):
            wrong.start(timeout_s=15)
        source = OpcUaSource(
            plant.url,
            lambda p, t: received.append(json.loads(p)["seq"]),
            publishing_ms=20,
            username="operator",
            password="s3cret",
            security_mode="SignAndEncrypt",
            server_certificate=plant.server_cert,
            cert_dir=tmp_path / "certs",
        )
        source.start()
        try:
            plant.run([message(0, "m-1", "2026-01-01T00:00:00Z")], clock)
            wait_until(lambda: received == [0])
        finally:
            source.close()
    assert source.security_policy_uri == "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256"
    # The plant server's private key: owner only, in a folder only its owner can enter.
    certs = tmp_path / "certs"
    assert stat.S_IMODE((certs / "plant-server-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    # ... and the pipeline's client key beside it.
    assert stat.S_IMODE((certs / "pipeline-client-key.pem").stat().st_mode) == 0o600


def test_make_certificate_writes_the_key_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "certs"
    previous = os.umask(0o000)  # the most permissive: nothing may depend on the umask taking bits away
    try:
        pair = asyncio.run(make_certificate(folder, "t", "urn:test", server=True))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # A usable key and certificate: asyncua loads them as a pair.
    key = asyncio.run(load_private_key(pair.key))
    cert = asyncio.run(load_certificate(pair.cert))
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_make_certificate_keeps_an_existing_key_and_tightens_its_mode(tmp_path: Path) -> None:
    first = asyncio.run(make_certificate(tmp_path, "t", "urn:test", server=False))
    pem = first.key.read_bytes()
    first.key.chmod(0o644)
    tmp_path.chmod(0o755)
    again = asyncio.run(make_certificate(tmp_path, "t", "urn:test", server=False))
    assert again.key.read_bytes() == pem
    assert stat.S_IMODE(again.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_server_restart_losses_are_counted_with_their_cause(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """Stop the plant server mid-run: what it could not write, and what nobody read, is named, not hidden."""
    # 16 s of sending: a restarted asyncua server and the client's reconnect took longer than the 8.5 s that
    # 10 s left once, on a machine at load 6 (a CI run, two CPU hogs and benchmarks on 2 cores).
    text = OPCUA.replace("rate: 200, duration: 1.5s", "rate: 60, duration: 16s") + (
        "faults:\n  - {kind: server_restart, at: 1.5s, down_for: 1s}\nrun: {drain_timeout: 3s}\n"
    )
    outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    variant = outcome.results.variants[0]
    ledger = outcome.ledger
    assert ledger.reconciled, ledger.problems()
    # At least the planned second of downtime (60 readings) could not be written at all; a
    # restart on a loaded machine takes longer, so this is a lower bound.
    assert variant.publisher is not None and variant.publisher.not_sent is not None
    not_sent = variant.publisher.not_sent["server_down"]
    assert not_sent >= 55
    assert ledger.sent + not_sent == 960, "every planned reading is sent or counted as not sent"
    assert variant.opcua is not None and variant.opcua.connection_losses >= 1
    # Readings from long after the restart (seq 450: 7.5 s in) arrive again: the client reconnected.
    seqs = ds.dataset(tmp_path / "r" / "data", format="parquet").to_table(columns=["seq"]).column("seq").to_pylist()
    assert max(seqs) > 450
    assert set(ledger.dropped_by_reason) <= {"server_outage", "opcua_queue_overflow"}


def test_bench_replays_into_an_external_server_by_url(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    """A server the bench did not start, given by URL: the replay writes as a client."""
    machines = [f"m-{i}" for i in range(5)]
    with PlantServer(machines) as outside:
        text = OPCUA.replace("{publishing: 50ms}", f"{{publishing: 50ms, server: '{outside.url}'}}")
        outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r"))
        assert outside.written == 0  # the bench wrote as a client, not through the server's own API
    assert outcome.ok, outcome.problems()
    assert (outcome.ledger.sent, outcome.ledger.persisted) == (300, 300)
    stats = outcome.results.variants[0].opcua
    assert stats is not None and "reference" not in stats.model_fields_set  # needs the embedded server


def test_source_with_configured_node_ids_skips_the_browse() -> None:
    received: list[int] = []
    with PlantServer(["m-1", "m-2"]) as plant:
        ids = {"m-1": {f: n for f, n in plant.node_ids()["m-1"].items() if f != "status"}}
        source = OpcUaSource(plant.url, lambda p, t: received.append(json.loads(p)["seq"]), node_ids=ids)
        source.start()
        try:
            plant.run(
                [message(0, "m-2", "2026-01-01T00:00:00Z"), message(1, "m-1", "2026-01-01T00:00:01Z")],
                MonotonicWallClock(),
            )
            wait_until(lambda: received == [1])
        finally:
            source.close()
    assert source.stats.machines == 1 and source.stats.monitored_items == 3  # only what was configured
    with pytest.raises(SourceError, match="missing seq"):
        OpcUaSource(
            "opc.tcp://127.0.0.1:1/",
            lambda p, t: None,
            node_ids={"m": {"load_rate": "ns=2;i=1", "mileage": "ns=2;i=2"}},
        )._configured()
