"""The metrics shown side by side per variant, shared by the terminal summary and the reports, and the ones a
gate compares.

Each figure is a getter over the results model (:class:`~bench.results.model.Variant` -> value, None where the
variant lacks the part it lives in), not a path of keys: a renamed field is an error of the type checker, not a
row that silently disappears.

Also the small statistics both need to say how far a figure can be trusted: the interval of a fitted slope
(:func:`slope_fit`, :func:`slope_text`) and whether a p99 hides where the time went (:func:`tail_share_bound`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, get_args

if TYPE_CHECKING:
    # The model imports this module (slope_fit, slope_text): its types are for annotations only.
    from bench.results.model import (
        AppendCost,
        CpuProbe,
        FlushStats,
        LatencySummary,
        LockProbe,
        OpcUa,
        QueueDepth,
        SinkFlushes,
        SystemPart,
        Variant,
    )

_P = TypeVar("_P")
_V = TypeVar("_V")

MetricValue: TypeAlias = int | float | str | None
"""A figure as the results hold it: a count, a rate, a time, or a text (the append slope); None when absent."""


# ----------------------------------------------------------------------------- the parts of a variant


def _via(part: Callable[[Variant], _P | None], figure: Callable[[_P], _V | None]) -> Callable[[Variant], _V | None]:
    """``figure`` of a variant's optional ``part``: None when the variant lacks the part."""

    def get(variant: Variant) -> _V | None:
        found = part(variant)
        return None if found is None else figure(found)

    return get


def _e2e(v: Variant) -> LatencySummary | None:
    return v.latency_ms.end_to_end


def _send_lag(v: Variant) -> LatencySummary | None:
    return v.latency_ms.send_lag


def _cpu(v: Variant) -> CpuProbe | None:
    return v.probes.cpu


def _lock(v: Variant) -> LockProbe | None:
    return v.probes.lock


def _loop_lag(v: Variant) -> LatencySummary | None:
    return v.probes.loop_lag_ms


def _append_cost(v: Variant) -> AppendCost | None:
    return v.probes.append_cost


def _queue_depth(v: Variant) -> QueueDepth | None:
    # The built-in pipeline's input queue; a run of an external system samples none worth showing.
    if v.system is not None and v.system.kind == "external":
        return None
    return v.probes.queue_depth


def _opcua(v: Variant) -> OpcUa | None:
    return v.opcua


def parquet_flushes(v: Variant) -> SinkFlushes | None:
    """The Parquet sink's flushes by trigger, None when the variant has no flush probe for it."""
    return v.probes.flush.get("parquet")


def parquet_flush_triggers(v: Variant) -> tuple[FlushStats | None, FlushStats | None, FlushStats | None]:
    """The Parquet sink's flushes of each trigger: size, timeout, shutdown (None where none fired)."""
    flushes = parquet_flushes(v)
    if flushes is None:
        return None, None, None
    return flushes.size, flushes.timeout, flushes.shutdown


_lock_wait = _via(_lock, lambda lock: lock.wait_ms)
_lock_hold = _via(_lock, lambda lock: lock.hold_ms)
_producer_stall = _via(_lock, lambda lock: lock.stall_ms)
_size_flush_ms = _via(_via(parquet_flushes, lambda f: f.size), lambda stats: stats.total_ms)
_timeout_flush_ms = _via(_via(parquet_flushes, lambda f: f.timeout), lambda stats: stats.total_ms)


def _p50(s: LatencySummary) -> float | None:
    return s.p50


def _p99(s: LatencySummary) -> float | None:
    return s.p99


def _p999(s: LatencySummary) -> float | None:
    return s.p999


def _max(s: LatencySummary) -> float | None:
    return s.max


def _mean(s: LatencySummary) -> float | None:
    return s.mean


def _total(s: LatencySummary) -> float | None:
    return s.total


def _sink_rows_per_s(sink: str) -> Callable[[Variant], float | None]:
    return lambda v: (v.throughput.sink_rows_per_s or {}).get(sink)


_hot_path_cpu = _via(_cpu, lambda cpu: cpu.hot_path_us_per_msg)
_parquet_sink_cpu = _via(_cpu, lambda cpu: cpu.sink_us_per_row.get("parquet"))


# ----------------------------------------------------------------------------- the side-by-side table


def _durable_from(v: Variant) -> str | None:
    system = v.system
    if system is None or system.durable_from is None:
        return None
    if system.durable_from == "column":
        return "its durable-time column"
    return f"watching its output every {system.durable_resolution_ms:,.0f} ms"


