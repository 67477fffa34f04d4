"""What a capacity sweep's measurements say: per-step verdicts, the knee, the USL fit, Little's law, advice.

Pure functions over plain arrays (no sockets, no processes), so each rule is
tested on its own. :mod:`bench.capacity.sweep` runs the steps and calls these.

Definitions, as the report states them:

- A step's **achieved** rate is the slope of the durable-row count over the
  step's measured window (after ``settle``), not count / duration: rows become
  durable a flush interval after they arrive, and a slope is blind to that
  constant delay while a ratio over a short window is not.
- The **backlog** at time t is sent(t) - durable(t), rebuilt exactly from every
  message's send time and the time its batch became durable; it is **growing**
  when its slope over the window exceeds ``backlog_growth`` x offered.
- A step is **sustainable** when the publishers kept their schedule, achieved
  >= ``threshold`` x offered, the backlog is not growing and nothing was lost.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pipeline.probes import Recorder

GRID_S = 0.05
MAX_TIMELINE_POINTS = 300
# The publishers kept up when they sent at >= this fraction of the offered rate with p99 lag below the bound.
PUBLISHER_RATE_FRACTION = 0.99
PUBLISHER_LAG_P99_MS = 250.0
KNEE_FACTOR = 2.0
# Below this file size the append-cost fit is all noise (fsync jitter dwarfs any size effect).
MIN_APPEND_MB = 2.0

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class StepInput:
    offered_per_s: float
    epoch_ns: int
    step_s: float
    settle_s: float
    seqs: IntArray
    intended_ns: IntArray
    sent_ns: IntArray
    durable_ns: IntArray
    """Per sent message (aligned with ``seqs``): when its row became durable, or -1 if it never did."""
    send_lag_p99_ms: float
    lost: int


def _slope(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float:
    if len(x) < 2 or float(np.ptp(x)) == 0:
        return 0.0
    return float(np.polyfit(x, y, 1)[0])


def _downsample(values: Sequence[Any], limit: int = MAX_TIMELINE_POINTS) -> list[Any]:
    if len(values) <= limit:
        return list(values)
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


@dataclass(frozen=True)
class _Counts:
    """Messages sent and durable by each point of a fixed grid from the step's start, and its measured window."""

    start: int
    end: int
    persisted: npt.NDArray[np.bool_]
    sent_sorted: IntArray
    durable_sorted: IntArray
    grid: IntArray
    sent_n: FloatArray
    durable_n: FloatArray
    backlog: FloatArray
    window: npt.NDArray[np.bool_]
    x: FloatArray
    """Seconds since the step's start of the grid points in the window."""


def step_metrics(s: StepInput, *, threshold: float, backlog_growth: float) -> dict[str, Any]:
    """Offered vs achieved, backlog slope, latency from intended send, Little's law, the verdict."""
    counts = _counts(s)
    window = counts.window
    sent_slope = _slope(counts.x, counts.sent_n[window])
    durable_slope, backlog_slope, fit_points, flushes = _durable_slopes(s, counts)
    in_window = counts.persisted & (s.intended_ns >= counts.start) & (s.intended_ns <= counts.end)
    e2e = Recorder()
    e2e.record_all_ns((s.durable_ns[in_window] - s.intended_ns[in_window]).tolist())
    kept_up = sent_slope >= PUBLISHER_RATE_FRACTION * s.offered_per_s and s.send_lag_p99_ms <= PUBLISHER_LAG_P99_MS
    achieved_ratio = durable_slope / s.offered_per_s
    growing = backlog_slope > backlog_growth * s.offered_per_s
    sustainable = kept_up and achieved_ratio >= threshold and not growing and s.lost == 0
    if not kept_up:
        verdict = "publisher-limited"
    elif sustainable:
        verdict = "sustainable"
    else:
        verdict = "unsustainable"
    return {
        "offered_per_s": s.offered_per_s,
        "sent": len(s.seqs),
        "sent_per_s": round(sent_slope, 1),
        "send_lag_p99_ms": round(s.send_lag_p99_ms, 2),
        "publisher_kept_up": kept_up,
        "persisted_per_s": round(durable_slope, 1),
        "achieved_ratio": round(achieved_ratio, 4),
        "backlog_slope_per_s": round(backlog_slope, 1),
        "backlog_start": int(counts.backlog[window][0]) if window.any() else 0,
        "backlog_end": int(counts.backlog[window][-1]) if window.any() else 0,
        "backlog_max": int(counts.backlog.max()) if len(counts.backlog) else 0,
        "backlog_growing": growing,
        "lost": s.lost,
        "latency_ms": {"end_to_end": e2e.summary(ladder=True)},
        "little": _little(s, counts, sent_slope),
        "sustainable": sustainable,
        "verdict": verdict,
        "window_s": [round(s.settle_s, 3), round(s.step_s, 3)],
        "slopes_sampled": fit_points,
        "flushes_in_window": len(flushes),
        "timeline": _timeline(s, counts),
    }


