"""The sink seam: what a buffer flush hands its rows to.

Ship an in-memory sink beside the real ones (as httpx ships ``MockTransport``)
so tests, and users trying out their own buffer strategy, need no files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


@dataclass(frozen=True, slots=True)
class SinkTiming:
    """Where one batch's time went, in nanoseconds."""

    build_ns: int
    write_ns: int
    commit_ns: int
    bytes_before: int | None = None
    """Bytes already in the file this batch went to (largest, if several): the append-cost probe's x axis."""
    rows_before: int | None = None


class Sink(Protocol[T_contra]):
    """Receives whole batches; durable when ``write_batch`` returns."""

    name: str

    def write_batch(self, items: Sequence[T_contra], batch_id: int) -> SinkTiming: ...

    def close(self) -> None: ...


class MemorySink(Generic[T]):
    """Keeps batches in memory; thread-safe. For tests and experiments."""

    def __init__(self, name: str = "memory", delay_s: float = 0.0) -> None:
        self.name = name
        self.batches: list[tuple[int, list[T]]] = []
        self.closed = False
        self._delay_s = delay_s
        self._lock = threading.Lock()

    def write_batch(self, items: Sequence[T], batch_id: int) -> SinkTiming:
        start = time.perf_counter_ns()
        if self._delay_s:
            # Simulates slow storage so tests can make flushes overlap triggers.
            time.sleep(self._delay_s)
        with self._lock:
            self.batches.append((batch_id, list(items)))
        return SinkTiming(0, time.perf_counter_ns() - start, 0)

    def close(self) -> None:
        self.closed = True

    @property
    def items(self) -> list[T]:
        with self._lock:
            return [item for _, batch in self.batches for item in batch]


def _sleep_s(seconds: float) -> None:
    """Sleep, finishing the last half millisecond by spinning: time.sleep overshoots by ~0.1 ms, a tenth of a
    1 ms delay, which would blur the size of a proportional slowdown."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    if seconds > 0.0005:
        time.sleep(seconds - 0.0005)
    while time.perf_counter() < end:
        pass


class SlowSink(Generic[T]):
    """Wraps a sink and makes every write slower: slow storage, on purpose.

    ``delay_s`` is added to every write (a disk with a fixed cost per flush);
    ``factor`` adds that fraction of the write's own time (a disk that is
    ``factor`` x slower, e.g. 0.1 = 10% slower), the realistic regression a
    performance gate must catch. Used by the bench's ``slow_sink`` fault; the
    added time counts as write time.
    """

    def __init__(self, inner: Sink[T], delay_s: float, factor: float = 0.0) -> None:
        self.inner = inner
        self.name = inner.name
        self.delay_s = delay_s
        self.factor = factor

    def write_batch(self, items: Sequence[T], batch_id: int) -> SinkTiming:
        began = time.perf_counter_ns()
        timing = self.inner.write_batch(items, batch_id)
        # The whole write as the caller waits for it (sorting and file handling included, not only the parts
        # the sink times), so factor 0.2 makes the flush itself about 20% slower.
        own_ns = time.perf_counter_ns() - began
        start = time.perf_counter_ns()
        _sleep_s(self.delay_s + self.factor * own_ns / 1e9)
        slept = time.perf_counter_ns() - start
        return SinkTiming(
            timing.build_ns, timing.write_ns + slept, timing.commit_ns, timing.bytes_before, timing.rows_before
        )

    def close(self) -> None:
        self.inner.close()
