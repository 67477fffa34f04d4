"""The assembled pipeline: validate -> buffer -> Parquet, rejections -> quarantine.

Source-agnostic: a source calls :meth:`Pipeline.submit` with raw bytes, from any
thread. Everything downstream is thread-safe.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.buffer import BufferClosed, BufferStatistics, FlushingBuffer, LockProbes
from pipeline.clock import Clock
from pipeline.config import PipelineSettings
from pipeline.drops import DropLog
from pipeline.model import FlushStat, Reading, Rejection
from pipeline.parquet_sink import ParquetSink, QuarantineSink
from pipeline.sinks import Sink, SlowSink
from pipeline.sql_sink import SqlSink
from pipeline.validate import Validator


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


class Pipeline:
    """validate -> buffer (size + timeout) -> Parquet; rejections to quarantine."""

    def __init__(
        self,
        settings: PipelineSettings,
        output: Path,
        clock: Clock,
        on_flush: Callable[[FlushStat], None] | None = None,
        sink_delay_s: float = 0.0,
    ) -> None:
        self.settings = settings
        self.output = output
        self._clock = clock
        self._validator = Validator(future_tolerance_ns=int(settings.validate_.future_tolerance * 1e9))
        buf = settings.buffer
        pq = settings.parquet
        self.parquet = ParquetSink(
            output / pq.path,
            rotate_s=pq.rotate,
            compression=pq.compression,
            fsync=pq.fsync,
            strategy=pq.strategy,
            rotate_rows=pq.rotate_rows,
        )
        self.drops = DropLog(output / "dropped")
        self.quarantine = QuarantineSink(output / settings.quarantine.path, rotate_s=pq.rotate, fsync=pq.fsync)
        readings_sinks: list[Sink[Reading]] = [
            SlowSink(self.parquet, sink_delay_s) if sink_delay_s > 0 else self.parquet
        ]
        self.sql: SqlSink | None = None
        if settings.sql is not None:
            self.sql = SqlSink(settings.sql, output)
            readings_sinks.append(self.sql)
        self._readings: FlushingBuffer[Reading] = FlushingBuffer(
            readings_sinks,
            size=buf.size,
            flush_interval_s=buf.flush_interval,
            capacity=buf.capacity,
            clock=clock,
            on_flush=on_flush,
            lock=buf.lock,
            overflow=buf.overflow,
            on_drop=self.drops.record,
            probes=settings.probes,
        )
        self._rejections: FlushingBuffer[Rejection] = FlushingBuffer(
            self.quarantine,
            size=buf.size,
            flush_interval_s=buf.flush_interval,
            capacity=buf.capacity,
            clock=clock,
            on_flush=on_flush,
            lock=buf.lock,
            overflow=buf.overflow,
            on_drop=self.drops.record,
            probes=settings.probes,
        )
        self._lock = threading.Lock()
        self._received = 0
        self._reasons: Counter[str] = Counter()
        self._refused_after_close = 0

    def start(self) -> None:
        self._readings.start()
        self._rejections.start()

    def submit(self, payload: bytes, topic: str) -> None:
        """Take one raw message from a source; thread-safe, may block on backpressure."""
        received = self._clock.now_ns()
        result = self._validator.check(payload, topic, received)
        with self._lock:
            self._received += 1
            if isinstance(result, Rejection):
                self._reasons[result.reason] += 1
        try:
            if isinstance(result, Reading):
                self._readings.put(result)
            else:
                self._rejections.put(result)
        except BufferClosed:
            # A source that delivers after close(): count it so the ledger's
            # "lost" has a visible cause instead of vanishing in a callback.
            with self._lock:
                self._refused_after_close += 1

    def close(self) -> None:
        """Flush everything buffered and finalise every file."""
        self._readings.close()
        self._rejections.close()
        self.drops.close()

    @property
    def lock_probes(self) -> LockProbes | None:
        """Lock wait/hold/stall histograms of the readings buffer (the hot one)."""
        return self._readings.probes

    @property
    def errors(self) -> list[BaseException]:
        return [e for e in (self._readings.error, self._rejections.error) if e is not None]

    def statistics(self) -> PipelineStatistics:
        with self._lock:
            received = self._received
            reasons = dict(self._reasons)
            refused = self._refused_after_close
        rejected = sum(reasons.values())
        return PipelineStatistics(
            received=received,
            accepted=received - rejected,
            rejected=rejected,
            rejected_by_reason=reasons,
            refused_after_close=refused,
            readings=self._readings.statistics(),
            rejections=self._rejections.statistics(),
        )
