"""A failing sink: crash_safe keeps the batch and retries it until it is written; naive gives it up.

pipeline/buffer.py (write_until_written, SinkStall), pipeline/async_buffer.py, pipeline/runtime.py (statistics,
close), pipeline/inject.py (the bench's sink_error fault), pipeline/__main__.py (the status line, the exit).

Real sinks and real failures: errors injected through the ``fault_injection`` control file (an EIO before the
Parquet sink is touched), and a real full disk: a 2 MiB tmpfs (root only; skipped otherwise) filled until
ENOSPC. Every reading is read back from the Parquet files; acknowledgements (``on_durable``) are checked
against the flushes the pipeline reported before them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pyarrow.dataset as ds
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import pipeline.buffer
from pipeline.clock import MonotonicWallClock
from pipeline.config import PipelineSettings
from pipeline.errors import ConfigError
from pipeline.model import FlushStat
from pipeline.runtime import Pipeline, PipelineStatistics
from simulators.broker import EmbeddedBroker
from tests.conftest import ROOT

RUNTIMES_AND_LOCKS = [
    pytest.param(runtime, lock, id=f"{runtime}-{lock}")
    for runtime in ("threads", "asyncio")
    for lock in ("swap", "coarse")
]
TOPIC = "plant/m-1/telemetry"
STATUS = re.compile(
    r"pipeline: received=(\d+) accepted=(\d+) rejected=(\d+)(?: stalled=([\d.]+)s held=(\d+) error=(\".*\"))?$"
)


def payload(seq: int, *, load_rate: float = 50.0) -> bytes:
    """A valid reading of now (a load_rate above 100 makes it a rejection with its seq: out_of_range)."""
    ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"machine": "m-1", "ts": ts, "load_rate": load_rate, "mileage": float(seq), "seq": seq}).encode()


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def settings(**overrides: Any) -> PipelineSettings:
    raw: dict[str, Any] = {"durability": "crash_safe", "buffer": {"size": 25, "flush_interval": "50ms"}}
    raw.update(overrides)
    return PipelineSettings.model_validate(raw)


def control(out: Path, sink_error: float, seed: int = 18) -> None:
    """Write the bench's control file as the bench does: a new file renamed over the old one."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "faults.json.tmp"
    tmp.write_text(json.dumps({"sink_error": sink_error, "seed": seed}))
    tmp.replace(out / "faults.json")


@dataclass
class Acks:
    """on_durable callbacks: which seq, and how many flushes had been reported when it was called."""

    flushes: list[FlushStat] = field(default_factory=list)
    calls: list[tuple[int, int]] = field(default_factory=list)

    def callback(self, seq: int) -> Callable[[], None]:
        return lambda: self.calls.append((seq, len(self.flushes)))

    def seqs(self) -> list[int]:
        return sorted(seq for seq, _ in self.calls)

    def check_after_their_flush(self, written: dict[int, tuple[str, int]]) -> None:
        """Each acknowledged seq was acknowledged after the flush that wrote it (sink, batch id) was reported."""
        reported_at = {(f.sink, f.batch_id): index for index, f in enumerate(self.flushes)}
        for seq, seen in self.calls:
            assert reported_at[written[seq]] < seen, f"seq {seq} acknowledged before its flush {written[seq]}"


def read_back(folder: Path) -> list[dict[str, Any]]:
    assert not list(folder.rglob("*.tmp")) and not list(folder.rglob("*.arrows.partial"))
    if not list(folder.rglob("*.parquet")):
        return []
    rows: list[dict[str, Any]] = ds.dataset(folder, format="parquet").to_table(columns=["seq", "batch_id"]).to_pylist()
    return rows


def written_by(rows: list[dict[str, Any]], sink: str) -> dict[int, tuple[str, int]]:
    return {r["seq"]: (sink, r["batch_id"]) for r in rows}


