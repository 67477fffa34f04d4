"""The capacity sweep's judgement on synthetic steps whose answer is known: verdicts, knee, USL, Little, advice."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bench.capacity import model

EPOCH = 1_800_000_000_000_000_000


def _step(
    offered: float,
    *,
    service_per_s: float | None = None,
    flush_every_s: float = 1.0,
    step_s: float = 15.0,
    settle_s: float = 3.0,
    lag_p99_ms: float = 1.0,
    lost: int = 0,
) -> model.StepInput:
    """A step whose pipeline flushes every ``flush_every_s`` and serves at most ``service_per_s`` rows/s (FIFO)."""
    n = int(offered * step_s)
    intended = EPOCH + (np.arange(n) / offered * 1e9).astype(np.int64)
    sent = intended + 2_000_000
    if service_per_s is None:
        ready = sent
    else:
        # A single FIFO server: message k is processed at max(its arrival, when message k-1 was done) + 1/service.
        ready = np.empty(n, dtype=np.int64)
        done = 0
        for k in range(n):
            done = max(int(sent[k]), done) + int(1e9 / service_per_s)
            ready[k] = done
    # Durable at the next flush boundary after processing (a timeout-triggered buffer), phase 0.37 s.
    period = int(flush_every_s * 1e9)
    phase = int(0.37e9)
    durable = ((ready - EPOCH - phase) // period + 1) * period + EPOCH + phase + 4_000_000
    return model.StepInput(
        offered_per_s=offered,
        epoch_ns=EPOCH,
        step_s=step_s,
        settle_s=settle_s,
        seqs=np.arange(n, dtype=np.int64),
        intended_ns=intended,
        sent_ns=sent,
        durable_ns=durable.astype(np.int64),
        send_lag_p99_ms=lag_p99_ms,
        lost=lost,
    )


def _judge(s: model.StepInput) -> dict[str, Any]:
    return model.step_metrics(s, threshold=0.98, backlog_growth=0.02)


@pytest.mark.parametrize("offered", [100.0, 1000.0, 3700.0])
@pytest.mark.parametrize("flush_every_s", [0.25, 1.0])
def test_a_pipeline_that_keeps_up_is_sustainable_whatever_the_flush_phase(offered: float, flush_every_s: float) -> None:
    """The staircase of flushes must not bias the achieved rate: fitted after each flush it is exact."""
    result = _judge(_step(offered, flush_every_s=flush_every_s))
    assert result["verdict"] == "sustainable"
    assert result["achieved_ratio"] == pytest.approx(1.0, abs=0.005)
    assert abs(result["backlog_slope_per_s"]) <= 0.005 * offered
    assert result["slopes_sampled"] == "after each flush"
    # Little's law holds for a stationary queue: L = lambda W within a few percent.
    assert result["little"]["ratio"] == pytest.approx(1.0, abs=0.05)


def test_a_saturated_pipeline_shows_its_service_rate_and_a_growing_backlog() -> None:
    result = _judge(_step(1000.0, service_per_s=600.0))
    assert result["verdict"] == "unsustainable"
    assert result["persisted_per_s"] == pytest.approx(600, rel=0.02)
    assert result["backlog_slope_per_s"] == pytest.approx(400, rel=0.05)
    assert result["backlog_growing"]
    assert result["backlog_end"] > result["backlog_start"]


def test_just_below_saturation_is_sustainable_just_above_is_not() -> None:
    assert _judge(_step(1000.0, service_per_s=1100.0))["verdict"] == "sustainable"
    assert _judge(_step(1000.0, service_per_s=950.0))["verdict"] == "unsustainable"


def test_a_publisher_behind_schedule_is_not_blamed_on_the_pipeline() -> None:
    result = _judge(_step(1000.0, service_per_s=600.0, lag_p99_ms=900.0))
    assert result["verdict"] == "publisher-limited"
    assert not result["sustainable"]


def test_a_loss_makes_a_step_unsustainable_even_when_it_kept_up() -> None:
    assert _judge(_step(500.0, lost=1))["verdict"] == "unsustainable"


def test_latency_is_measured_from_the_intended_send_time() -> None:
    result = _judge(_step(1000.0, flush_every_s=1.0))
    e2e = result["latency_ms"]["end_to_end"]
    # Timeout flushes every second: waits spread over 0..1 s, plus 2 ms send delay and 4 ms fsync.
    assert 450 < e2e["p50"] < 560
    assert 980 < e2e["p99"] < 1010


def _steps(p99s: list[float]) -> list[dict[str, Any]]:
    return [{"offered_per_s": 100.0 * (i + 1), "latency_ms": {"end_to_end": {"p99": p}}} for i, p in enumerate(p99s)]


def test_knee_is_the_first_step_from_which_p99_stays_above_twice_the_best_below() -> None:
    knee = model.knee(_steps([1000, 800, 600, 700, 1300, 5000]))
    assert knee is not None
    assert knee["offered_per_s"] == 500.0
    assert knee["below_p99_ms"] == 600
    assert model.knee(_steps([1000, 900, 950])) is None


def test_one_stalled_step_below_saturation_is_not_the_knee() -> None:
    # Measured: a passing stall gave 2,785 ms at 1,414 msg/s between 1,000 ms steps; saturation came at 2,828.
    knee = model.knee(_steps([997, 1000, 1007, 2785, 1041, 5472]))
    assert knee is not None and knee["offered_per_s"] == 600.0


def _usl(n: int, lam: float, sigma: float, kappa: float) -> float:
    return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))


def test_usl_recovers_known_coefficients_from_four_worker_counts() -> None:
    points = [(n, _usl(n, 1000, 0.05, 0.002)) for n in (1, 2, 3, 4)]
    fit = model.usl(points)
    assert fit is not None
    assert fit["sigma"] == pytest.approx(0.05, abs=1e-4)
    assert fit["kappa"] == pytest.approx(0.002, abs=1e-5)
    assert fit["peak_workers"] == pytest.approx((0.95 / 0.002) ** 0.5, rel=1e-3)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-6)


def test_usl_with_two_worker_counts_is_amdahl_and_says_so() -> None:
    fit = model.usl([(1, 1000.0), (2, 1800.0)])
    assert fit is not None
    assert fit["kappa"] == 0
    assert fit["sigma"] == pytest.approx(2 * 1000 / 1800 - 1, abs=1e-4)
    assert fit["peak_kind"] == "asymptote"
    assert fit["peak_per_s"] == pytest.approx(1000 / fit["sigma"], rel=1e-3)
    assert "Amdahl" in fit["note"]


def test_usl_superlinear_points_clamp_to_zero_contention() -> None:
    fit = model.usl([(1, 1000.0), (2, 2100.0), (3, 3300.0)])
    assert fit is not None
    assert fit["sigma"] >= 0 and fit["kappa"] >= 0


def test_usl_needs_one_worker_and_another_count() -> None:
    assert model.usl([(1, 1000.0)]) is None
    assert model.usl([(2, 1000.0), (3, 1400.0)]) is None


def test_workers_for_a_target_with_headroom() -> None:
    fit = model.usl([(n, _usl(n, 1000, 0.05, 0.0)) for n in (1, 2, 3)])
    need = model.workers_for(2500, 0.3, fit, 1000)
    # 3,250 msg/s needed; X(4) = 3,478 and X(3) = 2,727 under sigma = 0.05.
    assert need["workers"] == 4
    assert model.workers_for(2500, 0.3, None, 1000)["workers"] == 4
    assert model.workers_for(50_000, 0.3, fit, 1000)["workers"] is None  # beyond the asymptote of 20,000


def _advice(
    series: list[dict[str, Any]],
    *,
    fit: dict[str, Any] | None = None,
    append: dict[str, Any] | None = None,
    flush_ms: dict[str, Any] | None = None,
    target_rate: float | None = 5000.0,
) -> list[dict[str, str]]:
    return model.recommendations(
        series=series,
        fit=fit,
        append=append,
        flush_ms=flush_ms,
        flush_interval_s=1.0,
        buffer_size=500,
        rotate_s=60.0,
        target_rate=target_rate,
        headroom=0.3,
    )


def test_every_recommendation_shows_its_evidence() -> None:
    series = [{"workers": 1, "sustainable_per_s": 2000.0, "peak_per_s": 2300.0}]
    append = {"count": 40, "max_mb_before": 30.0, "slope_ms_per_mb": 0.5, "intercept_ms": 3.0}
    advice = _advice(series, append=append, flush_ms={"count": 30, "p99": 25.0})
    topics = {a["topic"]: a for a in advice}
    assert set(topics) == {"workers", "parquet rotation", "flush interval", "buffer size"}
    assert all(a["evidence"] for a in advice)
    assert "3 pipeline worker(s)" in topics["workers"]["text"]  # 6,500 / 2,300 -> 3
    assert "6.0 MB" in topics["parquet rotation"]["text"]  # intercept / slope: cost doubles at 6 MB
    assert "2,000 rows" in topics["buffer size"]["text"]


def test_a_slope_flat_within_noise_advises_no_rotation() -> None:
    # The same point estimate as above (doubling at 6 MB), but its interval holds 0: no advice may rest on it.
    append = {
        "count": 40,
        "max_mb_before": 30.0,
        "slope_ms_per_mb": 0.5,
        "intercept_ms": 3.0,
        "slope_ci95_ms_per_mb": [-0.2, 1.2],
    }
    (rotation,) = [a for a in _advice([], append=append, target_rate=None) if a["topic"] == "parquet rotation"]
    assert "flat within noise" in rotation["text"] and "6.0 MB" not in rotation["text"]
    assert "95% CI of the slope -0.200 .. 1.200" in rotation["evidence"]
    significant = {**append, "slope_ci95_ms_per_mb": [0.3, 0.7]}
    (rotation,) = [a for a in _advice([], append=significant, target_rate=None) if a["topic"] == "parquet rotation"]
    assert "6.0 MB" in rotation["text"]


def test_rotation_is_not_judged_from_files_that_barely_grew() -> None:
    append = {"count": 10, "max_mb_before": 0.2, "slope_ms_per_mb": 50.0, "intercept_ms": 1.0}
    advice = _advice([], append=append, target_rate=None)
    assert len(advice) == 1 and advice[0]["text"].startswith("not judged")


def test_no_worker_count_is_advised_from_a_lower_bound_fit() -> None:
    fit = model.usl([(1, 2800.0), (2, 3000.0)])
    assert fit is not None
    fit["note"] += "; some worker counts never saturated: their throughput is a lower bound and so is the fit"
    series = [
        {"workers": 1, "sustainable_per_s": 2000.0, "peak_per_s": 2800.0},
        {"workers": 2, "sustainable_per_s": 3000.0, "peak_per_s": 3000.0},
    ]
    advice = _advice(series, fit=fit)
    (workers,) = [a for a in advice if a["topic"] == "workers"]
    assert workers["text"].startswith("no worker count") and "lower bound" in workers["text"]


def test_no_worker_count_is_advised_when_the_pipeline_was_not_the_limit() -> None:
    fit = model.usl([(1, 2800.0), (2, 2900.0)])
    assert fit is not None
    fit["pipeline_limited"] = False
    series = [{"workers": 1, "sustainable_per_s": 2800.0, "peak_per_s": 2800.0}]
    advice = _advice(series, fit=fit)
    (workers,) = [a for a in advice if a["topic"] == "workers"]
    assert "not the limit" in workers["text"] and "other machines" in workers["text"]


def test_no_worker_count_from_one_worker_whose_limit_was_the_machine() -> None:
    series = [
        {
            "workers": 1,
            "sustainable_per_s": 2828.0,
            "peak_per_s": 2829.0,
            "limit": "the machine's cores, shared by every role (pipeline worker 28% of a core, ...)",
        }
    ]
    advice = _advice(series)
    (workers,) = [a for a in advice if a["topic"] == "workers"]
    assert workers["text"].startswith("no worker count") and "machine's cores" in workers["text"]


def test_one_worker_limited_by_its_own_cpu_still_answers_when_more_workers_met_the_cores() -> None:
    """Seen in a real sweep (scenarios/capacity-qos0.yaml on 2 cores): one worker's limit was its own core, two
    workers' the machine's cores, so the fit is not the pipeline's; the advice must not then say the pipeline's
    CPU was not the limit while quoting the line that says it was."""
    fit = model.usl([(1, 11_040.0), (2, 12_626.0)])
    assert fit is not None
    fit["pipeline_limited"] = False
    one = {
        "workers": 1,
        "sustainable_per_s": 9_537.0,
        "peak_per_s": 11_040.0,
        "limit": "the pipeline's CPU (pipeline worker 99% of a core, publishers 49%, ...)",
    }
    two = {"workers": 2, "sustainable_per_s": 11_347.0, "peak_per_s": 12_626.0, "limit": "the machine's cores"}
    (within,) = [a for a in _advice([one, two], fit=fit, target_rate=5000.0) if a["topic"] == "workers"]
    assert within["text"].startswith("1 pipeline worker for 5,000 msg/s") and "6,500" in within["text"]
    assert "was not the limit" not in within["text"] and "meet its cores" in within["text"]
    (beyond,) = [a for a in _advice([one, two], fit=fit, target_rate=9000.0) if a["topic"] == "workers"]
    assert beyond["text"].startswith("no worker count") and "limited by its own CPU" in beyond["text"]
