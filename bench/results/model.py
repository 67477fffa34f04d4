"""The results model: one typed definition of results.json that writers build and readers parse.

Every command writes the same shape (``bench run``, ``bench load``, a ``bench capacity`` sweep); the report, the
gate, ``bench compare`` and the CLI read it back through :func:`read_results` and attributes, never through string
paths into raw JSON::

    results = read_results(Path("reports/burst-20261125T120000Z"))
    for v in results.variants:
        print(v.name, v.ledger.persisted, v.latency_ms.end_to_end and v.latency_ms.end_to_end.p99)

Extra keys: every model forbids keys it does not define, so a writer's misspelt key fails where it is made, and a
results.json of the current ``schema_version`` holds exactly what this module defines (docs/results.md's field
reference is generated from it). A file of an older version loads too: :class:`Results` migrates what changed
(see ``_MIGRATIONS`` and the validators marked "older files") and leaves out keys no current field matches (an
intermediate commit's key, renamed before its version was bumped) instead of failing on them. A file of a newer
version than this bench reads is refused with both versions named.

Numbers keep their JSON type: a field that writers fill with an int in some runs and a float in others (a
percentile ladder's 0 and 100, ``producer_wait_ms`` without readings) is ``int | float``, so a file written through
the model holds the same values, printed the same way, as the dict it replaces (only the key order follows the
model's).
"""

from __future__ import annotations

import copy
import json
import math
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeGuard, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)

from bench.errors import UsageError
from bench.results import SCHEMA_VERSION, write_results
from bench.results.base import ResultsModel
from bench.results.metrics import slope_fit, slope_text
from bench.shapes.forward_results import ForwardResult
from bench.shapes.recompute_results import RecomputeResult
from bench.shapes.windows_results import WindowsResult
from pipeline.config import format_validation_error

__all__ = [
    "RESULTS_NAME",
    "AppendCost",
    "AppendPoint",
    "Capacity",
    "CapacityScaling",
    "CapacitySeries",
    "CapacityStep",
    "CpuAccount",
    "CpuProbe",
    "Environment",
    "FaultEvent",
    "FaultLatency",
    "FlushStats",
    "FlushTrigger",
    "Knee",
    "Latency",
    "LatencySummary",
    "Ledger",
    "Little",
    "Load",
    "LoadCoverage",
    "LoadPlan",
    "LoadPlanWorker",
    "LockProbe",
    "LocustRequestStats",
    "LocustStats",
    "Mismatch",
    "Number",
    "OpcUa",
    "OpcUaReference",
    "OpcUaSecurity",
    "OutputChecks",
    "PipelineStats",
    "ProbeOverhead",
    "Probes",
    "Publisher",
    "PublisherWindow",
    "QueueDepth",
    "Recommendation",
    "Resources",
    "Results",
    "ScalingRow",
    "ScenarioRef",
    "SinkFlushes",
    "SqlCheck",
    "StepVerdict",
    "StreamConfig",
    "StreamOverrides",
    "Throughput",
    "Timeline",
    "TransportConfig",
    "Truth",
    "TruthClass",
    "UslFit",
    "Validation",
    "ValidationClass",
    "Variant",
    "VariantConfig",
    "VariantFailure",
    "field_reference",
    "read_results",
    "results_json_schema",
]

RESULTS_NAME = "results.json"
GATE_NAME = "gate.json"
# The errors of one unreadable file: enough to see the pattern, not a screenful per variant.
MAX_ERROR_LINES = 12

Number: TypeAlias = int | float
"""A JSON number that writers give as an int in some runs and a float in others; kept as given."""


# ----------------------------------------------------------------------------- shared parts


class LatencySummary(ResultsModel):
    """A distribution of durations in ms (HdrHistogram, 1 us to 1 h, 3 significant digits); ``{"count": 0}``
    when nothing was recorded."""

    count: int
    """Samples recorded."""
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    p999: float | None = None
    """The 99.9th percentile."""
    max: float | None = None
    mean: float | None = None
    """total / count since version 6 (HdrHistogram's bucket mean before)."""
    total: float | None = None
    """Sum of all samples, ms (version 2 on)."""
    ladder: list[tuple[Number, float]] | None = None
    """``[[percentile, ms], ...]`` at 0, 10, 25, 50, 75, 90, 95, 99, 99.9, 99.99, 100 (version 5 on, where a
    report plots the whole distribution)."""
    below_zero: int | None = None
    """Samples below 0 (a clock step), left out of the percentiles; only when there were any."""
    clipped: int | None = None
    """Samples above the histogram's hour, counted at its top; only when there were any."""


class Timeline(ResultsModel):
    """Cumulative counts over the elapsed seconds of a variant or a capacity step (downsampled)."""

    t_s: list[float] = []
    sent: list[int] = []
    durable: list[int] = []
    """Messages whose Parquet flush was durable by then."""
    backlog: list[int] | None = None
    """Sent but not yet durable (capacity steps)."""