# --- injected sink errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("runtime", "lock"), RUNTIMES_AND_LOCKS)
def test_crash_safe_survives_injected_sink_errors(tmp_path: Path, runtime: str, lock: str) -> None:
    out = tmp_path / "out"
    control(out, 0.5)  # seed 18: the first write of both the Parquet and the quarantine sink fails
    s = settings(
        runtime=runtime, fault_injection="faults.json", buffer={"size": 25, "flush_interval": "50ms", "lock": lock}
    )
    acks = Acks()
    p = Pipeline(s, out, MonotonicWallClock(), on_flush=acks.flushes.append)
    p.start()
    readings, rejected = list(range(100)), list(range(1000, 1010))
    for seq in readings[:60]:
        p.submit(payload(seq), TOPIC, acks.callback(seq))
    for seq in rejected:
        p.submit(payload(seq, load_rate=500.0), TOPIC, acks.callback(seq))
    wait_until(lambda: p.statistics().injected_errors >= 2, what="injected errors")
    control(out, 0.0)
    for seq in readings[60:]:
        p.submit(payload(seq), TOPIC, acks.callback(seq))
    # Recovered by itself: everything written and acknowledged before close().
    wait_until(lambda: len(acks.calls) == 110, what="every message acknowledged")
    stats = p.statistics()
    p.close()

    assert stats.injected_errors >= 2 and stats.stalled_s == 0 and stats.held_rows == 0
    assert stats.readings is not None and stats.rejections is not None
    assert stats.readings.sink_failures + stats.rejections.sink_failures == stats.injected_errors
    assert (stats.readings.failed_rows, stats.rejections.failed_rows) == (0, 0)
    assert p.errors == []
    data, quarantine = read_back(out / "data"), read_back(out / "quarantine")
    assert sorted(r["seq"] for r in data) == readings  # each exactly once
    assert sorted(r["seq"] for r in quarantine) == rejected
    assert acks.seqs() == readings + rejected  # each acknowledged once
    acks.check_after_their_flush(written_by(data, "parquet") | written_by(quarantine, "quarantine"))


@pytest.mark.parametrize("runtime", ["threads", "asyncio"])
def test_naive_gives_the_failing_batch_up_as_before(
    tmp_path: Path, runtime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline.buffer, "WRITE_RETRIES", (0.0, 0.0))
    out = tmp_path / "out"
    control(out, 1.0)
    acks = Acks()
    p = Pipeline(
        settings(durability="naive", runtime=runtime, fault_injection="faults.json"),
        out,
        MonotonicWallClock(),
        on_flush=acks.flushes.append,
    )
    p.start()
    for seq in range(10):
        p.submit(payload(seq), TOPIC, acks.callback(seq))
    p.close()
    stats = p.statistics()
    assert stats.readings is not None
    assert (stats.readings.failed_rows, stats.readings.flushed_rows) == (10, 0)  # lost, and counted
    assert stats.injected_errors == 3  # one try and two retries, then given up
    assert stats.readings.sink_failures == 0 and stats.stalled_s == 0  # none of crash_safe's bookkeeping
    (error,) = p.errors
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert str(error) == "[Errno 5] injected sink error (fault_injection)"
    assert acks.calls == [] and acks.flushes == []
    assert read_back(out / "data") == []


@pytest.mark.parametrize(("runtime", "lock"), RUNTIMES_AND_LOCKS)
def test_close_gives_up_after_a_bounded_time_without_acknowledging(
    tmp_path: Path, runtime: str, lock: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pipeline.buffer, "CLOSE_RETRY_S", 0.3)
    out = tmp_path / "out"
    control(out, 1.0)
    acks = Acks()
    # Fewer rows than a batch: the timeout flush writes them, from the flusher (with coarse, under the lock, and
    # for asyncio on the loop), so this thread is never the one stuck retrying.
    s = settings(
        runtime=runtime, fault_injection="faults.json", buffer={"size": 100, "flush_interval": "50ms", "lock": lock}
    )
    p = Pipeline(s, out, MonotonicWallClock(), on_flush=acks.flushes.append)
    p.start()
    for seq in range(10):
        p.submit(payload(seq), TOPIC, acks.callback(seq))
    wait_until(lambda: p.statistics().stalled_s > 0, what="the stall")
    stalled = p.statistics()
    assert stalled.held_rows == 10 and stalled.readings is not None and stalled.readings.held_rows == 10
    assert stalled.sink_error == "[Errno 5] injected sink error (fault_injection)"
    assert stalled.readings.failing_sink == "parquet"
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        began = time.monotonic()
        p.close()
        took = time.monotonic() - began
    assert took < 5  # 0.3 s of retries, then given up (a generous bound: no timing is measured here)
    stats = p.statistics()
    assert stats.readings is not None and (stats.readings.failed_rows, stats.readings.flushed_rows) == (10, 0)
    assert stats.stalled_s == 0  # given up: nothing is being retried any more
    assert acks.calls == []  # never acknowledged: the broker keeps them
    assert [str(e) for e in p.errors] == ["[Errno 5] injected sink error (fault_injection)"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        m.startswith("closing with 10 rows unwritten (flush-parquet): sink parquet still failed") for m in errors
    )
    assert read_back(out / "data") == []


