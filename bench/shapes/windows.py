"""Producer -> bounded buffer -> consumer with sliding-window metrics: the ``windows`` shape of ``bench run``.

The generated stream (:func:`simulators.stream.stream`, with its event times) is fed **in process on a virtual
clock**: no broker, no sleeps, so a 15-minute stream runs in seconds and every figure but CPU is the same on
every run. In transit a seeded share of readings is held back (``late_fraction``), so some arrive out of order
and some after the watermark. The producer offers each reading at its arrival time to the built-in pipeline's
bounded buffer (:class:`pipeline.buffer_core.BufferCore`, once per overflow policy); the consumer takes what is
buffered, handles ``consumer_rate`` rows per second, and ticks the window engine every ``evaluate_every``.

Per variant (a strategy under one policy) the bench measures: the window values against an oracle computed
from the stream's truth (the delivered messages, the same lateness rule, brute force: :func:`oracle`), late
readings, drops by policy, the engine's peak element count and CPU per tick, and freshness (each window's
emission minus its end, virtual clock); per strategy, memory and CPU per tick against window length
(``memory_windows``).

Each ``external`` entry is a process of the same shape (:func:`run_external`): the same arrivals written to its
stdin as JSON lines, unpaced and with no buffer in front, its ``{dir}/windows.jsonl`` read back and compared
with the oracle of what it was sent (docs/windows.md has the contract).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
import resource
import statistics
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import ServiceError
from bench.harness.external_sut import _Resources
from bench.harness.ledger import Ledger
from bench.shapes.external import ShapeProcess
from bench.shapes.external_settings import ShapeExternal
from bench.shapes.run_file import ShapeRunFile
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


@dataclass
class Diff:
    """Emitted values against the oracle's, by kind (each a readable line)."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    """Not in the oracle, or emitted twice."""
    wrong: list[Key] = field(default_factory=list)
    wrong_text: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.wrong)

    def kinds(self) -> dict[str, int]:
        return {"missing": len(self.missing), "extra": len(self.extra), "wrong": len(self.wrong)}

    def sample(self, n: int = 5) -> list[str]:
        return (self.wrong_text + self.extra + self.missing)[:n]


def _same(got: tuple[int, float, float], want: tuple[int, float, float]) -> bool:
    return got[0] == want[0] and all(
        math.isclose(a, b, rel_tol=REL_TOL, abs_tol=REL_TOL) for a, b in ((got[1], want[1]), (got[2], want[2]))
    )


def diff(emitted: Iterable[WindowValue], expected: dict[Key, tuple[int, float, float]]) -> Diff:
    """Emitted values against the oracle: missing, extra (or emitted twice), or wrong (count, mean or max)."""
    seen: set[Key] = set()
    out = Diff()
    for v in emitted:
        key = (v.end_ns, v.machine, v.window_ns)
        want = expected.get(key)
        if key in seen:
            out.extra.append(f"{_key_text(key)}: emitted twice")
        elif want is None:
            out.extra.append(f"{_key_text(key)}: not in the oracle (count {v.count})")
        elif not _same((v.count, v.mean, v.max), want):
            out.wrong.append(key)
            out.wrong_text.append(
                f"{_key_text(key)}: got {v.count}/{v.mean!r}/{v.max!r}, expected {want[0]}/{want[1]!r}/{want[2]!r}"
            )
        seen.add(key)
    out.missing = [f"{_key_text(k)}: missing" for k in expected if k not in seen]
    return out


def compare(
    emitted: Iterable[WindowValue], expected: dict[Key, tuple[int, float, float]], sample: int = 5
) -> tuple[int, list[str]]:
    """Mismatches between emitted values and the oracle's (missing, extra, emitted twice, or different)."""
    found = diff(emitted, expected)
    return found.count, found.sample(sample)


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
    payload: bytes = b""
    """The stream's JSON payload as sent: what an external pipeline reads on its stdin."""


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
        out.append(
            Arrival(
                msg.intended_send_ns + delay, msg.seq, msg.machine, msg.ts_ns, float(body["load_rate"]), msg.payload
            )
        )
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
    per_row_ns: float = 0.0
    """Consumer time per row: the k-th row of a batch taken at t is handled at t + k * per_row_ns."""