def _counts(s: StepInput) -> _Counts:
    start = s.epoch_ns + int(s.settle_s * 1e9)
    end = s.epoch_ns + int(s.step_s * 1e9)
    persisted = s.durable_ns >= 0
    sent_sorted = np.sort(s.sent_ns)
    durable_sorted = np.sort(s.durable_ns[persisted])
    last = int(max(end, durable_sorted[-1] if len(durable_sorted) else end, sent_sorted[-1] if len(s.sent_ns) else end))
    grid = np.arange(s.epoch_ns, last + 1, int(GRID_S * 1e9), dtype=np.int64)
    sent_n = np.searchsorted(sent_sorted, grid, side="right").astype(np.float64)
    durable_n = np.searchsorted(durable_sorted, grid, side="right").astype(np.float64)
    window = (grid >= start) & (grid <= end)
    return _Counts(
        start=start,
        end=end,
        persisted=persisted,
        sent_sorted=sent_sorted,
        durable_sorted=durable_sorted,
        grid=grid,
        sent_n=sent_n,
        durable_n=durable_n,
        backlog=sent_n - durable_n,
        window=window,
        x=(grid[window] - s.epoch_ns) / 1e9,
    )


def _durable_slopes(s: StepInput, counts: _Counts) -> tuple[float, float, str, IntArray]:
    """The slopes of the durable count and of the backlog over the window, how they were sampled, the flushes."""
    # Rows become durable in steps, one per flush. Sampled on a fixed grid that staircase biases a short
    # window's slope by up to several percent (as much as the verdict's margin); sampled just after each
    # flush it lies on a line when flushes are regular, so durable count and backlog are fitted there.
    flushes = np.unique(
        counts.durable_sorted[(counts.durable_sorted >= counts.start) & (counts.durable_sorted <= counts.end)]
    )
    if len(flushes) >= 3:
        fx = (flushes - s.epoch_ns) / 1e9
        f_durable = np.searchsorted(counts.durable_sorted, flushes, side="right").astype(np.float64)
        f_sent = np.searchsorted(counts.sent_sorted, flushes, side="right").astype(np.float64)
        return _slope(fx, f_durable), _slope(fx, f_sent - f_durable), "after each flush", flushes
    return (
        _slope(counts.x, counts.durable_n[counts.window]),
        _slope(counts.x, counts.backlog[counts.window]),
        f"every {GRID_S:g} s",
        flushes,
    )


def _little(s: StepInput, counts: _Counts, sent_slope: float) -> dict[str, Any]:
    """Little's law over the window: mean number in the system = arrival rate x mean time in the system (both
    from the real send time, the backlog's own definition)."""
    sent_in_window = counts.persisted & (s.sent_ns >= counts.start) & (s.sent_ns <= counts.end)
    mean_in_system = float(counts.backlog[counts.window].mean()) if counts.window.any() else 0.0
    mean_time_s = (
        float((s.durable_ns[sent_in_window] - s.sent_ns[sent_in_window]).mean() / 1e9) if sent_in_window.any() else 0.0
    )
    predicted = sent_slope * mean_time_s
    return {
        "mean_in_system": round(mean_in_system, 1),
        "arrival_per_s": round(sent_slope, 1),
        "mean_time_s": round(mean_time_s, 4),
        "predicted": round(predicted, 1),
        "ratio": round(mean_in_system / predicted, 3) if predicted > 0 else None,
    }


def _timeline(s: StepInput, counts: _Counts) -> dict[str, list[Any]]:
    timeline = _downsample(
        list(
            zip(
                ((counts.grid - s.epoch_ns) / 1e9).round(2).tolist(),
                counts.sent_n.astype(int).tolist(),
                counts.durable_n.astype(int).tolist(),
                strict=True,
            )
        )
    )
    return {
        "t_s": [p[0] for p in timeline],
        "sent": [p[1] for p in timeline],
        "durable": [p[2] for p in timeline],
        "backlog": [p[1] - p[2] for p in timeline],
    }


