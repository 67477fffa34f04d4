"""The buffer's decisions, sans-IO: what to do with an offered row, which flush is due, and how a flush
uses the lock (the lock strategies, chosen by name from :data:`LOCK_STRATEGIES`).

Both drivers (threads in :mod:`pipeline.buffer`, asyncio in
:mod:`pipeline.async_buffer`) hold their own lock around these calls; the
core never blocks, never sleeps and never reads a clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from pipeline.model import OnDurable, TriggerKind

T = TypeVar("T")
Overflow = Literal["block", "drop_oldest", "drop_newest"]
LockKind = Literal["coarse", "swap"]
OfferResult = Literal["accepted", "full", "dropped_newest", "dropped_oldest"]

DROP_REASON: dict[OfferResult, str] = {
    "dropped_newest": "overflow_drop_newest",
    "dropped_oldest": "overflow_drop_oldest",
}


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


class BufferCore(Generic[T]):
    """Rows waiting for a flush, bounded by ``capacity`` with an overflow policy.

    ``block``: a full buffer refuses the row (``"full"``) and the driver makes the
    producer wait. ``drop_newest``: the offered row is dropped. ``drop_oldest``:
    the oldest buffered row is dropped to make room. Every drop is returned to the
    driver, which reports it: nothing is dropped silently.

    A row may carry an :data:`~pipeline.model.OnDurable` callback. The core keeps it beside the row and hands
    it back with the row's batch (:meth:`take_settlers`) or, for a dropped row, at once
    (:meth:`take_dropped_settlers`); the driver calls it. Rows without one cost nothing extra.
    """

    def __init__(self, *, size: int, interval_ns: int, capacity: int, overflow: Overflow) -> None:
        if size <= 0 or capacity < size or interval_ns <= 0:
            raise ValueError("need size > 0, capacity >= size and flush_interval > 0")
        self.size = size
        self.interval_ns = interval_ns
        self.capacity = capacity
        self.overflow: Overflow = overflow
        self._items: deque[T] = deque()
        self.oldest_ns: int | None = None
        # Callbacks of buffered rows that carry one, with the row's position: rows removed before it + its index.
        # A separate deque, so rows without a callback (the bench, OPC UA, MQTT acknowledging on receipt) pay
        # nothing for it.
        self._settlers: deque[tuple[int, OnDurable]] = deque()
        self._removed = 0
        self._taken_settlers: list[OnDurable] = []
        self._dropped_settlers: list[OnDurable] = []
        self._flush_requested = False

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, on_durable: OnDurable | None = None) -> int:
        """:meth:`offer`'s usual case, for a driver's hot path: with room, append ``item`` and return the count
        after it; without, change nothing and return 0 (then :meth:`offer` applies the overflow policy).

        The driver stamps a first row (count 1) itself, ``oldest_ns = now``: a clock read per batch, not per row
        (with :meth:`offer`, its ``now_ns`` argument, about a tenth of a put's cost).
        """
        items = self._items
        n = len(items)
        if n >= self.capacity:
            return 0
        if on_durable is not None:
            self._settlers.append((self._removed + n, on_durable))
        items.append(item)
        return n + 1

    def offer(self, item: T, now_ns: int, on_durable: OnDurable | None = None) -> tuple[OfferResult, T | None]:
        """Try to add ``item``; returns what happened and the row dropped, if any.

        A dropped row's callback is kept for :meth:`take_dropped_settlers`: a drop by policy is final.
        """
        count = self.add(item, on_durable)
        if count:  # the usual case first: room
            if count == 1:
                self.oldest_ns = now_ns
            return "accepted", None
        # Full.
        items = self._items
        if self.overflow == "block":
            return "full", None
        if self.overflow == "drop_newest":
            if on_durable is not None:
                self._dropped_settlers.append(on_durable)
            return "dropped_newest", item
        dropped = items.popleft()
        if self._settlers and self._settlers[0][0] == self._removed:
            self._dropped_settlers.append(self._settlers.popleft()[1])
        self._removed += 1
        if not items:
            self.oldest_ns = now_ns
        if on_durable is not None:
            self._settlers.append((self._removed + len(items), on_durable))
        items.append(item)
        return "dropped_oldest", dropped

    def request_flush(self) -> None:
        """Make a flush due now, if anything is buffered (served as a ``size`` trigger: the size that filled
        up is the source's acknowledgement window, see :meth:`pipeline.runtime.Pipeline.request_flush`)."""
        if self._items:
            self._flush_requested = True

    def due(self, now_ns: int) -> TriggerKind | None:
        if self._flush_requested:
            return "size"
        return due_trigger(now_ns, len(self._items), self.oldest_ns, self.size, self.interval_ns)

    def next_deadline_ns(self) -> int | None:
        """When the timeout trigger will be due, if anything is buffered."""
        return None if self.oldest_ns is None or not self._items else self.oldest_ns + self.interval_ns

    def take(self) -> list[T]:
        """Every buffered row, oldest first; their callbacks wait in :meth:`take_settlers`."""
        batch = list(self._items)
        self._items.clear()
        self.oldest_ns = None
        self._removed += len(batch)
        self._flush_requested = False
        if self._settlers:
            self._taken_settlers.extend(callback for _, callback in self._settlers)
            self._settlers.clear()
        return batch

    def take_settlers(self) -> Sequence[OnDurable]:
        """The callbacks of the rows :meth:`take` returned, in row order, each once.

        The driver calls them after the batch's write succeeded, and never if it failed.
        """
        if not self._taken_settlers:
            return ()
        taken, self._taken_settlers = self._taken_settlers, []
        return taken

    def take_dropped_settlers(self) -> Sequence[OnDurable]:
        """The callbacks of rows an overflow policy dropped, each once."""
        if not self._dropped_settlers:
            return ()
        dropped, self._dropped_settlers = self._dropped_settlers, []
        return dropped


@dataclass(frozen=True, slots=True)
class BufferStatistics:
    """A snapshot; values do not change after it is taken."""

    buffered: int
    accepted: int
    flushed_rows: int
    flushes: int
    coalesced: int
    failed_rows: int
    dropped: int
    producer_wait_ns: int
    stalled_s: float = 0.0
    """crash_safe: for how long a sink has been failing the write of a batch the buffer keeps retrying (0: not
    stalled)."""
    held_rows: int = 0
    """crash_safe: rows of the batch kept for a retry while a sink fails (not counted in ``buffered``)."""
    sink_failures: int = 0
    """crash_safe: failed write attempts since the start, each retried."""
    failing_sink: str | None = None
    """crash_safe: the sink that fails while stalled."""
    last_error: str | None = None
    """crash_safe: that sink's last error while stalled."""


@dataclass(frozen=True, slots=True)
class StallFigures:
    """What a crash_safe buffer's retry of a failing sink adds to its :class:`BufferStatistics`."""

    stalled_s: float = 0.0
    held_rows: int = 0
    sink_failures: int = 0
    failing_sink: str | None = None
    last_error: str | None = None


NOT_STALLED = StallFigures()


class BufferBook(Generic[T]):
    """The counters both drivers keep, and the bookkeeping around an offer and a flush.

    Not thread-safe: the driver calls it under its own lock.
    """

    def __init__(self, on_drop: Callable[[T, str], None] | None) -> None:
        self._on_drop = on_drop
        self.accepted = self.dropped = self.flushed_rows = self.flushes = 0
        self.coalesced = self.failed_rows = self.producer_wait_ns = 0
        self.pending_coalesced = 0
        self.flushing = False
        self.batch_id = 0

    def after_offer(self, result: OfferResult, dropped: T | None) -> None:
        if result != "dropped_newest":
            self.accepted += 1
        if dropped is not None:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(dropped, DROP_REASON[result])

    def size_fired(self, at_size: bool) -> None:
        """The size trigger fires once per fill; during a flush it is coalesced into the next swap."""
        if self.flushing and at_size:
            self.pending_coalesced += 1

    def next_batch(self) -> int:
        self.batch_id += 1
        return self.batch_id

    def take_coalesced(self) -> int:
        coalesced, self.pending_coalesced = self.pending_coalesced, 0
        return coalesced

    def account(self, rows: int, written: bool, coalesced: int) -> None:
        self.coalesced += coalesced
        if written:
            self.flushed_rows += rows
            self.flushes += 1
        else:
            self.failed_rows += rows

    def snapshot(self, buffered: int, stall: StallFigures = NOT_STALLED) -> BufferStatistics:
        return BufferStatistics(
            buffered=buffered,
            accepted=self.accepted,
            flushed_rows=self.flushed_rows,
            flushes=self.flushes,
            coalesced=self.coalesced,
            failed_rows=self.failed_rows,
            dropped=self.dropped,
            producer_wait_ns=self.producer_wait_ns,
            stalled_s=stall.stalled_s,
            held_rows=stall.held_rows,
            sink_failures=stall.sink_failures,
            failing_sink=stall.failing_sink,
            last_error=stall.last_error,
        )


class _Notifier(Protocol):
    def notify_all(self) -> None: ...


class LockedBuffer(Protocol[T]):
    """What a buffer driver offers its lock strategy; every call is made with the driver's lock held.

    Both drivers (threads, asyncio) keep their batch in ``_core``, their counters in ``_book`` and wake their
    flusher and blocked producers through ``_cond`` (a threading or an asyncio condition)."""

    _core: BufferCore[T]
    _book: BufferBook[T]

    @property
    def _cond(self) -> _Notifier: ...

    def _flush_locked(self, trigger: TriggerKind) -> None:
        """Take, write and account the whole batch without releasing the lock."""


class LockStrategy(Protocol[T]):
    """How a driver's flushes use its lock. Built once per driver, so a put or a flush never looks a name up."""

    def size_reached(self) -> None:
        """A producer filled the buffer (called from ``put``, lock held)."""

    def serve(self, trigger: TriggerKind) -> tuple[list[T], int] | None:
        """The flusher found ``trigger`` due (lock held): a batch to write outside the lock, or ``None`` if
        it was written already."""


class CoarseLock(Generic[T]):
    """The naive baseline: the lock is held across the whole flush, I/O included, and a producer that
    fills the buffer flushes inline. Correct (flushes are serialised), but every producer waits for every
    write."""

    def __init__(self, buffer: LockedBuffer[T]) -> None:
        self._buffer = buffer

    def size_reached(self) -> None:
        self._buffer._flush_locked("size")

    def serve(self, trigger: TriggerKind) -> tuple[list[T], int] | None:
        self._buffer._flush_locked(trigger)
        return None


class SwapLock(Generic[T]):
    """The improved strategy: the lock guards only appending and swapping the batch out; one flusher writes
    outside it (single-flight), and a size trigger that fires during a flush is coalesced into the next."""

    def __init__(self, buffer: LockedBuffer[T]) -> None:
        self._buffer = buffer

    def size_reached(self) -> None:
        """Wake the flusher; a fill during a flush is coalesced into the next swap."""
        b = self._buffer
        b._book.size_fired(len(b._core) == b._core.size)
        b._cond.notify_all()

    def serve(self, trigger: TriggerKind) -> tuple[list[T], int] | None:
        """Take the batch for the flusher to write outside the lock."""
        b = self._buffer
        batch = b._core.take()
        b._book.flushing = True
        batch_id = b._book.next_batch()
        b._cond.notify_all()  # producers blocked on a full buffer may go on
        return batch, batch_id


LockStrategyFactory = Callable[[LockedBuffer[Any]], LockStrategy[Any]]

LOCK_STRATEGIES: dict[LockKind, LockStrategyFactory] = {"coarse": CoarseLock, "swap": SwapLock}
"""Every lock strategy by name; ``pipeline.buffer.lock`` accepts exactly these keys."""


def lock_strategy(name: str) -> LockStrategyFactory:
    """The lock strategy called ``name``; an unknown name is a :class:`ValueError` that lists the known ones.

    >>> lock_strategy("swap").__name__
    'SwapLock'
    """
    if name not in LOCK_STRATEGIES:
        raise ValueError(f"lock strategy: expected one of {', '.join(LOCK_STRATEGIES)}, got {name!r}")
    return LOCK_STRATEGIES[name]
