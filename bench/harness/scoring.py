"""Score the validator against the truth: what each injected anomaly should have become, and what it did become.

The expected decision is derived here, independently of ``pipeline.validate``,
from the message's truth label and the validator's configured policies (the
table in ``docs/validation.md``), and from its payload's mileage, which must lie
in [0, ``mileage_max``] whatever anomaly was injected. The observed decision is
read back from the files: a persisted row (accepted, or repaired with its
repairs named), a quarantined row (with its reason), a dropped row, or nothing
(lost). Per class, a confusion table of truth against decision; every
disagreement is a mismatch, listed.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.harness.ledger import Ledger, ReadBack, set_aside_expected
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


# Anomalies no policy lets through, and the reason the validator rejects each with.
_ALWAYS_REJECTED = {
    "malformed_json": "malformed_json",
    "invalid_utf8": "invalid_utf8",
    "nan": "non_finite",
    "inf": "non_finite",
    "null": "missing_field",
    "missing_field": "missing_field",
    "bool_value": "wrong_type",
}
_LOCAL_TIMES = ("naive_timestamp", "dst_ambiguous", "dst_nonexistent")


@dataclass
class _Reading:
    """What the validator makes of a message it has decoded: its machine, the instant it stores, its repairs."""

    machine: str
    instant: int | None
    repairs: set[str] = field(default_factory=set)


def expect(message: Message, v: ValidateSettings, now_ns: int) -> Expectation:
    """What the validator's policies say ``message`` must become, ``now_ns`` being its clock at receipt."""
    reason = _undecodable(message, v)
    if reason is not None:
        return _reject(reason)
    body = _body(message.payload) or {}
    reading = _Reading(body.get("machine", message.machine), message.ts_ns)
    # In the validator's order: the first rule that rejects names the reason.
    reason = (
        _wrong_type(message, v, reading)
        or _machine_rejection(message, v, reading.machine)
        or _value_rejection(message, v, body)
        or _timestamp_form(message, v, body, reading)
        or _clock_rejection(v, reading.instant, now_ns)
        or _history_rejection(message, v, reading.instant)
    )
    if reason is not None:
        return _reject(reason)
    return Expectation(
        "repaired" if reading.repairs else "accepted",
        repairs=frozenset(reading.repairs),
        instant_ns=reading.instant,
        machine=reading.machine,
    )


def _undecodable(message: Message, v: ValidateSettings) -> str | None:
    """Rejected before any field is read: too large, not JSON, a repeated key, a value that cannot be stored."""
    truth, rules = message.truth, v.rules
    if truth == "oversize" and rules.oversize == "reject" and len(message.payload) > v.max_payload:
        return "oversize"
    if truth == "duplicate_key" and rules.duplicate_key == "reject":
        # Accepted, the last value wins: the generator puts the true value last, so the rest scores as clean.
        return "duplicate_key"
    return _ALWAYS_REJECTED.get(truth)


def _wrong_type(message: Message, v: ValidateSettings, reading: _Reading) -> str | None:
    if message.truth != "number_as_string":
        return None
    if v.rules.wrong_type == "reject":
        return "wrong_type"
    reading.repairs.add("number_from_string")
    return None


def _machine_rejection(message: Message, v: ValidateSettings, machine: str) -> str | None:
    truth = message.truth
    if truth == "hostile_id" and _hostile(machine):
        return "bad_machine_id"
    if (
        truth in ("hostile_id", "unknown_machine")
        and v.machines is not None
        and v.rules.unknown_machine == "reject"
        and machine not in v.machines
    ):
        return "unknown_machine"
    return None


def _value_rejection(message: Message, v: ValidateSettings, body: dict[str, Any]) -> str | None:
    """Readings the policies may reject: out of range, an uncertain or bad status, fields beyond the schema."""
    truth, rules = message.truth, v.rules
    if truth == "out_of_range" and rules.out_of_range == "reject":
        return "out_of_range"
    if truth == "status_uncertain" and rules.status_uncertain == "reject":
        return "status_uncertain"
    if truth == "status_bad" and rules.status_bad == "reject":
        return "status_bad"
    # Whatever the label, after the status (which the validator checks first): a mileage outside [0, mileage_max]
    # (a backwards shift below zero, a bound set below the stream's counters, an absurd spike).
    mileage = _mileage(body)
    if mileage == math.inf:
        return "out_of_range"  # an integer no float holds: refused whatever the policy
    if rules.out_of_range == "reject" and mileage is not None and not 0 <= mileage <= v.mileage_max:
        return "out_of_range"
    if truth in ("extra_fields", "oversize") and rules.extra_fields == "reject":
        return "extra_fields"
    return None


