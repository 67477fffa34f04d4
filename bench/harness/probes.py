"""Turning raw probe records into the summaries that go into results.json."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

from bench.results.metrics import slope_fit, slope_text
from pipeline.buffer import FlushingBuffer, LockProbes
from pipeline.clock import MonotonicWallClock
from pipeline.config import RulePolicies, ValidateSettings
from pipeline.model import FlushStat
from pipeline.probes import CpuStatistics, Recorder
from pipeline.sinks import SinkTiming
from pipeline.validate import Validator

MAX_POINTS = 400
EDGE_FLUSHES = 5


def flush_summary(flushes: list[FlushStat]) -> dict[str, Any]:
    """Per sink and trigger kind: count, rows, coalesced triggers, percentiles of each step."""
    groups: dict[tuple[str, str], list[FlushStat]] = defaultdict(list)
    for f in flushes:
        groups[(f.sink, f.trigger)].append(f)
    out: dict[str, Any] = {}
    for (sink, trigger), items in sorted(groups.items()):
        total, build, write, commit = Recorder(), Recorder(), Recorder(), Recorder()
        for f in items:
            total.record_ns(f.total_ns)
            build.record_ns(f.build_ns)
            write.record_ns(f.write_ns)
            commit.record_ns(f.commit_ns)
        out.setdefault(sink, {})[trigger] = {
            "count": len(items),
            "rows": sum(f.rows for f in items),
            "coalesced": sum(f.coalesced for f in items),
            "total_ms": total.summary(ladder=True),
            "build_ms": build.summary(),
            "write_ms": write.summary(),
            "commit_ms": commit.summary(),
        }
    return out


def sink_rows_per_s(flushes: list[FlushStat]) -> dict[str, float]:
    """Rows a sink wrote per second of its own flush time: the sink's speed, apart from load."""
    rows: dict[str, int] = defaultdict(int)
    busy: dict[str, int] = defaultdict(int)
    for f in flushes:
        rows[f.sink] += f.rows
        busy[f.sink] += f.total_ns
    return {s: round(rows[s] / (busy[s] / 1e9), 1) if busy[s] else 0.0 for s in rows}


def cpu_summary(flushes: list[FlushStat], hot_path: CpuStatistics | None) -> dict[str, Any]:
    """Thread CPU time per message on the hot path and per row in each sink: the gate's metrics on a shared
    machine. Medians (``*_us_per_msg``, ``*_us_per_row``), because a few slow calls move a mean by 10% from run
    to run (see :class:`~pipeline.probes.CpuSampler`); means beside them.

    Sinks: size-triggered flushes after each sink's first (opening a file and writing its schema is not the
    steady cost of a row); with none of those, every flush. Only flushes that recorded ``cpu_ns``.
    """
    out: dict[str, Any] = {}
    if hot_path is not None:
        out["hot_path_us_per_msg"] = None if hot_path.p50_us is None else round(hot_path.p50_us, 4)
        out["hot_path_us_mean"] = None if hot_path.mean_us is None else round(hot_path.mean_us, 4)
        out["hot_path_samples"] = hot_path.samples
        out["sample_every"] = hot_path.every
        out["warmup_samples"] = hot_path.warmup_samples
    per_row: dict[str, float] = {}
    per_row_mean: dict[str, float] = {}
    counted: dict[str, int] = {}
    by_sink: dict[str, list[FlushStat]] = defaultdict(list)
    for f in flushes:
        if f.cpu_ns is not None and f.rows:
            by_sink[f.sink].append(f)
    for sink, items in sorted(by_sink.items()):
        items.sort(key=lambda f: f.batch_id)
        steady = [f for f in items[1:] if f.trigger == "size"] or items
        per_row[sink] = round(statistics.median((f.cpu_ns or 0) / f.rows for f in steady) / 1000, 4)
        per_row_mean[sink] = round(sum(f.cpu_ns or 0 for f in steady) / sum(f.rows for f in steady) / 1000, 4)
        counted[sink] = len(steady)
    out["sink_us_per_row"] = per_row
    out["sink_us_per_row_mean"] = per_row_mean
    out["sink_flushes_counted"] = counted
    return out


def _downsample(points: list[Any]) -> list[Any]:
    if len(points) <= MAX_POINTS:
        return points
    step = len(points) / MAX_POINTS
    return [points[int(i * step)] for i in range(MAX_POINTS)]


def _append_ms(f: FlushStat) -> float:
    return (f.write_ns + f.commit_ns) / 1e6