class Ledger(ResultsModel):
    """Where every sent message went, read back from the sinks: sent = persisted + rejected + dropped + lost
    (+ not_persisted_expected for an external system)."""

    sent: int
    persisted: int
    """Distinct sent seq ids found in the Parquet data files."""
    rejected: int
    """Distinct sent seq ids found in the quarantine files (or rejected without a readable seq)."""
    dropped: int
    """Distinct sent seq ids in the drop log, dropped by a named policy or cause."""
    lost: int
    """sent - persisted - rejected - dropped (- not_persisted_expected): what nothing explains. Fails the run."""
    duplicates: int
    """Seq ids persisted more than once. Fails the run."""
    unexpected: int | None = None
    """Rows whose seq was never sent (another run on the same topic). Fails the run."""
    missing_seq_sample: list[int] | None = None
    """Up to 20 lost seq ids."""
    by_reason: dict[str, int] | None = None
    """Rejections by validator reason."""
    dropped_by_reason: dict[str, int] | None = None
    """Drops by cause (``opcua_queue_overflow``, ``server_outage``, a buffer policy...)."""
    unfinalised_files: list[str] | None = None
    """Files left without a footer. Fails the run."""
    redelivered: int | None = None
    """Copies the transport delivered beyond what was sent that the validator quarantined (version 4 on)."""
    quarantine_rows: int | None = None
    """Rows in the quarantine files (version 4 on)."""
    reconciled: bool | None = None
    """lost, duplicates and unexpected are 0, no file is unfinalised and the sum adds up."""
    steps: int | None = None
    """Capacity variants: how many steps this ledger sums (the sustainable ones, or all when none was)."""
    steps_offered_per_s: list[float] | None = None
    """Capacity variants: the offered rates of those steps (version 7 on)."""
    lost_in_overloaded_steps: int | None = None
    """Capacity variants: messages lost in the steps this ledger leaves out (e.g. to the broker's queue limit)."""
    not_persisted_expected: int | None = None
    """External systems: sends found in neither its output nor its rejects whose truth label says they should not
    be stored (see ``truth.expected_not_persisted``): bad input it left out, not lost (version 11 on; null for the
    built-in pipeline, whose decisions ``validation`` scores)."""
    not_persisted_by_truth: dict[str, int] | None = None
    """External systems: ``not_persisted_expected`` by truth label (version 11 on)."""


# ----------------------------------------------------------------------------- a variant


class TransportConfig(ResultsModel):
    """How the variant's messages travelled."""

    kind: str
    """``mqtt``, ``opcua``, ``both`` or ``memory``."""
    broker: str | None = None
    """``embedded`` or the broker URL (MQTT only)."""
    qos: int | None = None
    producers: int | None = None
    """Publishing threads (``bench run``) or locust users (``bench load``); version 2 on."""
    topic: str | None = None


class StreamOverrides(ResultsModel):
    """What the command line changed in the scenario's stream."""

    messages: int | None = None
    """``--messages``."""
    duration_s: float | None = None
    """``--duration``."""


class StreamConfig(ResultsModel):
    """The message stream as run."""

    planned: int
    """Messages the plan holds (after overrides)."""
    duration_s: float
    arrival: str
    """Arrival process of the phases (``uniform``, ``poisson``...)."""
    machines: int
    overrides: StreamOverrides


class VariantConfig(ResultsModel):
    """The variant's settings as run."""

    pipeline: dict[str, Any]
    """The resolved pipeline settings (``PipelineSettings`` as dumped; its own changes are the pipeline's)."""
    transport: TransportConfig | None = None
    stream: StreamConfig | None = None
    workers: int | None = None
    """Capacity variants: pipeline worker processes."""

    @property
    def flush_interval_s(self) -> float | None:
        """The buffer's timeout trigger in seconds, as the pipeline settings give it."""
        buffer = self.pipeline.get("buffer")
        value = buffer.get("flush_interval") if isinstance(buffer, dict) else None
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Throughput(ResultsModel):
    """Rates in messages (or rows) per second."""

    offered_per_s: float | None = None
    """Planned messages over the planned duration (capacity: the step's offered rate)."""
    sent_per_s: float | None = None
    persisted_per_s: float | None = None
    sink_rows_per_s: dict[str, float] | None = None
    """Per sink: rows written per second of its own flush time (sum of ``total_ms``), apart from the offered load
    (version 2 on)."""


class Latency(ResultsModel):
    """Latency distributions of a variant or a capacity step, ms."""

    end_to_end: LatencySummary | None = None
    """Per persisted row: the time its Parquet flush became durable minus its intended send time."""
    send_lag: LatencySummary | None = None
    """Actual minus intended send time, per message: large when the generator could not keep its schedule."""
    ack: LatencySummary | None = None
    """``bench load``: from a publish to its acknowledgement."""


class FlushStats(ResultsModel):
    """The flushes of one sink by one trigger."""

    count: int
    rows: int
    coalesced: int | None = None
    """Triggers that fired while a flush was running and were served by the next flush."""
    total_ms: LatencySummary
    """build + write + commit (with a ``ladder`` from version 5)."""
    build_ms: LatencySummary | None = None
    """Rows to a table / SQL parameters."""
    write_ms: LatencySummary | None = None
    """The row group or statement."""
    commit_ms: LatencySummary | None = None
    """flush + fsync, or COMMIT."""


FlushTrigger = Literal["size", "timeout", "shutdown"]


class SinkFlushes(ResultsModel):
    """One sink's flushes by what triggered them."""

    size: FlushStats | None = None
    """The buffer filled."""
    timeout: FlushStats | None = None
    """The flush interval passed."""
    shutdown: FlushStats | None = None
    """The last flush, at close: whatever was left."""

    def trigger(self, name: FlushTrigger) -> FlushStats | None:
        """The flushes of one trigger, by its name."""
        stats: FlushStats | None = getattr(self, name)
        return stats


class LockProbe(ResultsModel):
    """The readings buffer's lock, per ``put`` (version 2 on)."""

    strategy: str
    """``coarse`` or ``swap``."""
    enabled: bool | None = None
    """False when the lock probes were off (then no distributions)."""
    wait_ms: LatencySummary | None = None
    """From asking for the lock to holding it (with a ``ladder`` from version 5)."""
    hold_ms: LatencySummary | None = None
    """From holding the lock to releasing it, any holder; since version 7 without condition waits."""
    stall_ms: LatencySummary | None = None
    """The whole ``put`` as the producer sees it."""


AppendPoint: TypeAlias = tuple[float, int, float, str, float] | tuple[float, int, float, str]
"""``[mb_before, rows_before, cost_ms, trigger, total_ms]`` (``total_ms`` from version 3)."""


