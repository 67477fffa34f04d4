"""Sliding-window metrics over event time, sans-IO: count / mean / max per machine over the last L seconds.

Two strategies behind one interface (:class:`WindowEngine`), chosen by name from :data:`WINDOW_STRATEGIES`:

``naive``
    keeps every accepted reading of the longest window in a list per machine and recomputes each window from
    that list at every emitted boundary. Correct, but its memory grows with the readings a window holds
    (rate x window length) and so does its CPU per tick.
``improved``
    folds readings into per-slide buckets (count, sum, max); each window keeps a running count and sum over its
    finished buckets (added when a bucket finishes, subtracted when it leaves the window) and a monotonic deque
    of bucket maxima. Memory is bounded by buckets (window length / slide) per machine and window, whatever the
    rate; CPU per emitted boundary is constant per machine and window (amortised).

Event time and lateness (one rule for both, so their outputs are comparable):

- The *watermark* is the newest event time accepted so far minus ``allowed_lateness``.
- A reading whose event time is older than the watermark when it arrives is **late**: counted in
  :attr:`WindowEngine.late`, excluded from every window. Any other reading is accepted, even out of order.
- Window ends are multiples of ``slide`` (event time, ns since the epoch); the window ending at ``e`` covers
  ``[e - L, e)``. :meth:`WindowEngine.advance` emits every end not emitted yet that the watermark has reached
  (``e <= watermark``); no accepted reading can change such a window any more, since one that would is late.
- Only non-empty windows are emitted. :meth:`WindowEngine.finish` (end of stream) emits the rest.

Nothing in the engines reads a clock or does I/O: the caller decides when a tick is (every ``evaluate_every``).

``python -m pipeline.windows`` (:func:`main`) runs an engine on its own: readings as JSON lines on stdin, window
values as JSON lines out, a tick after every reading (the watermark alone decides what is due). It never imports
the bench.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal, Protocol

WindowStrategy = Literal["naive", "improved"]


@dataclass(frozen=True, slots=True)
class WindowConfig:
    """Window lengths, slide and allowed lateness, in ns. Every length a multiple of the slide."""

    windows_ns: tuple[int, ...]
    slide_ns: int
    allowed_lateness_ns: int = 0

    def __post_init__(self) -> None:
        # The scenario's validator gives the user-facing message; this guards direct use of the engine.
        if self.slide_ns <= 0 or self.allowed_lateness_ns < 0 or not self.windows_ns:
            raise ValueError("need slide > 0, allowed_lateness >= 0 and at least one window")
        for w in self.windows_ns:
            if w <= 0 or w < self.slide_ns or w % self.slide_ns:
                raise ValueError(f"window {w} ns: expected a positive multiple of the slide ({self.slide_ns} ns)")


@dataclass(frozen=True, slots=True)
class WindowValue:
    """One emitted window of one machine: the readings with event time in ``[end_ns - window_ns, end_ns)``."""

    end_ns: int
    machine: str
    window_ns: int
    count: int
    mean: float
    max: float


class WindowEngine(Protocol):
    accepted: int
    late: int

    def add(self, machine: str, ts_ns: int, value: float) -> bool:
        """Take one reading; False when it is late (counted, excluded)."""
        ...

    def advance(self) -> list[WindowValue]:
        """Emit the windows the watermark has closed since the last call (a tick)."""
        ...

    def finish(self) -> list[WindowValue]:
        """End of stream: emit every remaining non-empty window."""
        ...

    def elements(self) -> int:
        """Items the engine holds now (readings for naive, buckets and deque entries for improved)."""
        ...


class _EventTime:
    """The watermark, the lateness rule and which window ends are due: shared by both strategies."""

    def __init__(self, config: WindowConfig) -> None:
        self.config = config
        self.windows = tuple(sorted(set(config.windows_ns)))
        self.slide = config.slide_ns
        self.accepted = 0
        self.late = 0
        self._newest: int | None = None
        self._next_end: int | None = None
        """The first window end not emitted yet (None before any reading)."""
        self._emitted_any = False

    def _watermark(self) -> int | None:
        return None if self._newest is None else self._newest - self.config.allowed_lateness_ns

    def add(self, machine: str, ts_ns: int, value: float) -> bool:
        mark = self._watermark()
        if mark is not None and ts_ns < mark:
            self.late += 1
            return False
        first_end = ts_ns // self.slide * self.slide + self.slide
        if not self._emitted_any and (self._next_end is None or first_end < self._next_end):
            # Before the first emission an accepted reading may still be older than the first one seen.
            self._next_end = first_end
        self._store(machine, ts_ns, value)
        self.accepted += 1
        if self._newest is None or ts_ns > self._newest:
            self._newest = ts_ns
        return True

    def advance(self) -> list[WindowValue]:
        mark = self._watermark()
        return [] if mark is None else self._emit_through(mark)

    def finish(self) -> list[WindowValue]:
        if self._newest is None:
            return []
        # The last end whose window can hold the newest reading: e - longest <= newest.
        last = (self._newest + self.windows[-1]) // self.slide * self.slide
        out = self._emit_through(last)
        self._newest = max(self._newest, last + self.config.allowed_lateness_ns)  # anything later is late now
        return out

    def _emit_through(self, mark: int) -> list[WindowValue]:
        out: list[WindowValue] = []
        end = self._next_end
        if end is None:
            return out
        while end <= mark:
            self._emit(end, out)
            self._emitted_any = True
            end += self.slide
        self._next_end = end
        return out

    def _store(self, machine: str, ts_ns: int, value: float) -> None:
        raise NotImplementedError

    def _emit(self, end_ns: int, out: list[WindowValue]) -> None:
        raise NotImplementedError


class NaiveWindows(_EventTime):
    """A list of (event time, value) per machine; each window recomputed by scanning it at every boundary."""

    def __init__(self, config: WindowConfig) -> None:
        super().__init__(config)
        self._readings: dict[str, list[tuple[int, float]]] = {}

    def _store(self, machine: str, ts_ns: int, value: float) -> None:
        self._readings.setdefault(machine, []).append((ts_ns, value))

    def _emit(self, end_ns: int, out: list[WindowValue]) -> None:
        for machine in sorted(self._readings):
            readings = self._readings[machine]
            for window in self.windows:
                start = end_ns - window
                values = [v for t, v in readings if start <= t < end_ns]
                if values:
                    out.append(
                        WindowValue(end_ns, machine, window, len(values), sum(values) / len(values), max(values))
                    )
            # Readings older than the longest window of the next end can go; the list still holds every reading
            # of the longest window, however many the rate brings.
            keep_from = end_ns + self.slide - self.windows[-1]
            self._readings[machine] = [r for r in readings if r[0] >= keep_from]

    def elements(self) -> int:
        return sum(len(r) for r in self._readings.values())


@dataclass(slots=True)
class _Bucket:
    count: int
    total: float
    peak: float


class _Running:
    """One window of one machine: its finished buckets, running count and sum, and a monotonic max deque."""

    __slots__ = ("buckets", "count", "maxima", "total")

    def __init__(self) -> None:
        self.buckets: deque[tuple[int, _Bucket]] = deque()
        self.count = 0
        self.total = 0.0
        # (bucket index, its max), maxima strictly decreasing from the left: the front is the window's max.
        self.maxima: deque[tuple[int, float]] = deque()

    def push(self, index: int, bucket: _Bucket) -> None:
        self.buckets.append((index, bucket))
        self.count += bucket.count
        self.total += bucket.total
        while self.maxima and self.maxima[-1][1] <= bucket.peak:
            self.maxima.pop()
        self.maxima.append((index, bucket.peak))

    def evict_before(self, first: int) -> None:
        while self.buckets and self.buckets[0][0] < first:
            _, old = self.buckets.popleft()
            self.count -= old.count
            self.total -= old.total
        if self.count == 0:
            self.total = 0.0  # no rounding residue left behind by an emptied window
        while self.maxima and self.maxima[0][0] < first:
            self.maxima.popleft()


class ImprovedWindows(_EventTime):
    """Per-slide buckets, running sums and monotonic max deques: memory bounded by buckets, not readings."""

    def __init__(self, config: WindowConfig) -> None:
        super().__init__(config)
        self._open: dict[str, dict[int, _Bucket]] = {}
        """Buckets that may still change (not yet inside an emitted window), per machine."""
        self._running: dict[str, dict[int, _Running]] = {}

    def _store(self, machine: str, ts_ns: int, value: float) -> None:
        index = ts_ns // self.slide
        buckets = self._open.get(machine)
        if buckets is None:
            buckets = self._open[machine] = {}
            self._running[machine] = {w: _Running() for w in self.windows}
        bucket = buckets.get(index)
        if bucket is None:
            buckets[index] = _Bucket(1, value, value)
        else:
            bucket.count += 1
            bucket.total += value
            bucket.peak = max(bucket.peak, value)

    def _emit(self, end_ns: int, out: list[WindowValue]) -> None:
        last = end_ns // self.slide - 1  # the bucket this end finishes
        for machine in sorted(self._running):
            finished = self._open[machine].pop(last, None)
            for window, run in self._running[machine].items():
                if finished is not None:
                    run.push(last, finished)
                run.evict_before(last + 1 - window // self.slide)
                if run.count:
                    out.append(WindowValue(end_ns, machine, window, run.count, run.total / run.count, run.maxima[0][1]))

    def elements(self) -> int:
        held = sum(len(b) for b in self._open.values())
        for runs in self._running.values():
            held += sum(len(r.buckets) + len(r.maxima) for r in runs.values())
        return held


WINDOW_STRATEGIES: dict[WindowStrategy, Callable[[WindowConfig], WindowEngine]] = {
    "naive": NaiveWindows,
    "improved": ImprovedWindows,
}


def make_engine(strategy: WindowStrategy, config: WindowConfig) -> WindowEngine:
    return WINDOW_STRATEGIES[strategy](config)


def run_all(engine: WindowEngine, readings: Iterable[tuple[str, int, float]]) -> list[WindowValue]:
    """Feed readings in arrival order with a tick after each, then finish: a convenience for tests."""
    out: list[WindowValue] = []
    for machine, ts_ns, value in readings:
        engine.add(machine, ts_ns, value)
        out += engine.advance()
    return out + engine.finish()


# ----------------------------------------------------------------------------- ``python -m pipeline.windows``

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_reading(line: bytes, value_field: str) -> tuple[str, int, float]:
    """(machine, event time ns, value) of one JSON reading; ValueError naming what is wrong.

    ``ts`` is ISO 8601 with a zone (``Z`` or an offset); its microseconds are kept exactly (integer arithmetic)."""
    try:
        body = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    machine, ts, value = body.get("machine"), body.get("ts"), body.get(value_field)
    if not isinstance(machine, str):
        raise ValueError("machine: expected a string")
    if not isinstance(ts, str) or "\x00" in ts:
        raise ValueError("ts: expected an ISO 8601 string with a zone")
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        raise ValueError(f"ts: not ISO 8601: {ts[:64]!r}") from None
    if when.utcoffset() is None:
        raise ValueError(f"ts: no zone: {ts[:64]!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{value_field}: expected a finite number")
    delta = when - _EPOCH
    ts_ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    return machine, ts_ns, float(value)


def value_json(v: WindowValue) -> str:
    """One window value as the JSON line the CLI writes (and the bench reads back from an external pipeline)."""
    return json.dumps(
        {
            "end_ns": v.end_ns,
            "machine": v.machine,
            "window_s": v.window_ns / 1e9,
            "count": v.count,
            "mean": v.mean,
            "max": v.max,
        },
        separators=(",", ":"),
    )


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9, None: 10**9}
# The scenario's duration syntax (pipeline.config.parse_duration), parsed here without importing pydantic: a
# process started per run should not pay ~0.1 s of imports. A sign is accepted so the message can say "negative".


def _durations(text: str, flag: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        match = _DURATION.match(part)
        if match is None:
            raise ValueError(f"{flag}: {part.strip()!r} is not a duration; expected e.g. 500ms, 2s, 1m, 1h or seconds")
        out.append(round(float(match.group(1)) * _UNIT_NS[match.group(2)]))
    return tuple(out)


def _config(args: argparse.Namespace) -> WindowConfig:
    windows = _durations(args.windows, "--windows")
    (slide,) = _durations(args.slide, "--slide")
    (lateness,) = _durations(args.allowed_lateness, "--allowed-lateness")
    if slide <= 0:
        raise ValueError(f"--slide: {args.slide} is not above zero; expected a positive duration such as 1s")
    if lateness < 0:
        raise ValueError(f"--allowed-lateness: {args.allowed_lateness} is negative; expected 0 or more")
    for text, w in zip(args.windows.split(","), windows, strict=True):
        if w <= 0:
            raise ValueError(f"--windows: {text.strip()} is not above zero; expected positive durations")
        if w < slide:
            raise ValueError(
                f"--slide: {args.slide} is larger than the window {text.strip()}; expected slide <= window"
            )
        if w % slide:
            raise ValueError(f"--windows: {text.strip()} is not a multiple of --slide {args.slide}")
    return WindowConfig(windows, slide, lateness)


def main(argv: Sequence[str] | None = None) -> int:
    """Readings as JSON lines on stdin (arrival order) -> window values as JSON lines (``--out`` or stdout).

    A window is emitted as soon as the watermark (newest event time seen - allowed lateness) passes its end: no
    wall clock. At end of input the rest is emitted (:meth:`WindowEngine.finish`), then one last line
    ``{"readings": n, "accepted": a, "late": l, "invalid": i}``; a summary goes to stderr; exit 0."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.windows",
        description="Sliding-window count / mean / max per machine over event time, from JSON lines on stdin.",
    )
    parser.add_argument("--windows", default="10s,1m", help="window lengths, comma-separated (default 10s,1m)")
    parser.add_argument("--slide", default="1s", help="step between window ends, the bucket width (default 1s)")
    parser.add_argument("--allowed-lateness", default="2s", help="watermark = newest event time - this (default 2s)")
    parser.add_argument("--strategy", choices=sorted(WINDOW_STRATEGIES), default="improved")
    parser.add_argument("--value-field", default="load_rate", help="the numeric field to aggregate (load_rate)")
    parser.add_argument("--out", type=Path, help="write window values here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except ValueError as exc:
        parser.error(str(exc))
    engine = make_engine(args.strategy, config)
    out: IO[str] = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    readings = invalid = 0
    try:

        def write(values: list[WindowValue]) -> None:
            if values:
                out.write("".join(value_json(v) + "\n" for v in values))
                out.flush()  # a reader following the file sees each window once it is final

        for line in sys.stdin.buffer:
            if not line.strip():
                continue
            readings += 1
            try:
                machine, ts_ns, value = parse_reading(line, args.value_field)
            except ValueError as exc:
                invalid += 1
                if invalid <= 5:  # the first few say what is wrong; the count says how many
                    print(f"pipeline.windows: reading {readings} skipped: {exc}", file=sys.stderr)
                continue
            engine.add(machine, ts_ns, value)
            write(engine.advance())
        write(engine.finish())
        counts = {"readings": readings, "accepted": engine.accepted, "late": engine.late, "invalid": invalid}
        out.write(json.dumps(counts) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
    print(f"pipeline.windows: {' '.join(f'{k}={n}' for k, n in counts.items())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
