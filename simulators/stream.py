"""A deterministic, seeded stream of plant messages. Pure: no sockets, no clock.

Arrivals follow the phases (steady, burst, ramp, pause) in an *open model*:
each message has an intended send time fixed in advance, independent of how
fast anything downstream is. Arrival times come from inverting the cumulative
rate ``N(t)``: message k is sent when ``N(t) = u_k``, with ``u_k = k`` for
evenly spaced arrivals or a unit-rate Poisson process for ``poisson``.

The stream is a pure function of (spec, epoch): same inputs, same bytes.

>>> spec = StreamSpec(seed=1, machines=("m-0",), phases=(PhaseSpec("steady", 2.0, 1.0),))
>>> [m.seq for m in stream(spec, epoch_ns=0)]
[0, 1]
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

PhaseKind = Literal["steady", "burst", "ramp", "pause"]


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One phase. ``rate`` is messages per second over all machines; a ramp goes to ``rate_to``."""

    kind: PhaseKind
    duration_s: float
    rate: float = 0.0
    rate_to: float | None = None

    def rate_at_end(self) -> float:
        return self.rate if self.rate_to is None else self.rate_to

    def expected_count(self) -> float:
        if self.kind == "pause":
            return 0.0
        return (self.rate + self.rate_at_end()) / 2 * self.duration_s

    def time_of(self, u: float) -> float:
        """Seconds into the phase at which the cumulative count reaches ``u``."""
        a, b, d = self.rate, self.rate_at_end(), self.duration_s
        if math.isclose(a, b):
            return u / a
        slope = (b - a) / d
        return (-a + math.sqrt(a * a + 2 * slope * u)) / slope


@dataclass(frozen=True, slots=True)
class SignalSpec:
    """How the payload values evolve."""

    load_rate_min: float = 0.0
    load_rate_max: float = 100.0
    load_rate_step: float = 2.5
    mileage_start: float = 1000.0
    mileage_per_second: float = 0.4


@dataclass(frozen=True, slots=True)
class StreamSpec:
    seed: int
    machines: tuple[str, ...]
    phases: tuple[PhaseSpec, ...]
    signals: SignalSpec = SignalSpec()
    arrival: Literal["uniform", "poisson"] = "uniform"
    limit: int | None = None
    """Stop after this many messages (used to cut a stream to an exact count)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message to send, with the ground truth about it."""

    seq: int
    machine: str
    intended_send_ns: int
    payload: bytes
    truth: str = "valid"
    """The anomaly this message carries (``simulators.anomalies``), or ``valid``."""
    ts_ns: int | None = None
    """The instant its ``ts`` denotes (UTC ns); None when it has no single true instant."""
    copy: bool = False
    """A second send of an earlier message (``duplicate``): same seq, counted apart by the ledger."""
    newest_ns: int | None = None
    """Instant of its machine's newest earlier clean reading, where the validator's watermark stands; anomalies only."""


MAX_MESSAGES = 100_000_000
"""Most messages one stream may plan. Far above what one machine's publishers can send in an hour (a few
thousand a second here), low enough that counting a plan and the ledger's per-message arrays stay small."""


def expected_total(spec: StreamSpec) -> float:
    """Messages the phases offer on average (the exact count for uniform arrivals, give or take one per phase)."""
    return sum(p.expected_count() for p in spec.phases)


def check_plan(spec: StreamSpec) -> None:
    """Raise ValueError (one line) for a plan no run can carry out: non-finite or over :data:`MAX_MESSAGES`.

    Checked before anything iterates the stream: ``rate: 1e12`` would otherwise count for hours.
    """
    for i, phase in enumerate(spec.phases):
        values = (phase.duration_s, phase.rate, phase.rate_at_end())
        if not all(math.isfinite(v) for v in values):
            raise ValueError(
                f"phases[{i}]: expected finite rate and duration, got {phase.rate:g} for {phase.duration_s:g} s"
            )
    total = expected_total(spec)
    if spec.limit is not None:
        total = min(total, spec.limit)
    if not total <= MAX_MESSAGES:
        planned = f"{total:.3g}" if math.isfinite(total) else "unboundedly many"
        raise ValueError(
            f"phases: plan {planned} messages, more than the {MAX_MESSAGES:,} one run may send; "
            "lower a rate or a duration"
        )