class AppendCost(ResultsModel):
    """Per Parquet flush: what appending cost against the size of the file appended to (version 2 on)."""

    count: int
    """Flushes measured."""
    first_ms: float | None = None
    """Median cost (write + commit) of the first five size-triggered flushes."""
    last_ms: float | None = None
    """Median cost of the last five size-triggered flushes."""
    last_over_first: float | None = None
    slope_ms_per_mb: float | None = None
    """Least-squares slope of cost on MB already in the file."""
    slope_ci95_ms_per_mb: tuple[float, float] | None = None
    """The slope's 95% interval, ``[low, high]`` (version 7 on; null below three flushes)."""
    slope_stderr_ms_per_mb: float | None = None
    """The slope's standard error (version 7 on)."""
    slope_summary: str | None = None
    """The slope with its interval in words, "flat within noise" when the interval holds 0. Older files: fitted
    from the stored points when read."""
    intercept_ms: float | None = None
    fit_last_over_first: float | None = None
    """The fitted line read at the largest over the smallest file size."""
    max_mb_before: float | None = None
    points: list[AppendPoint] | None = None
    """One per flush (at most 400, evenly thinned): ``[mb_before, rows_before, cost_ms, trigger, total_ms]``."""

    @model_validator(mode="before")
    @classmethod
    def _fit_older_files(cls, data: Any) -> Any:
        """Older files: files before version 7 have no interval; fit it from the stored points (exact unless the
        points were thinned, which the text then says)."""
        if not isinstance(data, dict) or "slope_summary" in data or not isinstance(data.get("points"), list):
            return data
        xy = [
            (float(p[0]), float(p[2]))
            for p in data["points"]
            if isinstance(p, list | tuple) and len(p) >= 3 and all(_is_number(p[i]) for i in (0, 2))
        ]
        fit = slope_fit([x for x, _ in xy], [y for _, y in xy])
        if fit is None:
            return data
        count = data.get("count")
        sampled = f" (fitted here to {len(xy):,} of {count:,} flushes)" if _is_int(count) and count > len(xy) else ""
        return {**data, "slope_summary": slope_text(fit) + sampled}


class QueueDepth(ResultsModel):
    """Sampled every 0.25 s: rows in the readings buffer and messages sent but not yet durable or dropped."""

    count: int
    """Samples."""
    depth_max: int | None = None
    depth_p50: int | None = None
    depth_p99: int | None = None
    backlog_max: int | None = None
    backlog_p99: int | None = None
    series: list[tuple[float, int, int]] | None = None
    """``[t_s, depth, backlog]`` (at most 400, evenly thinned)."""


class CpuProbe(ResultsModel):
    """Thread CPU time (user + system) of the hot path and of each sink: what ``bench gate`` judges (version 6 on)."""

    hot_path_us_per_msg: float | None = None
    """Median CPU time of decode + validate + put, one message in ``sample_every``, after the warm-up."""
    hot_path_us_mean: float | None = None
    hot_path_samples: int | None = None
    sample_every: int | None = None
    warmup_samples: int | None = None
    sink_us_per_row: dict[str, float] = {}
    """Per sink: median CPU time per row of its writes, over size-triggered flushes after the first."""
    sink_us_per_row_mean: dict[str, float] = {}
    sink_flushes_counted: dict[str, int] = {}


class ProbeOverhead(ResultsModel):
    """What the lock probes cost, measured in the same run: ns per ``put`` into a null-sink buffer, probes on and
    off (version 2 on)."""

    ns_per_put_on: float
    ns_per_put_off: float
    overhead_pct: float | None = None
    ns_per_message_off: float | None = None
    """decode + validate + put without probes: a message's cost before any I/O."""
    overhead_pct_of_message: float | None = None
    method: str


class Probes(ResultsModel):
    """In-process measurements of the built-in pipeline."""

    flush: dict[str, SinkFlushes] = {}
    """Per sink (``parquet``, ``sql``, ``quarantine``), per trigger."""
    lock: LockProbe | None = None
    append_cost: AppendCost | None = None
    queue_depth: QueueDepth | None = None
    loop_lag_ms: LatencySummary | None = None
    """With ``pipeline.runtime: asyncio``: how late a 10 ms timer on the pipeline's event loop fires."""
    cpu: CpuProbe | None = None
    overhead: ProbeOverhead | None = None


class PublisherWindow(ResultsModel):
    """MQTT QoS 1/2: the bounded window of publishes awaiting their acknowledgement (version 7 on)."""

    size: int
    in_flight_max: int
    waits: int
    """Times the publisher waited for room."""
    wait_total_s: float
    wait_max_ms: float


class Publisher(ResultsModel):
    """What the load generator handed to the transport."""

    accepted: int
    acked: int | None = None
    all_acked: bool
    not_sent: dict[str, int] | None = None
    """Messages never handed over, by reason (``server_down``, paho's error name, ``ack_timeout``); version 3 on."""
    window: PublisherWindow | None = None
    failed: int | None = None
    """``bench load``: publishes locust counted as failed."""


class PipelineStats(ResultsModel):
    """The pipeline's own counters (the ledger does not trust them; they explain it)."""

    received: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    refused_after_close: int | None = None
    dropped_by_reason: dict[str, int] | None = None
    producer_wait_ms: Number | None = None
    """Time producers were blocked on a full buffer."""
    errors: list[str]
    """Each one fails the run."""


class ValidationClass(ResultsModel):
    """One truth label: what was injected, what the policies expect, what the read-back shows."""

    injected: int
    expected: dict[str, int]
    """Decision labels the policies call for (``rejected:non_finite``, ``repaired:utc_normalised``, ``accepted``)."""
    decisions: dict[str, int]
    """What the read-back shows, ``lost`` and ``dropped:<reason>`` included."""
    mismatches: int


class Mismatch(ResultsModel):
    """One message whose decision differs from its truth."""

    seq: int
    truth: str
    problem: str


