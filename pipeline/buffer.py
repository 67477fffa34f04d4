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

A failing sink (``crash_safe=False``, ``pipeline.durability: naive``): the batch is retried
:data:`WRITE_RETRIES` times, then given up: its rows count as failed, its callbacks are never called.
``crash_safe=True``: the batch is kept and retried with capped exponential backoff until it is written
(:func:`write_until_written`, :class:`SinkStall`); meanwhile the buffer keeps filling up to its capacity, where
the overflow policy applies (``block``: backpressure). Only :meth:`FlushingBuffer.close` bounds the retries
(:data:`CLOSE_RETRY_S`); what is still unwritten then is given up, unacknowledged, and logged as an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Generic, TypeVar

import numpy as np

from pipeline.buffer_core import (
    LOCK_STRATEGIES,
    NOT_STALLED,
    BufferBook,
    BufferCore,
    BufferStatistics,
    LockKind,
    LockStrategy,
    Overflow,
    StallFigures,
    due_trigger,
    lock_strategy,
)
from pipeline.clock import Clock
from pipeline.errors import PipelineError
from pipeline.model import FlushStat, OnDurable, TriggerKind
from pipeline.probes import Recorder
from pipeline.sinks import Sink, SinkTiming

__all__ = [
    "LOCK_STRATEGIES",
    "BufferClosed",
    "BufferStatistics",
    "FlushingBuffer",
    "SinkStall",
    "close_sinks",
    "due_trigger",
    "settle",
    "settle_batch",
    "write_to_sinks",
    "write_until_written",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

WRITE_RETRIES = (0.1, 0.5, 2.0)
"""naive: the waits between the attempts at writing a batch; after the last one it is given up."""

RETRY_FIRST_S = 0.1
"""crash_safe: the wait after a sink's first failed attempt at a batch; it doubles with each failure..."""
RETRY_CAP_S = 2.0
"""...up to this: a sink that comes back is written to within 2 s, and a dead one costs one attempt per 2 s."""
STALL_WARNING_EVERY_S = 10.0
"""crash_safe: while a sink keeps failing, a WARNING at most this often (the ERROR comes with the first failure)."""
CLOSE_RETRY_S = 10.0
"""crash_safe: how long :meth:`FlushingBuffer.close` keeps retrying a failing sink before it gives up what is
unwritten (never acknowledged: the broker keeps it for the next session). Bounded so that a stop finishes
before a supervisor's kill; the same for every buffer of a pipeline (:meth:`Pipeline.close` starts them all)."""


class BufferClosed(PipelineError):
    """A row was offered after :meth:`FlushingBuffer.close`; it was not accepted."""


class LockProbes:
    """Histograms of the buffer lock: producer wait, hold (any holder), producer stall.

    Every put is measured, but not recorded on the spot: a producer appends its three durations to
    :attr:`pending` (one ``extend``, about 0.05 us) and they reach the histograms in bulk, vectorised
    (:meth:`Recorder.record_array_ns`), when the flusher calls :meth:`fold` after a flush, outside the lock, or
    when :attr:`wait`, :attr:`hold` or :attr:`stall` is read. Three scalar records per put cost about 1 us, a
    tenth of the pipeline's whole chain, and inside the very lock they measure.
    """

    FOLD_AT = 3 * 65_536
    """A producer folds itself past this many pending values (no flush for a long while): memory stays bounded."""
    FOLD_AFTER_FLUSH = 3 * 16_384
    """The flusher folds once this many values are pending: a fold's fixed cost (arrays made, a dict update per
    distinct value) spread over 16,384 puts cut its cost per put from about 0.5 us (a fold per flush) to 0.2."""

    def __init__(self) -> None:
        self._wait, self._hold, self._stall = Recorder(), Recorder(), Recorder()
        self.pending: list[int] = []
        """wait, hold, stall of each put not yet folded, flat (one ``extend`` of three per put: a list of tuples
        is several times slower to turn into an array)."""
        self.pending_hold: list[int] = []
        """The flusher's own holds, not yet folded."""
        self._fold_lock = threading.Lock()

    @classmethod
    def new(cls) -> LockProbes:
        return cls()

    def fold_if_many(self) -> None:
        """What the flusher calls after each flush, outside the lock."""
        if len(self.pending) >= self.FOLD_AFTER_FLUSH:
            self.fold()

    def fold(self) -> None:
        """Move what is pending into the histograms; thread-safe, and producers may append meanwhile."""
        with self._fold_lock:
            # The lists are never replaced, only cut at their length now: an append racing with this lands
            # after the cut and waits for the next fold (slicing and del are each atomic under the GIL).
            pending, holds = self.pending, self.pending_hold
            n, m = len(pending), len(holds)
            if n:
                puts = np.array(pending[:n], dtype=np.int64).reshape(-1, 3)
                del pending[:n]
                self._wait.record_array_ns(puts[:, 0])
                self._hold.record_array_ns(puts[:, 1])
                self._stall.record_array_ns(puts[:, 2])
            if m:
                self._hold.record_array_ns(np.array(holds[:m], dtype=np.int64))
                del holds[:m]

    @property
    def wait(self) -> Recorder:
        self.fold()
        return self._wait

    @property
    def hold(self) -> Recorder:
        self.fold()
        return self._hold

    @property
    def stall(self) -> Recorder:
        self.fold()
        return self._stall


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
        crash_safe: bool = False,
    ) -> None:
        """``crash_safe``: keep a batch a sink fails to write and retry it until it is written (see the module)."""
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
        # len() of the deque, read without the lock by the stall's log lines: exact enough for a log line.
        self._stall = SinkStall(name, self._core.__len__) if crash_safe else None
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
        # Attributes read once into locals: this runs for every message.
        cond, core, probes = self._cond, self._core, self.probes
        t_enter = time.perf_counter_ns()
        cond.acquire()
        t_locked = time.perf_counter_ns()
        waited = 0  # time in cond.wait(), when the lock is released: not part of the hold
        dropped_settlers: Sequence[OnDurable] = ()
        try:
            if self._closing:
                raise BufferClosed(f"buffer of {self._thread.name} is closed; row not accepted")
            count = core.add(item, on_durable)
            if count:  # room: the usual case, without offer's result tuple and policy bookkeeping
                self._book.accepted += 1
                if count == 1:
                    core.oldest_ns = self._clock.now_ns()
            else:
                result, dropped = core.offer(item, self._clock.now_ns(), on_durable)
                if result == "full":
                    start = time.perf_counter_ns()
                    while result == "full" and not self._closing:
                        cond.wait()
                        result, dropped = core.offer(item, self._clock.now_ns(), on_durable)
                    waited = time.perf_counter_ns() - start
                    self._book.producer_wait_ns += waited
                    if result == "full":  # type: ignore[comparison-overlap]  # mypy cannot see the loop
                        # Closing while we waited: the flusher may have written its
                        # last batch, so appending now would lose the row silently.
                        raise BufferClosed(f"buffer of {self._thread.name} closed while a producer waited")
                self._book.after_offer(result, dropped)
                if dropped is not None:
                    dropped_settlers = core.take_dropped_settlers()
                count = len(core)
            if count == 1:
                # The flusher sleeps without a deadline while the buffer is
                # empty; the first row starts the timeout trigger's clock.
                cond.notify_all()
            if count == core.size:
                # Once per fill, not on every put past it: until the flusher gets the GIL to swap the batch
                # out, a fast producer goes on appending, and a notify per put (with the coalescing count
                # beside it) was 12,000 calls of 20,000 in a saturated run, about a tenth of the hot path.
                # The flusher misses nothing: it checks the size trigger under the lock before it waits.
                self._size_reached()
        finally:
            if probes is not None:
                now = time.perf_counter_ns()
                pending = probes.pending
                pending.extend((t_locked - t_enter, now - t_locked - waited, now - t_enter))
                if len(pending) >= LockProbes.FOLD_AT:
                    probes.fold()
            cond.release()
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

    def begin_close(self) -> None:
        """crash_safe: start the :data:`CLOSE_RETRY_S` deadline of a failing sink's retries now. Thread-safe and
        lock-free: a coarse flush retries with the lock held, and close() needs the lock after this."""
        if self._stall is not None:
            self._stall.begin_close()

    def close(self, timeout_s: float = 60.0) -> None:
        """Flush what is left (trigger ``shutdown``), then close the sinks (every one; the first error is raised).

        crash_safe: a failing sink is retried for at most :data:`CLOSE_RETRY_S` from here (or from
        :meth:`begin_close`); what stays unwritten is given up, unacknowledged, and logged as one error.
        """
        self.begin_close()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._stall is not None:
            self._stall.report_unwritten()
        close_sinks(self._sinks)

    def statistics(self) -> BufferStatistics:
        # A coarse flush holds the lock for as long as it writes, and crash_safe retries a failing sink under it:
        # a status display must not hang on that. Past a short wait the counters are read without the lock
        # (each an int read atomically: a snapshot a little less exact, never a stuck one).
        locked = self._cond.acquire(timeout=0.05)
        try:
            stall = self._stall.figures() if self._stall is not None else NOT_STALLED
            return self._book.snapshot(len(self._core), stall)
        finally:
            if locked:
                self._cond.release()

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
            if swapped is None:  # the coarse lock wrote the batch while holding the lock
                if self.probes is not None:
                    self.probes.fold_if_many()  # here, outside the lock, rather than in a producer's put
                continue
            batch, batch_id = swapped
            stats = self._write(batch, batch_id, trigger)
            with self._cond:
                self._book.flushing = False
                coalesced = self._book.take_coalesced()
                self._account(batch, stats, coalesced)
            self._report(stats, coalesced)
            settle_batch(settlers, stats is not None, batch_id)
            if self.probes is not None:
                self.probes.fold_if_many()  # here, outside the lock, rather than in a producer's put

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
            self.probes.pending_hold.append(time.perf_counter_ns() - t_locked)

    def _account(self, batch: list[T], stats: list[FlushStat] | None, coalesced: int) -> None:
        self._book.account(len(batch), stats is not None, coalesced)

    def _report(self, stats: list[FlushStat] | None, coalesced: int) -> None:
        if stats is not None and self._on_flush is not None:
            for stat in stats:
                self._on_flush(replace(stat, coalesced=coalesced))

    def _write(self, batch: list[T], batch_id: int, trigger: TriggerKind) -> list[FlushStat] | None:
        if self._stall is None:
            stats, error = write_to_sinks(self._sinks, batch, batch_id, trigger, self._clock)
        else:
            stats, error = write_until_written(self._sinks, batch, batch_id, trigger, self._clock, stall=self._stall)
        if error is not None:
            self.error = error
        return stats


