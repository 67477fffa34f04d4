"""Producer -> bounded buffer -> consumer with sliding-window metrics: the ``windows`` shape of ``bench run``.

The generated stream (:func:`simulators.stream.stream`, with its event times) is fed **in process on a virtual
clock**: no broker, no sleeps, so a 15-minute stream runs in seconds and every figure but CPU is the same on
every run. In transit a seeded share of readings is held back (``late_fraction``), so some arrive out of order
and some after the watermark. The producer offers each reading at its arrival time to the built-in pipeline's
bounded buffer (:class:`pipeline.buffer_core.BufferCore`, once per overflow policy); the consumer takes what is
buffered, handles ``consumer_rate`` rows per second, and ticks the window engine every ``evaluate_every``.

Per variant (a strategy under one policy) the bench measures: the window values against an oracle computed
from the stream's truth (the delivered messages, the same lateness rule, brute force: :func:`oracle`), late
readings, drops by policy, the engine's peak element count and CPU per tick; per strategy, memory and CPU per
tick against window length (``memory_windows``).
"""

from __future__ import annotations

import bisect
import json
import math
import random
import statistics
import time
import tracemalloc
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness.accounting import write_run_results
from bench.harness.ledger import Ledger
from bench.results import SCHEMA_VERSION, environment
from bench.shapes.windows_settings import Policy, Strategy, WindowsSettings
from pipeline.buffer_core import DROP_REASON, BufferCore
from pipeline.windows import WindowConfig, WindowValue, make_engine
from simulators.stream import StreamSpec, stream, total_duration_s

if TYPE_CHECKING:
    from bench.harness.progress import Progress
    from bench.harness.runner import RunOptions, RunOutcome
    from bench.scenario import LoadedScenario

Key = tuple[int, str, int]
"""(window end ns, machine, window length ns)."""
Reading = tuple[int, str, int, float]
"""(seq, machine, event time ns, value): what the consumer hands the engine, in arrival order."""

REL_TOL = 1e-9
"""Mean and max are compared within this relative tolerance (and as much absolute): floating point only."""


# ----------------------------------------------------------------------------- the oracle


def oracle(
    arrivals: Iterable[tuple[str, int, float]], windows_ns: Sequence[int], slide_ns: int, lateness_ns: int
) -> tuple[dict[Key, tuple[int, float, float]], int]:
    """Every non-empty window's (count, mean, max) and the late count, by brute force from readings in arrival
    order: late = older than (newest accepted so far - lateness); a window ending at e holds [e - L, e).

    Written apart from :mod:`pipeline.windows` (sorting + bisect + exact ``math.fsum``), so a shared bug is
    unlikely."""
    kept: dict[str, list[tuple[int, float]]] = defaultdict(list)
    newest: int | None = None
    late = 0
    for machine, ts, value in arrivals:
        if newest is not None and ts < newest - lateness_ns:
            late += 1
            continue
        kept[machine].append((ts, value))
        newest = ts if newest is None else max(newest, ts)
    expected: dict[Key, tuple[int, float, float]] = {}
    for machine, readings in kept.items():
        readings.sort()
        times = [t for t, _ in readings]
        values = [v for _, v in readings]
        for window in windows_ns:
            # Ends e (multiples of the slide) with some reading in [e - L, e): the union of (t, t + L] per t.
            ends: set[int] = set()
            last_added = -1
            for t in times:
                first = t // slide_ns * slide_ns + slide_ns
                end = max(first, last_added + slide_ns)
                stop = first + window - slide_ns
                while end <= stop:
                    ends.add(end)
                    end += slide_ns
                last_added = max(last_added, stop)
            for end in ends:
                lo, hi = bisect.bisect_left(times, end - window), bisect.bisect_left(times, end)
                if hi > lo:
                    part = values[lo:hi]
                    expected[(end, machine, window)] = (hi - lo, math.fsum(part) / (hi - lo), max(part))
    return expected, late