class OutputChecks(ResultsModel):
    """Checks on what was persisted."""

    rows_read_back: int
    non_finite_values: int
    files_with_naive_timestamps: int
    beyond_future_tolerance: int


class Validation(ResultsModel):
    """Validation scored against the truth (version 4 on; null without ``anomalies:``)."""

    classes: dict[str, ValidationClass]
    """Per truth label (``valid`` and every injected kind)."""
    mismatches: int
    mismatch_sample: list[Mismatch]
    """Up to 50."""
    output_checks: OutputChecks | None = None
    quarantine_rows: int | None = None
    problems: list[str] = []
    """Each one fails the run."""


class OpcUaSecurity(ResultsModel):
    """The OPC UA session's security."""

    policy_uri: str | None = None
    mode: str | None = None
    username: bool | None = None
    """Whether a user name was given (never the name)."""


class OpcUaReference(ResultsModel):
    """The same readings replayed as fast as possible (``messages``: 8,000; 2,000 in earlier results): a bare
    asyncua subscription against the pipeline."""

    messages: int
    bare_notifications_per_s: float
    pipeline_notifications_per_s: float
    pipeline_fraction: float | None = None
    """pipeline / bare: the median of the per-trial ratios (before ``fraction_trials``: best / best)."""
    fraction_trials: list[float] | None = None
    """Each trial's pipeline / bare, in run order: the spread around ``pipeline_fraction``."""
    bare_trials: list[float]
    pipeline_trials: list[float]
    method: str


class OpcUa(ResultsModel):
    """The OPC UA source's statistics (transport ``opcua`` or ``both``; version 3 on)."""

    notifications: int
    """Every data change received."""
    placeholders: int
    """BadWaitingForInitialData values, skipped."""
    readings: int
    """Joined readings handed to the pipeline."""
    incomplete: int
    """Readings that lost a value (quarantined as ``missing_field``)."""
    connection_losses: int
    resumed_at_ns: list[int]
    """Wall-clock ns of the first notification after each connection loss."""
    machines: int
    monitored_items: int
    by_status: dict[str, int]
    notifications_per_s: float | None = None
    security: OpcUaSecurity | None = None
    reference: OpcUaReference | None = None


class SqlCheck(ResultsModel):
    """The SQL table read back after the run (version 2 on)."""

    table: str
    rows: int
    created_by_run: bool | None = None
    sum_count: int | None = None
    """Per-minute aggregates: the sum of their ``count``."""
    late_beyond_retention: int | None = None
    check: str | None = None
    """``ok``, ``MISMATCH`` or ``skipped: ...``: the table must hold the Parquet data's readings."""


class Resources(ResultsModel):
    """The run's process (version 5 on)."""

    peak_rss_mb: float
    """Peak resident memory since the process started (a later variant inherits an earlier one's peak)."""


class LoadPlanWorker(ResultsModel):
    """One locust worker's share of the plan."""

    index: int
    users: int
    host: str | None = None


class LoadPlan(ResultsModel):
    """The plan the locust workers followed."""

    epoch_ns: int
    """The run's time zero on the master's clock."""
    workers: list[LoadPlanWorker]


class LoadCoverage(ResultsModel):
    """Whether the load engine published every planned message exactly once."""

    planned: int
    published: int
    failed: int
    not_published: int
    not_published_sample: list[int]
    published_twice: int
    published_twice_sample: list[int]
    outside_plan: int


class LocustRequestStats(ResultsModel):
    """A row of locust's ``_stats.csv``."""

    requests: int
    failures: int
    median_ms: float | None = None
    avg_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    requests_per_s: float | None = None
    failures_per_s: float | None = None


class LocustStats(LocustRequestStats):
    """locust's aggregated row, and one entry per request type."""

    by_type: dict[str, LocustRequestStats] = {}
    """Per request type and name (``MQTT publish``, ``MQTT connect``...)."""
    sends: str | None = None
    """The request type that is one send."""
    missing: str | None = None
    """The stats file locust did not write."""


class Load(ResultsModel):
    """``bench load``: the load engine's side (version 5 on; docs/load.md)."""

    engine: str
    workers: int
    remote_workers: int
    users: int
    user_class: str
    plan: LoadPlan
    coverage: LoadCoverage
    locust: LocustStats
    exit_codes: dict[str, int | None]
    locust_s: float | None = None
    """Wall time locust ran."""
    sent_files: list[str]
    clock_offsets_ms: dict[str, float]
    """Per worker index: its clock's offset from the master's."""
    files: list[str]
    """locust's CSV, HTML and logs in the run folder."""


class FaultLatency(ResultsModel):
    """The latency of the messages intended within a fault's window, ms: the spike the fault caused (version 10
    on)."""

    p50: float
    p99: float
    max: float


FaultLatencyKind = Literal["end_to_end", "receive"]