def planned_count(spec: StreamSpec) -> int:
    """How many messages :func:`stream` yields for ``spec``, without building payloads.

    Uniform arrivals are counted in closed form (the offsets are k = 0, 1, 2, ... below each phase's expected
    count), so a large plan costs nothing to count; Poisson arrivals are drawn, after :func:`check_plan`.
    """
    check_plan(spec)
    if spec.arrival == "poisson":
        return sum(1 for _ in _send_offsets(spec))
    count = 0
    for phase in spec.phases:
        total = phase.expected_count()
        if total - 1e-9 > 0:
            # Integers k >= 0 with k < total - 1e-9, the loop condition in _send_offsets.
            count += math.ceil(total - 1e-9)
    return count if spec.limit is None else min(count, spec.limit)


def machine_of(spec: StreamSpec, seq: int) -> str:
    """The machine that sends message ``seq``: machines take turns (round-robin)."""
    return spec.machines[seq % len(spec.machines)]


def total_duration_s(spec: StreamSpec) -> float:
    return sum(p.duration_s for p in spec.phases)


def _send_offsets(spec: StreamSpec) -> Iterator[float]:
    """Intended send times, seconds from the stream's start."""
    # A separate RNG for arrivals keeps payload values identical between
    # uniform and poisson runs of the same seed.
    rng = random.Random(f"{spec.seed}:arrivals")
    produced = 0
    start = 0.0
    for phase in spec.phases:
        total = phase.expected_count()
        if total > 0:
            u = 0.0 if spec.arrival == "uniform" else rng.expovariate(1.0)
            while u < total - 1e-9:
                if spec.limit is not None and produced >= spec.limit:
                    return
                yield start + phase.time_of(u)
                produced += 1
                u = u + 1.0 if spec.arrival == "uniform" else u + rng.expovariate(1.0)
        start += phase.duration_s


def format_ts(ns: int) -> str:
    """ISO 8601 UTC with microseconds, built from integers so it is exact."""
    seconds, micros = divmod(ns // 1000, 1_000_000)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=micros)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def stream(spec: StreamSpec, epoch_ns: int, ts_epoch_ns: int | None = None) -> Iterator[Message]:
    """Yield the messages of ``spec``; sends start at ``epoch_ns``.

    Payload timestamps start at ``ts_epoch_ns`` (default: ``epoch_ns``), so a
    fixed start gives identical payloads in every run.
    """
    ts_epoch = epoch_ns if ts_epoch_ns is None else ts_epoch_ns
    rng = random.Random(f"{spec.seed}:values")
    sig = spec.signals
    span = sig.load_rate_max - sig.load_rate_min
    load = {m: sig.load_rate_min + rng.random() * span for m in spec.machines}
    mileage0 = {m: sig.mileage_start + rng.random() * 100 for m in spec.machines}
    for seq, offset_s in enumerate(_send_offsets(spec)):
        machine = machine_of(spec, seq)
        step = (rng.random() * 2 - 1) * sig.load_rate_step
        value = min(sig.load_rate_max, max(sig.load_rate_min, load[machine] + step))
        load[machine] = value
        offset_ns = round(offset_s * 1e9)
        send_ns = epoch_ns + offset_ns
        # Payload timestamps carry microseconds; the instant is what they say, exactly.
        ts_ns = (ts_epoch + offset_ns) // 1000 * 1000
        body = {
            "machine": machine,
            "ts": format_ts(ts_ns),
            "load_rate": round(value, 3),
            "mileage": round(mileage0[machine] + sig.mileage_per_second * offset_s, 3),
            "seq": seq,
        }
        payload = json.dumps(body, separators=(",", ":")).encode()
        yield Message(seq=seq, machine=machine, intended_send_ns=send_ns, payload=payload, ts_ns=ts_ns)