def _by_truth(counts: Mapping[str, int] | None) -> str | None:
    """``3 (nan 2, inf 1)``: a count with its truth labels, the largest first; None when there is none."""
    if not counts:
        return None
    shown = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    named = ", ".join(f"{t} {n:,}" for t, n in shown[:3]) + (", ..." if len(shown) > 3 else "")
    return f"{sum(counts.values()):,} ({named})"


def _not_persisted(v: Variant) -> str | None:
    """An external system's bad input left out of its output, as its truth labels say it may be; "0" shown."""
    if v.ledger.not_persisted_expected is None:
        return None
    return _by_truth(v.ledger.not_persisted_by_truth) or "0"


def _refused(v: Variant) -> str | None:
    """Good input an external system rejected; unknown (None) when it keeps no rejects."""
    if v.truth is None or not v.truth.rejects_kept:
        return None
    return _by_truth(v.truth.refused_good_input) or "0"


@dataclass(frozen=True)
class MetricRow:
    """One row of the side-by-side table: a figure of each variant."""

    label: str
    value: Callable[[Variant], MetricValue]
    """The figure of a variant; None where the variant lacks it (the row is left out when every variant does)."""
    fmt: str
    """How a value prints (``str.format``)."""
    ratio: bool
    """Whether a ratio to the first variant is worth showing."""
    summary: Callable[[Variant], LatencySummary | None] | None = None
    """For a p99: the distribution it is read from, to tell whether the p99 hides where the time went
    (:func:`tail_share_bound`); None for every other row."""


METRIC_ROWS: list[MetricRow] = [
    MetricRow("  sent", lambda v: v.ledger.sent, "{:,.0f}", False),
    MetricRow("  persisted", lambda v: v.ledger.persisted, "{:,.0f}", False),
    MetricRow("  rejected", lambda v: v.ledger.rejected, "{:,.0f}", False),
    MetricRow("  dropped", lambda v: v.ledger.dropped, "{:,.0f}", False),
    MetricRow("  lost", lambda v: v.ledger.lost, "{:,.0f}", False),
    MetricRow("  duplicates", lambda v: v.ledger.duplicates, "{:,.0f}", False),
    # An external system judged by the truth labels of what was sent: bad input it left out is not lost; bad
    # input it stored and good input it refused are findings, not failures (the bench cannot know its policy).
    MetricRow("  not persisted (truth: bad input)", _not_persisted, "{}", False),
    MetricRow(
        "  persisted despite truth label",
        _via(lambda v: v.truth, lambda t: _by_truth(t.accepted_bad_input) or "0"),
        "{}",
        False,
    ),
    MetricRow("  refused good input", _refused, "{}", False),
    MetricRow("offered msg/s", lambda v: v.throughput.offered_per_s, "{:,.1f}", False),
    MetricRow("sent msg/s", lambda v: v.throughput.sent_per_s, "{:,.1f}", True),
    MetricRow("persisted msg/s", lambda v: v.throughput.persisted_per_s, "{:,.1f}", True),
    MetricRow("end-to-end p50 ms", _via(_e2e, _p50), "{:,.1f}", True),
    MetricRow("end-to-end p99 ms", _via(_e2e, _p99), "{:,.1f}", True, summary=_e2e),
    MetricRow("end-to-end max ms", _via(_e2e, _max), "{:,.1f}", True),
    # An external system's durable time is observed: the resolution stands beside the figures it bounds.
    MetricRow("end-to-end measured by", _durable_from, "{}", False),
    MetricRow("system CPU s / 1k msgs", _via(lambda v: v.system, lambda s: s.cpu_s_per_1k), "{:,.3f}", True),
    MetricRow("system peak RSS MB", _via(lambda v: v.system, lambda s: s.peak_rss_mb), "{:,.0f}", True),
    MetricRow("send lag p99 ms", _via(_send_lag, _p99), "{:,.1f}", True, summary=_send_lag),
    MetricRow("hot path CPU us/msg", _hot_path_cpu, "{:,.2f}", True),
    MetricRow("parquet sink CPU us/row", _parquet_sink_cpu, "{:,.2f}", True),
    MetricRow("flush p99 ms (size)", _via(_size_flush_ms, _p99), "{:,.2f}", True, summary=_size_flush_ms),
    MetricRow("flush p99 ms (timeout)", _via(_timeout_flush_ms, _p99), "{:,.2f}", True, summary=_timeout_flush_ms),
    MetricRow("lock wait p99 ms", _via(_lock_wait, _p99), "{:,.3f}", True, summary=_lock_wait),
    MetricRow("lock wait max ms", _via(_lock_wait, _max), "{:,.3f}", True),
    # A p99 of many short holds says nothing of the few long ones (a coarse lock held across each flush: 160
    # flushes among 40,000 puts sit above the p99), so the tail and the total are shown beside it.
    MetricRow("lock hold p99 ms", _via(_lock_hold, _p99), "{:,.3f}", True, summary=_lock_hold),
    MetricRow("lock hold p99.9 ms", _via(_lock_hold, _p999), "{:,.3f}", True),
    MetricRow("lock hold max ms", _via(_lock_hold, _max), "{:,.3f}", True),
    MetricRow("lock hold total ms", _via(_lock_hold, _total), "{:,.0f}", True),
    # Likewise a producer that blocks on a full buffer does so rarely but for long: max and total tell it.
    MetricRow("producer stall p99 ms", _via(_producer_stall, _p99), "{:,.3f}", True, summary=_producer_stall),
    MetricRow("producer stall max ms", _via(_producer_stall, _max), "{:,.3f}", True),
    MetricRow("producer stall total ms", _via(_producer_stall, _total), "{:,.0f}", True),
    MetricRow("blocked on a full buffer ms", _via(lambda v: v.pipeline, lambda p: p.producer_wait_ms), "{:,.0f}", True),
    MetricRow("event-loop lag p99 ms", _via(_loop_lag, _p99), "{:,.2f}", True, summary=_loop_lag),
    MetricRow("event-loop lag max ms", _via(_loop_lag, _max), "{:,.2f}", True),
    MetricRow("append cost first ms", _via(_append_cost, lambda a: a.first_ms), "{:,.2f}", True),
    MetricRow("append cost last ms", _via(_append_cost, lambda a: a.last_ms), "{:,.2f}", True),
    MetricRow("append last/first", _via(_append_cost, lambda a: a.last_over_first), "{:,.2f}", False),
    MetricRow("append last/first (fit)", _via(_append_cost, lambda a: a.fit_last_over_first), "{:,.2f}", False),
    # Text with its 95% interval ("flat within noise" when it holds 0): a bare slope from a few noisy flushes
    # reads as a trend that is not there.
    MetricRow("append slope", _via(_append_cost, lambda a: a.slope_summary), "{}", False),
    MetricRow("parquet sink rows/s", _sink_rows_per_s("parquet"), "{:,.0f}", True),
    MetricRow("sql sink rows/s", _sink_rows_per_s("sql"), "{:,.0f}", True),
    MetricRow("opcua notifications/s", _via(_opcua, lambda o: o.notifications_per_s), "{:,.0f}", True),
    MetricRow(
        "opcua capacity: pipeline / bare",
        _via(_via(_opcua, lambda o: o.reference), lambda r: r.pipeline_fraction),
        "{:.3f}",
        False,
    ),
    MetricRow("queue depth max", _via(_queue_depth, lambda q: q.depth_max), "{:,.0f}", True),
    MetricRow("files", lambda v: v.files, "{:,.0f}", False),
]


