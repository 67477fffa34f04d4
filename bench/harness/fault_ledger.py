"""The ledger per fault: which losses a fault explains, which it does not, and what each fault cost.

Every fault that happened has a window on the run's clock: from a little before it struck (what a naive writer
held in its open file and buffer dies with it) to a little after the system was back. Whether a loss in that
window is *named* (expected: the configuration never promised to survive this fault) or stays *lost*
(unexplained, which fails the run) depends on what the configuration promised:

- a crash (``process_kill``, ``process_restart``), a partition: a crash-safe pipeline fed at QoS 1 or 2;
- a broker restart: that, and a broker that keeps its sessions (a bench-managed Mosquitto with persistence;
  the embedded amqtt broker forgets every session);
- a failing sink (``db_outage``, ``disk_full``, ``sink_error``): a crash-safe pipeline, which holds what it
  cannot write and acknowledges nothing until it is written.

Per fault the results then say: named, lost, duplicated, and the latency of the messages intended in its window.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.harness.accounting import CrashWindow, Sends
from bench.harness.faults import FaultEvent
from bench.harness.ledger import ReadBack
from bench.harness.session import QUIET_S
from bench.scenario import BrokerRestartFault, Fault
from pipeline.config import PipelineSettings
from pipeline.probes import Recorder

STORAGE_FAULTS = ("db_outage", "disk_full", "sink_error")
"""Faults of the pipeline's sinks: a crash-safe pipeline holds what it cannot write, whatever the QoS."""


@dataclass(frozen=True)
class FaultWindow:
    event: FaultEvent
    expected: bool
    """The configuration did not promise to survive this fault: losses in the window are named, not lost."""
    start_ns: int
    end_ns: int

    def holds(self, at_ns: int) -> bool:
        return self.start_ns <= at_ns <= self.end_ns


def promised(kind: str, fault: Fault | None, settings: PipelineSettings, *, qos: int, broker: str | None) -> bool:
    """Whether the configuration promised to lose nothing in a fault of this kind (see the module's doc)."""
    crash_safe = settings.durability == "crash_safe"
    if kind in STORAGE_FAULTS:
        return crash_safe
    if kind == "broker_restart":
        keeps = broker == "mosquitto" and isinstance(fault, BrokerRestartFault) and fault.persistence
        return crash_safe and qos > 0 and keeps
    return crash_safe and qos > 0


def fault_windows(
    events: Sequence[FaultEvent],
    faults: Sequence[Fault],
    settings: PipelineSettings,
    *,
    qos: int,
    broker: str | None,
    now_ns: int,
    promises_all: bool = False,
) -> list[FaultWindow]:
    # A crash or a failing sink costs a naive pipeline not only its buffer but its open file (a time window of
    # parquet.rotate); a broker fault costs what was in flight, about a flush interval's worth at most.
    whole_file_ns = int((max(settings.buffer.flush_interval, settings.parquet.rotate) + 1.0) * 1e9)
    in_flight_ns = int((settings.buffer.flush_interval + 1.0) * 1e9)
    by_kind: dict[str, Fault] = {f.kind: f for f in faults}
    out = []
    for e in sorted(events, key=lambda e: e.struck_ns):
        fault = e.fault if e.fault is not None else by_kind.get(e.kind)
        expected = not promises_all and not promised(e.kind, fault, settings, qos=qos, broker=broker)
        end = e.recovered_ns or e.healed_ns or now_ns
        if expected and e.kind in STORAGE_FAULTS and e.healed_ns is not None:
            # A naive writer that failed keeps its broken file open until the file's time window ends: what
            # it is handed until then is lost to the same fault, even once the storage is back.
            end = max(end, e.healed_ns + whole_file_ns)
        before_ns = in_flight_ns if e.kind.startswith("broker_") else whole_file_ns
        out.append(FaultWindow(e, expected, e.struck_ns - before_ns, end + int(QUIET_S * 1e9)))
    return out


def crash_windows(windows: Sequence[FaultWindow]) -> list[CrashWindow]:
    """The windows whose losses the ledger names by their fault (the expected ones). Not an OPC UA server
    restart: what it cost is told apart more finely (server_outage, opcua_queue_overflow) by the accounting."""
    return [
        CrashWindow(w.event.kind, w.start_ns, w.end_ns)
        for w in windows
        if w.expected and w.event.kind != "server_restart"
    ]


def received_latencies(data_dir: Path, sends: Sends) -> dict[int, int]:
    """seq -> ns from the intended send to the row's ``received_at`` (the pipeline's receive time, 1 us
    resolution): what can be known of a pipeline in another process without its flush records."""
    out: dict[int, int] = {}
    planned = len(sends.intended_ns)
    for path in sorted(data_dir.rglob("*.parquet")) if data_dir.exists() else []:
        try:
            table = pq.read_table(path, columns=["seq", "received_at"])
        except Exception:  # an unreadable file is the read-back's to report, not this
            continue
        received = table.column("received_at").cast("int64").to_pylist()
        for seq, at_us in zip(table.column("seq").to_pylist(), received, strict=True):
            if 0 <= seq < planned and sends.sent(seq) and seq not in out:
                out[seq] = at_us * 1000 - sends.intended_ns[seq]
    return out


@dataclass
class _Cost:
    named: int = 0
    lost: int = 0
    duplicated: int = 0
    latency: Recorder = field(default_factory=Recorder)


def per_fault(
    windows: Sequence[FaultWindow],
    sends: Sends,
    back: ReadBack,
    latencies: Mapping[int, int],
    latency_kind: str,
) -> list[dict[str, Any]]:
    """Per fault window (in the order the faults struck): named, lost, duplicated, latency."""
    persisted = Counter(back.persisted_seqs)
    redelivered = Counter(
        s for s, r in zip(back.rejected_seqs, back.rejected_reasons, strict=True) if s is not None and r == "duplicate"
    )
    seen = set(persisted) | {s for s in back.rejected_seqs if s is not None}
    seen |= {s for s in back.dropped_seqs if s is not None}
    dropped = {s: r for s, r in zip(back.dropped_seqs, back.dropped_reasons, strict=True) if s is not None}
    rows = [_Cost() for _ in windows]
    for seq in sends.seqs:
        at = sends.intended_ns[seq]
        first = next((i for i, w in enumerate(windows) if w.holds(at)), None)
        if first is None:
            continue
        row = rows[first]
        if seq not in seen or dropped.get(seq) == windows[first].event.kind:
            if windows[first].expected:
                row.named += 1
            else:
                row.lost += 1
        row.duplicated += max(0, persisted[seq] - 1) + redelivered[seq]
        if seq in latencies:
            row.latency.record_ns(max(0, latencies[seq]))
    out = []
    for w, row in zip(windows, rows, strict=True):
        summary = row.latency.summary() if row.latency.count else None
        out.append(
            {
                "expected_loss": w.expected,
                "named": row.named,
                "lost": row.lost,
                "duplicated": row.duplicated,
                "latency_ms": None
                if summary is None
                else {"p50": summary["p50"], "p99": summary["p99"], "max": summary["max"]},
                "latency_kind": None if summary is None else latency_kind,
            }
        )
    return out
