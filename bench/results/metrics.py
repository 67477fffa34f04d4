"""The metrics shown side by side per variant, shared by the terminal summary and the reports.

Also the small statistics both need to say how far a figure can be trusted: the interval of a fitted slope
(:func:`slope_fit`, :func:`slope_text`) and whether a p99 hides where the time went (:func:`tail_share_bound`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
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
    ("lock wait max ms", ("probes", "lock", "wait_ms", "max"), "{:,.3f}", True),
    # A p99 of many short holds says nothing of the few long ones (a coarse lock held across each flush: 160
    # flushes among 40,000 puts sit above the p99), so the tail and the total are shown beside it.
    ("lock hold p99 ms", ("probes", "lock", "hold_ms", "p99"), "{:,.3f}", True),
    ("lock hold p99.9 ms", ("probes", "lock", "hold_ms", "p999"), "{:,.3f}", True),
    ("lock hold max ms", ("probes", "lock", "hold_ms", "max"), "{:,.3f}", True),
    ("lock hold total ms", ("probes", "lock", "hold_ms", "total"), "{:,.0f}", True),
    # Likewise a producer that blocks on a full buffer does so rarely but for long: max and total tell it.
    ("producer stall p99 ms", ("probes", "lock", "stall_ms", "p99"), "{:,.3f}", True),
    ("producer stall max ms", ("probes", "lock", "stall_ms", "max"), "{:,.3f}", True),
    ("producer stall total ms", ("probes", "lock", "stall_ms", "total"), "{:,.0f}", True),
    ("blocked on a full buffer ms", ("pipeline", "producer_wait_ms"), "{:,.0f}", True),
    ("event-loop lag p99 ms", ("probes", "loop_lag_ms", "p99"), "{:,.2f}", True),
    ("event-loop lag max ms", ("probes", "loop_lag_ms", "max"), "{:,.2f}", True),
    ("append cost first ms", ("probes", "append_cost", "first_ms"), "{:,.2f}", True),
    ("append cost last ms", ("probes", "append_cost", "last_ms"), "{:,.2f}", True),
    ("append last/first", ("probes", "append_cost", "last_over_first"), "{:,.2f}", False),
    ("append last/first (fit)", ("probes", "append_cost", "fit_last_over_first"), "{:,.2f}", False),
    # Text with its 95% interval ("flat within noise" when it holds 0): a bare slope from a few noisy flushes
    # reads as a trend that is not there.
    ("append slope", ("probes", "append_cost", "slope_summary"), "{}", False),
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


# ----------------------------------------------------------------------------- how far a figure can be trusted

SLOPE_LEVEL = 0.95
# Above this many degrees of freedom the Cornish-Fisher series for Student's t is exact to far better than the
# digits printed, and the exact finite series (one term per two degrees of freedom) would only cost time.
_EXACT_T_DF = 100
# The p99 "hides the tail" when at least this share of the total time lies in the slowest 1% of the samples.
TAIL_SHARE_WARNING = 0.5


def _t_within(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` degrees of freedom: the exact finite series (Abramowitz & Stegun
    26.7.3 and 26.7.4), so no statistics library has to be imported by every run."""
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * cos2
            total += term
        return sin * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(1, (df - 1) // 2):
        term *= 2 * k / (2 * k + 1) * cos2
        total += term
    return 2 / math.pi * (theta + sin * total)


def t_quantile(level: float, df: int) -> float:
    """The two-sided critical value of Student's t: P(|T| < t) = ``level`` (0.95, 10 -> 2.228)."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"expected 0 < level < 1 and df >= 1, got {level}, {df}")
    if df > _EXACT_T_DF:
        z = statistics.NormalDist().inv_cdf((1 + level) / 2)
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        return z + g1 / df + g2 / df**2 + g3 / df**3
    low, high = 0.0, 1.0
    while _t_within(high, df) < level:
        low, high = high, high * 2
    for _ in range(80):  # bisection to the last bit of a double
        mid = (low + high) / 2
        if _t_within(mid, df) < level:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass(frozen=True)
class SlopeFit:
    """A least-squares line y = intercept + slope * x with the interval of its slope (None below 3 points)."""

    slope: float
    intercept: float
    n: int
    stderr: float | None
    low: float | None
    high: float | None
    level: float = SLOPE_LEVEL

    @property
    def flat(self) -> bool | None:
        """True when the interval holds 0 (no slope can be told from the scatter); None without an interval."""
        if self.low is None or self.high is None:
            return None
        return self.low <= 0 <= self.high


def slope_fit(xs: Sequence[float], ys: Sequence[float], level: float = SLOPE_LEVEL) -> SlopeFit | None:
    """Ordinary least squares with the slope's t interval (independent, equal scatter assumed); None when the
    x values do not vary (no slope to fit)."""
    n = len(xs)
    if n != len(ys) or n < 2 or len(set(xs)) < 2:
        return None
    slope, intercept = statistics.linear_regression(xs, ys)
    if n < 3:
        return SlopeFit(slope, intercept, n, None, None, None, level)
    mean_x = statistics.fmean(xs)
    sxx = math.fsum((x - mean_x) ** 2 for x in xs)
    ssr = math.fsum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    stderr = math.sqrt(ssr / (n - 2) / sxx)
    half = t_quantile(level, n - 2) * stderr
    return SlopeFit(slope, intercept, n, stderr, slope - half, slope + half, level)


def _decimals(spread: float) -> int:
    """Decimals that keep two significant digits of ``spread`` (the uncertainty decides the precision)."""
    if not math.isfinite(spread) or spread <= 0:
        return 3
    return max(0, 1 - math.floor(math.log10(spread)))


def slope_text(fit: SlopeFit, unit: str = "ms/MB") -> str:
    """'12 ms/MB (95% CI 8.1 .. 16)', 'flat within noise (-9.2 ms/MB, 95% CI -40 .. 22)', or the slope with
    why there is no interval."""
    if fit.low is None or fit.high is None:
        return f"{fit.slope:,.3g} {unit} (no interval from {fit.n} points)"
    d = _decimals((fit.high - fit.low) / 2)
    # A bound that rounds to 0 would print as "-0" or "0" and read as "holds 0": show it to its first digit.
    while d < 12 and any(b != 0 and round(b, d) == 0 for b in (fit.low, fit.high)):
        d += 1
    ci = f"{fit.level:.0%} CI {fit.low:,.{d}f} .. {fit.high:,.{d}f}"
    if fit.flat:
        return f"flat within noise ({fit.slope:,.{d}f} {unit}, {ci})"
    return f"{fit.slope:,.{d}f} {unit} ({ci})"


def tail_share_bound(summary: Any) -> float | None:
    """At least this share of a latency summary's total time lies in its slowest 1% of samples.

    Every sample up to the p99 is at most the p99, so the fastest 99% add up to at most 0.99 * count * p99 and
    the rest of the total is the slowest 1%'s. Near 1, the p99 describes almost none of the time spent: a
    coarse lock's few flush-long holds among many short ones, or a producer blocked on a full buffer now and
    then. None when the summary lacks p99 or mean.
    """
    if not isinstance(summary, dict):
        return None
    p99, mean = summary.get("p99"), summary.get("mean")
    total, count = summary.get("total"), summary.get("count")
    if isinstance(total, int | float) and isinstance(count, int) and count > 0:
        mean = total / count  # total keeps more digits than the stored mean
    if not isinstance(p99, int | float) or not isinstance(mean, int | float) or mean <= 0:
        return None
    return max(0.0, 1 - 0.99 * float(p99) / float(mean))