def close_sinks(sinks: Sequence[Sink[T]]) -> None:
    """Close every sink, even after one fails (each holds files or connections of its own); raise the first error."""
    first: BaseException | None = None
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:
            if first is None:
                first = exc
            else:
                log.error("sink %s: close failed: %s", sink.name, exc)
    if first is not None:
        raise first


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
                _flush_stat(
                    sink.name,
                    batch_id,
                    trigger,
                    len(batch),
                    started=started,
                    timing=timing,
                    clock=clock,
                    cpu_started=cpu_started,
                )
            )
            break
    return out, None


def write_until_written(
    sinks: Sequence[Sink[T]],
    batch: list[T],
    batch_id: int,
    trigger: TriggerKind,
    clock: Clock,
    *,
    stall: SinkStall,
) -> tuple[list[FlushStat] | None, BaseException | None]:
    """crash_safe: write one batch to every sink in turn, retrying a failing sink until it writes.

    Backoff: :data:`RETRY_FIRST_S` doubling to :data:`RETRY_CAP_S`, for as long as it takes; ``stall`` counts
    and logs it. A sink that wrote the batch is not written again when the next one fails (the batch id
    stays the same, so a sink that wrote part of it skips that part). Only once the buffer closes are the
    retries bounded (:meth:`SinkStall.begin_close`): then, as :func:`write_to_sinks` does, ``None`` and the
    last error: the batch counts as failed rows, its callbacks are never called.
    """
    out = []
    for sink in sinks:
        started = clock.now_ns()
        cpu_started = time.thread_time_ns()
        backoff = RETRY_FIRST_S
        while True:
            try:
                timing = sink.write_batch(batch, batch_id)
            except Exception as exc:  # a sink failure must not kill the flusher
                stall.failed(sink.name, exc, len(batch))
                if not stall.may_retry():
                    stall.gave_up(len(batch), exc)
                    return None, exc
                stall.pause(backoff)
                backoff = min(2 * backoff, RETRY_CAP_S)
                continue
            stall.written(sink.name, len(batch))
            out.append(
                _flush_stat(
                    sink.name,
                    batch_id,
                    trigger,
                    len(batch),
                    started=started,
                    timing=timing,
                    clock=clock,
                    cpu_started=cpu_started,
                )
            )
            break
    return out, None


