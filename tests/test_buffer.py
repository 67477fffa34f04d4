"""Tests for pipeline/buffer.py: triggers, shutdown, no loss/duplication under load, backpressure, failures.

Threads are synchronised with Events/Conditions and timeouts, never with sleeps that
guess how long the flusher needs. The timeout trigger runs on a FakeClock.
"""

from __future__ import annotations

import threading
import time
import types
from collections import Counter
from collections.abc import Sequence

import pytest

import pipeline.buffer
from pipeline.buffer import BufferClosed, FlushingBuffer, due_trigger
from pipeline.clock import FakeClock
from pipeline.model import FlushStat
from pipeline.sinks import MemorySink, SinkTiming

WAIT_S = 10.0  # generous upper bound for a thread to react; only reached on failure


class Recorder:
    """Collects FlushStats from on_flush (flusher thread) and lets the test wait for them."""

    def __init__(self) -> None:
        self.stats: list[FlushStat] = []
        self._cond = threading.Condition()

    def __call__(self, stat: FlushStat) -> None:
        with self._cond:
            self.stats.append(stat)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = WAIT_S) -> list[FlushStat]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.stats) >= n, timeout), f"only {len(self.stats)} flush(es)"
            return list(self.stats)


class ObservedClock(FakeClock):
    """A FakeClock that signals whenever the flusher thread reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.flusher_read = threading.Event()

    def now_ns(self) -> int:
        if threading.current_thread().name.startswith("flush-"):
            self.flusher_read.set()
        return super().now_ns()


def make(
    sink: MemorySink[int] | object,
    *,
    size: int = 10,
    capacity: int = 100,
    interval_s: float = 60.0,
    clock: FakeClock | None = None,
    recorder: Recorder | None = None,
) -> FlushingBuffer[int]:
    buf: FlushingBuffer[int] = FlushingBuffer(
        sink,  # type: ignore[arg-type]
        size=size,
        flush_interval_s=interval_s,
        capacity=capacity,
        clock=clock or FakeClock(),
        on_flush=recorder,
    )
    buf.start()
    return buf


# --- due_trigger (pure) ------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "count", "oldest", "expected"),
    [
        (0, 10, 0, "size"),  # exactly size
        (0, 11, 0, "size"),  # above size
        (100, 10, 0, "size"),  # size wins when both are due
        (5, 1, 0, "timeout"),  # exactly the interval: due
        (6, 9, 0, "timeout"),
        (4, 1, 0, None),  # 1 ns short
        (4, 9, 0, None),
        (100, 0, 0, None),  # nothing to flush
        (100, 0, None, None),
        (100, 3, None, None),  # no start time known: no timeout
    ],
)
def test_due_trigger(now: int, count: int, oldest: int | None, expected: str | None) -> None:
    assert due_trigger(now, count, oldest, size=10, interval_ns=5) == expected


@pytest.mark.parametrize(
    ("size", "capacity", "interval"),
    [(0, 10, 1.0), (10, 9, 1.0), (10, 10, 0.0), (10, 10, -1.0)],
)
def test_constructor_rejects_bad_settings(size: int, capacity: int, interval: float) -> None:
    with pytest.raises(ValueError, match="size > 0"):
        FlushingBuffer(MemorySink[int](), size=size, flush_interval_s=interval, capacity=capacity, clock=FakeClock())


# --- triggers ----------------------------------------------------------------


def test_size_trigger_flushes_once() -> None:
    sink: MemorySink[int] = MemorySink()
    rec = Recorder()
    buf = make(sink, size=10, capacity=20, recorder=rec)
    for i in range(10):
        buf.put(i)
    (stat,) = rec.wait_for(1)
    assert (stat.trigger, stat.rows, stat.batch_id, stat.sink) == ("size", 10, 1, "memory")
    assert sink.batches == [(1, list(range(10)))]
    buf.close()
    assert len(rec.stats) == 1  # nothing left for a shutdown flush
    assert buf.statistics().flushes == 1


def test_timeout_trigger_on_fake_clock() -> None:
    clock = ObservedClock()
    sink: MemorySink[int] = MemorySink()
    rec = Recorder()
    buf = make(sink, size=10, interval_s=60.0, clock=clock, recorder=rec)
    buf.put(1)

    # Not due yet. Sound without sleeping: the decision reads only the fake clock, which
    # has not moved, so no trigger can be due. To be sure the flusher actually *evaluated*
    # this state, wait until it reads the clock after the wake: it reads it while holding
    # the buffer's lock and keeps that lock until it either waits again or has swapped the
    # rows out, so the snapshot below is taken after its decision. buffered == 1 proves no
    # swap (a flush in progress would already show buffered == 0).
    clock.flusher_read.clear()
    buf.wake()
    assert clock.flusher_read.wait(WAIT_S)
    before = buf.statistics()
    assert (before.flushes, before.buffered) == (0, 1)
    assert rec.stats == []

    clock.advance(61.0)
    buf.wake()
    (stat,) = rec.wait_for(1)
    assert stat.trigger == "timeout"
    assert stat.rows == 1
    assert stat.started_ns == clock.now_ns()  # timed on the injected clock, not the wall clock
    assert sink.items == [1]
    buf.close()


def test_shutdown_flush_on_close() -> None:
    sink: MemorySink[int] = MemorySink()
    rec = Recorder()
    buf = make(sink, size=10, recorder=rec)
    for i in range(3):
        buf.put(i)
    buf.close()  # joins the flusher, so on_flush has run by now
    assert [(s.trigger, s.rows) for s in rec.stats] == [("shutdown", 3)]
    assert sink.items == [0, 1, 2]
    assert sink.closed
    stats = buf.statistics()
    assert (stats.buffered, stats.flushed_rows, stats.accepted) == (0, 3, 3)


def test_close_with_empty_buffer_writes_nothing() -> None:
    sink: MemorySink[int] = MemorySink()
    buf = make(sink)
    buf.close()
    assert sink.batches == []
    assert sink.closed


# --- concurrency -------------------------------------------------------------


def test_no_loss_no_double_flush_under_concurrent_producers() -> None:
    """8 producers, 20,000 items, a 5 ms sink: size triggers fire while flushes run."""
    producers, per_producer, size, capacity = 8, 2_500, 100, 300
    sink: MemorySink[tuple[int, int]] = MemorySink(delay_s=0.005)
    rec = Recorder()
    # FakeClock never moves: only size and shutdown triggers can fire.
    buf: FlushingBuffer[tuple[int, int]] = FlushingBuffer(
        sink, size=size, flush_interval_s=60.0, capacity=capacity, clock=FakeClock(), on_flush=rec
    )
    buf.start()
    start = threading.Barrier(producers)

    def produce(p: int) -> None:
        start.wait(WAIT_S)
        for i in range(per_producer):
            buf.put((p, i))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    buf.close()

    expected = Counter((p, i) for p in range(producers) for i in range(per_producer))
    assert Counter(sink.items) == expected  # every item exactly once
    ids = [batch_id for batch_id, _ in sink.batches]
    assert ids == list(range(1, len(ids) + 1))  # unique, in order, none skipped
    assert max(len(batch) for _, batch in sink.batches) <= capacity

    stats = buf.statistics()
    assert stats.accepted == stats.flushed_rows == 20_000
    assert (stats.failed_rows, stats.buffered) == (0, 0)
    assert stats.flushes == len(sink.batches) == len(rec.stats)
    assert [s.rows for s in rec.stats] == [len(batch) for _, batch in sink.batches]
    assert [s.batch_id for s in rec.stats] == ids
    # Coalesced triggers: counted, reported per flush, and consistent. Without wake() a
    # flush can coalesce at most one size trigger (the rows can reach `size` only once
    # before the next swap), so each stat reports 0 or 1 and the total is <= flushes.
    assert stats.coalesced >= 0
    assert sum(s.coalesced for s in rec.stats) == stats.coalesced
    assert all(s.coalesced in (0, 1) for s in rec.stats)
    assert stats.coalesced <= stats.flushes
    triggers = [s.trigger for s in rec.stats]
    assert set(triggers[:-1]) == {"size"}
    assert triggers[-1] in ("size", "shutdown")
    assert all(s.rows >= size for s in rec.stats if s.trigger == "size")


class GatedSink(MemorySink[int]):
    """A slow sink: every write waits until the gate opens."""

    def __init__(self) -> None:
        super().__init__("gated")
        self.gate = threading.Event()

    def write_batch(self, items: Sequence[int], batch_id: int) -> SinkTiming:
        self.gate.wait(WAIT_S)
        return super().write_batch(items, batch_id)


def test_backpressure_blocks_put_and_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the sink stuck, the buffer fills to capacity and put() must wait.

    The gate opens only when put() starts measuring its wait (its first perf_counter_ns call
    from the producer thread, made under the buffer lock just before waiting), so the
    producer is guaranteed to have blocked: no timing guess involved.
    """
    sink = GatedSink()
    producer = threading.current_thread()
    real_perf_counter_ns = time.perf_counter_ns

    def perf_counter_ns() -> int:
        if threading.current_thread() is producer:
            sink.gate.set()
        return real_perf_counter_ns()

    # Replace only the buffer module's view of `time`, not the global module.
    monkeypatch.setattr(
        pipeline.buffer,
        "time",
        types.SimpleNamespace(perf_counter_ns=perf_counter_ns, sleep=time.sleep, thread_time_ns=time.thread_time_ns),
    )
    buf = make(sink, size=4, capacity=8)
    for i in range(40):  # >> capacity: the stuck first flush makes a put block for sure
        buf.put(i)
    buf.close()

    assert sink.gate.is_set()  # put() reached its blocking branch
    stats = buf.statistics()
    assert stats.producer_wait_ns > 0
    assert sink.items == list(range(40))  # one producer: order kept, nothing lost or doubled
    assert max(len(batch) for _, batch in sink.batches) <= 8
    assert stats.accepted == stats.flushed_rows == 40


