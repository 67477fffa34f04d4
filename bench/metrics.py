"""The metrics shown side by side per variant, shared by the terminal summary and the reports."""

from __future__ import annotations

from typing import Any


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
