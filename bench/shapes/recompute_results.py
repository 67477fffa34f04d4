"""results.json's ``recompute`` part of a variant (``bench/shapes/recompute.py``).

``bench.results.model`` imports it for its ``Variant``, so it takes its base from ``bench.results.base``.
"""

from __future__ import annotations

from bench.results.base import ResultsModel as _Model


class Distribution(_Model):
    """A distribution in ms (HdrHistogram, as ``LatencySummary``); ``{"count": 0}`` when nothing was recorded."""

    count: int
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    p999: float | None = None
    max: float | None = None
    mean: float | None = None
    total: float | None = None
    ladder: list[tuple[int | float, float]] | None = None
    below_zero: int | None = None
    clipped: int | None = None


class CostPoint(_Model):
    """The recomputes whose series length fell in one bin of the cost curve."""

    series_len: float
    """Mean series length (points, all machines) of the recomputes in the bin."""
    recomputes: int
    cpu_ms: float
    """Mean CPU time per recompute (the worker thread's, SQLite included)."""
    rows_written: float
    """Mean points rewritten per recompute."""


class Oracle(_Model):
    """The API's final series against a recompute of the raw readings read back from the store."""

    points: int
    """Points the oracle computed."""
    api_points: int
    """Points the API served."""
    mismatches: int
    """Points missing, extra, or differing by more than floating point (relative 1e-9). Fails the run."""
    max_abs_error: float
    """Largest difference in ``energy`` between matched points."""
    equal: bool


class ApiReaders(_Model):
    """The read API's latency under concurrent readers: locust ``HttpUser``s in a subprocess, each alternating
    GET /series?machine=ID and GET /status with ``wait`` between requests, while the variant ran."""

    users: int
    wait_ms: float
    duration_s: float
    """From the readers' start to their stop (the variant's sending, after all users were spawned)."""
    requests: int
    failures: int
    """Requests that failed (no answer, or an HTTP status other than 200)."""
    requests_per_s: float
    latency_ms: Distribution
    """Per request, as locust timed it (request sent to answer read), all requests."""
    by_request: dict[str, Distribution] = {}
    """The same per request name (``/series?machine`` and ``/status``)."""


class ExternalUsage(_Model):
    """An external pipeline's process tree while it served (sampled with psutil)."""

    command: str
    cpu_s: float
    cpu_s_per_1k: float | None = None
    """CPU seconds per 1,000 readings sent (readers' requests served included)."""
    peak_rss_mb: float
    exit_code: int | None = None


class RecomputeResult(_Model):
    """The notify-and-recompute shape: staleness, recompute cost against series length, correctness."""

    recompute: str
    """``full``, ``incremental`` or ``external`` (a pipeline the user brings: ``recompute.external``)."""
    coalesce: bool | None = None
    """None: an external pipeline (its own business)."""
    gather_interval_ms: float | None = None
    poll_interval_ms: float
    """How often the reader polled GET /status: staleness is over-stated by up to this (plus one answer)."""
    late_readings: int
    """Readings sent with a timestamp behind their machine's newest one (truth ``out_of_order`` / ``late``)."""
    staleness_ms: Distribution
    """Per reading: from its intended send time to the first API answer whose ``raw_through`` covers it (an
    external pipeline: whose ``seq_through`` is at least its seq)."""
    unreflected: int
    """Readings stored but never reflected by an API answer before the drain timeout. Fails the run."""
    notifications: int | None = None
    """Notifications the recompute worker received over its TCP connection from the gatherer (None: external)."""
    notification_bytes: int | None = None
    """Bytes those notifications took on the wire (a bare ping is one)."""
    recomputes: int | None = None
    coalesced: int | None = None
    """Notifications merged into one already pending (served by a recompute they did not start)."""
    recompute_cpu_ms: Distribution | None = None
    """CPU time per recompute."""
    cpu_ms_total: float | None = None
    rows_written_total: int | None = None
    cost_curve: list[CostPoint] = []
    """Cost per recompute against series length, by bins of length."""
    cost_slope_ms_per_1k: float | None = None
    """Least-squares slope of CPU ms per recompute against series length, per 1,000 points (None: too few)."""
    api_requests: int
    """Reader polls answered (200 and 304)."""
    api_not_modified: int
    """Polls answered 304 (the ETag matched: nothing new)."""
    final_version: int | None = None
    oracle: Oracle
    readers: ApiReaders | None = None
    """The API's latency under concurrent readers (None: ``readers.users`` was 0, or they did not run)."""
    external: ExternalUsage | None = None
    """An external pipeline's command and cost (None: a built-in variant)."""
