"""The assembled pipeline: validate -> buffer -> Parquet (+ SQL), rejections -> quarantine.

Source-agnostic: a source calls :meth:`Pipeline.submit` with raw bytes, from any
thread (or awaits :meth:`Pipeline.asubmit` on the pipeline's own loop). A source
that acknowledges only what is durable (MQTT ``ack: durable``) hands a callback
with each message; the buffers carry it with the message's reading or rejection
and call it after the flush that wrote it (see :data:`pipeline.model.OnDurable`).

Two runtimes, chosen by ``settings.runtime``:

``threads``  buffers guarded by thread locks, a flusher thread per buffer.
``asyncio``  the pipeline lives on an event loop in its own thread, as an
             OPC UA client pipeline does; validation and buffering run on the
             loop, and a loop-lag probe measures how long the loop stalls.

With ``durability: crash_safe`` a batch a sink fails to write is kept and retried until it is written (the
buffers' ``crash_safe``); :class:`PipelineStatistics` shows such a stall (``stalled_s``, ``held_rows``,
``sink_error``). ``fault_injection`` wraps every sink to fail on purpose (:mod:`pipeline.inject`).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.async_buffer import AsyncFlushingBuffer, LoopLagProbe
from pipeline.buffer import BufferClosed, FlushingBuffer, LockProbes
from pipeline.buffer_core import BufferStatistics
from pipeline.clock import Clock
from pipeline.config import PipelineSettings, check_fault_injection_path, check_output_path
from pipeline.decode import encode_payload
from pipeline.drops import DropLog
from pipeline.errors import ConfigError, PipelineError
from pipeline.model import FlushStat, OnDurable, Reading, Rejection
from pipeline.parquet_sink import ParquetSink, QuarantineSink
from pipeline.probes import CpuSampler, Recorder, Tally
from pipeline.recent import recent_seqs
from pipeline.sinks import Sink, SlowSink
from pipeline.validate import Validator

if TYPE_CHECKING:
    from pipeline.inject import InjectedFaultSink

    # SQLAlchemy is imported only by a pipeline with a SQL sink: a third of a new process's import time.
    from pipeline.sql_sink import SqlSink


@dataclass(frozen=True, slots=True)
class PipelineStatistics:
    """A snapshot of the pipeline's counters."""

    received: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    refused_after_close: int = 0
    readings: BufferStatistics | None = None
    rejections: BufferStatistics | None = None
    injected_errors: int = 0
    """Sink writes failed on purpose (``fault_injection``, the bench's sink_error fault)."""

    @property
    def _stalled(self) -> list[BufferStatistics]:
        return [b for b in (self.readings, self.rejections) if b is not None and b.stalled_s > 0]

    @property
    def stalled_s(self) -> float:
        """crash_safe: for how long the longest-failing sink has been failing (0: every sink writes)."""
        return max((b.stalled_s for b in self._stalled), default=0.0)

    @property
    def held_rows(self) -> int:
        """crash_safe: rows not yet written behind failing sinks: each stalled buffer's batch being retried and
        the rows buffered behind it (what a kill would leave the source to deliver again)."""
        return sum(b.held_rows + b.buffered for b in self._stalled)

    @property
    def sink_error(self) -> str | None:
        """crash_safe: the last error of the longest-failing sink, while one fails."""
        stalled = self._stalled
        return max(stalled, key=lambda b: b.stalled_s).last_error if stalled else None


def _not_started(item: object, on_durable: OnDurable | None) -> None:
    raise PipelineError("submit before start(), or on a pipeline whose runtime is asyncio (use asubmit)")


def freeze_startup_heap() -> None:
    """Collect, then keep every object alive now out of the cyclic collector's future passes (``gc.freeze``).

    For a process that runs a pipeline and nothing else, once it has started: the imports (pyarrow, pydantic,
    asyncua, paho...) are some 70,000 objects, and every full collection walked them all. In the pipeline's
    chain a full collection took 27 ms about every 20,000 messages, and with the younger generations' passes
    over the same objects the collector was 15% of the chain's CPU, and most of its run-to-run spread (7.7 to
    13.1 us per message in 14 runs; frozen, 7.7 to 9.0 in 7). Frozen objects are still freed when nothing
    refers to them; only one caught in a reference cycle would outlive its use, a one-off cost bounded by the
    startup heap (garbage made before is collected first). Not for a library caller: it freezes the whole
    process's heap.
    """
    gc.collect()
    gc.freeze()