class FaultEvent(ResultsModel):
    """One occurrence of a timed fault (version 9 on), with what it cost (version 10 on).

    Its window runs from a little before it struck (what a naive writer held in its buffer and open file dies
    with it) to a little after the system was back; the counts are of messages intended within it."""

    kind: str
    at_s: float
    """Seconds after the first send when it struck."""
    recovered_s: float | None = None
    """Seconds from when it struck until the system was back (a restarted process subscribed again, a healed
    connection carrying messages again); null when it was not."""
    error: str | None = None
    """Why it did not recover, when it did not."""
    duration_s: float | None = None
    """How long the fault was in effect: a partition's or a full disk's length; for a kill, the time the process
    was down (version 10 on)."""
    expected_loss: bool = False
    """The configuration did not promise to survive this fault (QoS 0 in a partition, a naive pipeline killed):
    its losses are named by it, not lost (version 10 on; for older files from the rule their bench applied)."""
    named: int | None = None
    """Messages whose loss the ledger names by this fault (in ``dropped_by_reason`` under its kind). Null: not
    counted (an older file whose ledger cannot tell which of several faults of a kind named them)."""
    lost: int | None = None
    """Unexplained losses of messages intended within this fault's window. Fails the run. Null: not counted (an
    older file whose ledger lost messages somewhere)."""
    duplicated: int | None = None
    """Messages intended within the window that arrived or were stored more than once (redelivered copies
    quarantined, and rows stored twice). Null: not counted (an older file with duplicates somewhere)."""
    latency_ms: FaultLatency | None = None
    """The latency of messages intended within the window (null when none of them has a known time)."""
    latency_kind: FaultLatencyKind | None = None
    """What ``latency_ms`` measures: ``end_to_end`` (to the durable flush, known for the in-process pipeline) or
    ``receive`` (to the row's ``received_at``: all that is known of a pipeline in another process)."""
    detail: str | None = None
    """How the fault was made (``mode drop``, ``fill 2 MB tmpfs``...)."""

    @property
    def counted(self) -> bool:
        """Whether the file says what this fault cost (named, lost and duplicated all known)."""
        return self.named is not None and self.lost is not None and self.duplicated is not None


TruthOutcome = Literal["persisted", "not_persisted"]


class TruthClass(ResultsModel):
    """One truth label: how many sends carried it, and what the external system's output shows of them."""

    expected: TruthOutcome
    """What its truth label calls for: ``persisted`` (stored, repaired if need be) or ``not_persisted``."""
    sent: int
    persisted: int
    """Found in its output."""
    rejected: int
    """Found in its rejects (when it keeps them)."""
    dropped: int
    not_persisted: int
    """Found nowhere, as its truth label says it may be: counted in the ledger's ``not_persisted_expected``."""
    lost: int
    """Found nowhere though its truth label says store it: counted in the ledger's ``lost``. Fails the run."""
    reasons: dict[str, int] | None = None
    """The system's own reasons for the ones it rejected (``rejected`` where its rejects name none)."""


class Truth(ResultsModel):
    """An external system's output judged by the truth labels of what was sent (version 11 on). Its decisions are
    findings, not failures: the bench cannot know the system's policy; only a lost message fails the run."""

    rejects_kept: bool
    """Whether the system keeps what it refuses (``system.external.rejects``)."""
    expected_not_persisted: list[str]
    """The truth labels counted as expected not to be stored: the scenario's ``system.external.expect_rejected``,
    or the kinds the built-in validator rejects by default, then each anomaly's own ``expect:``."""
    classes: dict[str, TruthClass]
    """Per truth label (``valid`` and every injected kind)."""
    accepted_bad_input: dict[str, int] = {}
    """Per truth label expected not to be stored: how many were stored anyway."""
    refused_good_input: dict[str, int] = {}
    """Per truth label expected to be stored (``valid`` included): how many it rejected."""
    findings: list[str] = []
    """Those two in words, as the summary and the report show them."""


class SystemPart(ResultsModel):
    """The system under test when it ran as a process of its own (version 9 on)."""

    kind: str
    """``process``: ``python -m pipeline`` as a child of the bench; ``external``: the user's own (version 10 on)."""
    starts: int
    """How many times it was started (1 + restarts; 0 when the bench attached to one already running)."""
    exit_codes: list[int | None]
    """Each start's exit code (-9: killed by SIGKILL)."""
    durable_from: Literal["column", "watching"] | None = None
    """external: end-to-end latency from its own durable-time column, or from watching its output."""
    durable_resolution_ms: float | None = None
    """external, watching: how often the output was polled, the resolution of its end-to-end latency."""
    cpu_s: float | None = None
    """external: CPU seconds (user + system) of its process tree over every start (psutil)."""
    cpu_s_per_1k: float | None = None
    """external: cpu_s per thousand messages sent."""
    peak_rss_mb: float | None = None
    """external: the highest sum of its process tree's resident memory seen (psutil)."""
    resources_every_s: float | None = None
    """external: how often cpu_s and peak_rss_mb were sampled (a short peak between samples can be missed)."""


class Variant(ResultsModel):
    """One matrix variant of a run (``default`` without a matrix), or one worker count of a capacity sweep."""

    name: str
    config: VariantConfig
    ledger: Ledger
    throughput: Throughput
    latency_ms: Latency
    timeline: Timeline | None = None
    """Version 5 on."""
    probes: Probes
    publisher: Publisher | None = None
    pipeline: PipelineStats | None = None
    validation: Validation | None = None
    opcua: OpcUa | None = None
    sql: SqlCheck | None = None
    faults: list[dict[str, Any]] | None = None
    """The scenario's faults as run (``kind`` and its settings); version 2 on."""
    files: int | None = None
    """Parquet data files read back."""
    data_bytes: int | None = None
    """Size of the finished Parquet data files (version 6 on)."""
    resources: Resources | None = None
    load: Load | None = None
    capacity_step: str | None = None
    """Capacity variants: the folder of the step its latency, throughput and timeline come from."""
    system: SystemPart | None = None
    # Other pipeline shapes' own results (version 12 on; bench/shapes/<name>.py):
    recompute: RecomputeResult | None = None
    """The notify-and-recompute shape: staleness, recompute cost against series length, oracle."""
    forward: ForwardResult | None = None
    """Store-and-forward shape: delivered, duplicates, left in the outbox, lost (named by fault) per strategy."""
    windows: WindowsResult | None = None
    """Sliding windows behind a bounded buffer: oracle check, lateness, drops per policy, memory, CPU per tick."""
    fault_events: list[FaultEvent] | None = None
    """The timed faults that happened, in order."""
    unreadable_files: list[str] = []
    """Parquet files in the output that could not be read, each as ``path: error``; their rows are missing from
    the ledger, which is then not reconciled. Fails the run (version 10 on)."""
    truth: Truth | None = None
    """External systems: what its output shows per truth label (version 11 on)."""


# ----------------------------------------------------------------------------- capacity