def append_cost(flushes: list[FlushStat], sink: str = "parquet") -> dict[str, Any]:
    """Cost of each flush against the bytes already in its target file.

    The cost is write + commit: putting the batch into the file. Building the
    batch (rows to an Arrow table) is the same whatever the file holds, so it
    is left out; it is in ``probes.flush`` and as the last item of each point.

    ``first_ms`` / ``last_ms`` are medians of the first and last five
    size-triggered flushes (equal row counts, so the cost is comparable; the
    shutdown flush is smaller and would flatter the end). ``slope_ms_per_mb``
    and ``intercept_ms`` are a least-squares fit of cost on MB already in the
    file, over all flushes; ``fit_last_over_first`` reads that line at the
    largest and smallest file size. ``slope_ci95_ms_per_mb`` is the slope's 95%
    interval (t, from the fit's residuals; None below three flushes) and
    ``slope_summary`` says it in words, "flat within noise" when the interval
    holds 0: a handful of noisy flushes otherwise reads as a trend.
    """
    items = sorted((f for f in flushes if f.sink == sink and f.bytes_before is not None), key=lambda f: f.batch_id)
    if not items:
        return {"count": 0}
    sized = [f for f in items if f.trigger == "size"] or items
    costs = [_append_ms(f) for f in sized]
    mbs = [(f.bytes_before or 0) / 1e6 for f in items]
    all_costs = [_append_ms(f) for f in items]
    fit = slope_fit(mbs, all_costs)
    slope, intercept = (fit.slope, fit.intercept) if fit is not None else (0.0, 0.0)
    first = statistics.median(costs[:EDGE_FLUSHES])
    last = statistics.median(costs[-EDGE_FLUSHES:])
    # The fitted line read at the smallest and largest file size: the same
    # question as first/last, less exposed to one noisy flush.
    fit_first = intercept + slope * min(mbs)
    fit_last = intercept + slope * max(mbs)
    return {
        "count": len(items),
        "first_ms": round(first, 3),
        "last_ms": round(last, 3),
        "last_over_first": round(last / first, 3) if first else None,
        "slope_ms_per_mb": round(slope, 4),
        "slope_ci95_ms_per_mb": None
        if fit is None or fit.low is None or fit.high is None
        else [round(fit.low, 4), round(fit.high, 4)],
        "slope_stderr_ms_per_mb": None if fit is None or fit.stderr is None else round(fit.stderr, 4),
        "slope_summary": slope_text(fit) if fit is not None else "no slope: every flush appended at the same size",
        "intercept_ms": round(intercept, 3),
        "fit_last_over_first": round(fit_last / fit_first, 3) if fit_first > 0 else None,
        "max_mb_before": round(max(mbs), 3),
        "points": _downsample(
            [
                [round(mb, 4), f.rows_before, round(_append_ms(f), 3), f.trigger, round(f.total_ns / 1e6, 3)]
                for mb, f in zip(mbs, items, strict=True)
            ]
        ),
    }


def lock_summary(probes: LockProbes | None, kind: str) -> dict[str, Any]:
    if probes is None:
        return {"strategy": kind, "enabled": False}
    return {
        "strategy": kind,
        "wait_ms": probes.wait.summary(ladder=True),
        "hold_ms": probes.hold.summary(),
        "stall_ms": probes.stall.summary(),
    }


def series_summary(samples: list[tuple[float, int, int]]) -> dict[str, Any]:
    """Queue depth (rows buffered) and backlog (sent, not yet durable) over time."""
    if not samples:
        return {"count": 0}
    depth = sorted(s[1] for s in samples)
    backlog = sorted(s[2] for s in samples)

    def pct(values: list[int], p: float) -> int:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {
        "count": len(samples),
        "depth_max": depth[-1],
        "depth_p50": pct(depth, 0.5),
        "depth_p99": pct(depth, 0.99),
        "backlog_max": backlog[-1],
        "backlog_p99": pct(backlog, 0.99),
        "series": _downsample([[round(t, 3), d, b] for t, d, b in samples]),
    }


def timeline_json(samples: list[tuple[float, int, int]]) -> dict[str, list[float]]:
    """Cumulative sent and durable counts over elapsed seconds (downsampled): throughput over time."""
    points = _downsample(samples)
    return {
        "t_s": [round(t, 3) for t, _, _ in points],
        "sent": [s for _, s, _ in points],
        "durable": [d for _, _, d in points],
    }


class _NullSink:
    name = "null"

    def write_batch(self, items: Any, batch_id: int) -> SinkTiming:
        return SinkTiming(0, 0, 0)

    def close(self) -> None:
        pass


def probe_overhead(puts: int = 20_000, trials: int = 5) -> dict[str, Any]:
    """Cost of the lock probes per ``put``: probes on vs off, alternated, medians.

    Measured in the run itself (same process, same machine load) so the figure
    belongs to the numbers it qualifies.
    """
    clock = MonotonicWallClock()

    def one(probes: bool) -> float:
        buf: FlushingBuffer[int] = FlushingBuffer(
            _NullSink(), size=1000, flush_interval_s=60, capacity=10_000, clock=clock, probes=probes
        )
        buf.start()
        start = time.perf_counter_ns()
        for i in range(puts):
            buf.put(i)
        elapsed = time.perf_counter_ns() - start
        buf.close()
        return elapsed / puts

    def validate_ns() -> float:
        payload = b'{"machine":"m-001","ts":"2026-01-01T00:00:00.000001Z","load_rate":42.5,"mileage":1.5,"seq":1}'
        # One message over and over: duplicate detection off, so every call takes the accept path.
        validator = Validator(ValidateSettings(rules=RulePolicies(duplicate="accept")))
        now = 1_767_225_600 * 10**9
        start = time.perf_counter_ns()
        for _ in range(puts):
            validator.check(payload, "t", now)
        return (time.perf_counter_ns() - start) / puts

    on, off, val = [], [], []
    for _ in range(trials):
        off.append(one(False))
        on.append(one(True))
        val.append(validate_ns())
    on_ns, off_ns, val_ns = statistics.median(on), statistics.median(off), statistics.median(val)
    return {
        "ns_per_put_on": round(on_ns, 1),
        "ns_per_put_off": round(off_ns, 1),
        "overhead_pct": round(100 * (on_ns - off_ns) / off_ns, 1) if off_ns else None,
        # What a message costs the pipeline before any I/O: decode + validate + put.
        "ns_per_message_off": round(val_ns + off_ns, 1),
        "overhead_pct_of_message": round(100 * (on_ns - off_ns) / (val_ns + off_ns), 1),
        "method": f"median of {trials} alternated trials of {puts} puts into a buffer with a null sink",
    }