def knee(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The first step from which e2e p99 stays above ``KNEE_FACTOR`` x the lowest p99 of the steps before it.

    Below saturation a timeout-triggered buffer keeps p99 near the flush
    interval (and higher rates even lower it, as size triggers fire sooner);
    past saturation the queue grows and p99 climbs with the step's length.
    "Stays above" (every later step too) keeps one step with a passing stall
    (a busy machine, a slow fsync) from being taken for the knee.
    """
    points = [
        (step, p99)
        for step in steps
        if (p99 := step.get("latency_ms", {}).get("end_to_end", {}).get("p99")) is not None
    ]
    for i in range(1, len(points)):
        best = min(p for _, p in points[:i])
        if all(p > KNEE_FACTOR * best for _, p in points[i:]):
            step, p99 = points[i]
            return {
                "offered_per_s": step["offered_per_s"],
                "p99_ms": p99,
                "below_p99_ms": best,
                "method": f"first step from which end-to-end p99 stays above {KNEE_FACTOR:g}x the lowest p99 below",
            }
    return None


def usl(points: Sequence[tuple[int, float]]) -> dict[str, Any] | None:
    """Fit the Universal Scalability Law X(N) = lambda N / (1 + sigma (N-1) + kappa N (N-1)).

    lambda is the one-worker throughput; sigma (contention) and kappa
    (coherency) come from the linearised form N lambda / X(N) - 1 =
    sigma (N-1) + kappa N (N-1), by least squares with both kept >= 0. With
    two worker counts the two cannot be told apart: kappa is set to 0 (Amdahl's
    law) and the note says so.
    """
    pts = sorted((n, x) for n, x in points if x > 0)
    if len(pts) < 2 or pts[0][0] != 1:
        return None
    lam = pts[0][1]
    sigma, kappa, note = _usl_coefficients(pts, lam)

    def predict(n: float) -> float:
        return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))

    r2 = _r_squared(pts, predict)
    return {
        "lambda": round(lam, 1),
        "sigma": round(sigma, 5),
        "kappa": round(kappa, 6),
        **_usl_peak(lam, sigma, kappa, predict),
        "r2": None if r2 is None else round(r2, 4),
        "points": [[n, round(x, 1)] for n, x in pts],
        "curve": [[n, round(predict(n), 1)] for n in range(1, max(8, 2 * pts[-1][0]) + 1)],
        "note": note,
    }


def _usl_coefficients(pts: Sequence[tuple[int, float]], lam: float) -> tuple[float, float, str]:
    """sigma and kappa by least squares on the linearised form, both kept >= 0, and a note on how."""
    rows = [(n - 1, n * (n - 1), n * lam / x - 1) for n, x in pts[1:]]
    a = np.array([[r[0], r[1]] for r in rows], dtype=np.float64)
    y = np.array([r[2] for r in rows], dtype=np.float64)
    if len(rows) == 1:
        return (
            max(0.0, float(y[0] / a[0, 0])),
            0.0,
            "two worker counts: coherency (kappa) cannot be separated from contention; kappa set to 0 (Amdahl)",
        )
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    sigma, kappa = float(sol[0]), float(sol[1])
    if sigma < 0 or kappa < 0:
        return _refit_one(a, y)
    return sigma, kappa, ""


def _refit_one(a: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> tuple[float, float, str]:
    # Non-negative least squares for two unknowns: if one comes out negative, fit the other alone.
    s_only = max(0.0, float(a[:, 0] @ y / (a[:, 0] @ a[:, 0])))
    k_only = max(0.0, float(a[:, 1] @ y / (a[:, 1] @ a[:, 1])))
    err_s = float(np.sum((a[:, 0] * s_only - y) ** 2))
    err_k = float(np.sum((a[:, 1] * k_only - y) ** 2))
    sigma, kappa = (s_only, 0.0) if err_s <= err_k else (0.0, k_only)
    return sigma, kappa, "unconstrained fit gave a negative coefficient; refitted with it at 0"


def _usl_peak(lam: float, sigma: float, kappa: float, predict: Callable[[float], float]) -> dict[str, Any]:
    """Where throughput stops growing: a maximum with coherency, Amdahl's ceiling without, none if linear."""
    if kappa > 0:
        peak_n = math.sqrt((1 - sigma) / kappa) if sigma < 1 else 1.0
        peak_x: float | None = predict(peak_n)
    else:
        peak_n = math.inf
        peak_x = lam / sigma if sigma > 0 else None  # the asymptote: Amdahl's ceiling
    return {
        "peak_workers": None if math.isinf(peak_n) else round(peak_n, 2),
        "peak_per_s": None if peak_x is None else round(peak_x, 1),
        "peak_kind": "maximum" if kappa > 0 else ("asymptote" if sigma > 0 else "none (linear)"),
    }


def _r_squared(pts: Sequence[tuple[int, float]], predict: Callable[[float], float]) -> float | None:
    # Only from three points: with two, one coefficient is fitted to the one point beyond lambda; R^2 says little.
    xs = np.array([x for _, x in pts])
    fitted = np.array([predict(n) for n, _ in pts])
    ss_tot = float(np.sum((xs - xs.mean()) ** 2))
    return 1 - float(np.sum((xs - fitted) ** 2)) / ss_tot if ss_tot > 0 and len(pts) > 2 else None


GENERATOR_HEADROOM = 0.8
"""A publisher process is planned at this fraction of its calibrated ceiling (``bench calibrate``): at its very
ceiling it would have no slack for the pipeline and broker sharing its cores, and its send lag would grow."""


def generator_plan(
    *, ceiling_per_s: float, publishers: int, highest_rate: float, qos: int, cores: int | None, source: str
) -> dict[str, Any]:
    """How many publisher processes the highest offered rate needs, from one process's calibrated ceiling.

    The publishers' combined ceiling counts at most one process per core: two processes on one core share it.
    ``warning`` says what is short (None: enough publishers and cores).
    """
    usable = ceiling_per_s * GENERATOR_HEADROOM
    needed = max(1, math.ceil(highest_rate / usable)) if usable > 0 else None
    running = min(publishers, cores) if cores else publishers
    combined = ceiling_per_s * running
    warning = None
    where = (
        f"{usable:,.0f} msg/s each ({GENERATOR_HEADROOM:.0%} of the calibrated ceiling {ceiling_per_s:,.0f} msg/s "
        f"at QoS {qos})"
    )
    if needed is None:
        warning = f"the calibration's publisher ceiling at QoS {qos} is {ceiling_per_s:g} msg/s: no rate is reachable"
    elif publishers < needed:
        warning = (
            f"capacity.publishers is {publishers}, but the highest offered rate {highest_rate:,.0f} msg/s needs "
            f"{needed} publisher processes at {where}; steps above {combined:,.0f} msg/s are generator-limited"
        )
    elif cores and needed > cores:
        warning = (
            f"the highest offered rate {highest_rate:,.0f} msg/s needs {needed} publisher processes at {where}, "
            f"more than this machine's {cores} cores; steps above {combined:,.0f} msg/s are generator-limited"
        )
    return {
        "calibration": source,
        "qos": qos,
        "ceiling_per_process_per_s": round(ceiling_per_s, 1),
        "headroom": GENERATOR_HEADROOM,
        "publishers": publishers,
        "needed_publishers": needed,
        "combined_ceiling_per_s": round(combined, 1),
        "highest_offered_per_s": highest_rate,
        "warning": warning,
    }


def generator_limited(offered_per_s: float, plan: dict[str, Any] | None) -> bool | None:
    """Whether a step offered more than the publishers' combined calibrated ceiling; None without a calibration."""
    if plan is None:
        return None
    return bool(offered_per_s > plan["combined_ceiling_per_s"])


CPU_BUSY_PCT = 85.0
"""At the first step the pipeline could not take, a role using this much of one core (100 = one core), or a
machine this much of all its cores (100 = every core), is taken to be the limit."""
GROWTH_FLAT = 1.1
"""More workers sustaining less than this many times one worker's rate: throughput did not grow."""

LimitKind = Literal["publishers", "generator", "pipeline", "broker", "cores", "unknown"]
"""Who limited a series, as its limit line names it: the publishers' send lag, the load generator's calibrated
ceiling, the pipeline workers' CPU, the broker's CPU, the machine's cores as a whole, or none the sweep can tell."""


def cpu_account(step: Mapping[str, Any], cores: int | None) -> dict[str, Any]:
    """Where a step's CPU went, 100 = one core: each of the sweep's roles as measured (None: not measured), their
    sum, the machine's busy share of all its cores (100 = every core) and the rest of it, which is other
    processes on the machine (None without the machine's figure)."""
    roles = {
        "workers_pct": step.get("cpu_pct"),
        "publishers_pct": step.get("publisher_cpu_pct"),
        "broker_pct": step.get("broker_cpu_pct"),
        "bench_pct": step.get("bench_process_cpu_pct"),
    }
    sweep = sum(float(v) for v in roles.values() if v is not None)
    machine = step.get("machine_cpu_pct")
    # Each role is sampled over its own window (a publisher over its whole run), so the sum can exceed the
    # machine's figure by a little: the rest is never below 0.
    other = max(0.0, float(machine) * cores - sweep) if machine is not None and cores else None
    return {
        **roles,
        "sweep_pct": round(sweep, 1),
        "machine_pct": machine,
        "other_pct": None if other is None else round(other, 1),
        "cores": cores,
        "unmeasured": [k.removesuffix("_pct") for k, v in roles.items() if v is None],
    }


def cores_busy(account: Mapping[str, Any]) -> bool | None:
    """Whether every core was about busy: from the machine's figure, else from the sweep's own processes; None
    when neither was measured."""
    machine, cores = account.get("machine_pct"), account.get("cores")
    if machine is not None:
        return bool(machine >= CPU_BUSY_PCT)
    if cores and not account.get("unmeasured"):
        return bool(account["sweep_pct"] >= CPU_BUSY_PCT * cores)
    return None


def _cores_text(account: Mapping[str, Any]) -> str:
    """The sweep's share of the machine's cores and the rest's, e.g. "the sweep's processes 1.8 of 2 cores,
    other processes 0.1"."""
    cores = account.get("cores")
    if not cores:
        return ""
    text = f"the sweep's processes {account['sweep_pct'] / 100:.1f} of {cores} cores"
    unmeasured = account.get("unmeasured") or []
    if account.get("other_pct") is not None:
        # What was not measured is in the rest: it is not other processes' alone then, and says so.
        rest = "other processes" + (f" and the unmeasured {' and '.join(unmeasured)}" if unmeasured else "")
        text += f", {rest} {account['other_pct'] / 100:.1f}"
    elif unmeasured:
        text += f" ({' and '.join(unmeasured)} not measured)"
    return text


_OTHERS_TOOK = "other processes took a good part of them: rerun on a quieter machine for the sweep's own limit"


def _others_took_much(account: Mapping[str, Any]) -> bool:
    """Whether processes outside the sweep took a quarter or more of the busy CPU (only said when every role was
    measured: otherwise the rest holds the unmeasured ones too)."""
    other, machine, cores = account.get("other_pct"), account.get("machine_pct"), account.get("cores")
    if account.get("unmeasured") or other is None or not machine or not cores:
        return False
    return bool(other >= 0.25 * machine * cores)


def _busy_text(step: Mapping[str, Any], account: Mapping[str, Any], role: str, broker: str) -> str:
    """Each role's CPU at a step, then the machine's and how much of it was the sweep's."""
    n = int(step.get("workers") or 1)
    per_worker = step.get("cpu_pct_per_worker")
    if per_worker is None:
        parts = [f"{role} CPU unknown"]
    elif n > 1:
        parts = [f"{n} {role}s {per_worker:.0f}% of a core each"]
    else:
        parts = [f"{role} {per_worker:.0f}% of a core"]
    if step.get("publisher_cpu_pct") is not None:
        parts.append(f"publishers {step['publisher_cpu_pct']:.0f}%")
    if account.get("broker_pct") is not None:
        parts.append(f"{broker} {account['broker_pct']:.0f}%")
    if account.get("bench_pct") is not None:
        parts.append(f"bench {account['bench_pct']:.0f}%")
    machine = account.get("machine_pct")
    if machine is not None:
        cores = account.get("cores")
        parts.append(f"machine {machine:.0f}% of all {cores or '?'} cores")
        share = _cores_text(account)
        if share:
            parts.append(share)
    return ", ".join(parts)


def limit_of(
    steps: Sequence[Mapping[str, Any]],
    *,
    role: str = "pipeline worker",
    generator: Mapping[str, Any] | None = None,
    cores: int | None = None,
    broker: str = "embedded broker",
) -> tuple[LimitKind | None, str | None]:
    """Who was busiest at the first step the pipeline could not take, and the line that says so with the
    evidence: the answer to "what to scale". ``role``: what the system under test is called ("pipeline worker",
    "external system"); ``generator``: the publishers' calibrated ceiling (generator_plan), when the sweep has
    one; ``broker``: what the broker's CPU figure is of. (None, None) when every step was sustainable."""
    bad = next((s for s in steps if s["verdict"] != "sustainable"), None)
    if bad is None:
        return None, None
    # The calibrated ceiling (bench capacity --calibration) backs the send-lag judgement: a step offered more
    # than the publishers can send is the generator's limit even when the pipeline fell behind too (they share
    # the cores), so it is never reported as the pipeline's.
    past = (
        f"past the publishers' calibrated ceiling {generator['combined_ceiling_per_s']:,.0f} msg/s"
        if generator is not None and bad.get("generator_limited")
        else None
    )
    if bad["verdict"] == "publisher-limited":
        lag = f"send lag p99 {bad['send_lag_p99_ms']:,.0f} ms at {bad['offered_per_s']:g} msg/s"
        return ("generator" if past else "publishers"), f"publishers ({lag}" + (
            f"; {past}: generator-limited)" if past else ")"
        )
    account = cpu_account(bad, cores)
    busy = _busy_text(bad, account, role, broker)
    if past:
        return "generator", f"the load generator: {bad['offered_per_s']:g} msg/s is {past} (generator-limited; {busy})"
    # A step that kept up but lost messages failed on the broker's queue limit: said beside whoever was busiest.
    kept_up = bad.get("lost") and not bad.get("backlog_growing")
    lost = f"; it kept up but lost {bad['lost']:,} message(s) (a broker's queue limit)" if kept_up else ""
    per_worker = bad.get("cpu_pct_per_worker")
    full = cores_busy(account)
    if per_worker is not None and per_worker >= CPU_BUSY_PCT:
        also = "; every core was busy too: more workers need more cores" if full else ""
        return "pipeline", f"the pipeline's CPU ({busy}){also}{lost}"
    if (account.get("broker_pct") or 0) >= CPU_BUSY_PCT:
        hint = "; measure against Mosquitto with --broker" if broker == "embedded broker" else ""
        return "broker", f"the {broker}, not the pipeline ({busy}){hint}{lost}"
    if full:
        quiet = "; " + _OTHERS_TOOK if _others_took_much(account) else ""
        return (
            "cores",
            f"the machine's cores: cores are the limit, every core busy ({busy}){lost}; spread the roles over more "
            f"cores or machines{quiet}",
        )
    return "unknown", f"not one busy core ({busy}): I/O or the broker's delivery, the sweep cannot tell which{lost}"


def scaling(
    series: Sequence[Mapping[str, Any]], *, generator: Mapping[str, Any] | None, cores: int | None
) -> dict[str, Any]:
    """Sustained throughput per worker count beside the load generator's ceiling, its growth from one worker, and
    in plain words why it stops growing, from the CPU each role used at the first step that failed."""
    ceiling = generator["combined_ceiling_per_s"] if generator is not None else None
    one = next((s for s in series if s["workers"] == 1), None)

    def ratio(value: float | None, base: float | None) -> float | None:
        return round(value / base, 3) if value is not None and base else None

    rows = []
    for sr in series:
        bad = next((s for s in sr["steps"] if s["verdict"] != "sustainable"), None)
        rows.append(
            {
                "workers": sr["workers"],
                "sustainable_per_s": sr["sustainable_per_s"],
                "vs_one_worker": ratio(sr["sustainable_per_s"], one["sustainable_per_s"] if one else None),
                "peak_per_s": sr["peak_per_s"],
                "peak_vs_one_worker": ratio(sr["peak_per_s"], one["peak_per_s"] if one else None),
                "generator_ceiling_per_s": ceiling,
                "limit_kind": sr.get("limit_kind"),
                "limit_offered_per_s": bad["offered_per_s"] if bad is not None else None,
                "cpu": cpu_account(bad, cores) if bad is not None else None,
            }
        )
    return {
        "cores": cores,
        "generator_ceiling_per_s": ceiling,
        "rows": rows,
        "growth": _growth_text(rows),
        "statement": _scaling_statement(rows, series, cores),
    }


def _growth_text(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Sustained throughput by worker count and its ratio to one worker's (None below two counts with one)."""
    one = next((r for r in rows if r["workers"] == 1), None)
    if one is None or len(rows) < 2:
        return None
    parts = []
    for r in sorted(rows, key=lambda r: r["workers"]):
        who = f"{r['workers']} worker{'' if r['workers'] == 1 else 's'}"
        sus = "none" if r["sustainable_per_s"] is None else f"{r['sustainable_per_s']:,.0f} msg/s"
        if r["workers"] != 1 and r["vs_one_worker"] is not None:
            sus += f" ({r['vs_one_worker']:.2f}x one worker, {r['workers']}x if it scaled linearly)"
        parts.append(f"{who} {sus}")
    text = "sustained throughput: " + "; ".join(parts)
    peaks = [r for r in sorted(rows, key=lambda r: r["workers"]) if r["workers"] != 1 and r["peak_vs_one_worker"]]
    if peaks:
        text += "; peak achieved " + ", ".join(f"{r['peak_vs_one_worker']:.2f}x at {r['workers']}" for r in peaks)
    return text


def _ladder_factor(steps: Sequence[Mapping[str, Any]]) -> float | None:
    """The largest factor between two consecutive offered rates: how coarse a sustained rate is."""
    rates = sorted({float(s["offered_per_s"]) for s in steps})
    return max((b / a for a, b in itertools.pairwise(rates) if a > 0), default=None)


def _scaling_statement(
    rows: Sequence[Mapping[str, Any]], series: Sequence[Mapping[str, Any]], cores: int | None
) -> str | None:
    """Why sustained throughput stopped growing at the largest worker count, or that the sweep cannot tell."""
    one = next((r for r in rows if r["workers"] == 1), None)
    if one is None or len(rows) < 2:
        return None
    top = max(rows, key=lambda r: r["workers"])
    n = top["workers"]
    if one["sustainable_per_s"] is None:
        return "cannot tell how throughput grows with workers: one worker had no sustainable step (lower the rates)"
    if top["sustainable_per_s"] is None:
        grew = f"{n} workers had no sustainable step"
    else:
        ratio = top["vs_one_worker"]
        factor = _ladder_factor([s for sr in series for s in sr["steps"]])
        coarse = f" (the rates are up to {factor:.2f}x apart, so the ratio is that coarse)" if factor else ""
        grew = (
            f"{n} workers sustained {ratio:.2f}x one worker's rate{coarse}"
            if ratio >= GROWTH_FLAT
            else f"{n} workers sustained no more than one worker ({ratio:.2f}x){coarse}"
        )
    kind, cpu = top["limit_kind"], top["cpu"] or {}
    at = f"at {n} workers' first failing step ({top['limit_offered_per_s'] or 0:,.0f} msg/s)"
    if kind is None:
        return f"{grew}; {n} workers sustained every offered rate: raise capacity.rates to see where growth stops"
    if kind in ("generator", "publishers"):
        return (
            f"{grew}; the load generator was the limit {at}, so the sweep cannot tell how far workers scale: add "
            "publisher processes or machines"
        )
    if kind == "cores":
        before = (
            "; one worker's limit was the cores too"
            if one["limit_kind"] == "cores"
            else "; more workers cannot add throughput on this machine"
        )
        quiet = "; " + _OTHERS_TOOK if _others_took_much(cpu) else ""
        return (
            f"{grew}; cores are the limit: {at} the machine's {cores or '?'} cores were "
            f"{cpu.get('machine_pct') or 0:.0f}% busy, {_cores_text(cpu)}{before}{quiet}"
        )
    if kind == "pipeline":
        if cores_busy(cpu):
            return f"{grew}; the pipeline workers' CPU and every core were busy {at}: cores are the limit"
        return (
            f"{grew}; the pipeline workers' own CPU was the limit {at} with cores to spare "
            f"(machine {cpu.get('machine_pct') or 0:.0f}%): more workers should add throughput, sweep more counts"
        )
    if kind == "broker":
        return f"{grew}; the broker's CPU was the limit {at}, not the pipeline's"
    return (
        f"{grew}; no role used a full core and the cores were not all busy {at}: the sweep cannot tell why "
        "throughput stopped growing (I/O, the broker's delivery)"
    )


def workers_for(target: float, headroom: float, fit: dict[str, Any] | None, one_worker: float) -> dict[str, Any]:
    """Smallest worker count whose predicted capacity covers target x (1 + headroom)."""
    need = target * (1 + headroom)
    if fit is None:
        n = math.ceil(need / one_worker) if one_worker > 0 else None
        return {"need_per_s": round(need, 1), "workers": n, "model": "linear from one worker (optimistic: no USL fit)"}
    lam, sigma, kappa = fit["lambda"], fit["sigma"], fit["kappa"]
    for n in range(1, 257):
        if lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1)) >= need:
            return {"need_per_s": round(need, 1), "workers": n, "model": "USL"}
    return {"need_per_s": round(need, 1), "workers": None, "model": "USL: not reachable by adding workers"}