# ----------------------------------------------------------------------------- what a gate compares

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
    "system_cpu_s_per_1k",
    "system_peak_rss_mb",
]
CounterName = Literal[
    "persisted", "rejected", "dropped", "lost", "duplicates", "files", "data_bytes", "flushes", "rows_written"
]


@dataclass(frozen=True)
class GateFigure:
    """A metric a regression gate can compare: one value per variant of a run (so one per gate replicate)."""

    value: Callable[[Variant], float | None]
    """The variant's value; None where it lacks it (e.g. a baseline older than the metric)."""
    higher_is_better: bool
    unit: str
    systems: frozenset[str] = frozenset({"in_process", "process"})
    """The kinds of system under test (scenario ``system.kind``) that report it; for the others it is not
    applicable (reported so by a gate, never judged as missing)."""


EVERY_SYSTEM = frozenset({"in_process", "process", "external"})
EXTERNAL_ONLY = frozenset({"external"})


def system_kind(v: Variant) -> str:
    """The kind of system a variant measured: in_process (no system part), process or external."""
    return v.system.kind if v.system is not None else "in_process"


def _external_system(v: Variant) -> SystemPart | None:
    return v.system if v.system is not None and v.system.kind == "external" else None


# What a regression gate can compare, per variant of a run's results.json. Times are medians or tails over one
# run; each gate replicate gives one value.
GATE_METRICS: dict[MetricName, GateFigure] = {
    # Thread CPU time: what a gate can judge on a shared machine (a busy neighbour doubles wall times).
    "hot_path_cpu_us": GateFigure(_hot_path_cpu, False, "us/msg"),
    "sink_cpu_us_per_row": GateFigure(_parquet_sink_cpu, False, "us/row"),
    "flush_mean_ms": GateFigure(_via(_size_flush_ms, _mean), False, "ms"),
    "flush_p50_ms": GateFigure(_via(_size_flush_ms, _p50), False, "ms"),
    "flush_p99_ms": GateFigure(_via(_size_flush_ms, _p99), False, "ms"),
    "e2e_p50_ms": GateFigure(_via(_e2e, _p50), False, "ms", EVERY_SYSTEM),
    "e2e_p99_ms": GateFigure(_via(_e2e, _p99), False, "ms", EVERY_SYSTEM),
    "lock_wait_p99_ms": GateFigure(_via(_lock_wait, _p99), False, "ms"),
    "sink_rows_per_s": GateFigure(_sink_rows_per_s("parquet"), True, "rows/s"),
    "persisted_per_s": GateFigure(lambda v: v.throughput.persisted_per_s, True, "msg/s", EVERY_SYSTEM),
    # The bench's own process (the in-process pipeline included); for an external system see system_peak_rss_mb.
    "peak_rss_mb": GateFigure(_via(lambda v: v.resources, lambda r: r.peak_rss_mb), False, "MB"),
    # An external system's process tree (psutil): CPU seconds (user + system) per thousand messages sent, and the
    # highest resident memory seen. Process CPU time, like the built-in pipeline's thread CPU metrics, barely
    # moves with a busy neighbour; the in-process probes do not exist for a program of the user's.
    "system_cpu_s_per_1k": GateFigure(
        _via(_external_system, lambda s: s.cpu_s_per_1k), False, "CPU s/1k msgs", EXTERNAL_ONLY
    ),
    "system_peak_rss_mb": GateFigure(_via(_external_system, lambda s: s.peak_rss_mb), False, "MB", EXTERNAL_ONLY),
}


