"""results.json's ``windows`` part of a variant (a strategy under one buffer overflow policy)."""

from __future__ import annotations

# The results model's base, from bench.results.base: bench.results.model imports this module.
from bench.results.base import ResultsModel as _Part


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


class EmitDelay(_Part):
    """Per emitted window value: the virtual time the consumer emitted it minus its end (event time), s.

    The floor is ``allowed_lateness`` (the watermark trails by that) plus up to one ``evaluate_every``; the rest
    is queueing in front of the consumer (the buffer, and under ``block`` the producer's own backlog)."""

    p50_s: float
    p99_s: float
    max_s: float


class MismatchKinds(_Part):
    """The mismatches by kind."""

    missing: int = 0
    """In the oracle, not emitted."""
    extra: int = 0
    """Emitted, not in the oracle (a window the oracle has no reading in, or emitted twice)."""
    wrong: int = 0
    """Emitted and in the oracle, with another count, mean or max."""


class ExternalWindows(_Part):
    """An external pipeline's run: the readings written to its stdin, its ``windows.jsonl`` read back."""

    command: list[str]
    exit_code: int | None
    """None when it was still running at the end and had to be stopped (then SIGTERM's negative code)."""
    sent: int
    """Readings written to its stdin (all of them unless it exited early)."""
    lines_read: int
    """Window-value lines read back from windows.jsonl."""
    bad_lines: int = 0
    """Lines of windows.jsonl that are not a window value nor the counts line (see ``bad_line_sample``)."""
    bad_line_sample: list[str] = []
    reported_late: int | None = None
    """The late count from its own counts line, if it wrote one."""
    readings_counted: float | None = None
    """Readings its windows hold: the sum of counts of its shortest window over that window's slides (each
    accepted reading lies in exactly that many windows of one length). The oracle's is ``sent - oracle_late``."""
    late_counted_in: int = 0
    """Mismatched windows whose value equals the one with every late reading counted in: the watermark ignored."""
    wall_s: float
    """From its start (before the first reading is written) to its exit."""
    cpu_s: float | None = None
    """CPU seconds of its process tree from ready to exit (ShapeProcess.usage: sampled every 0.2 s, so a short
    run's last moments can be missed)."""
    cpu_s_exact: float | None = None
    """CPU seconds from start (interpreter start included) to exit, from ``getrusage(RUSAGE_CHILDREN)`` around
    it: exact for what it and the children it waited for used."""
    peak_rss_mb: float | None = None
    """The highest RSS sum of its process tree sampled while it served (None: it ended before a sample)."""
    cpu_us_per_reading: float | None = None
    """cpu_s_exact (else cpu_s) over the readings sent, microseconds: its start is included, spread over them."""
    wall_us_per_reading: float | None = None
    """wall_s over the readings sent, microseconds (unpaced: its throughput ceiling, its start included)."""


class WindowsResult(_Part):
    """Sliding windows behind a bounded buffer: correctness against the oracle, lateness, drops, memory, CPU."""

    strategy: str
    """naive or improved; ``external`` for a pipeline the user brings (see ``external``)."""
    policy: str | None = None
    """The buffer's overflow policy this variant ran with (None for an external pipeline: no buffer in front)."""
    buffer_capacity: int | None = None
    consumer_rate: float | None = None
    emitted: int
    """Window values emitted (non-empty windows, every machine, every window length)."""
    expected: int
    """Window values the oracle computes from the stream's truth with the same lateness rule."""
    mismatches: int
    """Emitted values missing from, extra to or different from the oracle's (count exact, mean and max within
    1e-9 relative). 0 means correct."""
    mismatch_sample: list[str] = []
    mismatch_kinds: MismatchKinds | None = None
    late: int | None
    """Readings older than the watermark on arrival: counted, left out of every window (an external pipeline's
    own count, None if it wrote none)."""
    oracle_late: int
    dropped: dict[str, int]
    """Rows the buffer dropped, by policy reason (empty under block)."""
    producer_wait_s: float | None = None
    """block: virtual seconds the producer waited for room (its backpressure); 0 for the drop policies."""
    producer_wait_max_s: float | None = None
    peak_elements: int | None = None
    cpu: CpuPerTick | None = None
    emit_delay: EmitDelay | None = None
    """Freshness of the built-in variants' windows on the virtual clock (None for an external pipeline)."""
    sweep: list[WindowSweepPoint] = []
    """Memory and CPU per tick against window length (run once per strategy, shown on its block variant)."""
    external: ExternalWindows | None = None