def recommendations(
    *,
    series: Sequence[dict[str, Any]],
    fit: dict[str, Any] | None,
    append: dict[str, Any] | None,
    flush_ms: dict[str, Any] | None,
    flush_interval_s: float,
    buffer_size: int,
    rotate_s: float,
    target_rate: float | None,
    headroom: float,
) -> list[dict[str, str]]:
    """Advice, each item with the measurement it rests on."""
    out: list[dict[str, str]] = []
    one = next((s for s in series if s["workers"] == 1), series[0] if series else None)
    if one is not None and one.get("sustainable_per_s"):
        out.append(_workers_advice(one, series, fit, target_rate, headroom))
    rotation = _rotation_advice(append, rotate_s)
    if rotation is not None:
        out.append(rotation)
    if flush_ms and flush_ms.get("count") and one is not None and one.get("sustainable_per_s"):
        out += _flush_advice(flush_ms, one, flush_interval_s, buffer_size)
    return out


def _workers_advice(
    one: dict[str, Any],
    series: Sequence[dict[str, Any]],
    fit: dict[str, Any] | None,
    target_rate: float | None,
    headroom: float,
) -> dict[str, str]:
    """How many pipeline workers the target rate needs, or why this sweep cannot say."""
    base = one["sustainable_per_s"]
    peak = one.get("peak_per_s") or base
    if target_rate is None:
        text = (
            f"one worker sustains {base:,.0f} msg/s; plan for at most {base / (1 + headroom):,.0f} msg/s per "
            f"worker to keep {headroom:.0%} headroom (set capacity.target_rate for a worker count)"
        )
    else:
        text = _workers_for_target(one, series, fit, target_rate=target_rate, headroom=headroom, peak=peak)
    evidence = f"workers=1: highest sustainable step {base:,.0f} msg/s, peak achieved {peak:,.0f} msg/s"
    if fit is not None:
        evidence += f"; USL lambda={fit['lambda']:,.0f}, sigma={fit['sigma']:.4f}, kappa={fit['kappa']:.5f}"
    return {"topic": "workers", "text": text, "evidence": evidence}