def compare(
    emitted: Iterable[WindowValue], expected: dict[Key, tuple[int, float, float]], sample: int = 5
) -> tuple[int, list[str]]:
    """Mismatches between emitted values and the oracle's (missing, extra, emitted twice, or different)."""
    seen: set[Key] = set()
    bad: list[str] = []
    for v in emitted:
        key = (v.end_ns, v.machine, v.window_ns)
        want = expected.get(key)
        if key in seen:
            bad.append(f"{_key_text(key)}: emitted twice")
        elif want is None:
            bad.append(f"{_key_text(key)}: not in the oracle (count {v.count})")
        elif v.count != want[0] or not all(
            math.isclose(a, b, rel_tol=REL_TOL, abs_tol=REL_TOL) for a, b in ((v.mean, want[1]), (v.max, want[2]))
        ):
            bad.append(
                f"{_key_text(key)}: got {v.count}/{v.mean!r}/{v.max!r}, expected {want[0]}/{want[1]!r}/{want[2]!r}"
            )
        seen.add(key)
    missing = [f"{_key_text(k)}: missing" for k in expected if k not in seen]
    return len(bad) + len(missing), (bad + missing)[:sample]


def _key_text(key: Key) -> str:
    end, machine, window = key
    return f"{machine} window {window / 1e9:g}s ending {end / 1e9:.0f}"


# ----------------------------------------------------------------------------- the feed (virtual clock)


@dataclass(frozen=True, slots=True)
class Arrival:
    arrival_ns: int
    seq: int
    machine: str
    ts_ns: int
    value: float


def arrivals(spec: StreamSpec, settings: WindowsSettings, epoch_ns: int) -> list[Arrival]:
    """The stream's readings in the order they reach the buffer: at their send time, or later for the seeded
    ``late_fraction`` held back in transit (up to ``late_delay_max``)."""
    rng = random.Random(f"{spec.seed}:windows-transit")
    delay_max = round(settings.late_delay_max * 1e9)
    out = []
    for msg in stream(spec, epoch_ns=epoch_ns):
        body = json.loads(msg.payload)  # the consumer decodes the real payload: value and event time as sent
        assert msg.ts_ns is not None  # a plain stream's messages all carry their instant
        held = rng.random() < settings.late_fraction
        delay = rng.randint(1, delay_max) if held else 0
        out.append(Arrival(msg.intended_send_ns + delay, msg.seq, msg.machine, msg.ts_ns, float(body["load_rate"])))
    out.sort(key=lambda a: (a.arrival_ns, a.seq))
    return out


@dataclass
class Delivery:
    """What went through the buffer under one policy: readings in consumption order, ticks, drops, waits."""

    policy: Policy
    batches: list[tuple[int, list[Arrival]]] = field(default_factory=list)
    """(virtual time the consumer took it, rows) in order."""
    dropped: dict[str, list[int]] = field(default_factory=dict)
    """Policy reason -> dropped seqs."""
    wait_ns: int = 0
    wait_max_ns: int = 0


def through_buffer(items: Sequence[Arrival], policy: Policy, capacity: int, consumer_rate: float) -> Delivery:
    """Offer every arrival to a bounded buffer; a consumer takes all that is buffered whenever it is free and is
    busy ``rows / consumer_rate`` seconds with it. ``block`` makes the producer wait (virtual time) for room."""
    core: BufferCore[Arrival] = BufferCore(size=capacity, interval_ns=1, capacity=capacity, overflow=policy)
    per_row_ns = 1e9 / consumer_rate
    out = Delivery(policy)
    free_at = 0  # when the consumer can take the next batch
    producer_at = 0  # block: the producer's own clock runs behind the arrivals while it waits

    def drain(until: int) -> None:
        nonlocal free_at
        while len(core) and free_at <= until:
            start = max(free_at, core.oldest_ns or 0)
            batch = core.take()
            out.batches.append((start, batch))
            free_at = start + round(len(batch) * per_row_ns)

    for item in items:
        now = max(item.arrival_ns, producer_at)
        drain(now)
        result, victim = core.offer(item, now)
        if result == "full":
            waited = free_at - now
            out.wait_ns += waited
            out.wait_max_ns = max(out.wait_max_ns, waited)
            now = free_at
            drain(now)
            result, victim = core.offer(item, now)
            assert result == "accepted", result  # the consumer just emptied it
        producer_at = now
        if result in DROP_REASON and victim is not None:
            out.dropped.setdefault(DROP_REASON[result], []).append(victim.seq)
    drain(2**62)
    return out


