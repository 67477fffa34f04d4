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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


def step_metrics(s: StepInput, *, threshold: float, backlog_growth: float) -> dict[str, Any]:
    """Offered vs achieved, backlog slope, latency from intended send, Little's law, the verdict."""
    start = s.epoch_ns + int(s.settle_s * 1e9)
    end = s.epoch_ns + int(s.step_s * 1e9)
    persisted = s.durable_ns >= 0
    sent_sorted = np.sort(s.sent_ns)
    durable_sorted = np.sort(s.durable_ns[persisted])
    last = int(max(end, durable_sorted[-1] if len(durable_sorted) else end, sent_sorted[-1] if len(s.sent_ns) else end))
    grid = np.arange(s.epoch_ns, last + 1, int(GRID_S * 1e9), dtype=np.int64)
    sent_n = np.searchsorted(sent_sorted, grid, side="right").astype(np.float64)
    durable_n = np.searchsorted(durable_sorted, grid, side="right").astype(np.float64)
    backlog = sent_n - durable_n
    window = (grid >= start) & (grid <= end)
    x = (grid[window] - s.epoch_ns) / 1e9
    sent_slope = _slope(x, sent_n[window])
    # Rows become durable in steps, one per flush. Sampled on a fixed grid that staircase biases a short
    # window's slope by up to several percent (as much as the verdict's margin); sampled just after each
    # flush it lies on a line when flushes are regular, so durable count and backlog are fitted there.
    flushes = np.unique(durable_sorted[(durable_sorted >= start) & (durable_sorted <= end)])
    if len(flushes) >= 3:
        fx = (flushes - s.epoch_ns) / 1e9
        f_durable = np.searchsorted(durable_sorted, flushes, side="right").astype(np.float64)
        f_sent = np.searchsorted(sent_sorted, flushes, side="right").astype(np.float64)
        durable_slope = _slope(fx, f_durable)
        backlog_slope = _slope(fx, f_sent - f_durable)
        fit_points = "after each flush"
    else:
        durable_slope = _slope(x, durable_n[window])
        backlog_slope = _slope(x, backlog[window])
        fit_points = f"every {GRID_S:g} s"

    in_window = persisted & (s.intended_ns >= start) & (s.intended_ns <= end)
    e2e = Recorder()
    e2e.record_all_ns((s.durable_ns[in_window] - s.intended_ns[in_window]).tolist())
    # Little's law over the window: mean number in the system = arrival rate x mean time in the system
    # (both from the real send time, the backlog's own definition).
    sent_in_window = persisted & (s.sent_ns >= start) & (s.sent_ns <= end)
    mean_in_system = float(backlog[window].mean()) if window.any() else 0.0
    mean_time_s = (
        float((s.durable_ns[sent_in_window] - s.sent_ns[sent_in_window]).mean() / 1e9) if sent_in_window.any() else 0.0
    )
    predicted = sent_slope * mean_time_s

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
    timeline = _downsample(
        list(
            zip(
                ((grid - s.epoch_ns) / 1e9).round(2).tolist(),
                sent_n.astype(int).tolist(),
                durable_n.astype(int).tolist(),
                strict=True,
            )
        )
    )
    return {
        "offered_per_s": s.offered_per_s,
        "sent": len(s.seqs),
        "sent_per_s": round(sent_slope, 1),
        "send_lag_p99_ms": round(s.send_lag_p99_ms, 2),
        "publisher_kept_up": kept_up,
        "persisted_per_s": round(durable_slope, 1),
        "achieved_ratio": round(achieved_ratio, 4),
        "backlog_slope_per_s": round(backlog_slope, 1),
        "backlog_start": int(backlog[window][0]) if window.any() else 0,
        "backlog_end": int(backlog[window][-1]) if window.any() else 0,
        "backlog_max": int(backlog.max()) if len(backlog) else 0,
        "backlog_growing": growing,
        "lost": s.lost,
        "latency_ms": {"end_to_end": e2e.summary(ladder=True)},
        "little": {
            "mean_in_system": round(mean_in_system, 1),
            "arrival_per_s": round(sent_slope, 1),
            "mean_time_s": round(mean_time_s, 4),
            "predicted": round(predicted, 1),
            "ratio": round(mean_in_system / predicted, 3) if predicted > 0 else None,
        },
        "sustainable": sustainable,
        "verdict": verdict,
        "window_s": [round(s.settle_s, 3), round(s.step_s, 3)],
        "slopes_sampled": fit_points,
        "flushes_in_window": len(flushes),
        "timeline": {
            "t_s": [p[0] for p in timeline],
            "sent": [p[1] for p in timeline],
            "durable": [p[2] for p in timeline],
            "backlog": [p[1] - p[2] for p in timeline],
        },
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
    rows = [(n - 1, n * (n - 1), n * lam / x - 1) for n, x in pts[1:]]
    a = np.array([[r[0], r[1]] for r in rows], dtype=np.float64)
    y = np.array([r[2] for r in rows], dtype=np.float64)
    note = ""
    if len(rows) == 1:
        sigma, kappa = max(0.0, float(y[0] / a[0, 0])), 0.0
        note = "two worker counts: coherency (kappa) cannot be separated from contention; kappa set to 0 (Amdahl)"
    else:
        sol = np.linalg.lstsq(a, y, rcond=None)[0]
        sigma, kappa = float(sol[0]), float(sol[1])
        # Non-negative least squares for two unknowns: if one comes out negative, fit the other alone.
        if sigma < 0 or kappa < 0:
            s_only = max(0.0, float(a[:, 0] @ y / (a[:, 0] @ a[:, 0])))
            k_only = max(0.0, float(a[:, 1] @ y / (a[:, 1] @ a[:, 1])))
            err_s = float(np.sum((a[:, 0] * s_only - y) ** 2))
            err_k = float(np.sum((a[:, 1] * k_only - y) ** 2))
            sigma, kappa = (s_only, 0.0) if err_s <= err_k else (0.0, k_only)
            note = "unconstrained fit gave a negative coefficient; refitted with it at 0"

    def predict(n: float) -> float:
        return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))

    if kappa > 0:
        peak_n = math.sqrt((1 - sigma) / kappa) if sigma < 1 else 1.0
        peak_x: float | None = predict(peak_n)
    else:
        peak_n = math.inf
        peak_x = lam / sigma if sigma > 0 else None  # the asymptote: Amdahl's ceiling
    xs = np.array([x for _, x in pts])
    fitted = np.array([predict(n) for n, _ in pts])
    ss_tot = float(np.sum((xs - xs.mean()) ** 2))
    r2 = 1 - float(np.sum((xs - fitted) ** 2)) / ss_tot if ss_tot > 0 and len(pts) > 2 else None
    return {
        "lambda": round(lam, 1),
        "sigma": round(sigma, 5),
        "kappa": round(kappa, 6),
        "peak_workers": None if math.isinf(peak_n) else round(peak_n, 2),
        "peak_per_s": None if peak_x is None else round(peak_x, 1),
        "peak_kind": "maximum" if kappa > 0 else ("asymptote" if sigma > 0 else "none (linear)"),
        "r2": None if r2 is None else round(r2, 4),
        "points": [[n, round(x, 1)] for n, x in pts],
        "curve": [[n, round(predict(n), 1)] for n in range(1, max(8, 2 * pts[-1][0]) + 1)],
        "note": note,
    }


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
        base = one["sustainable_per_s"]
        peak = one.get("peak_per_s") or base
        limit = one.get("limit")
        not_pipeline = (fit is not None and fit.get("pipeline_limited") is False) or (
            isinstance(limit, str) and not limit.startswith("the pipeline's CPU")
        )
        if target_rate is not None and not_pipeline:
            text = (
                f"no worker count for {target_rate:,.0f} msg/s from this sweep: the pipeline's CPU was not the "
                f"limit ({limit or 'see the USL note'}), so more workers here would only share the same busy "
                "cores; run the publishers and the broker on other machines (bench load with remote workers, "
                "--broker) and sweep again"
            )
        elif target_rate is not None and fit is not None and "lower bound" in fit.get("note", ""):
            best = max(series, key=lambda s: s.get("sustainable_per_s") or 0)
            text = (
                f"no worker count for {target_rate:,.0f} msg/s yet: {best['workers']} worker(s) sustained "
                f"{best['sustainable_per_s'] or 0:,.0f} msg/s without saturating, so the fit is only a lower bound; "
                "offer more load (more publisher processes or machines: bench load) to find their limit"
            )
        elif target_rate is not None:
            need = workers_for(target_rate, headroom, fit, peak)
            text = (
                f"{need['workers']} pipeline worker(s) for {target_rate:,.0f} msg/s with {headroom:.0%} headroom "
                f"(capacity needed {need['need_per_s']:,.0f} msg/s; model: {need['model']})"
                if need["workers"] is not None
                else f"{target_rate:,.0f} msg/s with {headroom:.0%} headroom is beyond what more workers give "
                f"({need['model']})"
            )
        else:
            text = (
                f"one worker sustains {base:,.0f} msg/s; plan for at most {base / (1 + headroom):,.0f} msg/s per "
                f"worker to keep {headroom:.0%} headroom (set capacity.target_rate for a worker count)"
            )
        evidence = f"workers=1: highest sustainable step {base:,.0f} msg/s, peak achieved {peak:,.0f} msg/s"
        if fit is not None:
            evidence += f"; USL lambda={fit['lambda']:,.0f}, sigma={fit['sigma']:.4f}, kappa={fit['kappa']:.5f}"
        out.append({"topic": "workers", "text": text, "evidence": evidence})
    if append and append.get("count", 0) >= 3 and (append.get("max_mb_before") or 0) < MIN_APPEND_MB:
        out.append(
            {
                "topic": "parquet rotation",
                "text": f"not judged: files grew to only {append.get('max_mb_before') or 0:,.2f} MB in this sweep, too "
                "little to see append cost against size; run bench run scenarios/append_cost.yaml",
                "evidence": f"{append['count']} flushes; largest file before an append: "
                f"{append.get('max_mb_before') or 0:,.2f} MB",
            }
        )
    elif append and append.get("count", 0) >= 3 and append.get("max_mb_before"):
        slope, intercept = append["slope_ms_per_mb"], append["intercept_ms"]
        max_mb = append["max_mb_before"]
        sign = "+" if slope >= 0 else "-"
        ci = append.get("slope_ci95_ms_per_mb")
        # A slope whose 95% interval holds 0 is noise: no rotation advice can rest on it.
        flat = isinstance(ci, list | tuple) and len(ci) == 2 and ci[0] <= 0 <= ci[1]
        if flat:
            text = (
                f"append cost does not grow with file size up to {max_mb:,.1f} MB (flat within noise): rotation by "
                "time is fine"
            )
        elif slope > 0 and intercept > 0:
            double_mb = intercept / slope
            text = (
                f"rotate Parquet files before about {double_mb:,.1f} MB: past that an append costs twice a fresh file's"
                if double_mb < 10 * max_mb
                else f"file size barely moves the append cost up to {max_mb:,.1f} MB: rotation by time "
                f"(now {rotate_s:g} s) is fine"
            )
        else:
            text = f"append cost does not grow with file size up to {max_mb:,.1f} MB: rotation by time is fine"
        out.append(
            {
                "topic": "parquet rotation",
                "text": text,
                "evidence": f"append cost = {intercept:.2f} ms {sign} {abs(slope):.3f} ms/MB x MB already in the file "
                + (f"(95% CI of the slope {ci[0]:.3f} .. {ci[1]:.3f}) " if isinstance(ci, list | tuple) else "")
                + f"(least squares over {append['count']} flushes, up to {max_mb:,.2f} MB)",
            }
        )
    if flush_ms and flush_ms.get("count") and one is not None and one.get("sustainable_per_s"):
        p99 = float(flush_ms["p99"])
        rate = float(one["sustainable_per_s"])
        min_interval = max(0.1, 10 * p99 / 1000)
        size = max(1, round(rate * flush_interval_s))
        out.append(
            {
                "topic": "flush interval",
                "text": f"keep flush_interval >= {min_interval:.2f} s so flushing takes at most 10% of the time "
                f"(now {flush_interval_s:g} s); end-to-end latency is about half the interval plus the flush",
                "evidence": f"flush p99 {p99:.1f} ms over {flush_ms['count']} flushes at the sustainable steps",
            }
        )
        out.append(
            {
                "topic": "buffer size",
                "text": f"buffer.size about {size:,} rows at {rate:,.0f} msg/s so the size trigger fires about as "
                f"often as the timeout (now {buffer_size:,}); capacity at least {2 * size:,} to ride out one slow "
                "flush",
                "evidence": f"sustainable rate {rate:,.0f} msg/s x flush_interval {flush_interval_s:g} s",
            }
        )
    return out