# --- sink failures -----------------------------------------------------------


class FailingSink:
    """Raises on every write for the first `failures` attempts (default: always)."""

    name = "failing"

    def __init__(self, failures: int = 10**9) -> None:
        self.failures = failures
        self.attempts: Counter[int] = Counter()
        self.written: list[int] = []
        self.closed = False

    def write_batch(self, items: Sequence[int], batch_id: int) -> SinkTiming:
        self.attempts[batch_id] += 1
        if sum(self.attempts.values()) <= self.failures:
            raise OSError("disk full")
        self.written.extend(items)
        return SinkTiming(0, 0, 0)

    def close(self) -> None:
        self.closed = True


def test_sink_failure_counts_failed_rows_and_sets_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.buffer, "WRITE_RETRIES", (0, 0))
    sink = FailingSink()
    rec = Recorder()
    buf = make(sink, size=5, capacity=10, recorder=rec)
    for i in range(10):
        buf.put(i)
    buf.close()  # the flusher survives each failed batch and still reaches shutdown

    stats = buf.statistics()
    assert (stats.failed_rows, stats.flushed_rows, stats.flushes) == (10, 0, 0)
    assert isinstance(buf.error, OSError)
    assert "disk full" in str(buf.error)
    assert sink.attempts and set(sink.attempts.values()) == {3}  # 1 try + 2 retries per batch
    assert rec.stats == []  # a failed flush is not reported as a flush
    assert sink.closed