def _workers_for_target(
    one: dict[str, Any],
    series: Sequence[dict[str, Any]],
    fit: dict[str, Any] | None,
    *,
    target_rate: float,
    headroom: float,
    peak: float,
) -> str:
    limit = one.get("limit")
    not_pipeline = (fit is not None and fit.get("pipeline_limited") is False) or (
        isinstance(limit, str) and not limit.startswith("the pipeline's CPU")
    )
    own_cpu = isinstance(limit, str) and limit.startswith("the pipeline's CPU")
    if not_pipeline and own_cpu:
        # One worker ran out of its own core; more workers ran out of the machine's cores (the fit says so): one
        # worker's figure still holds, what more workers would give is this machine's, not the pipeline's.
        needed = target_rate * (1 + headroom)
        base = float(one.get("sustainable_per_s") or 0)
        elsewhere = (
            "more workers on this machine meet its cores first (see the scaling line): to sweep past one worker, "
            "run the publishers and the broker on other machines (bench load with remote workers, --broker)"
        )
        if base and needed <= base:
            return (
                f"1 pipeline worker for {target_rate:,.0f} msg/s with {headroom:.0%} headroom (capacity needed "
                f"{needed:,.0f} msg/s; one worker sustained {base:,.0f} msg/s, limited by its own CPU); {elsewhere}"
            )
        return (
            f"no worker count for {target_rate:,.0f} msg/s from this sweep: one worker sustained {base:,.0f} msg/s, "
            f"limited by its own CPU, and {elsewhere}"
        )
    if not_pipeline:
        return (
            f"no worker count for {target_rate:,.0f} msg/s from this sweep: the pipeline's CPU was not the "
            f"limit ({limit or 'see the USL note'}), so more workers here would only share the same busy "
            "cores; run the publishers and the broker on other machines (bench load with remote workers, "
            "--broker) and sweep again"
        )
    if fit is not None and "lower bound" in fit.get("note", ""):
        best = max(series, key=lambda s: s.get("sustainable_per_s") or 0)
        return (
            f"no worker count for {target_rate:,.0f} msg/s yet: {best['workers']} worker(s) sustained "
            f"{best['sustainable_per_s'] or 0:,.0f} msg/s without saturating, so the fit is only a lower bound; "
            "offer more load (more publisher processes or machines: bench load) to find their limit"
        )
    need = workers_for(target_rate, headroom, fit, peak)
    if need["workers"] is None:
        return (
            f"{target_rate:,.0f} msg/s with {headroom:.0%} headroom is beyond what more workers give ({need['model']})"
        )
    return (
        f"{need['workers']} pipeline worker(s) for {target_rate:,.0f} msg/s with {headroom:.0%} headroom "
        f"(capacity needed {need['need_per_s']:,.0f} msg/s; model: {need['model']})"
    )


