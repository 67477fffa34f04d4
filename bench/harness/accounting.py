"""After a session: read back -> reconcile -> attribute named losses -> durable times -> end-to-end latency.

Whoever published (paced publishers in this process, locust users, publisher processes), the bench's side of
the ledger is a :class:`Sends`; the system under test's side is its :class:`~bench.harness.sut.Output`, read
back from its files. ``bench run`` and ``bench load`` share :func:`account` and :func:`variant_parts`, so the
same scenario gives the same ledger and the same tables whichever engine sent it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.ledger import Ledger, ReadBack, attribute_outage, attribute_queue_overflow, reconcile
from bench.harness.probes import append_cost, flush_summary, series_summary, sink_rows_per_s, timeline_json
from bench.harness.sut import Output
from bench.results.model import Results
from bench.scenario import Scenario
from pipeline.config import PipelineSettings
from pipeline.model import FlushStat
from pipeline.probes import Recorder
from simulators.stream import StreamSpec, machine_of, planned_count, total_duration_s


@dataclass(frozen=True)
class CommandOptions:
    """What every running command takes: where its run folder goes, and the broker instead of the scenario's."""

    out: Path | None = None
    broker: str | None = None
    reports_dir: Path = Path("reports")


@dataclass(frozen=True)
class RunRecord:
    """What a command leaves behind: its run folder, and what it wrote into its results.json."""

    run_dir: Path
    results: Results


def write_run_results(run_dir: Path, data: dict[str, Any]) -> Results:
    """Build the typed results from what a command measured, and write them as the run's results.json.

    The model refuses a key it does not define: a writer's typo fails here, not in a reader months later.
    """
    results = Results.model_validate(data)
    results.write(run_dir / "results.json")
    return results


@dataclass(frozen=True)
class Sends:
    """What the bench handed to the transport: the sent side of the ledger."""

    seqs: list[int]
    """Each planned message sent, once (deliberate copies are in ``copies``)."""
    intended_ns: Sequence[int]
    """Intended send time per seq (indexable by seq, ``planned`` long); read only for sent seqs."""
    sent: Callable[[int], bool]
    copies: Counter[int] = field(default_factory=Counter)
    payloads: dict[bytes, int] = field(default_factory=dict)
    """Payloads that cannot name their seq (malformed JSON, ...) -> the seq they were sent as."""


@dataclass(frozen=True)
class Outage:
    """A server outage the run caused (fault ``server_restart``): losses in it are attributed, not lost."""

    stopped_at_ns: list[int]
    resumed_at_ns: list[int]
    publishing_s: float


@dataclass(frozen=True)
class CrashWindow:
    """A stretch of the run clock where a process fault could cost messages the system never promised to keep:
    a loss of a message intended for this window is named by the fault (``cause``) instead of left unexplained."""

    cause: str
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class Accounting:
    ledger: Ledger
    e2e: Recorder


def account(
    sends: Sends,
    output: Output,
    spec: StreamSpec,
    *,
    opcua_machines: Sequence[str] = (),
    outage: Outage | None = None,
    crashes: Sequence[CrashWindow] = (),
) -> Accounting:
    """Reconcile, attribute what OPC UA's queues, a caused outage and a process fault the configuration did not
    promise to survive dropped, by name, and measure end to end."""
    back = output.back
    ledger = reconcile(sends.seqs, back, copies=sends.copies, sent_payloads=sends.payloads)
    if crashes and ledger.lost:
        ledger = _attribute_crashes(sends, back, ledger, crashes)
    if opcua_machines and ledger.lost:
        dropped = {s: r for s, r in zip(back.dropped_seqs, back.dropped_reasons, strict=True) if s is not None}
        on_opcua = set(opcua_machines)
        opcua_sent = [seq for seq in sends.seqs if machine_of(spec, seq) in on_opcua]
        dropped.update(attribute_queue_overflow(opcua_sent, back, lambda seq: machine_of(spec, seq)))
        if outage is not None:
            dropped.update(
                attribute_outage(
                    opcua_sent,
                    back,
                    intended_ns=sends.intended_ns,
                    stopped_at_ns=outage.stopped_at_ns,
                    resumed_at_ns=outage.resumed_at_ns,
                    publishing_s=outage.publishing_s,
                )
            )
        ledger = reconcile(sends.seqs, back, dropped, copies=sends.copies, sent_payloads=sends.payloads)
    planned = len(sends.intended_ns)
    e2e = Recorder()
    for seq, durable_ns in output.durable:
        if 0 <= seq < planned and sends.sent(seq):
            e2e.record_ns(durable_ns - sends.intended_ns[seq])
    return Accounting(ledger, e2e)


