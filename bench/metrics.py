"""The metrics shown side by side per variant, shared by the terminal summary and the reports."""

from __future__ import annotations

from typing import Any, Literal, get_args


def get_path(data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]...``, or None where a key is missing."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


# (label, path into a variant, format, whether a ratio to the first variant is worth showing)
METRIC_ROWS: list[tuple[str, tuple[str, ...], str, bool]] = [
    ("  sent", ("ledger", "sent"), "{:,.0f}", False),
    ("  persisted", ("ledger", "persisted"), "{:,.0f}", False),
    ("  rejected", ("ledger", "rejected"), "{:,.0f}", False),
    ("  dropped", ("ledger", "dropped"), "{:,.0f}", False),
    ("  lost", ("ledger", "lost"), "{:,.0f}", False),
    ("  duplicates", ("ledger", "duplicates"), "{:,.0f}", False),
    ("offered msg/s", ("throughput", "offered_per_s"), "{:,.1f}", False),
    ("sent msg/s", ("throughput", "sent_per_s"), "{:,.1f}", True),
    ("persisted msg/s", ("throughput", "persisted_per_s"), "{:,.1f}", True),
    ("end-to-end p50 ms", ("latency_ms", "end_to_end", "p50"), "{:,.1f}", True),
    ("end-to-end p99 ms", ("latency_ms", "end_to_end", "p99"), "{:,.1f}", True),
    ("end-to-end max ms", ("latency_ms", "end_to_end", "max"), "{:,.1f}", True),
    ("send lag p99 ms", ("latency_ms", "send_lag", "p99"), "{:,.1f}", True),
    ("hot path CPU us/msg", ("probes", "cpu", "hot_path_us_per_msg"), "{:,.2f}", True),
    ("parquet sink CPU us/row", ("probes", "cpu", "sink_us_per_row", "parquet"), "{:,.2f}", True),
    ("flush p99 ms (size)", ("probes", "flush", "parquet", "size", "total_ms", "p99"), "{:,.2f}", True),
    ("flush p99 ms (timeout)", ("probes", "flush", "parquet", "timeout", "total_ms", "p99"), "{:,.2f}", True),
    ("lock wait p99 ms", ("probes", "lock", "wait_ms", "p99"), "{:,.3f}", True),
    ("lock hold p99 ms", ("probes", "lock", "hold_ms", "p99"), "{:,.3f}", True),
    ("producer stall p99 ms", ("probes", "lock", "stall_ms", "p99"), "{:,.3f}", True),
    ("event-loop lag p99 ms", ("probes", "loop_lag_ms", "p99"), "{:,.2f}", True),
    ("event-loop lag max ms", ("probes", "loop_lag_ms", "max"), "{:,.2f}", True),
    ("append cost first ms", ("probes", "append_cost", "first_ms"), "{:,.2f}", True),
    ("append cost last ms", ("probes", "append_cost", "last_ms"), "{:,.2f}", True),
    ("append last/first", ("probes", "append_cost", "last_over_first"), "{:,.2f}", False),
    ("append last/first (fit)", ("probes", "append_cost", "fit_last_over_first"), "{:,.2f}", False),
    ("append slope ms/MB", ("probes", "append_cost", "slope_ms_per_mb"), "{:,.3f}", False),
    ("parquet sink rows/s", ("throughput", "sink_rows_per_s", "parquet"), "{:,.0f}", True),
    ("sql sink rows/s", ("throughput", "sink_rows_per_s", "sql"), "{:,.0f}", True),
    ("opcua notifications/s", ("opcua", "notifications_per_s"), "{:,.0f}", True),
    ("opcua capacity: pipeline / bare", ("opcua", "reference", "pipeline_fraction"), "{:.3f}", False),
    ("queue depth max", ("probes", "queue_depth", "depth_max"), "{:,.0f}", True),
    ("files", ("files",), "{:,.0f}", False),
]


MetricName = Literal[
    "hot_path_cpu_us",
    "sink_cpu_us_per_row",
    "flush_mean_ms",
    "flush_p50_ms",
    "flush_p99_ms",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "lock_wait_p99_ms",
    "sink_rows_per_s",
    "persisted_per_s",
    "peak_rss_mb",
]
CounterName = Literal[
    "persisted", "rejected", "dropped", "lost", "duplicates", "files", "data_bytes", "flushes", "rows_written"
]

# What a regression gate can compare, per variant of a run's results.json.
# name -> (path, higher_is_better, unit). Times are medians or tails over one run; each gate replicate gives one value.
GATE_METRICS: dict[MetricName, tuple[tuple[str, ...], bool, str]] = {
    # Thread CPU time: what a gate can judge on a shared machine (a busy neighbour doubles wall times).
    "hot_path_cpu_us": (("probes", "cpu", "hot_path_us_per_msg"), False, "us/msg"),
    "sink_cpu_us_per_row": (("probes", "cpu", "sink_us_per_row", "parquet"), False, "us/row"),
    "flush_mean_ms": (("probes", "flush", "parquet", "size", "total_ms", "mean"), False, "ms"),
    "flush_p50_ms": (("probes", "flush", "parquet", "size", "total_ms", "p50"), False, "ms"),
    "flush_p99_ms": (("probes", "flush", "parquet", "size", "total_ms", "p99"), False, "ms"),
    "e2e_p50_ms": (("latency_ms", "end_to_end", "p50"), False, "ms"),
    "e2e_p99_ms": (("latency_ms", "end_to_end", "p99"), False, "ms"),
    "lock_wait_p99_ms": (("probes", "lock", "wait_ms", "p99"), False, "ms"),
    "sink_rows_per_s": (("throughput", "sink_rows_per_s", "parquet"), True, "rows/s"),
    "persisted_per_s": (("throughput", "persisted_per_s"), True, "msg/s"),
    "peak_rss_mb": (("resources", "peak_rss_mb"), False, "MB"),
}
_TRIGGERS = ("size", "timeout", "shutdown")


def counter_value(variant: dict[str, Any], name: str) -> float | None:
    """A deterministic counter of a run: the same stream into the same code must give the same number."""
    if name in ("persisted", "rejected", "dropped", "lost", "duplicates"):
        value = get_path(variant, "ledger", name)
    elif name in ("files", "data_bytes"):
        value = get_path(variant, name)
    elif name in ("flushes", "rows_written"):
        key = "count" if name == "flushes" else "rows"
        parts = [get_path(variant, "probes", "flush", "parquet", t, key) for t in _TRIGGERS]
        value = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
    else:
        raise KeyError(name)
    return None if value is None else float(value)


COUNTERS: tuple[CounterName, ...] = get_args(CounterName)
# One list of names for the schema (Literal) and one table of paths: they must agree.
assert set(get_args(MetricName)) == set(GATE_METRICS)