def test_fault_injection_costs_nothing_when_unset_and_stays_inside_the_output(tmp_path: Path) -> None:
    p = Pipeline(settings(), tmp_path, MonotonicWallClock())
    assert p._readings_sinks == [p.parquet] and p._rejections_sinks == [p.quarantine]  # no wrapper
    p.parquet.close()
    p.quarantine.close()  # never started: its buffers would have closed them
    with pytest.raises(ValueError, match="fault_injection: expected a path inside the output folder"):
        settings(fault_injection="../faults.json")
    with pytest.raises(ConfigError, match=r"pipeline\.fault_injection: .* which is absolute"):
        Pipeline(settings().model_copy(update={"fault_injection": "/tmp/x.json"}), tmp_path / "b", MonotonicWallClock())


def test_an_absent_or_broken_control_file_injects_nothing(tmp_path: Path) -> None:
    from pipeline.inject import FaultControl

    path = tmp_path / "faults.json"
    fc = FaultControl(path)
    assert fc.current()[0] == 0.0  # absent
    path.write_text('{"sink_error": 2}')
    time.sleep(0.06)
    assert fc.current()[0] == 0.0  # out of range: ignored
    path.write_text('{"sink_error": 0.25, "seed": 3}')
    time.sleep(0.06)
    assert fc.current()[:2] == (0.25, 3)
    path.unlink()
    time.sleep(0.06)
    assert fc.current()[0] == 0.0


