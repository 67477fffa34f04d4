"""A bounded buffer with size and timeout flush triggers, driven by threads.

Two lock strategies, chosen by name from :data:`~pipeline.buffer_core.LOCK_STRATEGIES`:

``swap`` (improved)
    The lock guards only appending and swapping the buffer out. One flusher
    thread owns every flush and writes *outside* the lock, so a slow disk never
    makes producers wait for the write, and a size trigger racing the timeout
    trigger cannot flush twice: a trigger that fires while a flush runs is
    counted as *coalesced* and served by the next swap.
``coarse`` (naive baseline, as first implementations do)
    The lock is held across the whole flush, file or database I/O included. A
    producer that fills the buffer flushes inline; the timer thread flushes
    under the same lock. Correct (flushes are serialised) but every producer
    waits for every write.

Probes (when enabled): producer lock wait, lock hold time (any holder), and
producer stall (whole ``put``), each an HdrHistogram recorded under the lock.

A row may come with an :data:`~pipeline.model.OnDurable` callback (``put(row, on_durable)``): the flusher
thread calls the callbacks of a batch, in row order, after every sink wrote it, and never when the write
failed; a row an overflow policy drops has its callback called by the producer that caused the drop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from pipeline.buffer_core import (
    LOCK_STRATEGIES,
    BufferBook,
    BufferCore,
    BufferStatistics,
    LockKind,
    LockStrategy,
    Overflow,
    due_trigger,
    lock_strategy,
)
from pipeline.clock import Clock
from pipeline.errors import PipelineError
from pipeline.model import FlushStat, OnDurable, TriggerKind
from pipeline.probes import Recorder
from pipeline.sinks import Sink

__all__ = [
    "LOCK_STRATEGIES",
    "BufferClosed",
    "BufferStatistics",
    "FlushingBuffer",
    "due_trigger",
    "settle",
    "settle_batch",
    "write_to_sinks",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

WRITE_RETRIES = (0.1, 0.5, 2.0)


class BufferClosed(PipelineError):
    """A row was offered after :meth:`FlushingBuffer.close`; it was not accepted."""


@dataclass
class LockProbes:
    """Histograms of the buffer lock: producer wait, hold (any holder), producer stall."""

    wait: Recorder
    hold: Recorder
    stall: Recorder

    @classmethod
    def new(cls) -> LockProbes:
        return cls(Recorder(), Recorder(), Recorder())


class FlushingBuffer(Generic[T]):
    """Bounded buffer flushed by size or age into one or more sinks."""

    def __init__(
        self,
        sink: Sink[T] | Sequence[Sink[T]],
        *,
        size: int,
        flush_interval_s: float,
        capacity: int,
        clock: Clock,
        on_flush: Callable[[FlushStat], None] | None = None,
        lock: LockKind = "swap",
        overflow: Overflow = "block",
        on_drop: Callable[[T, str], None] | None = None,
        probes: bool = True,
    ) -> None:
        make_lock = lock_strategy(lock)
        self._sinks: list[Sink[T]] = [sink] if not isinstance(sink, Sequence) else list(sink)
        if not self._sinks:
            raise ValueError("need at least one sink")
        self._core: BufferCore[T] = BufferCore(
            size=size, interval_ns=int(flush_interval_s * 1e9), capacity=capacity, overflow=overflow
        )
        self._lock_kind: LockKind = lock
        # Bound once: a put that fills the buffer and a due flush call the strategy without looking it up.
        strategy: LockStrategy[T] = make_lock(self)
        self._size_reached = strategy.size_reached
        self._serve = strategy.serve
        self._clock = clock
        self._on_flush = on_flush
        self.probes: LockProbes | None = LockProbes.new() if probes else None
        self._cond = threading.Condition()
        self._closing = False
        self._book: BufferBook[T] = BufferBook(on_drop)
        self.error: BaseException | None = None
        name = "+".join(s.name for s in self._sinks)
        self._thread = threading.Thread(target=self._run, name=f"flush-{name}", daemon=True)

    @property
    def lock_kind(self) -> LockKind:
        return self._lock_kind

    def start(self) -> None:
        self._thread.start()

    # -- producers ---------------------------------------------------------

    def put(self, item: T, on_durable: OnDurable | None = None) -> None:
        """Add one row. ``block`` waits while full; the drop policies never wait.

        ``on_durable`` is called once the row is written (or dropped by the overflow policy); see the module.
        """
        t_enter = time.perf_counter_ns()
        self._cond.acquire()
        t_locked = time.perf_counter_ns()
        waited = 0  # time in cond.wait(), when the lock is released: not part of the hold
        dropped_settlers: Sequence[OnDurable] = ()
        try:
            if self.probes is not None:
                self.probes.wait.record_ns(t_locked - t_enter)
            if self._closing:
                raise BufferClosed(f"buffer of {self._thread.name} is closed; row not accepted")
            result, dropped = self._core.offer(item, self._clock.now_ns(), on_durable)
            if result == "full":
                start = time.perf_counter_ns()
                while result == "full" and not self._closing:
                    self._cond.wait()
                    result, dropped = self._core.offer(item, self._clock.now_ns(), on_durable)
                waited = time.perf_counter_ns() - start
                self._book.producer_wait_ns += waited
                if result == "full":  # type: ignore[comparison-overlap]  # mypy cannot see the loop
                    # Closing while we waited: the flusher may have written its
                    # last batch, so appending now would lose the row silently.
                    raise BufferClosed(f"buffer of {self._thread.name} closed while a producer waited")
            self._book.after_offer(result, dropped)
            if dropped is not None:
                dropped_settlers = self._core.take_dropped_settlers()
            if len(self._core) == 1:
                # The flusher sleeps without a deadline while the buffer is
                # empty; the first row starts the timeout trigger's clock.
                self._cond.notify_all()
            if len(self._core) >= self._core.size:
                self._size_reached()
        finally:
            if self.probes is not None:
                now = time.perf_counter_ns()
                self.probes.hold.record_ns(now - t_locked - waited)
                self.probes.stall.record_ns(now - t_enter)
            self._cond.release()
        if dropped_settlers:
            # Recorded by on_drop above: the policy's decision is final, the source may let the message go.
            settle(dropped_settlers)

    def request_flush(self) -> None:
        """Flush what is buffered now rather than at the next trigger; returns at once."""
        with self._cond:
            self._core.request_flush()
            self._cond.notify_all()

    def wake(self) -> None:
        """Re-evaluate the triggers now (used after a fake clock jumps)."""
        with self._cond:
            if self._book.flushing and len(self._core):
                self._book.pending_coalesced += 1
            self._cond.notify_all()

    def close(self, timeout_s: float = 60.0) -> None:
        """Flush what is left (trigger ``shutdown``), then close the sinks."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        for sink in self._sinks:
            sink.close()

    def statistics(self) -> BufferStatistics:
        with self._cond:
            return self._book.snapshot(len(self._core))

    # -- the flusher thread -------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                trigger = self._wait_for_trigger()
                # The hold starts once the wait is over: cond.wait() releases the lock while it sleeps.
                t_locked = time.perf_counter_ns()
                if trigger is None:
                    self._record_hold(t_locked)
                    return
                swapped = self._serve(trigger)
                settlers = self._core.take_settlers()
                self._record_hold(t_locked)
                if swapped is None:
                    continue
            batch, batch_id = swapped
            stats = self._write(batch, batch_id, trigger)
            with self._cond:
                self._book.flushing = False
                coalesced = self._book.take_coalesced()
                self._account(batch, stats, coalesced)
            self._report(stats, coalesced)
            settle_batch(settlers, stats is not None, batch_id)

    def _wait_for_trigger(self) -> TriggerKind | None:
        """Under the lock: block until a trigger is due; ``None`` means stop."""
        while True:
            now = self._clock.now_ns()
            trigger = self._core.due(now)
            if trigger is None and self._closing:
                return "shutdown" if len(self._core) else None
            if trigger is not None:
                return trigger
            deadline = self._core.next_deadline_ns()
            self._cond.wait(None if deadline is None else max(0.0, (deadline - now) / 1e9))

    # -- what the lock strategies do, always with the lock held ----------------

    def _flush_locked(self, trigger: TriggerKind) -> None:
        """Coarse: take and write while holding the lock (the baseline's cost)."""
        batch = self._core.take()
        settlers = self._core.take_settlers()
        batch_id = self._book.next_batch()
        stats = self._write(batch, batch_id, trigger)
        self._account(batch, stats, 0)
        self._cond.notify_all()
        self._report(stats, 0)
        settle_batch(settlers, stats is not None, batch_id)

    def _record_hold(self, t_locked: int) -> None:
        if self.probes is not None:
            self.probes.hold.record_ns(time.perf_counter_ns() - t_locked)

    def _account(self, batch: list[T], stats: list[FlushStat] | None, coalesced: int) -> None:
        self._book.account(len(batch), stats is not None, coalesced)

    def _report(self, stats: list[FlushStat] | None, coalesced: int) -> None:
        if stats is not None and self._on_flush is not None:
            for stat in stats:
                self._on_flush(replace(stat, coalesced=coalesced))

    def _write(self, batch: list[T], batch_id: int, trigger: TriggerKind) -> list[FlushStat] | None:
        stats, error = write_to_sinks(self._sinks, batch, batch_id, trigger, self._clock)
        if error is not None:
            self.error = error
        return stats