def _rotation_advice(append: dict[str, Any] | None, rotate_s: float) -> dict[str, str] | None:
    """When to rotate Parquet files, from how an append's cost grows with the file's size (None: too few flushes)."""
    if not (append and append.get("count", 0) >= 3):
        return None
    if (append.get("max_mb_before") or 0) < MIN_APPEND_MB:
        return {
            "topic": "parquet rotation",
            "text": f"not judged: files grew to only {append.get('max_mb_before') or 0:,.2f} MB in this sweep, too "
            "little to see append cost against size; run bench run scenarios/append_cost.yaml",
            "evidence": f"{append['count']} flushes; largest file before an append: "
            f"{append.get('max_mb_before') or 0:,.2f} MB",
        }
    slope, intercept = append["slope_ms_per_mb"], append["intercept_ms"]
    max_mb = append["max_mb_before"]
    sign = "+" if slope >= 0 else "-"
    ci = append.get("slope_ci95_ms_per_mb")
    return {
        "topic": "parquet rotation",
        "text": _rotation_text(slope, intercept, max_mb, ci, rotate_s),
        "evidence": f"append cost = {intercept:.2f} ms {sign} {abs(slope):.3f} ms/MB x MB already in the file "
        + (f"(95% CI of the slope {ci[0]:.3f} .. {ci[1]:.3f}) " if isinstance(ci, list | tuple) else "")
        + f"(least squares over {append['count']} flushes, up to {max_mb:,.2f} MB)",
    }