def test_sink_failure_then_success_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.buffer, "WRITE_RETRIES", (0, 0))
    sink = FailingSink(failures=2)
    rec = Recorder()
    buf = make(sink, size=5, capacity=10, recorder=rec)
    for i in range(5):
        buf.put(i)
    (stat,) = rec.wait_for(1)
    buf.close()
    assert stat.rows == 5
    assert sink.written == [0, 1, 2, 3, 4]  # written once, by the third attempt
    assert sink.attempts == Counter({1: 3})
    assert buf.error is None
    assert buf.statistics().failed_rows == 0


def test_put_after_close_is_refused_not_silently_lost() -> None:
    """A row offered after close() must raise, not be counted as accepted and never written."""
    sink: MemorySink[int] = MemorySink()
    buf = make(sink)
    buf.close()
    with pytest.raises(BufferClosed):
        buf.put(1)
    stats = buf.statistics()
    assert stats.accepted == stats.flushed_rows + stats.failed_rows == 0


# --- lock hold: only while the lock is really held -----------------------------


def test_lock_hold_leaves_out_the_flushers_idle_wait() -> None:
    # cond.wait() releases the lock: the flusher sleeping on an empty buffer holds nothing. Counting from
    # before its wait made a swap lock's hold look as long as the idle time (seen: p99.9 ~ the flush interval).
    # Margins: the idle wait is 1.5 s, the real hold is a take() of one row (microseconds); only a 0.75 s
    # preemption of the flusher while it holds the lock could fail this.
    buf = make(MemorySink(), size=1000, capacity=1000)
    time.sleep(1.5)
    buf.put(1)
    buf.close()
    assert buf.probes is not None
    assert buf.probes.hold.count >= 2  # the put and the shutdown flush
    assert buf.probes.hold.summary()["max"] < 750, buf.probes.hold.summary()


def test_a_blocked_producers_wait_is_stall_not_hold() -> None:
    # With the `block` policy a producer waits in cond.wait() (lock released) for the flusher to make room:
    # that is stall and producer wait, never hold. The sink sleeps 0.5 s per batch, so the 21st put waits at
    # least ~0.5 s; its hold is an append (microseconds). 0.25 s of margin on each side.
    buf = make(MemorySink(delay_s=0.5), size=10, capacity=10)
    for i in range(21):
        buf.put(i)
    stats = buf.statistics()
    buf.close()
    assert buf.probes is not None
    assert stats.producer_wait_ns >= 250_000_000
    assert buf.probes.stall.summary()["max"] >= 250
    assert buf.probes.hold.summary()["max"] < 250, buf.probes.hold.summary()
