"""Statistics behind the CI performance regression gate: pure functions, no I/O.

Two designs compare a baseline A with a candidate B measured as a few short
replicates on a noisy shared machine:

- ``paired(a, b)``: A and B interleaved in one job (A B B A ...), pair i gives
  the ratio B_i / A_i. Machine drift common to a pair cancels in the ratio.
- ``unpaired(a, b)``: a stored baseline against new replicates, already
  normalised by the caller; medians, because one disturbed replicate must not
  move the estimate.

Every metric yields a ``Change``; the p-values of one run go through ``holm``
together, and ``verdict`` / ``regression`` turn a change and its Holm decision
into the gate's answer::

    changes = {"p99": paired(a_p99, b_p99), "flush": paired(a_fl, b_fl)}
    tested = {k: c.p_value for k, c in changes.items() if c.p_value is not None}
    decided = holm(tested, alpha=0.10)
    failed = [k for k in decided if regression(changes[k], higher_is_better=False, tolerance=0.05,
                                               significant=decided[k].rejected)]

Changes are fractions of the baseline: +0.12 means B is 12% higher than A.
Inputs must be finite and non-negative (times, rates, sizes): a ratio of
signed quantities means nothing. Bad input raises ``ValueError``; a comparison
that is possible in principle but not with these data (too few pairs, a zero
baseline) returns a ``Change`` whose ``p_value`` is None and whose ``note``
says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import stats

Verdict = Literal["better", "worse", "no significant change"]

MIN_REPLICATES = 3
"""Fewer pairs (or replicates per group) than this and no test is attempted.