def _rotation_text(slope: float, intercept: float, max_mb: float, ci: Any, rotate_s: float) -> str:
    # A slope whose 95% interval holds 0 is noise: no rotation advice can rest on it.
    flat = isinstance(ci, list | tuple) and len(ci) == 2 and ci[0] <= 0 <= ci[1]
    if flat:
        return (
            f"append cost does not grow with file size up to {max_mb:,.1f} MB (flat within noise): rotation by "
            "time is fine"
        )
    if not (slope > 0 and intercept > 0):
        return f"append cost does not grow with file size up to {max_mb:,.1f} MB: rotation by time is fine"
    double_mb = intercept / slope
    if double_mb < 10 * max_mb:
        return f"rotate Parquet files before about {double_mb:,.1f} MB: past that an append costs twice a fresh file's"
    return (
        f"file size barely moves the append cost up to {max_mb:,.1f} MB: rotation by time (now {rotate_s:g} s) is fine"
    )


def _flush_advice(
    flush_ms: dict[str, Any], one: dict[str, Any], flush_interval_s: float, buffer_size: int
) -> list[dict[str, str]]:
    """The flush interval and buffer size that suit the flush times and one worker's sustainable rate."""
    p99 = float(flush_ms["p99"])
    rate = float(one["sustainable_per_s"])
    min_interval = max(0.1, 10 * p99 / 1000)
    size = max(1, round(rate * flush_interval_s))
    return [
        {
            "topic": "flush interval",
            "text": f"keep flush_interval >= {min_interval:.2f} s so flushing takes at most 10% of the time "
            f"(now {flush_interval_s:g} s); end-to-end latency is about half the interval plus the flush",
            "evidence": f"flush p99 {p99:.1f} ms over {flush_ms['count']} flushes at the sustainable steps",
        },
        {
            "topic": "buffer size",
            "text": f"buffer.size about {size:,} rows at {rate:,.0f} msg/s so the size trigger fires about as "
            f"often as the timeout (now {buffer_size:,}); capacity at least {2 * size:,} to ride out one slow "
            "flush",
            "evidence": f"sustainable rate {rate:,.0f} msg/s x flush_interval {flush_interval_s:g} s",
        },
    ]