def through_buffer(items: Sequence[Arrival], policy: Policy, capacity: int, consumer_rate: float) -> Delivery:
    """Offer every arrival to a bounded buffer; a consumer takes all that is buffered whenever it is free and is
    busy ``rows / consumer_rate`` seconds with it. ``block`` makes the producer wait (virtual time) for room."""
    core: BufferCore[Arrival] = BufferCore(size=capacity, interval_ns=1, capacity=capacity, overflow=policy)
    per_row_ns = 1e9 / consumer_rate
    out = Delivery(policy, per_row_ns=per_row_ns)
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
    emit_delay_ns: list[int] = field(default_factory=list)
    """Per value a tick emitted (not those of the end of stream): tick time minus window end (kept ones only)."""


def drive(
    strategy: Strategy,
    config: WindowConfig,
    delivery: Delivery,
    evaluate_every_ns: int,
    *,
    keep: bool = True,
    trace_memory: bool = False,
) -> EngineRun:
    """Hand the delivered rows to an engine in order, ticking it every ``evaluate_every`` of virtual time.

    Row k of a batch taken at t is handled at t + (k + 1) * ``per_row_ns``; a tick at T sees the rows handled by
    T. The virtual clock and event time share an origin (the stream's send times are its event times), so a
    tick's time minus a window's end is how long after its end the window came out (``emit_delay_ns``)."""
    engine = make_engine(strategy, config)
    emitted: list[WindowValue] = []
    delays: list[int] = []
    cpu: list[int] = []
    peak = 0
    next_tick: int | None = None
    if trace_memory:
        tracemalloc.start()
        tracemalloc.reset_peak()

    def tick(at: int) -> None:
        nonlocal peak
        started = time.thread_time_ns()
        values = engine.advance()
        cpu.append(time.thread_time_ns() - started)
        if keep:
            emitted.extend(values)
            delays.extend(at - v.end_ns for v in values)
        peak = max(peak, engine.elements())

    per_row = delivery.per_row_ns
    try:
        for taken_at, batch in delivery.batches:
            if next_tick is None:
                next_tick = taken_at + evaluate_every_ns
            for k, row in enumerate(batch, 1):
                handled = taken_at + round(k * per_row)
                while next_tick < handled:
                    tick(next_tick)
                    next_tick += evaluate_every_ns
                engine.add(row.machine, row.ts_ns, row.value)
            peak = max(peak, engine.elements())
        if next_tick is not None:
            tick(next_tick)
        rest = engine.finish()
        if keep:
            emitted.extend(rest)
        peak_bytes = tracemalloc.get_traced_memory()[1] if trace_memory else 0
    finally:
        if trace_memory:
            tracemalloc.stop()
    return EngineRun(emitted, engine.accepted, engine.late, peak, cpu, peak_bytes, delays)


def cpu_summary(samples: Sequence[int]) -> dict[str, Any]:
    ms = sorted(s / 1e6 for s in samples) or [0.0]
    return {
        "ticks": len(samples),
        "mean_ms": round(statistics.fmean(ms), 4),
        "p99_ms": round(ms[min(len(ms) - 1, math.ceil(0.99 * len(ms)) - 1)], 4),
        "max_ms": round(ms[-1], 4),
    }


def delay_summary(samples_ns: Sequence[int]) -> dict[str, Any] | None:
    """p50 / p99 / max of emission delays (nearest rank), s; None without samples."""
    if not samples_ns:
        return None
    ordered = sorted(samples_ns)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] / 1e9, 3)

    return {"p50_s": rank(0.50), "p99_s": rank(0.99), "max_s": round(ordered[-1] / 1e9, 3)}


# ----------------------------------------------------------------------------- bench run


@dataclass
class VariantOutcome:
    name: str
    result: dict[str, Any]
    ledger: Ledger
    errors: list[str]


ProgressFn = Callable[[str, int, int, int], None]
"""(step name, step index, steps, readings done in this step): the harness turns it into a Progress."""


