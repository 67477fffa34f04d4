"""``python -m pipeline --config FILE`` on its own against a broker, stopped by SIGINT."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pyarrow.dataset as ds
from paho.mqtt.enums import CallbackAPIVersion

from simulators.broker import EmbeddedBroker
from tests.conftest import ROOT

# Today's midnight (UTC): recent enough for the validator's far-past rule on any day the tests run.
DAY = datetime.now(UTC).strftime("%Y-%m-%d")
GOOD = [
    {"machine": "m-1", "ts": f"{DAY}T00:00:00Z", "load_rate": 10.0, "mileage": 1.0, "seq": 0},
    {"machine": "m-2", "ts": f"{DAY}T05:30:00+05:30", "load_rate": 20, "mileage": 2.5, "seq": 1},
]
BAD = [b"{not json", f'{{"machine": "m-1", "ts": "{DAY}T00:00:00", "load_rate": 1, "mileage": 1, "seq": 2}}'.encode()]


def _publish(url_port: int, payloads: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", url_port)
    client.loop_start()
    infos = [client.publish("plant/m/telemetry", p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def iter_queue(q: queue.Queue[str]) -> list[str]:
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items


def test_pipeline_runs_standalone(tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        config = tmp_path / "pipeline.yaml"
        config.write_text(
            f"source: {{url: '{broker.url}', topic: 'plant/+/telemetry', qos: 1}}\n"
            f"output: {tmp_path / 'out'}\n"
            "pipeline: {buffer: {size: 100, flush_interval: 100ms}}\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--config", str(config), "--report-every", "0.1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in proc.stdout or []:
                lines.put(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            # The first line says the subscription is granted; publishing before it would lose messages.
            assert "subscribed" in lines.get(timeout=30)
            _publish(broker.port, [json.dumps(m).encode() for m in GOOD] + BAD)
            # Stop only once the pipeline has taken all four (its periodic counter line says so).
            while "received=4 " not in lines.get(timeout=30):
                pass
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            reader.join(timeout=10)
        err = proc.stderr.read() if proc.stderr else ""
        out = next(line for line in iter_queue(lines) if "stopped" in line)
    assert proc.returncode == 0, err
    assert "received=4 accepted=2 rejected=2" in out, out
    data = ds.dataset(tmp_path / "out" / "data", format="parquet").to_table()
    assert sorted(data.column("seq").to_pylist()) == [0, 1]
    # +05:30 was normalised: both readings are the same instant in UTC.
    assert len(set(data.column("ts").to_pylist())) == 1
    rejected = ds.dataset(tmp_path / "out" / "quarantine", format="parquet").to_table().to_pylist()
    assert sorted(r["reason"] for r in rejected) == ["malformed_json", "naive_timestamp"]
    assert {r["payload"] for r in rejected} == set(BAD)


def test_pipeline_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("source: {url: 'http://x', qos: 5}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert proc.returncode == 2
    # The source kind (by URL scheme) is part of the path: source.mqtt.url, source.opcua.url.
    assert f"{config}: source.mqtt.url" in proc.stderr and f"{config}: source.mqtt.qos" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pipeline_runs_standalone_against_an_opcua_server(tmp_path: Path) -> None:
    """The same program, pointed at an OPC UA endpoint instead of a broker."""
    from pipeline.clock import MonotonicWallClock
    from simulators.opcua_server import PlantServer
    from simulators.stream import Message

    def msg(seq: int) -> Message:
        body = {"machine": "m-1", "ts": f"{DAY}T00:00:0{seq}Z", "load_rate": 1.0 + seq, "mileage": 2.0, "seq": seq}
        return Message(seq, "m-1", 0, json.dumps(body).encode())

    with PlantServer(["m-1"]) as plant:
        config = tmp_path / "pipeline.yaml"
        config.write_text(
            f"source: {{url: '{plant.url}', publishing: 50ms}}\n"
            f"output: {tmp_path / 'out'}\n"
            "pipeline: {buffer: {size: 100, flush_interval: 100ms}}\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--config", str(config), "--report-every", "0.1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in proc.stdout or []:
                lines.put(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            assert "subscribed to Objects/Plant" in lines.get(timeout=30)
            plant.run([msg(0), msg(1), msg(2)], MonotonicWallClock())
            while "received=3 " not in lines.get(timeout=30):
                pass
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            reader.join(timeout=10)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    data = ds.dataset(tmp_path / "out" / "data", format="parquet").to_table()
    assert sorted(data.column("seq").to_pylist()) == [0, 1, 2]


def test_secured_opcua_standalone_keeps_its_key_in_a_private_folder_under_the_output(tmp_path: Path) -> None:
    """source.cert_dir is relative to the output folder, created 0700 before the client writes its key."""
    import os
    import stat

    from simulators.opcua_server import PlantServer

    out = tmp_path / "out"
    # Before, cert_dir was relative to the working directory (here the checkout).
    cwd_certs_before = (ROOT / "certs").exists()
    with PlantServer(
        ["m-1"], security_mode="SignAndEncrypt", cert_dir=tmp_path / "server-certs", users={"operator": "s3cret"}
    ) as plant:
        config = tmp_path / "pipeline.yaml"
        config.write_text(
            f"source: {{url: '{plant.url}', security: SignAndEncrypt, server_certificate: '{plant.server_cert}',"
            " username: operator, password: '${OPCUA_PASSWORD}'}\n"
            f"output: {out}\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--config", str(config), "--report-every", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OPCUA_PASSWORD": "s3cret"},
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert "subscribed to Objects/Plant" in first, (first, proc.stderr.read() if proc.stderr else "")
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    certs = out / "certs"
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert (certs / "pipeline-client-key.pem").is_file()
    # The client's own key, like the server's: owner-only (asyncua alone would write it with the umask's 0644).
    assert stat.S_IMODE((certs / "pipeline-client-key.pem").stat().st_mode) == 0o600
    assert (ROOT / "certs").exists() == cwd_certs_before