# --- a real full disk -----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of its own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], check=False, capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        # A test that failed half-way may still hold files open there: detach it lazily rather than leave it.
        if subprocess.run(["umount", str(where)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk refuses a single byte more (ENOSPC)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 512, b"\0"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize(("runtime", "lock"), [("threads", "swap"), ("asyncio", "coarse")])
def test_a_full_disk_stalls_crash_safe_and_it_recovers_by_itself(
    small_disk: Path, runtime: str, lock: str, caplog: pytest.LogCaptureFixture
) -> None:
    out = small_disk / "out"
    acks = Acks()
    # One timeout flush for all 50 rows: with coarse on asyncio it retries on the loop, which blocks submit().
    s = settings(runtime=runtime, buffer={"size": 1000, "flush_interval": "100ms", "lock": lock})
    p = Pipeline(s, out, MonotonicWallClock(), on_flush=acks.flushes.append)
    p.start()
    filler = fill(small_disk)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        for seq in range(50):
            p.submit(payload(seq), TOPIC, acks.callback(seq))
        wait_until(lambda: p.statistics().stalled_s > 0.3, what="the stall")
        stalled = p.statistics()
        assert stalled.held_rows == 50 and stalled.readings is not None and stalled.readings.held_rows == 50
        assert stalled.sink_error is not None and "No space left on device" in stalled.sink_error
        assert stalled.readings.sink_failures >= 2 and stalled.readings.failed_rows == 0
        assert acks.calls == []  # nothing acknowledged while it is not on disk
        filler.unlink()
        wait_until(lambda: len(acks.calls) == 50, what="the recovery")  # no restart, no close
    stats = p.statistics()
    assert stats.stalled_s == 0 and stats.held_rows == 0
    assert stats.readings is not None and (stats.readings.flushed_rows, stats.readings.failed_rows) == (50, 0)
    p.close()
    assert p.errors == []
    data = read_back(out / "data")
    assert sorted(r["seq"] for r in data) == list(range(50))  # each exactly once, readable by pyarrow
    acks.check_after_their_flush(written_by(data, "parquet"))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("sink parquet failing: ") for m in messages) == 1  # one ERROR, not one per attempt
    assert any(re.match(r"sink parquet recovered after [\d.]+ s; 50 rows written", m) for m in messages)


# --- python -m pipeline ---------------------------------------------------------------------------------------


def publish(port: int, payloads: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(TOPIC, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


class Standalone:
    """``python -m pipeline`` (or ``python -c`` code running its main) with its stdout lines in a queue."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout or []:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, match: Callable[[str], bool], timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(line)
            if match(line):
                return line

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._reader.join(10)
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return code, self.proc.stderr.read() if self.proc.stderr else ""


def standalone_config(tmp_path: Path, broker: EmbeddedBroker, out: Path, **pipeline_settings: Any) -> Path:
    config = tmp_path / "pipeline.json"
    body = {
        "source": {"url": broker.url, "topic": "plant/+/telemetry", "qos": 1},
        "output": str(out),
        "pipeline": {
            "durability": "crash_safe",
            "buffer": {"size": 1000, "flush_interval": "100ms"},
            **pipeline_settings,
        },
    }
    config.write_text(json.dumps(body))  # JSON is YAML
    return config


def stalled_status(line: str) -> re.Match[str] | None:
    found = STATUS.match(line)
    return found if found is not None and found.group(4) is not None else None


def test_standalone_says_it_is_stalled_on_a_full_disk_and_recovers(small_disk: Path, tmp_path: Path) -> None:
    out = small_disk / "out"
    with EmbeddedBroker() as broker:
        config = standalone_config(tmp_path, broker, out)
        run = Standalone(["-m", "pipeline", "--config", str(config), "--report-every", "0.2"])
        try:
            run.wait_for(lambda line: "subscribed" in line)
            filler = fill(small_disk)
            publish(broker.port, [payload(seq) for seq in range(40)])
            line = run.wait_for(lambda line: bool((m := stalled_status(line)) and m.group(1) == "40"))
            found = stalled_status(line)
            assert found is not None
            assert found.group(1, 2, 3, 5) == ("40", "40", "0", "40")  # received, accepted, rejected, held
            assert "No space left on device" in json.loads(found.group(6))
            filler.unlink()
            run.wait_for(lambda line: line == "pipeline: received=40 accepted=40 rejected=0")  # healthy again
        finally:
            code, stderr = run.stop()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert re.search(
        r"^pipeline: ERROR: sink parquet failing: .*No space left on device; holding 40 rows", stderr, re.M
    )
    assert re.search(r"^pipeline: WARNING: sink parquet recovered after [\d.]+ s; 40 rows written", stderr, re.M)
    assert sorted(r["seq"] for r in read_back(out / "data")) == list(range(40))


def test_standalone_stopped_while_a_sink_fails_exits_1_and_leaves_it_unacknowledged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    control(out, 1.0)
    # main() itself, with the close bound shortened from 10 s: the rest is python -m pipeline as it runs.
    code = (
        "import sys; import pipeline.buffer; pipeline.buffer.CLOSE_RETRY_S = 0.5; "
        "from pipeline.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    with EmbeddedBroker() as broker:
        config = standalone_config(tmp_path, broker, out, fault_injection="faults.json")
        run = Standalone(["-c", code, "--config", str(config), "--report-every", "0.2"])
        try:
            run.wait_for(lambda line: "subscribed" in line)
            publish(broker.port, [payload(seq) for seq in range(30)])
            run.wait_for(lambda line: bool((m := stalled_status(line)) and m.group(5) == "30"))
        finally:
            exit_code, stderr = run.stop()
    assert exit_code == 1, stderr
    assert "Traceback" not in stderr
    assert "pipeline: ERROR: closing with 30 rows unwritten (flush-parquet): sink parquet still failed" in stderr
    assert stderr.rstrip().endswith("pipeline: error: [Errno 5] injected sink error (fault_injection)")
    assert any(line.startswith("pipeline: stopped; received=30 accepted=30 rejected=0") for line in run.seen)
    assert read_back(out / "data") == []


def test_status_line_keeps_the_prefix_the_bench_parses() -> None:
    from pipeline.__main__ import status_line
    from pipeline.buffer_core import BufferStatistics

    healthy = PipelineStatistics(received=5, accepted=4, rejected=1)
    assert status_line(healthy) == "pipeline: received=5 accepted=4 rejected=1"
    buf = BufferStatistics(
        buffered=3500,
        accepted=9000,
        flushed_rows=4500,
        flushes=9,
        coalesced=0,
        failed_rows=0,
        dropped=0,
        producer_wait_ns=0,
        stalled_s=12.34,
        held_rows=500,
        sink_failures=9,
        failing_sink="parquet",
        last_error='cannot append to "x": [Errno 28] No space left on device',
    )
    line = status_line(PipelineStatistics(received=9000, accepted=9000, rejected=0, readings=buf))
    assert line == (
        'pipeline: received=9000 accepted=9000 rejected=0 stalled=12.3s held=4000 error="cannot append to \\"x\\": '
        '[Errno 28] No space left on device"'
    )
    assert re.match(r"pipeline: received=(\d+) accepted=(\d+) rejected=(\d+)", line)