def _mileage(body: dict[str, Any]) -> float | None:
    """The payload's mileage as the validator reads it (inf for an integer too large for a float); None when it
    is not a number."""
    mileage = body.get("mileage")
    if isinstance(mileage, float):
        return mileage if math.isfinite(mileage) else None  # NaN and infinity are the non_finite rule's
    if isinstance(mileage, bool) or not isinstance(mileage, int):
        return None
    try:
        return float(mileage)
    except OverflowError:
        return math.inf


def _timestamp_form(message: Message, v: ValidateSettings, body: dict[str, Any], reading: _Reading) -> str | None:
    """A timestamp in another form than UTC ISO 8601: rejected, or repaired to the instant it is read as."""
    truth, rules = message.truth, v.rules
    if truth == "offset_timestamp":
        if rules.offset_timestamp == "reject":
            return "offset_timestamp"
        reading.repairs.add("utc_normalised")
    if truth in ("epoch_seconds", "epoch_millis"):
        if rules.epoch_timestamp == "reject":
            return "epoch_timestamp"
        reading.repairs.add(truth)
    if truth in _LOCAL_TIMES:
        return _local_time(message, v, body, reading)
    return None


def _local_time(message: Message, v: ValidateSettings, body: dict[str, Any], reading: _Reading) -> str | None:
    """A timestamp without an offset, read as UTC or as the machine's local time (which a DST change may make
    ambiguous or skip)."""
    truth, rules = message.truth, v.rules
    if v.naive_timestamps == "reject":
        return "naive_timestamp"
    wall = datetime.fromisoformat(body["ts"])
    if v.naive_timestamps == "assume_utc":
        reading.repairs.add("assumed_utc")
        reading.instant = _ns(wall.replace(tzinfo=UTC))
        return None
    reading.repairs.add("assumed_machine_zone")
    zone = ZoneInfo(v.timezones.get(reading.machine, v.default_timezone))
    if truth == "dst_ambiguous":
        if rules.ambiguous_local_time == "reject":
            return "ambiguous_local_time"
        reading.repairs.add("ambiguous_earlier")
        reading.instant = _ns(wall.replace(tzinfo=zone, fold=0).astimezone(UTC))
    elif truth == "dst_nonexistent":
        if rules.nonexistent_local_time == "reject":
            return "nonexistent_local_time"
        reading.repairs.add("nonexistent_shifted")
        # The wall time read with the offset in force before the gap.
        reading.instant = _ns(wall.replace(tzinfo=zone, fold=0).astimezone(UTC))
    return None


def _clock_rejection(v: ValidateSettings, instant: int | None, now_ns: int) -> str | None:
    """Too far ahead of the validator's clock, or too far behind it."""
    rules = v.rules
    if instant is None:
        return None
    if rules.future_timestamp == "reject" and instant - now_ns > v.future_tolerance * 1e9:
        return "future_timestamp"
    if rules.far_past == "reject" and now_ns - instant > v.past_tolerance * 1e9:
        return "far_past"
    return None


def _history_rejection(message: Message, v: ValidateSettings, instant: int | None) -> str | None:
    """Against what its machine sent before: a copy, behind the watermark, a mileage that runs backwards."""
    rules = v.rules
    if message.copy and rules.duplicate == "reject":
        return "duplicate"
    # Lateness is judged on the instant the validator sees (a repaired local time may land months away).
    newest = message.newest_ns
    if instant is not None and newest is not None and rules.late == "reject" and newest - instant > v.watermark * 1e9:
        return "late"
    if message.truth == "mileage_backwards" and rules.mileage_backwards == "reject":
        return "mileage_backwards"
    return None


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
        try:
            table = pq.read_table(
                path, columns=["seq", "ts", "machine", "repairs", "load_rate", "mileage", "received_at"]
            )
        except (OSError, pa.ArrowException):
            continue  # an unreadable file: the ledger names it (unreadable_files); nothing in it can be scored
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


# ----------------------------------------------------------------------------- an external system