class Knee(ResultsModel):
    """Where end-to-end p99 starts to climb."""

    offered_per_s: float
    p99_ms: float
    below_p99_ms: float | None = None
    """The lowest p99 below the knee."""
    method: str | None = None


class Little(ResultsModel):
    """Little's law as a check: the measured backlog against arrival rate x latency."""

    mean_in_system: float | None = None
    arrival_per_s: float | None = None
    mean_time_s: float | None = None
    predicted: float | None = None
    ratio: float | None = None
    """mean_in_system / predicted: near 1 when backlog and latency agree."""


StepVerdict = Literal["sustainable", "unsustainable", "publisher-limited"]


class CapacityStep(ResultsModel):
    """One constant-rate step of a capacity sweep (docs/capacity.md)."""

    offered_per_s: float
    sent: int | None = None
    sent_per_s: float | None = None
    send_lag_p99_ms: float | None = None
    publisher_kept_up: bool | None = None
    persisted_per_s: float | None = None
    """Least-squares slope of durable over the window after settle."""
    achieved_ratio: float | None = None
    backlog_slope_per_s: float | None = None
    backlog_start: int | None = None
    backlog_end: int | None = None
    backlog_max: int | None = None
    backlog_growing: bool | None = None
    lost: int | None = None
    ledger: Ledger | None = None
    latency_ms: Latency | None = None
    flush_ms: LatencySummary | None = None
    """Parquet flushes of every trigger in the window."""
    lock_wait_ms: LatencySummary | None = None
    cpu_pct: float | None = None
    """The pipeline workers' CPU, 100 = one core."""
    cpu_pct_per_worker: float | None = None
    rss_mb: float | None = None
    publisher_cpu_pct: float | None = None
    broker_cpu_pct: float | None = None
    """The broker process's CPU: the embedded one, or an external one on this machine found by its port (null when
    it runs elsewhere)."""
    bench_process_cpu_pct: float | None = None
    """The bench's own process's CPU during the step (null in older files)."""
    machine_cpu_pct: float | None = None
    """All cores together, 100 = every core busy."""
    little: Little | None = None
    sustainable: bool | None = None
    verdict: StepVerdict | None = None
    """Older files without it: from ``sustainable``."""
    window_s: tuple[float, float] | None = None
    """The window the slopes are fitted over: [settle, step] seconds."""
    slopes_sampled: str | None = None
    flushes_in_window: int | None = None
    timeline: Timeline | None = None
    dir: str | None = None
    """The step's folder, relative to the run folder."""
    errors: list[str] = []
    workers: int | None = None
    generator_limited: bool | None = None
    """Offered more than the publishers' calibrated ceiling (``bench capacity --calibration``); null without."""

    @model_validator(mode="before")
    @classmethod
    def _verdict_of_older_files(cls, data: Any) -> Any:
        """Older files: steps from before the verdict have only ``sustainable``."""
        if isinstance(data, dict) and data.get("verdict") is None and isinstance(data.get("sustainable"), bool):
            return {**data, "verdict": "sustainable" if data["sustainable"] else "unsustainable"}
        return data


class CapacitySeries(ResultsModel):
    """The steps of one worker count."""

    workers: int
    limit: str | None = None
    """Who was busiest at the first step the pipeline could not take."""
    limit_kind: Literal["publishers", "generator", "pipeline", "broker", "cores", "unknown"] | None = None
    """Who the limit line names (null: every step sustainable, or an older file)."""
    steps: list[CapacityStep]
    sustainable_per_s: float | None = None
    """The highest sustainable step's offered rate."""
    sustainable_step: int | None = None
    """Its index in ``steps``."""
    peak_per_s: float | None = None
    saturated: bool | None = None
    knee: Knee | None = None
    stopped: str | None = None
    """Why the sweep stopped."""
    warnings: list[str] | None = None

    def best_step(self) -> CapacityStep | None:
        """The step the sweep called sustainable: by its offered rate, else by its index."""
        if self.sustainable_per_s is not None:
            for step in self.steps:
                if math.isclose(step.offered_per_s, self.sustainable_per_s, rel_tol=1e-6):
                    return step
        index = self.sustainable_step
        return self.steps[index] if index is not None and 0 <= index < len(self.steps) else None


class UslFit(ResultsModel):
    """Universal Scalability Law: X(N) = λN / (1 + σ(N-1) + κN(N-1)) fitted to the peak per worker count."""

    lambda_: float = Field(alias="lambda")
    """λ: msg/s of one worker."""
    sigma: float
    """σ: contention."""
    kappa: float
    """κ: coherency."""
    peak_workers: float | None = None
    peak_per_s: float | None = None
    peak_kind: str | None = None
    r2: float | None = None
    points: list[tuple[int, float]] = []
    """Measured ``[N, X]``."""
    curve: list[tuple[int, float]] = []
    """Predicted ``[N, X]``."""
    note: str | None = None
    pipeline_limited: bool | None = None
    """Every series that saturated was limited by the pipeline's CPU."""


class Recommendation(ResultsModel):
    """One piece of advice with its evidence."""

    topic: str
    text: str
    evidence: str


class GeneratorPlan(ResultsModel):
    """The publisher processes a sweep needs, from a ``bench calibrate`` ceiling (docs/calibrate.md)."""

    calibration: str
    """The calibration.json given with --calibration."""
    qos: int
    ceiling_per_process_per_s: float
    """One publisher process's unpaced rate at this QoS (QoS 2: QoS 1's)."""
    headroom: float
    """Publishers are planned at this fraction of the ceiling."""
    publishers: int
    needed_publishers: int | None = None
    """For the highest offered rate at ceiling x headroom each."""
    combined_ceiling_per_s: float
    """ceiling x min(publishers, cores): a step offering more is generator-limited."""
    highest_offered_per_s: float
    warning: str | None = None