def settle(callbacks: Sequence[OnDurable]) -> None:
    """Call each callback in order; one that raises is logged and does not stop the others (nor the flusher)."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("a durable-acknowledgement callback failed")


def settle_batch(callbacks: Sequence[OnDurable], written: bool, batch_id: int) -> None:
    """After a flush: call the batch's callbacks if every sink wrote it, else say they stay unacknowledged."""
    if not callbacks:
        return
    if written:
        settle(callbacks)
    else:
        # Not acknowledged: the broker keeps them and delivers them again after a reconnect or a restart.
        log.warning("flush %d failed: its %d messages stay unacknowledged", batch_id, len(callbacks))


def write_to_sinks(
    sinks: Sequence[Sink[T]], batch: list[T], batch_id: int, trigger: TriggerKind, clock: Clock
) -> tuple[list[FlushStat] | None, BaseException | None]:
    """Write one batch to every sink in turn, retrying each with backoff.

    Returns one :class:`FlushStat` per sink, or ``None`` and the last error if
    a sink gave up (the batch then counts as failed rows, never as written).
    Blocking: drivers call it from a thread, or, as the naive async strategy
    does, on the event loop itself.
    """
    out = []
    for sink in sinks:
        started = clock.now_ns()
        cpu_started = time.thread_time_ns()
        for attempt, backoff in enumerate((*WRITE_RETRIES, None)):
            try:
                timing = sink.write_batch(batch, batch_id)
            except Exception as exc:  # a sink failure must not kill the flusher
                log.warning("sink %s: flush %d failed (attempt %d): %s", sink.name, batch_id, attempt + 1, exc)
                if backoff is None:
                    return None, exc
                time.sleep(backoff)
                continue
            out.append(
                FlushStat(
                    sink=sink.name,
                    batch_id=batch_id,
                    trigger=trigger,
                    rows=len(batch),
                    started_ns=started,
                    build_ns=timing.build_ns,
                    write_ns=timing.write_ns,
                    commit_ns=timing.commit_ns,
                    durable_ns=clock.now_ns(),
                    bytes_before=timing.bytes_before,
                    rows_before=timing.rows_before,
                    cpu_ns=time.thread_time_ns() - cpu_started,
                )
            )
            break
    return out, None