EXPECTED_NOT_PERSISTED: frozenset[str] = frozenset(
    {
        # Nothing storable: every policy rejects these (_ALWAYS_REJECTED).
        *_ALWAYS_REJECTED,
        # Rejected by the built-in validator's default policies (docs/validation.md), for reasons any careful
        # validator shares: too large, ambiguous, impossible, from a stranger, or a copy of what was stored.
        "oversize",
        "duplicate_key",
        "number_as_string",
        "out_of_range",
        "mileage_backwards",
        "future_timestamp",
        "far_past",
        "naive_timestamp",
        "dst_ambiguous",
        "dst_nonexistent",
        "duplicate",
        "late",
        "unknown_machine",
        "hostile_id",
        "status_uncertain",
        "status_bad",
    }
)
"""Truth labels whose message an external system may leave out of its output without that being a loss: the
classes the built-in validator rejects under its default policies. The rest (``valid``, ``offset_timestamp``,
``epoch_seconds``, ``epoch_millis``, ``out_of_order``, ``extra_fields``) name a reading that should be stored,
repaired if need be: missing from the output, it is lost. A scenario replaces the set with
``system.external.expect_rejected``, and an anomaly's own ``expect:`` decides for its class."""

TRUTH_FINDINGS_SHOWN = 5
"""Classes named per finding line: the rest are in results.json's ``truth.classes``."""


def expected_not_persisted(
    override: Iterable[str] | None, anomaly_expect: dict[str, Decision] | None = None
) -> frozenset[str]:
    """The truth labels counted as expected not to be persisted: the scenario's list or the default, then each
    anomaly's own ``expect:`` (rejected: expected not persisted; accepted or repaired: expected stored)."""
    labels = set(EXPECTED_NOT_PERSISTED if override is None else override)
    for truth, decision in (anomaly_expect or {}).items():
        if decision == "rejected":
            labels.add(truth)
        else:
            labels.discard(truth)
    labels.discard("valid")  # a clean reading is always expected to be stored
    return frozenset(labels)


def sent_truths(seqs: Iterable[int], anomalous: dict[int, list[Message]]) -> Iterator[tuple[int, list[str]]]:
    """The truth label of every send of each seq: a clean seq once ``valid``; a seq sent again on purpose (the
    ``duplicate`` anomaly) ``valid`` and then its copies' labels; an anomalous seq its own label."""
    for seq in seqs:
        sent = anomalous.get(seq)
        if sent is None:
            yield seq, ["valid"]
        elif all(m.copy for m in sent):
            yield seq, ["valid", *(m.truth for m in sent)]
        else:
            yield seq, [m.truth for m in sent]


@dataclass
class TruthTally:
    """Per truth label, what an external system's output shows of the messages carrying it."""

    expected: frozenset[str]
    rejects_kept: bool
    classes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    """truth -> outcome (``sent``, ``persisted``, ``rejected``, ``dropped``, ``not_persisted``, ``lost``) -> n."""
    reasons: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    """truth -> the system's own reject reason -> n."""
    missing: list[int] = field(default_factory=list)
    """Seqs with a send that should have been stored and was found nowhere (lost)."""

    @property
    def not_persisted(self) -> Counter[str]:
        return Counter({t: c["not_persisted"] for t, c in self.classes.items() if c["not_persisted"]})

    @property
    def accepted_bad_input(self) -> dict[str, int]:
        """Messages the truth says should not be stored as sent, stored anyway."""
        return {t: c["persisted"] for t, c in sorted(self.classes.items()) if t in self.expected and c["persisted"]}

    @property
    def refused_good_input(self) -> dict[str, int]:
        """Messages the truth says should be stored, in the system's rejects instead."""
        return {t: c["rejected"] for t, c in sorted(self.classes.items()) if t not in self.expected and c["rejected"]}

    def findings(self) -> list[str]:
        """The figures a reader must see though they fail nothing: the bench cannot know the system's policy."""
        out = []
        for what, counts in (
            ("persisted despite truth label", self.accepted_bad_input),
            ("refused though the truth label says store", self.refused_good_input),
        ):
            if counts:
                shown = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                named = ", ".join(f"{t} {n:,}" for t, n in shown[:TRUTH_FINDINGS_SHOWN])
                more = (
                    f", {len(shown) - TRUTH_FINDINGS_SHOWN} more class(es)" if len(shown) > TRUTH_FINDINGS_SHOWN else ""
                )
                out.append(f"{sum(counts.values()):,} {what}: {named}{more}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "rejects_kept": self.rejects_kept,
            "expected_not_persisted": sorted(self.expected),
            "classes": {
                truth: {
                    "expected": "not_persisted" if truth in self.expected else "persisted",
                    **{k: counts[k] for k in ("sent", "persisted", "rejected", "dropped", "not_persisted", "lost")},
                    **({"reasons": dict(self.reasons[truth])} if self.reasons.get(truth) else {}),
                }
                for truth, counts in sorted(self.classes.items())
            },
            "accepted_bad_input": self.accepted_bad_input,
            "refused_good_input": self.refused_good_input,
            "findings": self.findings(),
        }


