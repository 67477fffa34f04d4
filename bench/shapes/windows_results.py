"""results.json's ``windows`` part of a variant (a strategy under one buffer overflow policy)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Part(BaseModel):
    # The same config as bench.results.model.ResultsModel; not imported from there, which imports this module.
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class CpuPerTick(_Part):
    """CPU time of the engine's tick (emit the due windows), ms, measured with ``time.thread_time_ns``."""

    ticks: int
    mean_ms: float
    p99_ms: float
    max_ms: float


class WindowSweepPoint(_Part):
    """One window length of the memory sweep: the strategy alone with that one window, block policy."""

    window_s: float
    peak_elements: int
    """Most items held at a tick: readings (naive) or buckets and max-deque entries (improved)."""
    peak_bytes: int
    """tracemalloc's peak over the feed, what the engine allocated (emitted values are not kept)."""
    cpu: CpuPerTick


class WindowsResult(_Part):
    """Sliding windows behind a bounded buffer: correctness against the oracle, lateness, drops, memory, CPU."""

    strategy: str
    policy: str
    """The buffer's overflow policy this variant ran with."""
    buffer_capacity: int
    consumer_rate: float
    emitted: int
    """Window values emitted (non-empty windows, every machine, every window length)."""
    expected: int
    """Window values the oracle computes from the stream's truth with the same lateness rule."""
    mismatches: int
    """Emitted values missing from, extra to or different from the oracle's (count exact, mean and max within
    1e-9 relative). 0 means correct."""
    mismatch_sample: list[str] = []
    late: int
    """Readings older than the watermark on arrival: counted, left out of every window."""
    oracle_late: int
    dropped: dict[str, int]
    """Rows the buffer dropped, by policy reason (empty under block)."""
    producer_wait_s: float
    """block: virtual seconds the producer waited for room (its backpressure); 0 for the drop policies."""
    producer_wait_max_s: float
    peak_elements: int
    cpu: CpuPerTick
    sweep: list[WindowSweepPoint] = []
    """Memory and CPU per tick against window length (run once per strategy, shown on its block variant)."""