def _attribute_crashes(sends: Sends, back: ReadBack, ledger: Ledger, crashes: Sequence[CrashWindow]) -> Ledger:
    """Name each lost message intended inside a crash window by its fault; the rest stay lost (unexplained)."""
    dropped = {s: r for s, r in zip(back.dropped_seqs, back.dropped_reasons, strict=True) if s is not None}
    seen = set(back.persisted_seqs) | {s for s in back.rejected_seqs if s is not None} | set(dropped)
    for seq in sends.seqs:
        if seq in seen:
            continue
        at = sends.intended_ns[seq]
        cause = next((c.cause for c in crashes if c.start_ns <= at <= c.end_ns), None)
        if cause is not None:
            dropped[seq] = cause
    return reconcile(sends.seqs, back, dropped, copies=sends.copies, sent_payloads=sends.payloads)


def variant_parts(
    name: str,
    sc: Scenario,
    settings: PipelineSettings,
    spec: StreamSpec,
    *,
    transport: dict[str, Any],
    overrides: dict[str, Any],
    ledger: Ledger,
    latency: dict[str, Recorder],
    flushes: list[FlushStat],
    epoch_ns: int,
    last_sent_ns: int,
    timeline: list[tuple[float, int, int]],
    samples: list[tuple[float, int, int]],
    lock: dict[str, Any],
    pipeline: dict[str, Any] | None,
    files: int,
) -> dict[str, Any]:
    """The parts of a results.json variant every run engine writes, in the order readers expect them."""
    planned = planned_count(spec)
    duration_s = total_duration_s(spec)
    send_span_s = max((last_sent_ns - epoch_ns) / 1e9, 1e-9)
    # Without flush records (a pipeline in another process) the persist rate is unknown, not infinite.
    last_durable = max((f.durable_ns for f in flushes if f.sink == "parquet"), default=epoch_ns if flushes else None)
    persist_span_s = None if last_durable is None else max((last_durable - epoch_ns) / 1e9, 1e-9)
    return {
        "name": name,
        "config": {
            "pipeline": settings.model_dump(mode="json", by_alias=True),
            "transport": transport,
            "stream": {
                "planned": planned,
                "duration_s": round(duration_s, 3),
                "arrival": spec.arrival,
                "machines": len(spec.machines),
                "overrides": overrides,
            },
        },
        "ledger": ledger.to_json(),
        "throughput": {
            "offered_per_s": round(planned / max(duration_s, 1e-9), 1),
            "sent_per_s": round(ledger.sent / send_span_s, 1),
            "persisted_per_s": None if persist_span_s is None else round(ledger.persisted / persist_span_s, 1),
            "sink_rows_per_s": sink_rows_per_s(flushes),
        },
        "latency_ms": {k: r.summary() for k, r in latency.items()},
        "timeline": timeline_json(timeline),
        "probes": {
            "flush": flush_summary(flushes),
            "lock": lock,
            "append_cost": append_cost(flushes),
            "queue_depth": series_summary(samples),
        },
        "pipeline": pipeline,
        "faults": [f.model_dump(mode="json") for f in sc.faults],
        "files": files,
        "unreadable_files": ledger.unreadable_files,
    }


def pipeline_part(extras: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """The pipeline's own counters (an extra of the built-in pipeline), beside the read-back ledger."""
    stats = extras["statistics"]
    return {
        "received": stats.received,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "rejected_by_reason": stats.rejected_by_reason,
        "refused_after_close": stats.refused_after_close,
        "dropped_by_reason": extras["drops"],
        "errors": errors,
    }