@dataclass
class EngineRun:
    emitted: list[WindowValue]
    accepted: int
    late: int
    peak_elements: int
    tick_cpu_ns: list[int]
    peak_bytes: int = 0


def drive(
    strategy: Strategy,
    config: WindowConfig,
    delivery: Delivery,
    evaluate_every_ns: int,
    *,
    keep: bool = True,
    trace_memory: bool = False,
) -> EngineRun:
    """Hand the delivered batches to an engine in order, ticking it every ``evaluate_every`` of virtual time."""
    engine = make_engine(strategy, config)
    emitted: list[WindowValue] = []
    cpu: list[int] = []
    peak = 0
    next_tick: int | None = None
    if trace_memory:
        tracemalloc.start()
        tracemalloc.reset_peak()

    def tick() -> None:
        nonlocal peak
        started = time.thread_time_ns()
        values = engine.advance()
        cpu.append(time.thread_time_ns() - started)
        if keep:
            emitted.extend(values)
        peak = max(peak, engine.elements())

    try:
        for taken_at, batch in delivery.batches:
            if next_tick is None:
                next_tick = taken_at + evaluate_every_ns
            while next_tick <= taken_at:
                tick()
                next_tick += evaluate_every_ns
            for row in batch:
                engine.add(row.machine, row.ts_ns, row.value)
            peak = max(peak, engine.elements())
        tick()
        rest = engine.finish()
        if keep:
            emitted.extend(rest)
        peak_bytes = tracemalloc.get_traced_memory()[1] if trace_memory else 0
    finally:
        if trace_memory:
            tracemalloc.stop()
    return EngineRun(emitted, engine.accepted, engine.late, peak, cpu, peak_bytes)


def cpu_summary(samples: Sequence[int]) -> dict[str, Any]:
    ms = sorted(s / 1e6 for s in samples) or [0.0]
    return {
        "ticks": len(samples),
        "mean_ms": round(statistics.fmean(ms), 4),
        "p99_ms": round(ms[min(len(ms) - 1, math.ceil(0.99 * len(ms)) - 1)], 4),
        "max_ms": round(ms[-1], 4),
    }


# ----------------------------------------------------------------------------- bench run


@dataclass
class VariantOutcome:
    name: str
    result: dict[str, Any]
    ledger: Ledger
    errors: list[str]