class CpuAccount(ResultsModel):
    """Where a step's CPU went, 100 = one core (``machine_pct``: 100 = every core)."""

    workers_pct: float | None = None
    publishers_pct: float | None = None
    broker_pct: float | None = None
    bench_pct: float | None = None
    sweep_pct: float
    """The sum of the roles measured."""
    machine_pct: float | None = None
    other_pct: float | None = None
    """The machine's busy CPU less the sweep's: other processes on the machine."""
    cores: int | None = None
    unmeasured: list[str] = []


class ScalingRow(ResultsModel):
    """One worker count of the scaling read-out."""

    workers: int
    sustainable_per_s: float | None = None
    vs_one_worker: float | None = None
    """Sustainable rate / one worker's."""
    peak_per_s: float | None = None
    peak_vs_one_worker: float | None = None
    generator_ceiling_per_s: float | None = None
    """The publishers' calibrated combined ceiling (null without --calibration)."""
    limit_kind: Literal["publishers", "generator", "pipeline", "broker", "cores", "unknown"] | None = None
    limit_offered_per_s: float | None = None
    """The first step that was not sustainable."""
    cpu: CpuAccount | None = None
    """At that step."""


class CapacityScaling(ResultsModel):
    """Sustained throughput per worker count beside the generator's ceiling, and why it stops growing."""

    cores: int | None = None
    generator_ceiling_per_s: float | None = None
    rows: list[ScalingRow] = []
    growth: str | None = None
    """Sustained throughput by worker count and its ratio to one worker's (null below two counts)."""
    statement: str | None = None
    """Why it stops growing, or that the sweep cannot tell (null below two counts)."""
    broker_process: str | None = None
    """What the broker's CPU figure is of (null: not measured)."""


class Capacity(ResultsModel):
    """A ``bench capacity`` sweep (version 5 on)."""

    settings: dict[str, Any] | None = None
    """The scenario's capacity section as run."""
    threshold: float | None = None
    """Share of offered that persisted must reach for a sustainable step."""
    step_s: float | None = None
    transport: str | None = None
    broker: str | None = None
    qos: int | None = None
    series: list[CapacitySeries] = []
    usl: UslFit | None = None
    """Null below two worker counts."""
    recommendations: list[Recommendation] = []
    generator: GeneratorPlan | None = None
    """With --calibration: the publishers' ceiling and how many the sweep needed (version 13)."""
    scaling: CapacityScaling | None = None
    """Sustained throughput per worker count, its growth and its limit (null in older files)."""


# ----------------------------------------------------------------------------- the file


class ScenarioRef(ResultsModel):
    """The scenario file the run was made from."""

    name: str
    path: str
    sha256: str
    seed: int


class Environment(ResultsModel):
    """Where the run ran."""

    python: str
    implementation: str
    platform: str
    machine: str
    cpus: int | None = None
    host_load: list[float] | None = None
    """1/5/15-minute load average before the run."""
    host_load_after: list[float] | None = None
    packages: dict[str, str | None]
    """Installed versions of the bench's packages (null: not installed)."""
    git_commit: str | None = None
    """The commit of the checkout the bench ran from; null outside a git checkout (version 8 on)."""


class VariantFailure(ResultsModel):
    """A matrix variant that could not run to its ledger (a sink that could not start, a broker that refused it):
    named here so a run that broke half way is not mistaken for a smaller matrix (version 10 on)."""

    variant: str
    error: str
    """What stopped it, in one line."""


class Results(ResultsModel):
    """One results.json: a run (``bench run``, ``bench load``) or a capacity sweep."""

    schema_version: int
    run_id: str
    kind: Literal["capacity"] | None = None
    """``capacity`` for a sweep; absent for a run."""
    started_at: str
    """ISO 8601, UTC."""
    scenario: ScenarioRef
    environment: Environment
    variants: list[Variant]
    """One per matrix variant that ran to its ledger, or one per worker count of a sweep."""
    failures: list[VariantFailure] = []
    """Variants that could not run to their ledger: the file holds the variants that finished and these. Any
    failure fails the run (version 10 on)."""
    capacity: Capacity | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _read_any_version(cls, data: Any, handler: ModelWrapValidatorHandler[Results]) -> Results:
        """The current version strictly; an older one migrated, keys no current field matches left out."""
        version = data.get("schema_version") if isinstance(data, dict) else None
        if not _is_int(version) or version == SCHEMA_VERSION:
            return handler(data)
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"written by a newer bench (schema_version {version}); this one reads up to {SCHEMA_VERSION}"
            )
        data = copy.deepcopy(data)
        for since, migrate in sorted(_MIGRATIONS.items()):
            if version < since:
                migrate(data)
        try:
            return handler(data)
        except ValidationError as exc:
            unknown = [tuple(e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
            if not unknown:
                raise
        for loc in unknown:
            _delete(data, loc)
        return handler(data)

    def to_json(self) -> dict[str, Any]:
        """The plain JSON object, keys as given (what a writer left unset stays out of the file)."""
        return self.model_dump(mode="python", by_alias=True, exclude_unset=True)

    def write(self, path: Path) -> None:
        """Write results.json atomically (a temporary file, then a rename)."""
        write_results(path, self)


# ----------------------------------------------------------------------------- older files


def _drop_wall_s(data: dict[str, Any]) -> None:
    for variant in _dicts(data.get("variants")):
        throughput = variant.get("throughput")
        if isinstance(throughput, dict):
            throughput.pop("wall_s", None)  # replaced by throughput.sink_rows_per_s


# The faults of version 9 whose window a ledger named its losses in: a crash; an OPC UA server outage (always).
_V9_CRASHES = frozenset({"process_kill", "process_restart"})
_V9_NAMED_AS = {"process_kill": "process_kill", "process_restart": "process_restart", "server_restart": "server_outage"}


def _account_v9_fault_events(data: dict[str, Any]) -> None:
    """Version 9's fault events say when, not what they cost: fill in what its ledger proves and no more.

    ``expected_loss`` is the rule version 9's bench applied: a crash is expected to lose unless the pipeline was
    crash-safe and fed at QoS 1 or 2; an OPC UA server outage always is. A count is filled only where the ledger
    settles it per fault: 0 lost when the ledger lost nothing, 0 duplicated when nothing arrived twice, and named
    when this is the only fault of its kind (or the ledger named nothing by that kind). Otherwise it stays null
    (not counted) rather than 0, which would claim a fault cost nothing. Durations and latencies were not
    recorded: they stay null.
    """
    for variant in _dicts(data.get("variants")):
        events = list(_dicts(variant.get("fault_events")))
        if not events:
            continue
        ledger, config = _dict(variant.get("ledger")), _dict(variant.get("config"))
        qos = _dict(config.get("transport")).get("qos")
        promised = _dict(config.get("pipeline")).get("durability") == "crash_safe" and _is_int(qos) and qos > 0
        named_by = _dict(ledger.get("dropped_by_reason"))
        of_kind = {kind: sum(1 for e in events if e.get("kind") == kind) for kind in {e.get("kind") for e in events}}
        for event in events:
            kind = event.get("kind")
            if not isinstance(kind, str) or kind not in _V9_NAMED_AS:
                continue  # no kind of version 9: nothing is known of its cost
            expected = not promised if kind in _V9_CRASHES else True
            event.setdefault("expected_loss", expected)
            named = named_by.get(_V9_NAMED_AS[kind], 0)
            if _is_int(named) and (named == 0 or of_kind[kind] == 1):
                event.setdefault("named", named)
            if ledger.get("lost") == 0:
                event.setdefault("lost", 0)
            if ledger.get("duplicates") == 0 and ledger.get("redelivered", 0) == 0:
                event.setdefault("duplicated", 0)


# A file older than the key is changed by the function before it is validated, oldest first. Additions need
# nothing (their fields are optional); this is for what was removed, renamed, or means something else now.
_MIGRATIONS = {
    2: _drop_wall_s,
    10: _account_v9_fault_events,
}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))