def _flush_stat(
    sink: str,
    batch_id: int,
    trigger: TriggerKind,
    rows: int,
    *,
    started: int,
    timing: SinkTiming,
    clock: Clock,
    cpu_started: int,
) -> FlushStat:
    return FlushStat(
        sink=sink,
        batch_id=batch_id,
        trigger=trigger,
        rows=rows,
        started_ns=started,
        build_ns=timing.build_ns,
        write_ns=timing.write_ns,
        commit_ns=timing.commit_ns,
        durable_ns=clock.now_ns(),
        bytes_before=timing.bytes_before,
        rows_before=timing.rows_before,
        cpu_ns=time.thread_time_ns() - cpu_started,
    )


class SinkStall:
    """crash_safe: one buffer's failing sink, retried until it writes: the backoff's pauses, the bound once the
    buffer closes, the figures its statistics show and the log lines (logger ``pipeline.buffer``):

    - ERROR, when a sink starts failing: ``sink parquet failing: <error>; holding 500 rows (...)``;
    - WARNING, at most every :data:`STALL_WARNING_EVERY_S` while it keeps failing: rows held, seconds, last error;
    - WARNING, when it writes again: ``sink parquet recovered after 12.3 s; 500 rows written (...)``;
    - ERROR, at close, if rows were given up: how many, which sink, why.

    Written only by whoever writes the buffer's batches (one flusher at a time: both lock strategies serialise
    flushes); :meth:`figures` is read from any thread without a lock: each field is one attribute, read
    atomically, and a status display needs no more exactness than that. "Rows held" in the log lines counts
    the batch being retried and the rows buffered behind it: what a kill would leave to the source to deliver
    again.
    """

    def __init__(self, name: str, buffered: Callable[[], int]) -> None:
        self.name = name
        self._buffered = buffered
        self._closing = threading.Event()
        self._deadline: float | None = None
        self.failures = 0
        """Failed attempts since the start."""
        self._since: float | None = None  # time.monotonic() of the first failure of the current stall
        self._sink: str | None = None
        self._error: str | None = None
        self._held = 0
        self._attempts = 0  # failed attempts of the current stall
        self._warned_at = 0.0
        self.unwritten = 0
        """Rows given up at close."""
        self._gave_up: tuple[str, str] | None = None  # (sink, error) of the last batch given up

    # Real time, not the buffer's clock: the pauses are real sleeps, and a test's fake clock does not move.

    def failed(self, sink: str, exc: BaseException, rows: int) -> None:
        now = time.monotonic()
        self.failures += 1
        self._error = _one_line(exc)
        self._attempts += 1
        if self._since is None or self._sink != sink:
            self._since, self._sink, self._held, self._attempts, self._warned_at = now, sink, rows, 1, now
            if not self.may_retry():
                return  # closing, past its deadline: given up at once, and reported once by report_unwritten()
            log.error(
                "sink %s failing: %s; holding %d rows and retrying until it writes them (durability crash_safe: "
                "none of them counts as durable meanwhile)",
                sink,
                self._error,
                rows + self._buffered(),
            )
        elif now - self._warned_at >= STALL_WARNING_EVERY_S:
            self._warned_at = now
            log.warning(
                "sink %s still failing after %.0f s: %d rows held; %d attempts; last error: %s",
                sink,
                now - self._since,
                rows + self._buffered(),
                self._attempts,
                self._error,
            )

    def written(self, sink: str, rows: int) -> None:
        if self._since is None:
            return
        log.warning(
            "sink %s recovered after %.1f s; %d rows written (%d failed attempts, %d rows buffered behind them)",
            sink,
            time.monotonic() - self._since,
            rows,
            self._attempts,
            self._buffered(),
        )
        self._end()

    def may_retry(self) -> bool:
        """False once the close deadline has passed: from then on a failed attempt gives its batch up."""
        return self._deadline is None or time.monotonic() < self._deadline

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` before the next attempt. A close cuts the wait short (one more attempt at once), and
        from then on no wait goes past its deadline."""
        deadline = self._deadline
        if deadline is None:
            self._closing.wait(seconds)
            return
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(min(seconds, remaining))

    def gave_up(self, rows: int, exc: BaseException) -> None:
        self.unwritten += rows
        self._gave_up = (self._sink or "?", _one_line(exc))
        self._end()

    def _end(self) -> None:
        self._since = self._sink = self._error = None
        self._held = self._attempts = 0

    def begin_close(self) -> None:
        """Bound the retries from now on; idempotent and thread-safe (the first call sets the deadline)."""
        if self._deadline is None:
            self._deadline = time.monotonic() + CLOSE_RETRY_S
            if self._since is not None:
                # Says why a stop takes this long.
                log.warning(
                    "closing while sink %s fails: retrying it for at most %g s, then what is unwritten is given up",
                    self._sink,
                    CLOSE_RETRY_S,
                )
        self._closing.set()

    def report_unwritten(self) -> None:
        """At close, once the last flush is over: one ERROR if rows were given up."""
        if not self.unwritten or self._gave_up is None:
            return
        sink, error = self._gave_up
        log.error(
            "closing with %d rows unwritten (flush-%s): sink %s still failed after %g s of retries at close: %s; "
            "never reported durable: a source that acknowledges only durable messages (MQTT ack durable, persistent "
            "session) has them delivered again, any other loses them",
            self.unwritten,
            self.name,
            sink,
            CLOSE_RETRY_S,
            error,
        )

    def figures(self) -> StallFigures:
        since = self._since
        return StallFigures(
            stalled_s=0.0 if since is None else max(0.0, time.monotonic() - since),
            held_rows=self._held,
            sink_failures=self.failures,
            failing_sink=self._sink,
            last_error=self._error,
        )


def _one_line(exc: BaseException) -> str:
    """An error as log lines and the status line show it: its message, else its class; one line."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
