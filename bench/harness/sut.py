"""The seam between the harness and the pipeline it measures: the system under test.

The harness reconciles the ledger from what a system under test *left behind* (its files read back), never
from its counters or in-process hooks, so the same harness can measure a process the bench did not write.
What an implementation can offer beyond that (lock waits, flush statistics, CPU per message) comes through
:meth:`SystemUnderTest.extras` and is reported when present.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.harness.ledger import ReadBack, durable_rows, read_back
from bench.scenario import Scenario
from pipeline.clock import Clock
from pipeline.config import PipelineSettings
from pipeline.model import FlushStat
from pipeline.runtime import Pipeline
from pipeline.sources import Source, SourceSettings, make_source


def end_process(proc: subprocess.Popen[bytes], how: signal.Signals, timeout_s: float) -> int | None:
    """Send ``how`` to a child that is still running, wait up to ``timeout_s``, then SIGKILL it; its exit code
    (negative: the signal that ended it). One place for how every system under test the bench started ends."""
    if proc.poll() is None:
        proc.send_signal(how)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a child process's log, for an error that says why it failed ('' when unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class SourceSpec:
    """One subscription the system under test makes: its settings, and constructor options of the source."""

    settings: SourceSettings
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SinkFault:
    """A scenario's ``slow_sink`` fault: the built-in pipeline's sinks wait or slow down on every write."""

    delay_s: float = 0.0
    slowdown: float = 0.0

    @classmethod
    def of(cls, sc: Scenario) -> SinkFault:
        return cls(sc.sink_delay_s(), sc.sink_slowdown())


NO_SINK_FAULT = SinkFault()


@dataclass(frozen=True)
class Output:
    """What a system under test left behind, read back after it stopped."""

    back: ReadBack
    durable: list[tuple[int, int]]
    """(seq, when its row became durable on the run's clock) per persisted row; empty when it cannot tell."""
    flushes: list[FlushStat] = field(default_factory=list)
    """The built-in pipeline's flush records (an extra: an external system has none)."""


class SystemUnderTest(Protocol):
    """A pipeline the harness starts, feeds through a transport, stops (or kills) and reads back."""

    def start(self, sources: Sequence[SourceSpec]) -> None:
        """Start and subscribe; returns once it is ready to receive."""

    def received(self) -> int | None:
        """Messages it has taken in so far, when it can tell (the drain waits on it); None otherwise."""

    def stop(self) -> None:
        """Stop gracefully: unsubscribe, flush what is buffered, finalise files."""

    def kill(self) -> None:
        """Stop at once, as a crash would: nothing flushed that was not already."""

    def read_back(self) -> Output:
        """What was persisted, quarantined (with reason) and dropped (with cause), from its own output."""

    def extras(self) -> dict[str, Any]:
        """In-process probes it offers (may be empty)."""


class InProcessPipeline:
    """The built-in pipeline, in this process (threads or asyncio), fed by sources from :mod:`pipeline.sources`.

    With the memory transport nothing subscribes: the publishers call :attr:`submit` directly.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        out_dir: Path,
        clock: Clock,
        sink: SinkFault = NO_SINK_FAULT,
    ) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.clock = clock
        self.flushes: list[FlushStat] = []
        self.pipeline = Pipeline(
            settings,
            out_dir,
            clock,
            on_flush=self.flushes.append,
            sink_delay_s=sink.delay_s,
            sink_slowdown=sink.slowdown,
        )
        self.sources: list[Source] = []
        self.closed_sources: list[Source] = []
        """Kept after closing: their statistics are read afterwards."""
        self._stopped = False

    @property
    def submit(self) -> Callable[[bytes, str], None]:
        return self.pipeline.submit

    def start(self, sources: Sequence[SourceSpec]) -> None:
        self.pipeline.start()
        for spec in sources:
            source = make_source(
                spec.settings,
                self.pipeline.submit,
                output=self.out_dir,
                clock=self.clock,
                on_fields=self.pipeline.submit_fields,
                **spec.options,
            )
            # Appended before start: a source that fails half-way through starting is still closed.
            self.sources.append(source)
            source.start()

    def received(self) -> int:
        return self.pipeline.statistics().received

    def stalled(self) -> bool:
        """Whether a sink is failing and the pipeline holds rows it cannot write (a fault's recovery watch)."""
        return self.pipeline.statistics().stalled_s > 0

    def close_sources(self) -> None:
        while self.sources:
            source = self.sources.pop(0)
            self.closed_sources.append(source)
            source.close()

    def stop(self) -> None:
        """Idempotent: the harness's teardown calls it again after a failure."""
        self.close_sources()
        if not self._stopped:
            self._stopped = True
            self.pipeline.close()

    def kill(self) -> None:
        raise NotImplementedError("the in-process pipeline cannot be killed; run it as a worker process")

    def read_back(self) -> Output:
        s = self.settings
        back = read_back(self.out_dir / s.parquet.path, self.out_dir / s.quarantine.path, self.out_dir / "dropped")
        return Output(back, list(durable_rows(back, self.flushes)), list(self.flushes))

    def extras(self) -> dict[str, Any]:
        p = self.pipeline
        return {
            "statistics": p.statistics(),
            "errors": [str(e) for e in p.errors],
            "drops": p.drops.counts(),
            "lock_probes": p.lock_probes,
            "loop_lag": p.loop_lag_recorder.summary() if p.loop_lag_recorder is not None else None,
            "hot_path_cpu": p.hot_path_cpu.statistics(),
            "sql_back": p.sql.read_back() if p.sql is not None else None,
        }