def tally_external(
    sends: Iterable[tuple[int, list[str]]],
    persisted_seqs: Iterable[int],
    rejected: Iterable[tuple[int | None, str]],
    dropped: dict[int, str],
    expected: frozenset[str],
    *,
    rejects_kept: bool,
) -> TruthTally:
    """Pair each send with what the output shows of its seq, counted as the ledger counts (persisted first, then
    rejected, then dropped, up to the number of sends), each outcome given to the send its truth fits best.

    Within one seq, persisted rows go to sends whose truth says store, rejected rows to sends whose truth says
    refuse; only then the other way round (a finding). A send found nowhere is ``not_persisted`` when its truth
    says refuse, else ``lost``.
    """
    tally = TruthTally(expected, rejects_kept)
    persisted_counts = Counter(persisted_seqs)
    reasons_of: dict[int, list[str]] = defaultdict(list)
    for seq, reason in rejected:
        if seq is not None:
            reasons_of[seq].append(reason)
    for seq, truths in sends:
        n = len(truths)
        p = min(persisted_counts.get(seq, 0), n)
        reasons = reasons_of.get(seq, [])[: n - p]
        d = 1 if seq in dropped and p + len(reasons) < n else 0
        good = [t for t in truths if t not in expected]
        bad = [t for t in truths if t in expected]
        good_p = min(p, len(good))
        bad_p = p - good_p
        bad_r = min(len(reasons), len(bad) - bad_p)
        good_r = len(reasons) - bad_r
        # In order: stored, refused, dropped, then missing; bad sends take the refusals first.
        bad_outcomes = ["persisted"] * bad_p + ["rejected"] * bad_r
        good_outcomes = ["persisted"] * good_p + ["rejected"] * good_r
        bad_reasons, good_reasons = reasons[:bad_r], reasons[bad_r:]
        if d:
            (bad_outcomes if len(bad_outcomes) < len(bad) else good_outcomes).append("dropped")
        bad_outcomes += ["not_persisted"] * (len(bad) - len(bad_outcomes))
        good_outcomes += ["lost"] * (len(good) - len(good_outcomes))
        for group, outcomes, kept in ((bad, bad_outcomes, bad_reasons), (good, good_outcomes, good_reasons)):
            for truth, outcome in zip(group, outcomes, strict=True):
                counts = tally.classes[truth]
                counts["sent"] += 1
                counts[outcome] += 1
            for truth, reason in zip(
                [t for t, o in zip(group, outcomes, strict=True) if o == "rejected"], kept, strict=True
            ):
                tally.reasons[truth][reason] += 1
        if "lost" in good_outcomes:
            tally.missing.append(seq)
    return tally


def judge_external(
    ledger: Ledger,
    back: ReadBack,
    seqs: Iterable[int],
    anomalous: dict[int, list[Message]],
    *,
    expect_rejected: Iterable[str] | None,
    anomaly_expect: dict[str, Decision] | None,
    rejects_kept: bool,
) -> tuple[Ledger, dict[str, Any]]:
    """An external system's ledger with the bad input it left out set aside from lost, and results.json's
    ``truth`` (per truth label what its output shows, and the findings)."""
    expected = expected_not_persisted(expect_rejected, anomaly_expect)
    dropped = {s: r for s, r in zip(back.dropped_seqs, back.dropped_reasons, strict=True) if s is not None}
    tally = tally_external(
        sent_truths(seqs, anomalous),
        back.persisted_seqs,
        zip(back.rejected_seqs, back.rejected_reasons, strict=True),
        dropped,
        expected,
        rejects_kept=rejects_kept,
    )
    return set_aside_expected(ledger, tally.not_persisted, tally.missing), tally.to_json()
