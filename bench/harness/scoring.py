"""Score the validator against the truth: what each injected anomaly should have become, and what it did become.

The expected decision is derived here, independently of ``pipeline.validate``,
from the message's truth label and the validator's configured policies (the
table in ``docs/validation.md``). The observed decision is read back from the
files: a persisted row (accepted, or repaired with its repairs named), a
quarantined row (with its reason), a dropped row, or nothing (lost). Per
class, a confusion table of truth against decision; every disagreement is a
mismatch, listed.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ValidateSettings
from simulators.stream import Message

Decision = Literal["accepted", "repaired", "rejected"]
MISMATCH_SAMPLE = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Expectation:
    decision: Decision
    reasons: frozenset[str] = frozenset()
    repairs: frozenset[str] = frozenset()
    instant_ns: int | None = None
    machine: str | None = None

    def label(self) -> str:
        if self.decision == "rejected":
            return "rejected:" + "|".join(sorted(self.reasons))
        if self.decision == "repaired":
            return "repaired:" + ",".join(sorted(self.repairs))
        return "accepted"


@dataclass(frozen=True)
class Observed:
    decision: str  # accepted | repaired | rejected | dropped | lost
    reason: str | None = None
    repairs: frozenset[str] = frozenset()
    instant_ns: int | None = None
    machine: str | None = None

    def label(self) -> str:
        if self.decision in ("rejected", "dropped"):
            return f"{self.decision}:{self.reason}"
        if self.decision == "repaired":
            return "repaired:" + ",".join(sorted(self.repairs))
        return self.decision


def _reject(*reasons: str) -> Expectation:
    return Expectation("rejected", frozenset(reasons))


def _body(payload: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _ns(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _hostile(machine: str) -> bool:
    return len(machine) > 255 or any(unicodedata.category(c) == "Cc" for c in machine)


def expect(message: Message, v: ValidateSettings, now_ns: int) -> Expectation:
    """What the validator's policies say ``message`` must become, ``now_ns`` being its clock at receipt."""
    truth, rules = message.truth, v.rules
    if truth == "oversize" and rules.oversize == "reject" and len(message.payload) > v.max_payload:
        return _reject("oversize")
    if truth in ("malformed_json", "invalid_utf8"):
        return _reject(truth)
    if truth == "duplicate_key" and rules.duplicate_key == "reject":
        # Accepted, the last value wins: the generator puts the true value last, so the rest scores as clean.
        return _reject("duplicate_key")
    if truth in ("nan", "inf"):
        return _reject("non_finite")
    if truth in ("null", "missing_field"):
        return _reject("missing_field")
    if truth == "bool_value":
        return _reject("wrong_type")
    body = _body(message.payload) or {}
    repairs: set[str] = set()
    if truth == "number_as_string":
        if rules.wrong_type == "reject":
            return _reject("wrong_type")
        repairs.add("number_from_string")
    machine = body.get("machine", message.machine)
    if truth == "hostile_id" and _hostile(machine):
        return _reject("bad_machine_id")
    if (
        truth in ("hostile_id", "unknown_machine")
        and v.machines is not None
        and rules.unknown_machine == "reject"
        and machine not in v.machines
    ):
        return _reject("unknown_machine")
    if truth == "out_of_range" and rules.out_of_range == "reject":
        return _reject("out_of_range")
    if truth == "status_uncertain" and rules.status_uncertain == "reject":
        return _reject("status_uncertain")
    if truth == "status_bad" and rules.status_bad == "reject":
        return _reject("status_bad")
    if truth in ("extra_fields", "oversize") and rules.extra_fields == "reject":
        return _reject("extra_fields")
    instant = message.ts_ns
    if truth == "offset_timestamp":
        if rules.offset_timestamp == "reject":
            return _reject("offset_timestamp")
        repairs.add("utc_normalised")
    if truth in ("epoch_seconds", "epoch_millis"):
        if rules.epoch_timestamp == "reject":
            return _reject("epoch_timestamp")
        repairs.add(truth)
    if truth in ("naive_timestamp", "dst_ambiguous", "dst_nonexistent"):
        if v.naive_timestamps == "reject":
            return _reject("naive_timestamp")
        wall = datetime.fromisoformat(body["ts"])
        if v.naive_timestamps == "assume_utc":
            repairs.add("assumed_utc")
            instant = _ns(wall.replace(tzinfo=UTC))
        else:
            repairs.add("assumed_machine_zone")
            zone = ZoneInfo(v.timezones.get(machine, v.default_timezone))
            if truth == "dst_ambiguous":
                if rules.ambiguous_local_time == "reject":
                    return _reject("ambiguous_local_time")
                repairs.add("ambiguous_earlier")
                instant = _ns(wall.replace(tzinfo=zone, fold=0).astimezone(UTC))
            elif truth == "dst_nonexistent":
                if rules.nonexistent_local_time == "reject":
                    return _reject("nonexistent_local_time")
                repairs.add("nonexistent_shifted")
                # The wall time read with the offset in force before the gap.
                instant = _ns(wall.replace(tzinfo=zone, fold=0).astimezone(UTC))
    if instant is not None:
        if rules.future_timestamp == "reject" and instant - now_ns > v.future_tolerance * 1e9:
            return _reject("future_timestamp")
        if rules.far_past == "reject" and now_ns - instant > v.past_tolerance * 1e9:
            return _reject("far_past")
    if message.copy and rules.duplicate == "reject":
        return _reject("duplicate")
    # Lateness is judged on the instant the validator sees (a repaired local time may land months away).
    newest = message.newest_ns
    if instant is not None and newest is not None and rules.late == "reject" and newest - instant > v.watermark * 1e9:
        return _reject("late")
    if truth == "mileage_backwards" and rules.mileage_backwards == "reject":
        return _reject("mileage_backwards")
    return Expectation(
        "repaired" if repairs else "accepted", repairs=frozenset(repairs), instant_ns=instant, machine=machine
    )