Even at 3 the rank tests cannot reach the usual levels: the smallest two-sided
exact Wilcoxon p-value is 2 / 2**n (0.25 at n=3, 0.125 at 4, 0.0625 at 5), the
smallest Mann-Whitney one 2 / C(n_a + n_b, n_a) (0.1 at 3 + 3). A gate at
alpha 0.10 needs at least 5 pairs, and more once Holm divides alpha among metrics.
"""

# Exact tests where they are exact and cheap; past these sizes the normal
# approximation is accurate to far better than the gate's alpha resolution.
_WILCOXON_EXACT_MAX = 50
_WILCOXON_ENUMERATE_MAX = 13  # with ties: 2**13 sign patterns, enumerated in milliseconds
_MWU_EXACT_MAX = 100  # n_a + n_b
_MWU_ENUMERATE_MAX = 20_000  # with ties: distinct splits C(n_a + n_b, n_a) enumerated (8 + 8 = 12,870)

# Float round-off only: B = 1.05 * A can compute to a change of 0.04999999999999993,
# which a user reads as exactly 5% and expects to meet a 5% tolerance.
_TOLERANCE_EPS = 1e-9
# Log ratios that differ by less than this are equal up to round-off (B = 1.2 * A
# gives ratios 1.2 +- 1 ulp); the bootstrap of such data is a point.
_DEGENERATE_SPREAD = 1e-12


@dataclass(frozen=True, slots=True)
class Change:
    """The change of one metric from A to B, with its uncertainty.

    ``estimate``, ``ci_low`` and ``ci_high`` are fractions of A (+0.2 = B is 20%
    higher). They are NaN when no ratio exists (a zero baseline, see ``note``);
    the interval is NaN too when there are fewer than ``MIN_REPLICATES``.
    ``p_value`` is None when no test was possible, and ``note`` then says why;
    ``note`` also records data that were set aside (pairs that are 0 in both).
    """

    n_a: int
    n_b: int
    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float | None
    method: str
    note: str | None = None

    @property
    def n(self) -> int:
        """Replicates behind the comparison: the pairs used (paired), or the smaller group (unpaired)."""
        return min(self.n_a, self.n_b)

    @property
    def testable(self) -> bool:
        """Whether a test was possible; when not, ``note`` says why."""
        return self.p_value is not None


@dataclass(frozen=True, slots=True)
class HolmResult:
    """One hypothesis after the Holm-Bonferroni step-down."""

    p_value: float
    adjusted: float
    rejected: bool


def paired(
    a: Sequence[float],
    b: Sequence[float],
    *,
    confidence: float = 0.90,
    seed: int = 0,
    resamples: int = 10_000,
) -> Change:
    """Change from A to B over interleaved pairs: the Hodges-Lehmann estimate of the ratio B_i / A_i, minus 1.

    Hodges-Lehmann: the median of the pairwise averages of the log ratios, the estimate that goes with the
    signed-rank test. Why not the geometric mean: on a shared machine a replicate now and then runs 1.2-2x
    slower as a whole; one such pair moves a mean of 20 log ratios by 2-3%, enough to carry a 7% change
    under a 5% tolerance, while the rank test (rightly) still calls the change significant.

    Interval: percentile bootstrap over pairs of that estimate, at an
    expanded level (see ``_expanded_level``), so that a 90% interval covers
    about 90% even with 8 pairs. P-value: Wilcoxon signed-rank test of the log
    ratios against 0, two-sided, exact for small n (by enumeration when there
    are ties).

    >>> round(paired([10, 11, 12], [12, 13.2, 14.4]).estimate, 12)
    0.2
    """
    _check_options(confidence, resamples)
    av = _values("a", a)
    bv = _values("b", b)
    if av.size != bv.size:
        raise ValueError(f"paired needs one b per a: got {av.size} values of a and {bv.size} of b")
    pairs = av.size
    both_zero = (av == 0) & (bv == 0)
    one_zero = (av == 0) != (bv == 0)
    method = f"paired: Hodges-Lehmann ratio, bootstrap {confidence:.0%} CI, Wilcoxon signed-rank"

    def untestable(n: int, estimate: float, note: str | None) -> Change:
        return Change(n, n, estimate, math.nan, math.nan, confidence, None, method, note)

    if one_zero.any():
        return untestable(
            pairs,
            math.nan,
            f"ratio undefined: A is 0 while B is not in {int(((av == 0) & (bv > 0)).sum())} pair(s), "
            f"B is 0 while A is not in {int(((bv == 0) & (av > 0)).sum())}; "
            "compare this metric as a difference, not a ratio",
        )
    if both_zero.all():
        return Change(
            pairs, pairs, 0.0, 0.0, 0.0, confidence, None, method, "metric is 0 in A and B in every pair: no test"
        )
    dropped = int(both_zero.sum())
    dropped_note = f"{dropped} pair(s) 0 in both A and B left out" if dropped else None
    log_ratio = np.log(bv[~both_zero]) - np.log(av[~both_zero])
    n = int(log_ratio.size)
    estimate = float(np.expm1(_hodges_lehmann(log_ratio, -1)))
    if n < MIN_REPLICATES:
        return untestable(
            n,
            estimate,
            _join(dropped_note, f"only {n} usable pair(s): at least {MIN_REPLICATES} are needed for a test"),
        )

    if np.ptp(log_ratio) <= _DEGENERATE_SPREAD:
        ci_low = ci_high = estimate
    else:
        ci = stats.bootstrap(
            (log_ratio,),
            _hodges_lehmann,
            n_resamples=resamples,
            confidence_level=_expanded_level(confidence, n),
            method="percentile",
            vectorized=True,
            rng=np.random.default_rng(seed),
        ).confidence_interval
        with np.errstate(over="ignore"):  # a ratio beyond 1e308 is reported as inf, which it is for a gate
            ci_low, ci_high = float(np.expm1(ci.low)), float(np.expm1(ci.high))

    if not log_ratio.any():
        # scipy gives NaN when every difference is 0; no pair moved, which is as
        # far from evidence of a change as data can be.
        p_value, test, note = 1.0, "exact", _join(dropped_note, "A and B identical in every pair")
    else:
        p_value, test = _wilcoxon(log_ratio)
        note = dropped_note
    return Change(n, n, estimate, ci_low, ci_high, confidence, p_value, f"{method} ({test})", note)


def unpaired(
    a: Sequence[float],
    b: Sequence[float],
    *,
    confidence: float = 0.90,
    seed: int = 0,
    resamples: int = 10_000,
) -> Change:
    """Change from a baseline group A to a candidate group B: median(B) / median(A) - 1.

    Interval: percentile bootstrap, each group resampled on its own. Plain
    percentile here, unlike ``paired``: the bootstrap distribution of a median
    of few values is lumpy and already covers at or above the nominal level
    (90% interval: 0.91-0.94 over 600 simulated runs each at 5 + 5, 8 + 8, 20 + 8).
    P-value: Mann-Whitney U, two-sided, exact for small groups (by enumeration
    when there are ties).

    >>> round(unpaired([10, 11, 12], [12, 13.2, 14.4]).estimate, 12)
    0.2
    """
    _check_options(confidence, resamples)
    av = _values("a", a)
    bv = _values("b", b)
    n_a, n_b = int(av.size), int(bv.size)
    method = f"unpaired: median ratio, bootstrap {confidence:.0%} CI, Mann-Whitney U"

    def untestable(estimate: float, note: str) -> Change:
        return Change(n_a, n_b, estimate, math.nan, math.nan, confidence, None, method, note)

    if not av.any() and not bv.any():
        return Change(n_a, n_b, 0.0, 0.0, 0.0, confidence, None, method, "metric is 0 in every replicate: no test")
    med_a = float(np.median(av))
    if med_a == 0:
        return untestable(
            math.nan, "ratio undefined: the median of A is 0; compare this metric as a difference, not a ratio"
        )
    estimate = float(np.median(bv)) / med_a - 1
    if min(n_a, n_b) < MIN_REPLICATES:
        return untestable(
            estimate, f"{n_a} + {n_b} replicates: at least {MIN_REPLICATES} per group are needed for a test"
        )

    if np.ptp(av) == 0 and np.ptp(bv) == 0:
        ci_low = ci_high = estimate  # every resample is the same pair of medians
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            # A resample of A can have median 0 when A holds zeros: that interval end is
            # then unbounded (inf), which is what the data say.
            ci = stats.bootstrap(
                (av, bv),
                _median_ratio,
                n_resamples=resamples,
                confidence_level=confidence,
                method="percentile",
                vectorized=True,
                rng=np.random.default_rng(seed),
            ).confidence_interval
        ci_low, ci_high = float(ci.low), float(ci.high)

    if np.ptp(np.concatenate([av, bv])) == 0:
        # All ranks tie; scipy gives NaN. Nothing differs, so no evidence of a change.
        p_value, test, note = 1.0, "exact", "all values identical"
    else:
        p_value, test = _mann_whitney(av, bv)
        note = None
    return Change(n_a, n_b, estimate, ci_low, ci_high, confidence, p_value, f"{method} ({test})", note)


def cv(values: Sequence[float], *, robust: bool = False) -> float:
    """Coefficient of variation: sample standard deviation (ddof=1) / mean.

    ``robust=True``: 1.4826 * MAD / median instead, which equals the classic CV
    for normal data but ignores up to half the replicates being disturbed (one
    replicate hit by a noisy neighbour inflates the classic CV, not this one).
    The classic one is the default because it is what pyperf and most readers
    mean by "CV"; ask for the robust one when a single outlier should not flag
    a whole run. 0.0 when the spread is 0 (all values equal, all 0 included;
    with ``robust`` also when more than half are equal).

    >>> cv([1, 2, 3])
    0.5
    """
    v = _values("values", values)
    if v.size < 2:
        raise ValueError(f"cv needs at least 2 values, got {v.size}")
    if robust:
        centre = float(np.median(v))
        spread = float(stats.median_abs_deviation(v, scale="normal"))
    else:
        centre = float(v.mean())
        spread = float(v.std(ddof=1))
    # Non-negative values with a spread have a positive mean and median, so no division by 0.
    return 0.0 if spread == 0 else spread / centre


def erratic(values: Sequence[float], limit: float, *, robust: bool = False) -> bool:
    """True when ``cv(values, robust=robust)`` exceeds ``limit`` (a fraction, 0.10 = 10%)."""
    if not (limit > 0 and math.isfinite(limit)):
        raise ValueError(f"limit must be a positive fraction, got {limit}")
    return cv(values, robust=robust) > limit


def holm(pvalues: Mapping[str, float], alpha: float) -> dict[str, HolmResult]:
    """Holm-Bonferroni step-down at family-wise error rate ``alpha``.

    Sorted ascending, p_(i) is adjusted to max over j <= i of min(1, (m - j + 1) p_(j))
    (i, j from 1), so adjusted values keep the order of the raw ones; a hypothesis is
    rejected when its adjusted p-value is <= alpha, which is the step-down rule
    "reject while p_(i) <= alpha / (m - i + 1)". Pass only the tests that were
    possible (``Change.p_value`` not None): a metric that could not be tested
    cannot be rejected and only makes the others harder to reject.

    >>> {k: r.rejected for k, r in holm({"p99": 0.01, "flush": 0.04}, 0.05).items()}
    {'p99': True, 'flush': True}
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    for name, p in pvalues.items():
        if not 0 <= p <= 1:  # also catches NaN
            raise ValueError(f"p-value of {name!r} must be in [0, 1], got {p}")
    m = len(pvalues)
    ordered = sorted(pvalues.items(), key=lambda item: item[1])
    results: dict[str, HolmResult] = {}
    running = 0.0
    for i, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * p))
        results[name] = HolmResult(p, running, running <= alpha)
    return {name: results[name] for name in pvalues}


