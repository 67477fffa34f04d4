"""Sink errors on purpose, for the bench's ``sink_error`` fault (``pipeline.fault_injection``).

The bench writes a small JSON control file under the output folder, e.g. ``{"sink_error": 0.3, "seed": 16}``,
and rewrites it to change the fault while the pipeline runs (``{"sink_error": 0}`` ends it). With
``pipeline.fault_injection`` naming that file, :class:`~pipeline.runtime.Pipeline` wraps every sink in an
:class:`InjectedFaultSink`: before each ``write_batch`` it fails, with probability ``sink_error``, by raising
``OSError(EIO, "injected sink error (fault_injection)")`` without touching the real sink. The buffer then
treats it as any failed write (naive: retried a few times then given up; crash_safe: retried until written).

The file is read again when it changes (checked with ``stat`` at most every :data:`CHECK_EVERY_S`); a file
that is absent, unreadable or not of that shape injects nothing. Each sink draws from its own
``random.Random`` seeded from the file's ``seed`` and the sink's name, so which of a sink's writes fail is the
same from run to run whatever the other flusher threads do. Without the setting nothing is wrapped: no cost.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Generic, TypeVar

from pipeline.sinks import Sink, SinkTiming

T = TypeVar("T")
log = logging.getLogger(__name__)

CHECK_EVERY_S = 0.05
"""At most one ``stat`` of the control file per this many seconds (per control, shared by the sinks)."""
INJECTED_MESSAGE = "injected sink error (fault_injection)"


class FaultControl:
    """The control file, read again whenever its ``stat`` changes; thread-safe (both flushers share it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._checked_at = -math.inf
        self._stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of what was read last
        self._probability = 0.0
        self._seed: int | None = None
        self._generation = 0  # changes whenever the seed does: the sinks re-seed their generators

    def current(self) -> tuple[float, int | None, int]:
        """(probability of a sink error, seed, generation), from the file as of at most CHECK_EVERY_S ago."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= CHECK_EVERY_S:
                self._checked_at = now
                self._refresh()
            return self._probability, self._seed, self._generation

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._set(0.0, self._seed, None)  # absent: no injection
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_bytes())
            probability = float(data.get("sink_error", 0.0))
            seed = data.get("seed", 0)
            if not 0.0 <= probability <= 1.0 or not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError("expected sink_error in [0, 1] and an integer seed")
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            # Caught half-written by a writer that does not rename, or wrong: nothing injected until it changes.
            log.warning("fault_injection: ignoring %s: %s", self.path, exc)
            self._set(0.0, self._seed, stamp)
            return
        self._set(probability, seed, stamp)

    def _set(self, probability: float, seed: int | None, stamp: tuple[int, int, int] | None) -> None:
        if seed != self._seed:
            self._generation += 1
        if (probability, seed) != (self._probability, self._seed):
            log.info("fault_injection: sink_error %g, seed %s (%s)", probability, seed, self.path)
        self._probability, self._seed, self._stamp = probability, seed, stamp


class InjectedFaultSink(Generic[T]):
    """Wraps a sink: fails a write, before it reaches the sink, as often as the control file says."""

    def __init__(self, inner: Sink[T], control: FaultControl) -> None:
        self.inner = inner
        self.name = inner.name
        self.control = control
        self.injected = 0
        """Writes failed on purpose so far."""
        self._random = random.Random()
        self._generation = -1

    def write_batch(self, items: Sequence[T], batch_id: int) -> SinkTiming:
        probability, seed, generation = self.control.current()
        if generation != self._generation:
            # A str seed is hashed with SHA-512, the same in every process (unlike hash() of a str).
            self._random.seed(f"{seed}:{self.name}")
            self._generation = generation
        # Drawn only when injecting: a probability of 0 leaves the sequence where it was.
        if probability > 0 and self._random.random() < probability:
            self.injected += 1
            raise OSError(errno.EIO, INJECTED_MESSAGE)
        return self.inner.write_batch(items, batch_id)

    def close(self) -> None:
        self.inner.close()