@dataclass
class Outcomes:
    """What the files say happened to each seq."""

    persisted: dict[int, list[Observed]] = field(default_factory=lambda: defaultdict(list))
    rejected: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    dropped: dict[int, str] = field(default_factory=dict)
    non_finite_rows: int = 0
    naive_ts_files: int = 0
    beyond_future_tolerance: int = 0
    rows: int = 0


def read_outcomes(
    data_dir: Path,
    rejected: Iterable[tuple[int | None, str]],
    dropped: dict[int, str],
    *,
    future_tolerance_s: float,
    replay_offset_ns: int,
) -> Outcomes:
    """Read the persisted rows back, with the checks a careful user would run on them."""
    out = Outcomes(dropped=dict(dropped))
    for seq, reason in rejected:
        if seq is not None:
            out.rejected[seq].append(reason)
    tolerance_us = int(future_tolerance_s * 1e6)
    offset_us = replay_offset_ns // 1000
    for path in sorted(data_dir.rglob("*.parquet")) if data_dir.exists() else []:
        table = pq.read_table(path, columns=["seq", "ts", "machine", "repairs", "load_rate", "mileage", "received_at"])
        ts_type = table.schema.field("ts").type
        if not (isinstance(ts_type, pa.TimestampType) and ts_type.tz in ("UTC", "+00:00")):
            out.naive_ts_files += 1
        for name in ("load_rate", "mileage"):
            column = table.column(name)
            out.non_finite_rows += len(column) - pc.sum(pc.is_finite(column).cast(pa.int64())).as_py()
        ts_us = table.column("ts").cast(pa.int64())
        received_us = table.column("received_at").cast(pa.int64())
        ahead = pc.subtract(ts_us, pc.add(received_us, offset_us))
        out.beyond_future_tolerance += pc.sum(pc.greater(ahead, tolerance_us).cast(pa.int64())).as_py() or 0
        out.rows += table.num_rows
        for seq, ts, machine, repairs in zip(
            table.column("seq").to_pylist(),
            ts_us.to_pylist(),
            table.column("machine").to_pylist(),
            table.column("repairs").to_pylist(),
            strict=True,
        ):
            fixed = frozenset(repairs.split(",")) if repairs else frozenset()
            out.persisted[seq].append(Observed("repaired" if fixed else "accepted", None, fixed, ts * 1000, machine))
    return out


def _matches(exp: Expectation, obs: Observed, override: Decision | None) -> str | None:
    """None when ``obs`` is what ``exp`` asks for, else what is wrong."""
    if obs.decision in ("dropped", "lost"):
        return f"{obs.decision} instead of {exp.decision}"
    if override is not None:
        return None if obs.decision == override else f"{obs.decision}, the scenario expects {override}"
    if obs.decision != exp.decision:
        return f"{obs.label()}, expected {exp.label()}"
    if exp.decision == "rejected":
        return None if obs.reason in exp.reasons else f"reason {obs.reason}, expected {exp.label()}"
    if obs.repairs != exp.repairs:
        return f"{obs.label()}, expected {exp.label()}"
    if exp.instant_ns is not None and obs.instant_ns != exp.instant_ns // 1000 * 1000:
        return f"stored ts {obs.instant_ns} ns, the message meant {exp.instant_ns} ns"
    if exp.machine is not None and obs.machine != exp.machine:
        return f"stored machine {obs.machine!r}, sent {exp.machine!r}"
    return None


@dataclass
class Score:
    confusion: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    expected: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    mismatches: int = 0
    mismatches_by_class: Counter[str] = field(default_factory=Counter)
    sample: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": {
                truth: {
                    "injected": sum(self.confusion[truth].values()),
                    "expected": dict(self.expected[truth]),
                    "decisions": dict(self.confusion[truth]),
                    "mismatches": self.mismatches_by_class.get(truth, 0),
                }
                for truth in sorted(self.confusion)
            },
            "mismatches": self.mismatches,
            "mismatch_sample": self.sample,
        }


def score(
    sends: Iterable[tuple[int, list[Message]]],
    outcomes: Outcomes,
    expectation: Callable[[Message], Expectation],
    overrides: dict[str, Decision] | None = None,
) -> Score:
    """Pair each send of a seq with one observed outcome and judge it."""
    overrides = overrides or {}
    result = Score()
    for seq, messages in sends:
        pool: list[Observed] = list(outcomes.persisted.get(seq, ()))
        pool += [Observed("rejected", reason) for reason in outcomes.rejected.get(seq, ())]
        if seq in outcomes.dropped:
            pool.append(Observed("dropped", outcomes.dropped[seq]))
        for message in messages:
            exp = expectation(message)
            override = overrides.get(message.truth)
            # The observation that fits best: one with no problem if there is one.
            best: int | None = None
            problem: str | None = "lost"
            for i, obs in enumerate(pool):
                found = _matches(exp, obs, override)
                if found is None:
                    best, problem = i, None
                    break
                if best is None:
                    best, problem = i, found
            obs = pool.pop(best) if best is not None else Observed("lost")
            result.confusion[message.truth][obs.label()] += 1
            result.expected[message.truth][override or exp.label()] += 1
            if problem is not None and obs.decision not in ("dropped", "lost"):
                result.mismatches += 1
                result.mismatches_by_class[message.truth] += 1
                if len(result.sample) < MISMATCH_SAMPLE:
                    result.sample.append({"seq": seq, "truth": message.truth, "problem": problem})
    return result
