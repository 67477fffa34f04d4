"""The same buffer for pipelines that run on asyncio (as OPC UA clients do).

Lock strategies, chosen by name from :data:`~pipeline.buffer_core.LOCK_STRATEGIES` as in :mod:`pipeline.buffer`:

``swap`` (improved)
    An ``asyncio.Lock`` guards append and swap; one flusher task writes the
    swapped-out batch in a worker thread (``asyncio.to_thread``), so the event
    loop keeps serving every other coroutine during file or database I/O.
``coarse`` (naive baseline)
    The lock is held across the flush and the write runs *on the loop*: every
    subscription on that loop stalls for as long as the disk takes. The
    loop-lag probe (:class:`LoopLagProbe`) shows exactly that.

Decisions come from the shared sans-IO :class:`~pipeline.buffer_core.BufferCore`;
writing (with retries) from :func:`~pipeline.buffer.write_to_sinks`, or, with ``crash_safe``, from
:func:`~pipeline.buffer.write_until_written`, which keeps a failing sink's batch and retries it until it is
written, as in :mod:`pipeline.buffer` (with ``coarse`` those retries, and their pauses, block the loop: the
baseline's cost, as every write of it does). Callbacks that come with rows
(``put(row, on_durable)``) are called as in :mod:`pipeline.buffer`: on the loop, by the flusher task, after
the batch was written, in row order; never for a batch whose write failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Generic, TypeVar

from pipeline.buffer import (
    BufferClosed,
    LockProbes,
    SinkStall,
    close_sinks,
    settle,
    settle_batch,
    write_to_sinks,
    write_until_written,
)
from pipeline.buffer_core import (
    NOT_STALLED,
    BufferBook,
    BufferCore,
    BufferStatistics,
    LockKind,
    LockStrategy,
    Overflow,
    lock_strategy,
)
from pipeline.clock import Clock
from pipeline.model import FlushStat, OnDurable, TriggerKind
from pipeline.probes import Recorder
from pipeline.sinks import Sink

T = TypeVar("T")


class AsyncFlushingBuffer(Generic[T]):
    """Bounded buffer flushed by size or age, for use from one event loop."""

    def __init__(
        self,
        sinks: Sequence[Sink[T]],
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
        crash_safe: bool = False,
    ) -> None:
        """``crash_safe``: keep a batch a sink fails to write and retry it until it is written (see the module)."""
        make_lock = lock_strategy(lock)
        self._sinks = list(sinks)
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
        self._cond = asyncio.Condition()
        self._closing = False
        self._book: BufferBook[T] = BufferBook(on_drop)
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        name = "+".join(s.name for s in self._sinks)
        self._stall = SinkStall(name, self._core.__len__) if crash_safe else None

    @property
    def lock_kind(self) -> LockKind:
        return self._lock_kind

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="flusher")

    async def put(self, item: T, on_durable: OnDurable | None = None) -> None:
        """Add one row; ``on_durable`` is called once it is written (or dropped by the overflow policy)."""
        t_enter = time.perf_counter_ns()
        async with self._cond:
            t_locked = time.perf_counter_ns()
            waited = [0]  # time in cond.wait(), when the lock is released: not part of the hold
            try:
                dropped_settlers = await self._put_locked(item, on_durable, t_enter, t_locked, waited)
            finally:
                if self.probes is not None:
                    now = time.perf_counter_ns()
                    # Folded in bulk (LockProbes.fold), as in the threaded buffer.
                    pending = self.probes.pending
                    pending.extend((t_locked - t_enter, now - t_locked - waited[0], now - t_enter))
                    if len(pending) >= LockProbes.FOLD_AT:  # the coarse lock's flushes never reach the fold above
                        self.probes.fold()
        if dropped_settlers:
            settle(dropped_settlers)

    async def _put_locked(
        self, item: T, on_durable: OnDurable | None, t_enter: int, t_locked: int, waited: list[int]
    ) -> Sequence[OnDurable]:
        if self._closing:
            raise BufferClosed("buffer is closed; row not accepted")
        result, dropped = self._core.offer(item, self._clock.now_ns(), on_durable)
        if result == "full":
            start = time.perf_counter_ns()
            while result == "full" and not self._closing:
                await self._cond.wait()
                result, dropped = self._core.offer(item, self._clock.now_ns(), on_durable)
            waited[0] = time.perf_counter_ns() - start
            self._book.producer_wait_ns += waited[0]
            if result == "full":  # type: ignore[comparison-overlap]  # mypy cannot see the loop
                raise BufferClosed("buffer closed while a producer waited")
        self._book.after_offer(result, dropped)
        if len(self._core) == 1:
            self._cond.notify_all()
        if len(self._core) >= self._core.size:
            self._size_reached()
        return self._core.take_dropped_settlers() if dropped is not None else ()

    async def request_flush(self) -> None:
        """Flush what is buffered now rather than at the next trigger; returns without waiting for it."""
        async with self._cond:
            self._core.request_flush()
            self._cond.notify_all()

    def begin_close(self) -> None:
        """crash_safe: start the close deadline of a failing sink's retries now. Thread-safe, and callable while
        the loop is blocked (a coarse write retries on it): :meth:`pipeline.runtime.Pipeline.close` calls it
        from its own thread before it asks the loop to close."""
        if self._stall is not None:
            self._stall.begin_close()

    async def close(self) -> None:
        """Flush what is left, then close the sinks (every one; the first error is raised). crash_safe: as
        :meth:`pipeline.buffer.FlushingBuffer.close`."""
        self.begin_close()
        async with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._task is not None:
            await self._task
        if self._stall is not None:
            self._stall.report_unwritten()
        await asyncio.to_thread(close_sinks, self._sinks)

    def statistics(self) -> BufferStatistics:
        # Read from other threads for progress displays: a snapshot of ints,
        # each read atomically; exactness is not needed there.
        return self._book.snapshot(len(self._core), self._stall.figures() if self._stall is not None else NOT_STALLED)

    async def _run(self) -> None:
        while True:
            async with self._cond:
                trigger = await self._wait_for_trigger()
                if trigger is None:
                    return
                swapped = self._serve(trigger)
                settlers = self._core.take_settlers()
                if swapped is None:
                    continue
            batch, batch_id = swapped
            stats, error = await asyncio.to_thread(self._write, batch, batch_id, trigger)
            async with self._cond:
                self._book.flushing = False
                coalesced = self._book.take_coalesced()
                self._account(batch, stats, error, coalesced)
            settle_batch(settlers, stats is not None, batch_id)
            if self.probes is not None:
                self.probes.fold_if_many()

    async def _wait_for_trigger(self) -> TriggerKind | None:
        while True:
            now = self._clock.now_ns()
            trigger = self._core.due(now)
            if trigger is None and self._closing:
                return "shutdown" if len(self._core) else None
            if trigger is not None:
                return trigger
            deadline = self._core.next_deadline_ns()
            timeout = None if deadline is None else max(0.0, (deadline - now) / 1e9)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cond.wait(), timeout)

    # -- what the lock strategies do, always with the lock held ----------------

    def _flush_locked(self, trigger: TriggerKind) -> None:
        """Coarse: write right here, on the loop, holding the lock (the baseline's cost)."""
        batch = self._core.take()
        settlers = self._core.take_settlers()
        batch_id = self._book.next_batch()
        stats, error = self._write(batch, batch_id, trigger)
        self._account(batch, stats, error, 0)
        self._cond.notify_all()
        settle_batch(settlers, stats is not None, batch_id)

    def _write(
        self, batch: list[T], batch_id: int, trigger: TriggerKind
    ) -> tuple[list[FlushStat] | None, BaseException | None]:
        """Blocking: in a worker thread (swap) or on the loop (coarse)."""
        if self._stall is None:
            return write_to_sinks(self._sinks, batch, batch_id, trigger, self._clock)
        return write_until_written(self._sinks, batch, batch_id, trigger, self._clock, stall=self._stall)

    def _account(
        self, batch: list[T], stats: list[FlushStat] | None, error: BaseException | None, coalesced: int
    ) -> None:
        self._book.account(len(batch), stats is not None, coalesced)
        if stats is None:
            self.error = error
            return
        if self._on_flush is not None:
            for stat in stats:
                self._on_flush(replace(stat, coalesced=coalesced))


class LoopLagProbe:
    """How late the event loop runs a timer: the time every coroutine on it stalls.

    Sleeps ``interval_s`` again and again and records how much later than asked
    it woke up. A flush done on the loop, or a thread lock taken on it, shows as lag.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.lag = Recorder()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-probe")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            self.lag.record_ns(int((loop.time() - start - self.interval_s) * 1e9))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