class Pipeline:
    """validate -> buffer (size + timeout) -> sinks; rejections to quarantine."""

    def __init__(
        self,
        settings: PipelineSettings,
        output: Path,
        clock: Clock,
        on_flush: Callable[[FlushStat], None] | None = None,
        *,
        sink_delay_s: float = 0.0,
        sink_slowdown: float = 0.0,
        replay_offset_ns: int = 0,
    ) -> None:
        """``replay_offset_ns`` shifts the validator's notion of now, for a run that replays another time."""
        self.settings = settings
        self.output = output
        self._clock = clock
        self._on_flush = on_flush
        self._validator = Validator(settings.validate_)
        self.replay_offset_ns = replay_offset_ns
        pq = settings.parquet
        # The settings' validators refuse these already; settings built without validation (model_construct,
        # model_copy(update=...)) meet the same rule here, where the paths become folders.
        for name, section in (("parquet", pq), ("quarantine", settings.quarantine)):
            try:
                check_output_path(
                    f"pipeline.{name}.path", section.path, section.allow_outside_output, f"pipeline.{name}"
                )
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if settings.fault_injection is not None:
            try:
                check_fault_injection_path(settings.fault_injection)
            except ValueError as exc:
                raise ConfigError(f"pipeline.{exc}") from None
        self.parquet = ParquetSink(
            output / pq.path,
            rotate_s=pq.rotate,
            compression=pq.compression,
            fsync=pq.fsync,
            strategy=pq.strategy,
            rotate_rows=pq.rotate_rows,
            crash_safe=settings.durability == "crash_safe",
        )
        self.drops = DropLog(output / "dropped")
        self.quarantine = QuarantineSink(
            output / settings.quarantine.path,
            rotate_s=pq.rotate,
            fsync=pq.fsync,
            crash_safe=settings.durability == "crash_safe",
        )
        self._readings_sinks: list[Sink[Reading]] = [
            SlowSink(self.parquet, sink_delay_s, sink_slowdown)
            if sink_delay_s > 0 or sink_slowdown > 0
            else self.parquet
        ]
        self.sql: SqlSink | None = None
        if settings.sql is not None:
            from pipeline.sql_sink import SqlSink

            self.sql = SqlSink(settings.sql, output)
            if settings.durability == "crash_safe":
                # The database first: a kill between the two writes leaves a row in SQL but not in the Parquet
                # data, so its redelivery is not a duplicate of the files (below) and is written again, which
                # an idempotent strategy (upsert, copy) absorbs. The other order would lose it from SQL.
                self._readings_sinks.insert(0, self.sql)
            else:
                self._readings_sinks.append(self.sql)
        if settings.durability == "crash_safe" and settings.validate_.rules.duplicate == "reject":
            # After the sinks: the data sink has recovered a killed process's journals into the files read here.
            # A message durable but not yet acknowledged at a kill comes again after it: still a duplicate.
            self._validator.seed_recent(recent_seqs(output / pq.path, settings.validate_.dedup_window).seqs)
        self._rejections_sinks: list[Sink[Rejection]] = [self.quarantine]
        self._injected: list[InjectedFaultSink[Any]] = []
        if settings.fault_injection is not None:
            self._inject_faults(output / settings.fault_injection)
        self._lock = threading.Lock()
        self._received = Tally()
        self._reasons: Counter[str] = Counter()
        self._refused_after_close = 0
        self._readings: FlushingBuffer[Reading] | AsyncFlushingBuffer[Reading] | None = None
        self._put_reading: Callable[[Reading, OnDurable | None], None] = _not_started
        self._put_rejection: Callable[[Rejection, OnDurable | None], None] = _not_started
        self._rejections: FlushingBuffer[Rejection] | AsyncFlushingBuffer[Rejection] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.loop_lag: LoopLagProbe | None = None
        self.hot_path_cpu = CpuSampler()

    def _inject_faults(self, control_file: Path) -> None:
        """Wrap every sink to fail as the bench's control file says (only when the setting is on: no cost
        otherwise). ``self.parquet``, ``self.quarantine`` and ``self.sql`` stay the real sinks."""
        from pipeline.inject import FaultControl, InjectedFaultSink

        control = FaultControl(control_file)
        readings: list[InjectedFaultSink[Reading]] = [InjectedFaultSink(s, control) for s in self._readings_sinks]
        rejections: list[InjectedFaultSink[Rejection]] = [InjectedFaultSink(s, control) for s in self._rejections_sinks]
        self._injected = [*readings, *rejections]
        self._readings_sinks = list(readings)
        self._rejections_sinks = list(rejections)

    def _buffer_kwargs(self) -> dict[str, Any]:
        buf = self.settings.buffer
        return {
            "size": buf.size,
            "flush_interval_s": buf.flush_interval,
            "capacity": buf.capacity,
            "clock": self._clock,
            "on_flush": self._on_flush,
            "lock": buf.lock,
            "overflow": buf.overflow,
            "on_drop": self.drops.record,
            "probes": self.settings.probes,
            "crash_safe": self.settings.durability == "crash_safe",
        }

    def start(self) -> None:
        if self.settings.runtime == "threads":
            readings: FlushingBuffer[Reading] = FlushingBuffer(self._readings_sinks, **self._buffer_kwargs())
            rejections: FlushingBuffer[Rejection] = FlushingBuffer(self._rejections_sinks, **self._buffer_kwargs())
            readings.start()
            rejections.start()
            self._readings, self._rejections = readings, rejections
            # Bound once for _submit, which runs for every message.
            self._put_reading, self._put_rejection = readings.put, rejections.put
            return
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def setup() -> None:
                areadings: AsyncFlushingBuffer[Reading] = AsyncFlushingBuffer(
                    self._readings_sinks, **self._buffer_kwargs()
                )
                arejections: AsyncFlushingBuffer[Rejection] = AsyncFlushingBuffer(
                    self._rejections_sinks, **self._buffer_kwargs()
                )
                areadings.start()
                arejections.start()
                self._readings, self._rejections = areadings, arejections
                self.loop_lag = LoopLagProbe()
                self.loop_lag.start()

            loop.run_until_complete(setup())
            ready.set()
            loop.run_forever()
            loop.close()

        self._loop_thread = threading.Thread(target=serve, name="pipeline-loop", daemon=True)
        self._loop_thread.start()
        ready.wait(10)

    def _validate(self, payload: bytes, topic: str) -> Reading | Rejection:
        now = self._clock.now_ns()
        return self._tally(self._validator.check(payload, topic, now, now + self.replay_offset_ns))

    def _tally(self, result: Reading | Rejection) -> Reading | Rejection:
        if type(result) is Rejection:
            # Its reason before it counts as received: a snapshot between the two (statistics() reads the
            # reasons first) may count it accepted for a moment, never make "accepted" negative.
            with self._lock:
                self._reasons[result.reason] += 1
        self._received.bump()
        return result

    def _refused(self) -> None:
        # A source that delivers after close(): count it so the ledger's
        # "lost" has a visible cause instead of vanishing in a callback.
        with self._lock:
            self._refused_after_close += 1

    def submit(self, payload: bytes, topic: str, on_durable: OnDurable | None = None) -> None:
        """Take one raw message from a source thread; may block on backpressure.

        ``on_durable`` is called once the message's reading (or its quarantine row) is written by a flush that
        succeeded, from the flusher; never for a message refused after :meth:`close` or whose flush failed.
        """
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.asubmit(payload, topic, on_durable), self._loop).result()
            return
        if not self.hot_path_cpu.due():
            self._submit(payload, topic, on_durable)
            return
        # The hot path's CPU time (decode + validate + put), one message in `every`; a put that blocks on a
        # full buffer waits without using CPU, so backpressure does not inflate it.
        began = self.hot_path_cpu.now_ns()
        self._submit(payload, topic, on_durable)
        self.hot_path_cpu.add(self.hot_path_cpu.now_ns() - began)

    def submit_fields(self, fields: dict[str, Any], topic: str) -> None:
        """:meth:`submit` for a source that builds each message as an object (OPC UA) rather than receiving
        bytes: the validator judges the object itself when its fast path takes it, skipping the encode to JSON
        and the decode back (``Validator.check_fields``); anything else is encoded
        (:func:`pipeline.decode.encode_payload`) and judged, and quarantined, as those bytes."""
        if self._loop is not None:
            self.submit(encode_payload(fields), topic)
            return
        if not self.hot_path_cpu.due():
            self._submit_fields(fields, topic)
            return
        began = self.hot_path_cpu.now_ns()
        self._submit_fields(fields, topic)
        self.hot_path_cpu.add(self.hot_path_cpu.now_ns() - began)

    def _submit_fields(self, fields: dict[str, Any], topic: str) -> None:
        now = self._clock.now_ns()
        self._settle(self._tally(self._validator.check_fields(fields, topic, now, now + self.replay_offset_ns)), None)

    def _submit(self, payload: bytes, topic: str, on_durable: OnDurable | None) -> None:
        self._settle(self._validate(payload, topic), on_durable)

    def _settle(self, result: Reading | Rejection, on_durable: OnDurable | None) -> None:
        try:
            if type(result) is Reading:
                self._put_reading(result, on_durable)
            else:
                assert isinstance(result, Rejection)
                self._put_rejection(result, on_durable)
        except BufferClosed:
            self._refused()

    def request_flush(self) -> None:
        """Flush both buffers now rather than at their next trigger; returns without waiting. Thread-safe.

        For a source whose broker sends nothing more until it acknowledges (its window of unacknowledged
        messages is full) and that acknowledges only once messages are durable: without it, the window would
        wait for the timeout trigger every time. Served as a ``size`` trigger.
        """
        if self._loop is not None:
            loop = self._loop
            for abuf in (self._readings, self._rejections):
                if isinstance(abuf, AsyncFlushingBuffer) and loop.is_running():
                    asyncio.run_coroutine_threadsafe(abuf.request_flush(), loop)
            return
        for buf in (self._readings, self._rejections):
            if isinstance(buf, FlushingBuffer):
                buf.request_flush()

    async def asubmit(self, payload: bytes, topic: str, on_durable: OnDurable | None = None) -> None:
        """Take one raw message on the pipeline's event loop (asyncio runtime); ``on_durable`` as in
        :meth:`submit`, called on the loop."""
        # Only decode + validate are timed here: an awaited put may run other tasks on this thread meanwhile.
        sampled = self.hot_path_cpu.due()
        began = self.hot_path_cpu.now_ns() if sampled else 0
        result = self._validate(payload, topic)
        if sampled:
            self.hot_path_cpu.add(self.hot_path_cpu.now_ns() - began)
        try:
            if isinstance(result, Reading):
                assert isinstance(self._readings, AsyncFlushingBuffer)
                await self._readings.put(result, on_durable)
            else:
                assert isinstance(self._rejections, AsyncFlushingBuffer)
                await self._rejections.put(result, on_durable)
        except BufferClosed:
            self._refused()

    def close(self) -> None:
        """Flush everything buffered and finalise every file.

        Every buffer and the drop log are closed even when one fails (the first error is raised afterwards), so
        a readings sink that cannot finalise does not cost the rejections their flush. crash_safe: a failing
        sink is retried for at most :data:`pipeline.buffer.CLOSE_RETRY_S` from here, for both buffers together;
        what is still unwritten then is given up unacknowledged, logged, and in :attr:`errors`.
        """
        for buf in (self._readings, self._rejections):
            if buf is not None:
                # From this thread, before the loop is asked for anything: a coarse asyncio write retrying on the
                # loop blocks it until the deadline this starts.
                buf.begin_close()
        errors: list[BaseException] = []
        if self._loop is not None and self._loop_thread is not None:
            loop = self._loop

            async def aclose() -> None:
                for buf in (self._readings, self._rejections):
                    if isinstance(buf, AsyncFlushingBuffer):
                        try:
                            await buf.close()
                        except Exception as exc:  # closing the rest matters more; raised below
                            errors.append(exc)
                if self.loop_lag is not None:
                    await self.loop_lag.stop()

            asyncio.run_coroutine_threadsafe(aclose(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            self._loop_thread.join(30)
        else:
            for tbuf in (self._readings, self._rejections):
                if isinstance(tbuf, FlushingBuffer):
                    try:
                        tbuf.close()
                    except Exception as exc:  # closing the rest matters more; raised below
                        errors.append(exc)
        try:
            self.drops.close()
        except Exception as exc:  # closing the rest matters more; raised below
            errors.append(exc)
        if errors:
            raise errors[0]

    @property
    def lock_probes(self) -> LockProbes | None:
        """Lock wait/hold/stall histograms of the readings buffer (the hot one)."""
        return self._readings.probes if self._readings is not None else None

    @property
    def loop_lag_recorder(self) -> Recorder | None:
        return self.loop_lag.lag if self.loop_lag is not None else None

    @property
    def errors(self) -> list[BaseException]:
        return [b.error for b in (self._readings, self._rejections) if b is not None and b.error is not None]

    def statistics(self) -> PipelineStatistics:
        with self._lock:
            reasons = dict(self._reasons)
            refused = self._refused_after_close
        received = self._received.value()
        rejected = sum(reasons.values())
        return PipelineStatistics(
            received=received,
            accepted=received - rejected,
            rejected=rejected,
            rejected_by_reason=reasons,
            refused_after_close=refused,
            readings=self._readings.statistics() if self._readings is not None else None,
            rejections=self._rejections.statistics() if self._rejections is not None else None,
            injected_errors=sum(sink.injected for sink in self._injected),
        )