def _delete(data: Any, loc: Sequence[int | str]) -> None:
    """Remove the key at ``loc`` (a pydantic error location) from nested dicts and lists."""
    node = data
    for part in loc[:-1]:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (in_dict or in_list):
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(loc[-1], None)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- reading


_EXPECTED = "a run folder holding results.json, as written by `bench run`, `bench load` or `bench capacity`"


def read_results(path: Path | str) -> Results:
    """The results of a run folder or a results.json file.

    Raises :class:`~bench.errors.UsageError` naming the file when it is missing, unreadable, not JSON or not a
    bench results file (with the fields that did not match).
    """
    given = Path(path)
    file = given / RESULTS_NAME if given.is_dir() else given
    if not given.exists():
        raise UsageError(f"{given}: no such file or folder; expected {_EXPECTED}")
    if not file.is_file():
        if (given / GATE_NAME).is_file():
            raise UsageError(
                f"{given}: a gate folder (its verdict is in {GATE_NAME} and summary.md), no results.json; pass one "
                "of its replicate folders (A01, B01, ...) to report a run with the gate's verdict beside it"
            )
        raise UsageError(f"{given}: no results.json in this folder; expected {_EXPECTED}")
    if file.name != RESULTS_NAME and file.suffix != ".json":
        raise UsageError(f"{given}: not a results.json file; expected {_EXPECTED}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: cannot read it ({exc}); expected {_EXPECTED}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{file}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); expected a results.json "
            "written by `bench run`"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{file}: expected a JSON object with a 'variants' list, got {type(data).__name__}")
    try:
        return Results.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(file, exc).splitlines()
        if len(lines) > MAX_ERROR_LINES:
            lines = [*lines[:MAX_ERROR_LINES], f"... and {len(lines) - MAX_ERROR_LINES} more"]
        version = data.get("schema_version", "missing")
        raise UsageError(
            f"{file}: expected a bench results file (this bench reads schema_version 1 to {SCHEMA_VERSION}; the "
            f"file says {version}), but:\n" + "\n".join(lines)
        ) from None


def results_json_schema() -> dict[str, Any]:
    """The JSON Schema of results.json (of the current schema_version), for editors and other tools."""
    schema = Results.model_json_schema(by_alias=True)
    schema["title"] = f"iiot-bench results.json (schema_version {SCHEMA_VERSION})"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


# ----------------------------------------------------------------------------- the field reference


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every model reachable from ``root``, in the order a reader meets them."""
    seen: list[type[BaseModel]] = []

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.append(tp)
            for field in tp.model_fields.values():
                visit(field.annotation)
        for arg in get_args(tp):
            visit(arg)

    visit(root)
    return seen


def _type_text(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    names = {int: "int", float: "number", str: "string", bool: "bool"}
    if tp in names:
        return names[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if set(args) == {int, float}:
            return "number"
        plain = [a for a in args if a is not type(None)]
        texts = ["number" if set(plain) == {int, float} else _type_text(a) for a in plain]
        texts = list(dict.fromkeys(texts))
        return " or ".join(texts) + (" or null" if len(plain) < len(args) else "")
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    if origin is dict:
        return f"{{{_type_text(args[0])}: {_type_text(args[1])}}}"
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    return str(tp)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def field_reference() -> str:
    """docs/results.md's field reference, generated from the model (a test keeps the file up to date)."""
    out = []
    for model in _models(Results):
        doc = " ".join((model.__doc__ or "").split())
        out += [f"#### {model.__name__}", "", doc, "", "| field | type | |", "|---|---|---|"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            required = "" if field.is_required() else " (optional)"
            out.append(
                f"| `{key}` | {_cell(_type_text(field.annotation))}{required} | {_cell(field.description or '')} |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"