def _parquet_flush_sum(v: Variant, figure: Callable[[FlushStats], int]) -> int | None:
    """``figure`` summed over the Parquet sink's flush triggers; None when none fired (or no probe)."""
    parts = [figure(stats) for stats in parquet_flush_triggers(v) if stats is not None]
    return sum(parts) if parts else None


# A deterministic counter of a run: the same stream into the same code must give the same number.
_COUNTERS: dict[CounterName, Callable[[Variant], int | None]] = {
    "persisted": lambda v: v.ledger.persisted,
    "rejected": lambda v: v.ledger.rejected,
    "dropped": lambda v: v.ledger.dropped,
    "lost": lambda v: v.ledger.lost,
    "duplicates": lambda v: v.ledger.duplicates,
    "files": lambda v: v.files,
    "data_bytes": lambda v: v.data_bytes,
    "flushes": lambda v: _parquet_flush_sum(v, lambda stats: stats.count),
    "rows_written": lambda v: _parquet_flush_sum(v, lambda stats: stats.rows),
}


# Counters of the built-in pipeline's Parquet sink: not applicable to an external system (whose output files the
# bench does not write; ``files`` is what its output glob matched).
BUILT_IN_COUNTERS: frozenset[CounterName] = frozenset({"data_bytes", "flushes", "rows_written"})


def counter_value(variant: Variant, name: CounterName) -> float | None:
    """A deterministic counter of a run: the same stream into the same code must give the same number."""
    value = _COUNTERS[name](variant)
    return None if value is None else float(value)


COUNTERS: tuple[CounterName, ...] = get_args(CounterName)
# One list of names for the schema (Literal) and one table of getters: they must agree.
assert set(get_args(MetricName)) == set(GATE_METRICS)
assert set(COUNTERS) == set(_COUNTERS)


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


def tail_share_bound(summary: LatencySummary | Mapping[str, Any] | None) -> float | None:
    """At least this share of a latency summary's total time lies in its slowest 1% of samples.

    Every sample up to the p99 is at most the p99, so the fastest 99% add up to at most 0.99 * count * p99 and
    the rest of the total is the slowest 1%'s. Near 1, the p99 describes almost none of the time spent: a
    coarse lock's few flush-long holds among many short ones, or a producer blocked on a full buffer now and
    then. None when the summary lacks p99 or mean. ``summary``: a :class:`~bench.results.model.LatencySummary`,
    or the dict a recorder gives.
    """
    from bench.results.model import LatencySummary  # the model imports this module: not at its top

    p99: Any
    mean: Any
    total: Any
    count: Any
    if isinstance(summary, LatencySummary):
        p99, mean, total, count = summary.p99, summary.mean, summary.total, summary.count
    elif isinstance(summary, Mapping):
        p99, mean = summary.get("p99"), summary.get("mean")
        total, count = summary.get("total"), summary.get("count")
    else:
        return None
    if isinstance(total, int | float) and isinstance(count, int) and count > 0:
        mean = total / count  # total keeps more digits than the stored mean
    if not isinstance(p99, int | float) or not isinstance(mean, int | float) or mean <= 0:
        return None
    return max(0.0, 1 - 0.99 * float(p99) / float(mean))