def measure(
    spec: StreamSpec,
    settings: WindowsSettings,
    capacity: int,
    epoch_ns: int = 1_700_000_000 * 10**9,
    *,
    items: Sequence[Arrival] | None = None,
    progress: ProgressFn | None = None,
    steps: int | None = None,
) -> list[VariantOutcome]:
    """Every strategy under every policy, side by side on the same arrivals; the sweep once per strategy.

    ``progress`` hears of each finished step (a sweep point, then a variant) out of ``steps`` (default: these)."""
    items = arrivals(spec, settings, epoch_ns) if items is None else items
    config = WindowConfig(settings.windows_ns(), settings.slide_ns(), settings.lateness_ns())
    every = round(settings.evaluate_every * 1e9)
    n_sweep = len(settings.strategies) * len(settings.memory_windows)
    total = steps if steps is not None else n_sweep + len(settings.strategies) * len(settings.policies)
    step = 0

    def done(name: str) -> None:
        nonlocal step
        if progress is not None:
            progress(name, step, total, len(items))
        step += 1

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
            done(f"sweep {strategy} {length:g}s")
        sweeps[strategy] = points
    duration = total_duration_s(spec)
    out = []
    for policy, delivery in deliveries.items():
        consumed = [(r.machine, r.ts_ns, r.value) for _, batch in delivery.batches for r in batch]
        expected, oracle_late = oracle(consumed, config.windows_ns, config.slide_ns, config.allowed_lateness_ns)
        dropped = {reason: len(seqs) for reason, seqs in delivery.dropped.items()}
        for strategy in settings.strategies:
            run = drive(strategy, config, delivery, every)
            found = diff(run.emitted, expected)
            mismatches, sample = found.count, found.sample()
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
                "mismatch_kinds": found.kinds(),
                "late": run.late,
                "oracle_late": oracle_late,
                "dropped": dropped,
                "producer_wait_s": round(delivery.wait_ns / 1e9, 3),
                "producer_wait_max_s": round(delivery.wait_max_ns / 1e9, 3),
                "peak_elements": run.peak_elements,
                "cpu": cpu_summary(run.tick_cpu_ns),
                "emit_delay": delay_summary(run.emit_delay_ns),
                "sweep": sweeps[strategy] if policy == settings.policies[0] else [],
            }
            result = {
                "name": name,
                "config": {
                    "pipeline": {
                        "buffer": {"capacity": capacity, "overflow": policy},
                        "windows": {"strategy": strategy, **_settings_json(settings)},
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
            done(name)
    return out


def _settings_json(settings: WindowsSettings) -> dict[str, Any]:
    """The windows settings as run, without the external pipelines (each external variant names its own)."""
    return settings.model_dump(mode="json", exclude={"external"})


# ----------------------------------------------------------------------------- external pipelines

OUTPUT_NAME = "windows.jsonl"
"""Where an external pipeline writes its window values: ``{dir}/windows.jsonl``."""


@dataclass
class ReadBack:
    """An external pipeline's ``windows.jsonl``, parsed."""

    values: list[WindowValue] = field(default_factory=list)
    counts: dict[str, Any] | None = None
    """Its last counts line (``{"late": n, ...}``), if any."""
    bad: list[str] = field(default_factory=list)
    bad_count: int = 0


def _number(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: expected a number, got {value!r}"[:120])
    return float(value)


def read_back(path: Path) -> ReadBack:
    """Window values (lines with ``end_ns``) and the counts line (with ``late``); anything else is a bad line."""
    out = ReadBack()
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
                if "end_ns" in body:
                    end, count = body["end_ns"], body.get("count")
                    machine = body.get("machine")
                    if not isinstance(end, int) or isinstance(end, bool):
                        raise ValueError(f"end_ns: expected an integer, got {end!r}"[:120])
                    if not isinstance(count, int) or isinstance(count, bool):
                        raise ValueError(f"count: expected an integer, got {count!r}"[:120])
                    if not isinstance(machine, str):
                        raise ValueError("machine: expected a string")
                    window = round(_number(body, "window_s") * 1e9)
                    out.values.append(
                        WindowValue(end, machine, window, count, _number(body, "mean"), _number(body, "max"))
                    )
                elif "late" in body:
                    out.counts = body
                else:
                    raise ValueError("neither a window value (end_ns) nor the counts line (late)")
            except ValueError as exc:
                out.bad_count += 1
                if len(out.bad) < 5:
                    out.bad.append(f"line {number}: {exc}")
    return out


def readings_counted(values: Iterable[WindowValue], windows_ns: Sequence[int], slide_ns: int) -> float:
    """Readings the windows hold: every accepted reading lies in exactly L / slide windows of length L (every
    end up to the last one holding it is emitted), so the shortest window's counts over that many slides."""
    shortest = min(windows_ns)
    return sum(v.count for v in values if v.window_ns == shortest) / (shortest // slide_ns)


@dataclass
class ExternalRun:
    """What feeding one external pipeline gave: its output, exit, and the bench's view of its cost."""

    sent: int
    exit_code: int | None
    wall_ns: int
    usage: dict[str, float]
    back: ReadBack
    cpu_s_exact: float | None = None


def feed_external(proc: ShapeProcess, items: Sequence[Arrival], on_sent: Callable[[int], None] | None) -> ExternalRun:
    """Write every reading's payload to its stdin in arrival order, as fast as it takes them, then close it.

    Unpaced on purpose: its windows follow event time (the watermark), not the wall clock, so pacing would not
    change what it must emit, and unpaced the time per reading is its throughput ceiling."""
    # The reaped children's CPU, before and after: exact for its process tree (the sampler can miss the last
    # 0.2 s of a short run). The bench starts no other child meanwhile (variants run one after another).
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic_ns()  # before its start, like the exact CPU: both per-reading figures include it
    proc.start()
    sent = 0
    for item in items:
        if not proc.send(item.payload):
            break
        sent += 1
        if on_sent is not None and sent % 2000 == 0:
            on_sent(sent)
    code = proc.finish()
    wall = time.monotonic_ns() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    exact = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return ExternalRun(sent, code, wall, proc.usage(), read_back(proc.folder / OUTPUT_NAME), round(exact, 3))


def judge_external(
    name: str,
    ext: ShapeExternal,
    run: ExternalRun,
    *,
    items: Sequence[Arrival],
    config: WindowConfig,
    command: list[str],
    log_path: Path,
) -> VariantOutcome:
    """Its window values against the oracle of what it was sent, its cost, and a ledger from its output."""
    fed = [(a.machine, a.ts_ns, a.value) for a in items[: run.sent]]
    windows, slide, lateness = config.windows_ns, config.slide_ns, config.allowed_lateness_ns
    expected, oracle_late = oracle(fed, windows, slide, lateness)
    found = diff(run.back.values, expected)
    # The same readings with no watermark at all: a wrong value equal to this one counted late readings in.
    everything, _ = oracle(fed, windows, slide, 2**62)
    late_in = 0
    for v in run.back.values:
        key = (v.end_ns, v.machine, v.window_ns)
        got, want_all = (v.count, v.mean, v.max), everything.get(key)
        if want_all is not None and (key not in expected or not _same(got, expected[key])) and _same(got, want_all):
            late_in += 1
    reported = run.back.counts.get("late") if run.back.counts else None
    reported_late = reported if isinstance(reported, int) and not isinstance(reported, bool) else None
    counted = readings_counted(run.back.values, windows, slide)
    errors: list[str] = []
    if run.sent < len(items):
        errors.append(
            f"the pipeline exited early (code {run.exit_code}) after {run.sent:,} of {len(items):,} readings; "
            f"its output: {log_path}"
        )
    elif run.exit_code != 0:
        errors.append(f"the pipeline exited with code {run.exit_code} (0 expected); its output: {log_path}")
    if not (proc_out := log_path.parent / OUTPUT_NAME).exists():
        errors.append(f"it wrote no {proc_out}")
    if found.count:
        kinds = ", ".join(f"{k} {n:,}" for k, n in found.kinds().items() if n)
        errors.append(
            f"window values: {found.count:,} mismatch(es) with the oracle ({kinds}), e.g. {found.sample(1)[0]}"
        )
    if run.back.bad_count:
        errors.append(f"{run.back.bad_count:,} unreadable line(s) in its {OUTPUT_NAME}, e.g. {run.back.bad[0]}")
    if reported_late is not None and reported_late != oracle_late:
        errors.append(f"late readings: it counted {reported_late:,}, the oracle {oracle_late:,}")
    persisted = min(run.sent, max(0, round(counted)))
    rejected = reported_late if reported_late is not None else oracle_late
    over = persisted + rejected - run.sent
    ledger = Ledger(
        sent=run.sent,
        persisted=persisted,
        rejected=rejected,
        dropped=0,
        lost=max(0, -over),
        duplicates=0,
        unexpected=max(0, over),
        missing_seq_sample=[],
        by_reason={"late": rejected} if rejected else {},
    )
    cpu_s, rss = run.usage.get("cpu_s"), run.usage.get("peak_rss_mb") or None  # 0: never sampled while serving
    per = max(run.sent, 1)
    # Per reading from the exact figure (its start included, a fixed cost spread over the readings): the sampled
    # one can miss most of a run shorter than a few sampling intervals.
    cpu_total = run.cpu_s_exact if run.cpu_s_exact is not None else cpu_s
    windows_part = {
        "strategy": "external",
        "emitted": len(run.back.values),
        "expected": len(expected),
        "mismatches": found.count,
        "mismatch_sample": found.sample(),
        "mismatch_kinds": found.kinds(),
        "late": reported_late,
        "oracle_late": oracle_late,
        "dropped": {},
        "external": {
            "command": command,
            "exit_code": run.exit_code,
            "sent": run.sent,
            "lines_read": len(run.back.values),
            "bad_lines": run.back.bad_count,
            "bad_line_sample": run.back.bad,
            "reported_late": reported_late,
            "readings_counted": round(counted, 3),
            "late_counted_in": late_in,
            "wall_s": round(run.wall_ns / 1e9, 3),
            "cpu_s": cpu_s,
            "cpu_s_exact": run.cpu_s_exact,
            "peak_rss_mb": rss,
            "cpu_us_per_reading": None if cpu_total is None else round(cpu_total * 1e6 / per, 3),
            "wall_us_per_reading": round(run.wall_ns / 1e3 / per, 3),
        },
    }
    result = {
        "name": name,
        "config": {"pipeline": {"shape": "windows", "external": ext.model_dump(mode="json")}},
        "ledger": ledger.to_json(),
        "throughput": {"sent_per_s": round(run.sent / max(run.wall_ns / 1e9, 1e-9), 1)},
        "latency_ms": {},
        "probes": {},
        "system": {
            "kind": "external",
            "starts": 1,
            "exit_codes": [run.exit_code],
            "cpu_s": cpu_s,
            "cpu_s_per_1k": None if cpu_s is None else round(cpu_s * 1000 / per, 4),
            "peak_rss_mb": rss,
            "resources_every_s": _Resources.EVERY_S,
        },
        "windows": windows_part,
    }
    return VariantOutcome(name, result, ledger, errors)


def run_external(
    loaded: LoadedScenario,
    index: int,
    *,
    items: Sequence[Arrival],
    config: WindowConfig,
    run_dir: Path,
    on_sent: Callable[[int], None] | None = None,
) -> VariantOutcome | str:
    """One ``windows.external`` entry: its outcome, or why it could not run (one line)."""
    settings = loaded.scenario.windows
    assert settings is not None
    ext = settings.external[index]
    where = f"{loaded.path}: windows.external[{index}]"
    proc = ShapeProcess(
        ext,
        where=where,
        scenario_dir=loaded.path.parent,
        folder=run_dir / ext.name,
        values={"seed": str(loaded.scenario.seed)},
    )
    try:
        run = feed_external(proc, items, on_sent)
    except ServiceError as exc:
        # One line (its output is in system.log): "exited with code 2 as it started", "was not ready within".
        first = str(exc).splitlines()[0].split("; its last output")[0]
        return f"{first}; its output: {proc.log_path}"
    command = [arg.format(**proc.values) for arg in ext.argv()]  # start() checked every placeholder
    return judge_external(ext.name, ext, run, items=items, config=config, command=command, log_path=proc.log_path)


def run_windows(
    loaded: LoadedScenario,
    options: RunOptions,
    run_dir: Path,
    spec: StreamSpec,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    """``bench run`` of a scenario with a ``windows:`` section."""
    from bench.harness.progress import Progress
    from bench.harness.runner import RunOutcome

    sc = loaded.scenario
    settings = sc.windows
    assert settings is not None
    run_file = ShapeRunFile.begin(loaded)
    clock_start = time.monotonic()
    items = arrivals(spec, settings, 1_700_000_000 * 10**9)
    builtin_steps = len(settings.strategies) * (len(settings.memory_windows) + len(settings.policies))
    steps = builtin_steps + len(settings.external)

    def report(name: str, step: int, total: int, done: int) -> None:
        if on_progress is None:
            return
        elapsed = time.monotonic() - clock_start
        on_progress(
            Progress(
                variant=name,
                variant_index=step,
                variants=total,
                elapsed_s=elapsed,
                planned=len(items),
                sent=done,
                received=done,
                persisted=done,
                rejected=0,
                send_rate=0.0,
                lag_s=0.0,
                backlog=0,
                phase="windows",
            )
        )

    outcomes = measure(spec, settings, sc.pipeline.buffer.capacity, items=items, progress=report, steps=steps)
    failures: dict[str, str] = {}
    config = WindowConfig(settings.windows_ns(), settings.slide_ns(), settings.lateness_ns())
    for i, ext in enumerate(settings.external):
        step = builtin_steps + i
        got = run_external(
            loaded,
            i,
            items=items,
            config=config,
            run_dir=run_dir,
            on_sent=functools.partial(report, ext.name, step, steps),
        )
        if isinstance(got, str):
            failures[ext.name] = got
        else:
            outcomes.append(got)
        report(ext.name, step, steps, len(items))
    written = run_file.write(loaded, run_dir, [o.result for o in outcomes], failures)
    return RunOutcome(
        run_dir, written, {o.name: o.ledger for o in outcomes}, {o.name: o.errors for o in outcomes}, failures
    )


def summary_lines(variants: Iterable[Any]) -> list[str]:
    """The shape's figures in words, one line per variant and sweep point (for a summary or a test)."""
    lines = []
    for v in variants:
        w = v.windows
        if w is None:
            continue
        if w.external is not None:
            e = w.external
            cpu = "-" if e.cpu_us_per_reading is None else f"{e.cpu_us_per_reading:,.1f}"
            late = "not reported" if w.late is None else f"{w.late:,}"
            exact = "-" if e.cpu_s_exact is None else f"{e.cpu_s_exact:g}"
            sampled = "-" if e.cpu_s is None else f"{e.cpu_s:g}"
            rss = "not sampled" if e.peak_rss_mb is None else f"{e.peak_rss_mb:g} MB"
            lines.append(
                f"{v.name} (external): {w.mismatches:,} mismatch(es) of {w.expected:,} windows "
                f"({_kinds(w)}; {e.late_counted_in:,} with late readings counted in); late {late} "
                f"(oracle {w.oracle_late:,}); exit {e.exit_code}; CPU {exact} s start to exit ({sampled} s sampled "
                f"from ready), {cpu} us/reading; wall {e.wall_us_per_reading:,.1f} us/reading; peak RSS {rss}"
            )
            continue
        drops = ", ".join(f"{k} {n:,}" for k, n in w.dropped.items()) or "none"
        cpu_tick = "-" if w.cpu is None else f"{w.cpu.mean_ms:g}"
        delay = (
            ""
            if w.emit_delay is None
            else f"; window out after its end p50 {w.emit_delay.p50_s:g} s / p99 {w.emit_delay.p99_s:g} s"
        )
        lines.append(
            f"{v.name}: {w.mismatches} mismatch(es) of {w.expected:,} windows; late {w.late or 0:,}; drops {drops}; "
            f"producer waited {w.producer_wait_s or 0:g} s; peak {w.peak_elements or 0:,} elements; CPU/tick mean "
            f"{cpu_tick} ms{delay}"
        )
        for p in w.sweep:
            lines.append(
                f"  {w.strategy} window {p.window_s:g} s: peak {p.peak_elements:,} elements, "
                f"{p.peak_bytes / 1024:,.0f} KiB, CPU/tick mean {p.cpu.mean_ms:g} ms, max {p.cpu.max_ms:g} ms"
            )
    return lines


def _kinds(w: Any) -> str:
    k = w.mismatch_kinds
    return "-" if k is None else f"missing {k.missing:,}, extra {k.extra:,}, wrong {k.wrong:,}"
