"""A bounded buffer with two flush triggers (size and timeout) and one flusher.

Producers call :meth:`FlushingBuffer.put`; a single flusher thread swaps the
buffered rows out under the lock and writes them *outside* it, so a slow disk
never makes producers wait for the write itself. Because one thread owns every
flush, a size trigger racing the timeout trigger cannot produce two flushes of
the same rows: a trigger that fires while a flush is running is counted as
*coalesced* and served by the next swap.

The decision "is a flush due?" is the pure function :func:`due_trigger`, tested
on a fake clock without threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from pipeline.clock import Clock
from pipeline.errors import PipelineError
from pipeline.model import FlushStat, TriggerKind
from pipeline.sinks import Sink

T = TypeVar("T")
log = logging.getLogger(__name__)

WRITE_RETRIES = (0.1, 0.5, 2.0)


class BufferClosed(PipelineError):
    """A row was offered after :meth:`FlushingBuffer.close`; it was not accepted."""


def due_trigger(now_ns: int, count: int, oldest_ns: int | None, size: int, interval_ns: int) -> TriggerKind | None:
    """Which trigger, if any, is due now.

    >>> due_trigger(0, 10, 0, size=10, interval_ns=5)
    'size'
    >>> due_trigger(5, 1, 0, size=10, interval_ns=5)
    'timeout'
    >>> due_trigger(4, 1, 0, size=10, interval_ns=5) is None
    True
    """
    if count >= size:
        return "size"
    if count and oldest_ns is not None and now_ns - oldest_ns >= interval_ns:
        return "timeout"
    return None


@dataclass(frozen=True, slots=True)
class BufferStatistics:
    """A snapshot; values do not change after it is taken."""

    buffered: int
    accepted: int
    flushed_rows: int
    flushes: int
    coalesced: int
    failed_rows: int
    producer_wait_ns: int


class FlushingBuffer(Generic[T]):
    """Bounded buffer flushed by size or age into a :class:`~pipeline.sinks.Sink`."""

    def __init__(
        self,
        sink: Sink[T],
        *,
        size: int,
        flush_interval_s: float,
        capacity: int,
        clock: Clock,
        on_flush: Callable[[FlushStat], None] | None = None,
    ) -> None:
        if size <= 0 or capacity < size or flush_interval_s <= 0:
            raise ValueError("need size > 0, capacity >= size and flush_interval > 0")
        self._sink = sink
        self._size = size
        self._interval_ns = int(flush_interval_s * 1e9)
        self._capacity = capacity
        self._clock = clock
        self._on_flush = on_flush
        self._cond = threading.Condition()
        self._items: list[T] = []
        self._oldest_ns: int | None = None
        self._closing = False
        self._flushing = False
        self._pending_coalesced = 0
        self._batch_id = 0
        self._accepted = 0
        self._flushed_rows = 0
        self._flushes = 0
        self._coalesced = 0
        self._failed_rows = 0
        self._producer_wait_ns = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"flush-{sink.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: T) -> None:
        """Add one row; blocks while the buffer is at capacity (backpressure)."""
        with self._cond:
            if self._closing:
                raise BufferClosed(f"buffer of sink {self._sink.name} is closed; row not accepted")
            if len(self._items) >= self._capacity:
                start = time.perf_counter_ns()
                while len(self._items) >= self._capacity and not self._closing:
                    self._cond.wait()
                self._producer_wait_ns += time.perf_counter_ns() - start
                if self._closing:
                    # The flusher may already have written its last batch: a row
                    # appended now would be counted as accepted and never written.
                    raise BufferClosed(f"buffer of sink {self._sink.name} closed while a producer waited")
            first = not self._items
            if first:
                self._oldest_ns = self._clock.now_ns()
            self._items.append(item)
            self._accepted += 1
            if first:
                # The flusher sleeps without a deadline while the buffer is
                # empty; the first row starts the timeout trigger's clock.
                self._cond.notify_all()
            if len(self._items) == self._size:
                if self._flushing:
                    self._pending_coalesced += 1
                self._cond.notify_all()

    def wake(self) -> None:
        """Re-evaluate the triggers now (used after a fake clock jumps)."""
        with self._cond:
            if self._flushing and self._items:
                self._pending_coalesced += 1
            self._cond.notify_all()

    def close(self, timeout_s: float = 60.0) -> None:
        """Flush what is left (trigger ``shutdown``), then close the sink."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sink.close()

    def statistics(self) -> BufferStatistics:
        with self._cond:
            return BufferStatistics(
                buffered=len(self._items),
                accepted=self._accepted,
                flushed_rows=self._flushed_rows,
                flushes=self._flushes,
                coalesced=self._coalesced,
                failed_rows=self._failed_rows,
                producer_wait_ns=self._producer_wait_ns,
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = self._clock.now_ns()
                    trigger = due_trigger(now, len(self._items), self._oldest_ns, self._size, self._interval_ns)
                    if trigger is None and self._closing:
                        trigger = "shutdown" if self._items else None
                        if trigger is None:
                            return
                    if trigger is not None:
                        break
                    wait_s = None
                    if self._oldest_ns is not None:
                        wait_s = max(0.0, (self._oldest_ns + self._interval_ns - now) / 1e9)
                    self._cond.wait(wait_s)
                batch, self._items = self._items, []
                self._oldest_ns = None
                self._flushing = True
                self._batch_id += 1
                batch_id = self._batch_id
                self._cond.notify_all()  # producers blocked on capacity may go on
            stat = self._write(batch, batch_id, trigger)
            with self._cond:
                self._flushing = False
                coalesced, self._pending_coalesced = self._pending_coalesced, 0
                self._coalesced += coalesced
                if stat is None:
                    self._failed_rows += len(batch)
                else:
                    self._flushed_rows += len(batch)
                    self._flushes += 1
            if stat is not None and self._on_flush is not None:
                self._on_flush(replace(stat, coalesced=coalesced))

    def _write(self, batch: list[T], batch_id: int, trigger: TriggerKind) -> FlushStat | None:
        started = self._clock.now_ns()
        for attempt, backoff in enumerate((*WRITE_RETRIES, None)):
            try:
                timing = self._sink.write_batch(batch, batch_id)
            except Exception as exc:  # a sink failure must not kill the flusher thread
                log.warning("sink %s: flush %d failed (attempt %d): %s", self._sink.name, batch_id, attempt + 1, exc)
                if backoff is None:
                    self.error = exc
                    return None
                time.sleep(backoff)
                continue
            return FlushStat(
                sink=self._sink.name,
                batch_id=batch_id,
                trigger=trigger,
                rows=len(batch),
                started_ns=started,
                build_ns=timing.build_ns,
                write_ns=timing.write_ns,
                commit_ns=timing.commit_ns,
                durable_ns=self._clock.now_ns(),
            )
        return None