def measure(
    spec: StreamSpec, settings: WindowsSettings, capacity: int, epoch_ns: int = 1_700_000_000 * 10**9
) -> list[VariantOutcome]:
    """Every strategy under every policy, side by side on the same arrivals; the sweep once per strategy."""
    items = arrivals(spec, settings, epoch_ns)
    config = WindowConfig(settings.windows_ns(), settings.slide_ns(), settings.lateness_ns())
    every = round(settings.evaluate_every * 1e9)
    deliveries = {p: through_buffer(items, p, capacity, settings.consumer_rate) for p in settings.policies}
    sweeps: dict[Strategy, list[dict[str, Any]]] = {}
    for strategy in settings.strategies:
        points = []
        for length in settings.memory_windows:
            one = WindowConfig((round(length * 1e9),), settings.slide_ns(), settings.lateness_ns())
            no_drops = deliveries.get("block") or through_buffer(items, "block", capacity, settings.consumer_rate)
            run = drive(strategy, one, no_drops, every, keep=False, trace_memory=True)
            points.append(
                {
                    "window_s": length,
                    "peak_elements": run.peak_elements,
                    "peak_bytes": run.peak_bytes,
                    "cpu": cpu_summary(run.tick_cpu_ns),
                }
            )
        sweeps[strategy] = points
    duration = total_duration_s(spec)
    out = []
    for policy, delivery in deliveries.items():
        consumed = [(r.machine, r.ts_ns, r.value) for _, batch in delivery.batches for r in batch]
        expected, oracle_late = oracle(consumed, config.windows_ns, config.slide_ns, config.allowed_lateness_ns)
        dropped = {reason: len(seqs) for reason, seqs in delivery.dropped.items()}
        for strategy in settings.strategies:
            run = drive(strategy, config, delivery, every)
            mismatches, sample = compare(run.emitted, expected)
            name = f"{strategy}-{policy}"
            errors = [f"window values: {mismatches} mismatch(es) with the oracle, e.g. {s}" for s in sample[:1]]
            if run.late != oracle_late:
                errors.append(f"late readings: engine counted {run.late}, the oracle {oracle_late}")
            n_dropped = sum(dropped.values())
            lost = len(items) - run.accepted - run.late - n_dropped
            ledger = Ledger(
                sent=len(items),
                persisted=run.accepted,
                rejected=run.late,
                dropped=n_dropped,
                lost=lost,
                duplicates=0,
                unexpected=0,
                missing_seq_sample=[],
                by_reason={"late": run.late} if run.late else {},
                dropped_by_reason=dropped,
            )
            windows_part = {
                "strategy": strategy,
                "policy": policy,
                "buffer_capacity": capacity,
                "consumer_rate": settings.consumer_rate,
                "emitted": len(run.emitted),
                "expected": len(expected),
                "mismatches": mismatches,
                "mismatch_sample": sample,
                "late": run.late,
                "oracle_late": oracle_late,
                "dropped": dropped,
                "producer_wait_s": round(delivery.wait_ns / 1e9, 3),
                "producer_wait_max_s": round(delivery.wait_max_ns / 1e9, 3),
                "peak_elements": run.peak_elements,
                "cpu": cpu_summary(run.tick_cpu_ns),
                "sweep": sweeps[strategy] if policy == settings.policies[0] else [],
            }
            result = {
                "name": name,
                "config": {
                    "pipeline": {
                        "buffer": {"capacity": capacity, "overflow": policy},
                        "windows": {"strategy": strategy, **settings.model_dump(mode="json")},
                    }
                },
                "ledger": ledger.to_json(),
                # Throughput of a virtual-clock feed: what was offered; nothing is persisted to storage.
                "throughput": {"offered_per_s": round(len(items) / duration, 3) if duration else None},
                "latency_ms": {},
                "probes": {},
                "windows": windows_part,
            }
            out.append(VariantOutcome(name, result, ledger, errors))
    return out


def run_windows(
    loaded: LoadedScenario,
    options: RunOptions,
    run_dir: Path,
    spec: StreamSpec,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    """``bench run`` of a scenario with a ``windows:`` section."""
    from bench.harness.runner import RunOutcome, scenario_ref

    sc = loaded.scenario
    settings = sc.windows
    assert settings is not None
    run_id = f"{sc.name}-{uuid.uuid4().hex[:8]}"
    started = time.time()
    env_before = environment()
    outcomes = measure(spec, settings, sc.pipeline.buffer.capacity)
    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "scenario": scenario_ref(loaded),
        "environment": {**env_before, "host_load_after": environment()["host_load"]},
        "variants": [o.result for o in outcomes],
        "failures": [],
    }
    written = write_run_results(run_dir, results)
    return RunOutcome(run_dir, written, {o.name: o.ledger for o in outcomes}, {o.name: o.errors for o in outcomes}, {})


def summary_lines(variants: Iterable[Any]) -> list[str]:
    """The shape's figures in words, one line per variant and sweep point (for a summary or a test)."""
    lines = []
    for v in variants:
        w = v.windows
        if w is None:
            continue
        drops = ", ".join(f"{k} {n:,}" for k, n in w.dropped.items()) or "none"
        lines.append(
            f"{v.name}: {w.mismatches} mismatch(es) of {w.expected:,} windows; late {w.late:,}; drops {drops}; "
            f"producer waited {w.producer_wait_s:g} s; peak {w.peak_elements:,} elements; CPU/tick mean "
            f"{w.cpu.mean_ms:g} ms"
        )
        for p in w.sweep:
            lines.append(
                f"  {w.strategy} window {p.window_s:g} s: peak {p.peak_elements:,} elements, "
                f"{p.peak_bytes / 1024:,.0f} KiB, CPU/tick mean {p.cpu.mean_ms:g} ms, max {p.cpu.max_ms:g} ms"
            )
    return lines