def smallest_p(n_a: int, n_b: int, *, paired: bool) -> float:
    """The smallest two-sided p-value the gate's exact test can give with these sample sizes.

    Paired (Wilcoxon signed-rank, n pairs): every ratio on one side, 2 / 2**n. Unpaired (Mann-Whitney): the
    two groups fully separated, 2 / C(n_a + n_b, n_a). When this exceeds the level a metric is tested at
    (after Holm), no data could ever make the test reject: the gate is inconclusive, not passed.

    >>> smallest_p(5, 5, paired=True)
    0.0625
    >>> round(smallest_p(3, 3, paired=False), 3)
    0.1
    """
    if paired:
        n = min(n_a, n_b)
        return 1.0 if n < MIN_REPLICATES else min(1.0, 2.0 / 2**n)
    if min(n_a, n_b) < MIN_REPLICATES:
        return 1.0
    return min(1.0, 2.0 / math.comb(n_a + n_b, n_a))


def verdict(change: Change, *, higher_is_better: bool, tolerance: float, significant: bool) -> Verdict:
    """Classify a change: "worse" or "better" if significant AND beyond ``tolerance``, else "no significant change".

    ``significant`` is the Holm decision for this metric (``holm(...)[name].rejected``).
    Beyond the tolerance means the point estimate is at least ``tolerance`` in
    that direction, relative to A: with tolerance 0.05 a latency is "worse" from
    +5% (B >= 1.05 A) and a throughput from -5% (B <= 0.95 A).

    Why the point estimate, not the interval's near end: whether there is a
    change at all is already decided by the Holm-adjusted rank test, which
    controls the family-wise error rate; requiring the bootstrap interval to
    exclude 0 as well would add a second, unadjusted test of the same question
    that can disagree with the first, and the user would have to reconcile two
    procedures. The tolerance answers a different question, whether the change
    is big enough to matter, and the best single answer to that is the
    estimate. The interval is reported beside it for the reader.
    """
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a non-negative fraction, got {tolerance}")
    if significant and change.p_value is None:
        raise ValueError(f"significant=True for a change that has no test: {change.note}")
    if not significant or math.isnan(change.estimate):
        return "no significant change"
    bad = -change.estimate if higher_is_better else change.estimate
    if abs(bad) < tolerance - _TOLERANCE_EPS or bad == 0:
        return "no significant change"
    return "worse" if bad > 0 else "better"


