"""Plain data that flows through the pipeline.

Immutable records, no behaviour: a :class:`Reading` is a validated sample, a
:class:`Rejection` is an input the validator refused (with its reason), and a
:class:`FlushStat` describes one buffer flush. Simulators may use these types to
describe ground truth; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

TriggerKind = Literal["size", "timeout", "shutdown"]

OnDurable = Callable[[], None]
"""What a source hands over with a message when it acknowledges only what is durable: the pipeline calls it
once, after the flush that wrote the message's row (or its quarantine row) succeeded, or when an overflow
policy dropped it (a final decision). Never called for a message whose flush failed or that was refused."""


class Reading(NamedTuple):
    """One validated sample, timestamps as UTC nanoseconds since the epoch.

    A named tuple rather than a frozen dataclass like the others: one is made per accepted message, and a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (about 1.4 us here, against
    0.3 us for the tuple), a tenth of the chain's cost. It is as immutable, and fields read the same way.
    """

    machine: str
    ts_ns: int
    load_rate: float
    mileage: float
    seq: int
    received_ns: int
    repairs: tuple[str, ...] = ()
    """What the validator fixed to accept it (e.g. ``utc_normalised``); empty when nothing."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input the validator refused; persisted to quarantine, never dropped."""

    reason: str
    detail: str
    payload: bytes
    topic: str
    received_ns: int
    seq: int | None = None
    machine: str | None = None


@dataclass(frozen=True, slots=True)
class FlushStat:
    """One flush: what fired it, how much it wrote and where the time went.

    ``build_ns`` turns buffered items into a columnar batch, ``write_ns`` hands
    it to the file, ``commit_ns`` makes it durable (flush + fsync).
    ``durable_ns`` is the clock reading when the rows became durable; every row
    of the batch carries ``batch_id`` so latency can be computed per row.
    """

    sink: str
    batch_id: int
    trigger: TriggerKind
    rows: int
    started_ns: int
    build_ns: int
    write_ns: int
    commit_ns: int
    durable_ns: int
    coalesced: int = 0
    bytes_before: int | None = None
    """Size of the target file before this flush (append-cost probe), if the sink knows it."""
    rows_before: int | None = None
    cpu_ns: int | None = None
    """CPU time of the write in the thread that did it (``time.thread_time_ns``): unlike the wall times above,
    it barely moves when another job shares the cores, so a regression gate can judge it on a busy machine."""

    @property
    def total_ns(self) -> int:
        return self.build_ns + self.write_ns + self.commit_ns