def regression(change: Change, *, higher_is_better: bool, tolerance: float, significant: bool) -> bool:
    """The gate's failure: worse, significant after Holm, and beyond the tolerance (see ``verdict``)."""
    return verdict(change, higher_is_better=higher_is_better, tolerance=tolerance, significant=significant) == "worse"


def _values(name: str, values: Sequence[float]) -> NDArray[np.float64]:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers, got shape {v.shape}")
    if v.size == 0:
        raise ValueError(f"{name} is empty")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise ValueError(
            f"{name} holds {v[bad[0]]} at index {int(bad[0])}: every replicate must be a finite number "
            "(a failed replicate must be dropped or rerun, with its pair when paired)"
        )
    negative = np.flatnonzero(v < 0)
    if negative.size:
        raise ValueError(f"{name} holds {v[negative[0]]} at index {int(negative[0])}: ratios need non-negative metrics")
    return v


def _check_options(confidence: float, resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100 for a percentile interval to mean anything, got {resamples}")


def _join(*notes: str | None) -> str | None:
    kept = [note for note in notes if note]
    return "; ".join(kept) if kept else None


def _expanded_level(confidence: float, n: int) -> float:
    """Nominal level for a percentile bootstrap of a mean of n values to cover ``confidence``.

    The bootstrap spreads a mean by the plug-in variance (divisor n) and reads
    normal-like quantiles, so with few values it is too narrow: a 90% interval
    over 8 lognormal pairs covered 81% in simulation. Hesterberg's expanded
    percentile interval ("What teachers should know about the bootstrap",
    2015) asks for the level whose normal quantile is sqrt(n / (n - 1)) times
    Student's t quantile; that brought the same simulation to 89-91% at n=8
    (0.893 over 20,000 runs at 1,000 resamples), 88-89% at n=5 and n=12.
    90% becomes 95.7% at n=8, 99.3% at n=4.
    """
    tail = (1 - confidence) / 2
    z = math.sqrt(n / (n - 1)) * float(stats.t.isf(tail, n - 1))
    return 1 - 2 * float(stats.norm.sf(z))


def _hodges_lehmann(x: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    """Median of the Walsh averages (x_i + x_j) / 2, i <= j, along ``axis`` (vectorised for the bootstrap)."""
    values = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    i, j = np.triu_indices(values.shape[-1])
    walsh = (values[..., i] + values[..., j]) / 2
    median: NDArray[np.float64] = np.median(walsh, axis=-1)
    return median


def _median_ratio(a: NDArray[np.float64], b: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    ratio: NDArray[np.float64] = np.median(b, axis=axis) / np.median(a, axis=axis) - 1
    return ratio


def _wilcoxon(log_ratio: NDArray[np.float64]) -> tuple[float, str]:
    """Two-sided signed-rank p-value of log ratios against 0, and how it was computed.

    Pratt's treatment of zero differences: a pair that did not move keeps its
    place among the ranked magnitudes and counts for neither side, rather than
    being dropped as if it had never been measured (Wilcox's rule). The method
    is chosen here rather than by scipy's "auto" so the report can say which
    one gave the p-value.
    """
    n = log_ratio.size
    magnitudes = np.abs(log_ratio)
    ties = bool((magnitudes == 0).any()) or np.unique(magnitudes).size < n
    if ties and n <= _WILCOXON_ENUMERATE_MAX:
        # The exact table assumes no ties. Flipping the signs of the signed midranks in
        # all 2**n ways is the exact null distribution with them; scipy's own permutation
        # route for wilcoxon does the same but row by row (2 s at n=13; this takes 40 ms).
        signed = np.sign(log_ratio) * stats.rankdata(magnitudes)
        result = stats.permutation_test(
            (signed,), _sum, permutation_type="samples", vectorized=True, n_resamples=2**n, alternative="two-sided"
        )
        return float(result.pvalue), "exact by enumeration, ties"
    if not ties and n <= _WILCOXON_EXACT_MAX:
        return float(stats.wilcoxon(log_ratio, zero_method="pratt", method="exact").pvalue), "exact"
    # "auto" picks the normal approximation in exactly this case (n > 50, or ties and n > 13);
    # naming "asymptotic" would be clearer, but scipy-stubs 1.17.1.5 leaves it out of this overload.
    return float(stats.wilcoxon(log_ratio, zero_method="pratt", method="auto").pvalue), "normal approximation"


def _mann_whitney(a: NDArray[np.float64], b: NDArray[np.float64]) -> tuple[float, str]:
    """Two-sided Mann-Whitney U p-value and how it was computed (see ``_wilcoxon`` for why chosen here)."""
    pooled = np.concatenate([a, b])
    ties = np.unique(pooled).size < pooled.size
    if ties and math.comb(pooled.size, a.size) <= _MWU_ENUMERATE_MAX:
        # As for the signed ranks: every split of the pooled midranks into groups of n_a and
        # n_b, vectorised; the rank sum of A orders the splits exactly as U does.
        ranks = stats.rankdata(pooled)
        result = stats.permutation_test(
            (ranks[: a.size], ranks[a.size :]),
            _sum_first,
            permutation_type="independent",
            vectorized=True,
            n_resamples=_MWU_ENUMERATE_MAX,
            alternative="two-sided",
        )
        return float(result.pvalue), "exact by enumeration, ties"
    if not ties and pooled.size <= _MWU_EXACT_MAX:
        return float(stats.mannwhitneyu(a, b, method="exact").pvalue), "exact"
    return float(stats.mannwhitneyu(a, b, method="asymptotic").pvalue), "normal approximation, tie-corrected"


def _sum(x: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    total: NDArray[np.float64] = np.sum(x, axis=axis)
    return total


def _sum_first(x: NDArray[np.float64], y: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    return _sum(x, axis)
