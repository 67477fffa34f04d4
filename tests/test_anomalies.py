"""Tests for simulators/anomalies.py: the seeded anomaly catalogue, and its agreement with the bench's oracle.

The generator labels every message with the truth; ``bench.harness.scoring.expect``
derives from that label and the validator's policies what the message must
become. The strongest checks here run the generated messages through the real
:class:`pipeline.validate.Validator` and demand that it decides exactly what
the oracle expects, message by message, under several policy sets.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bench.harness.scoring import Expectation, expect
from pipeline.config import RulePolicies, ValidateSettings
from pipeline.model import Reading, Rejection
from pipeline.validate import Validator
from simulators.anomalies import HOSTILE_IDS, KINDS, NEEDS_HISTORY, OPCUA_KINDS, AnomalySpec, inject
from simulators.stream import Message, PhaseSpec, StreamSpec, stream

EPOCH_NS = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z: weeks away from any DST change in Europe or America
SECOND_NS = 10**9
MACHINES = ("press-0", "press-1", "lathe-0", "robot-0")
PARIS = {m: "Europe/Paris" for m in MACHINES}
MIXED_ZONES = {"press-0": "Europe/Paris", "press-1": "America/New_York", "lathe-0": "UTC", "robot-0": "Europe/Paris"}
DST_KINDS = frozenset({"dst_ambiguous", "dst_nonexistent"})
TOPIC = "plant/telemetry"


def clean(count: int, *, seed: int = 7, rate: float = 20.0, machines: tuple[str, ...] = MACHINES) -> list[Message]:
    """``count`` clean messages, ``rate`` per second over all machines (round-robin), from EPOCH_NS."""
    spec = StreamSpec(
        seed=seed, machines=machines, phases=(PhaseSpec("steady", count / rate + 1.0, rate),), limit=count
    )
    out = list(stream(spec, EPOCH_NS))
    assert len(out) == count
    return out


def run(
    messages: Iterable[Message],
    specs: Iterable[AnomalySpec],
    *,
    seed: int = 3,
    zones: dict[str, str] | None = None,
    start_ns: int | None = None,
    eligible: Callable[[str, str], bool] | None = None,
) -> list[Message]:
    return list(inject(messages, specs, seed=seed, zones=zones, start_ns=start_ns, eligible=eligible))


def body(message: Message) -> dict[str, Any]:
    parsed = json.loads(message.payload)
    assert isinstance(parsed, dict)
    return parsed


def ns(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * SECOND_NS + delta.microseconds * 1000


def labelled(messages: Iterable[Message], kind: str) -> list[Message]:
    return [m for m in messages if m.truth == kind]


# -- determinism -------------------------------------------------------------------


def test_inject_is_deterministic() -> None:
    specs = [AnomalySpec(kind, rate=0.03) for kind in KINDS]
    first = run(clean(1500), specs, seed=11, zones=MIXED_ZONES)
    second = run(clean(1500), specs, seed=11, zones=MIXED_ZONES)
    assert [m.payload for m in first] == [m.payload for m in second]
    assert [(m.seq, m.truth, m.ts_ns, m.copy, m.newest_ns) for m in first] == [
        (m.seq, m.truth, m.ts_ns, m.copy, m.newest_ns) for m in second
    ]
    assert first == second
    # The seed matters: another one picks other messages.
    other = run(clean(1500), specs, seed=12, zones=MIXED_ZONES)
    assert [m.truth for m in other] != [m.truth for m in first]


def test_adding_a_rule_does_not_reshuffle_the_first() -> None:
    messages = clean(2000)
    nan = AnomalySpec("nan", rate=0.3)
    alone = run(messages, [nan])
    both = run(messages, [nan, AnomalySpec("inf", rate=0.3)])
    hit_alone = {m.seq for m in alone if m.truth == "nan"}
    hit_both = {m.seq for m in both if m.truth == "nan"}
    assert hit_alone, "the rule must hit something for the comparison to mean anything"
    assert hit_alone == hit_both
    # Same bytes too, not just the same seqs.
    assert [m.payload for m in alone if m.truth == "nan"] == [m.payload for m in both if m.truth == "nan"]
    # The appended rule only takes what the first left, and adding a third moves neither.
    inf_hits = {m.seq for m in both if m.truth == "inf"}
    assert inf_hits and not inf_hits & hit_both
    three = run(messages, [nan, AnomalySpec("inf", rate=0.3), AnomalySpec("null", rate=0.3)])
    assert {m.seq for m in three if m.truth == "nan"} == hit_both
    assert {m.seq for m in three if m.truth == "inf"} == inf_hits


def test_one_draw_per_rule_whatever_the_rules_do() -> None:
    """What the one-draw-per-(message, rule) scheme does guarantee: a rule's rate, window, machines or
    eligibility never move the other rules' draws; it only takes (first wins) messages they would have hit."""
    messages = clean(2000)
    second = AnomalySpec("inf", rate=0.3)
    # With the first rule off, inf hits exactly the messages whose inf draw is below its rate.
    candidates = {m.seq for m in run(messages, [AnomalySpec("nan", rate=0.0), second]) if m.truth == "inf"}
    assert abs(len(candidates) / 2000 - 0.3) < 0.05
    variants = [
        AnomalySpec("nan", rate=0.3),
        AnomalySpec("nan", rate=0.9),
        AnomalySpec("nan", rate=0.5, machines=("press-0",)),
        AnomalySpec("nan", at_s=10.0, duration_s=5.0),
        AnomalySpec("mileage_backwards", rate=0.3),  # needs history: refuses each machine's first message
    ]
    for first in variants:
        out = run(messages, [first, second])
        first_hits = {m.seq for m in out if m.truth == first.kind}
        assert first_hits, first
        assert {m.seq for m in out if m.truth == "inf"} == candidates - first_hits, first
    refused = run(messages, [AnomalySpec("nan", rate=0.9), second], eligible=lambda kind, machine: kind == "inf")
    assert {m.seq for m in refused if m.truth == "inf"} == candidates


# -- every kind --------------------------------------------------------------------

RATE = 0.2
RATE_N = 2000
# Hoeffding: P(|hits/n - p| >= t) <= 2 exp(-2 n t^2). With n >= 1996 eligible messages (the first per
# machine is not eligible for the kinds that need history) and t = 0.05 the bound is 2 exp(-9.98) < 1e-4,
# so for any seed the chance that a correct generator fails this check is below 1/1000 (per kind).
RATE_TOLERANCE = 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_labelled_at_its_rate(kind: str) -> None:
    messages = clean(RATE_N)
    out = run(messages, [AnomalySpec(kind, rate=RATE)], zones=PARIS)
    truths = Counter(m.truth for m in out)
    # Exactly one label per message, drawn from the catalogue; nothing but the kind asked for.
    assert set(truths) <= {"valid", kind}, truths
    copies = [m for m in out if m.copy]
    assert len(out) == RATE_N + len(copies)
    assert (len(copies) > 0) == (kind == "duplicate")
    eligible = RATE_N - (len(MACHINES) if kind in NEEDS_HISTORY else 0)
    hits = truths[kind]
    assert abs(hits / eligible - RATE) < RATE_TOLERANCE, (kind, hits, eligible)
    # Every labelled message really differs from its clean original (the copy of a duplicate is the exception).
    by_seq = {m.seq: m for m in messages}
    for m in labelled(out, kind):
        assert (m.payload == by_seq[m.seq].payload) == (kind == "duplicate")
        assert m.machine == by_seq[m.seq].machine
        assert m.intended_send_ns == by_seq[m.seq].intended_send_ns


@pytest.mark.parametrize("kind", sorted(DST_KINDS))
def test_dst_kinds_leave_a_utc_machine_clean(kind: str) -> None:
    messages = clean(200)
    out = run(messages, [AnomalySpec(kind, rate=1.0)])
    assert out == messages
    paris = run(messages, [AnomalySpec(kind, rate=1.0)], zones={"press-1": "Europe/Paris"})
    assert {m.machine for m in labelled(paris, kind)} == {"press-1"}
    assert {m.truth for m in paris if m.machine != "press-1"} == {"valid"}


def test_a_message_carries_at_most_one_anomaly() -> None:
    messages = clean(400)
    # Every rule would hit every message: the first that applies wins, the others leave it alone.
    out = run(messages, [AnomalySpec("nan", rate=1.0), AnomalySpec("inf", rate=1.0), AnomalySpec("extra_fields")])
    assert len(out) == len(messages)
    assert {m.truth for m in out} == {"nan"}
    for m in out:
        assert m.payload.count(b"NaN") == 1
        assert b"Infinity" not in m.payload
        assert set(body(m)) == {"machine", "ts", "load_rate", "mileage", "seq"}
    # With every kind at a high rate, still one label each and never more messages than sends (+ copies).
    everything = run(clean(1000), [AnomalySpec(kind, rate=0.5) for kind in KINDS], zones=PARIS)
    assert {m.truth for m in everything} <= {"valid", *KINDS}
    assert len(everything) == 1000 + sum(m.copy for m in everything)
    assert Counter(m.seq for m in everything if not m.copy) == Counter(range(1000))


# -- where and when ----------------------------------------------------------------


def test_schedule_window_hits_only_inside_it() -> None:
    messages = clean(400, rate=40.0)  # 10 s of sends
    out = run(messages, [AnomalySpec("nan", at_s=2.0, duration_s=3.0)])
    for m in out:
        elapsed = (m.intended_send_ns - EPOCH_NS) / SECOND_NS
        assert (m.truth == "nan") == (2.0 <= elapsed < 5.0), (m.seq, elapsed, m.truth)
    # A rate inside the window: some but not all inside, none outside.
    half = run(messages, [AnomalySpec("nan", rate=0.5, at_s=2.0, duration_s=3.0)])
    inside = [m for m in half if 2.0 <= (m.intended_send_ns - EPOCH_NS) / SECOND_NS < 5.0]
    assert all(m.truth == "valid" for m in half if m not in inside)
    assert 0 < len(labelled(inside, "nan")) < len(inside)
    # Open-ended: from at_s to the end.
    tail = run(messages, [AnomalySpec("inf", at_s=8.0)])
    assert all((m.truth == "inf") == (m.intended_send_ns - EPOCH_NS >= 8 * SECOND_NS) for m in tail)
    # start_ns moves the window: counted from 1 s before the first send, 2..5 s is 1..4 s of the stream.
    shifted = run(messages, [AnomalySpec("nan", at_s=2.0, duration_s=3.0)], start_ns=EPOCH_NS - SECOND_NS)
    for m in shifted:
        elapsed = (m.intended_send_ns - EPOCH_NS) / SECOND_NS
        assert (m.truth == "nan") == (1.0 <= elapsed < 4.0), (m.seq, elapsed, m.truth)


def test_machines_restricts_the_rule() -> None:
    out = run(clean(400), [AnomalySpec("status_bad", rate=1.0, machines=("press-1", "robot-0"))])
    assert {m.machine for m in labelled(out, "status_bad")} == {"press-1", "robot-0"}
    assert all(m.truth == "status_bad" for m in out if m.machine in ("press-1", "robot-0"))
    assert all(m.truth == "valid" for m in out if m.machine not in ("press-1", "robot-0"))


def test_eligible_refuses_kinds() -> None:
    asked: set[tuple[str, str]] = set()

    def opcua_on_press_1(kind: str, machine: str) -> bool:
        asked.add((kind, machine))
        return kind in OPCUA_KINDS or machine != "press-1"

    specs = [AnomalySpec("malformed_json", rate=1.0), AnomalySpec("nan", rate=1.0)]
    out = run(clean(200), specs, eligible=opcua_on_press_1)
    # malformed_json cannot travel over OPC UA: press-1 gets the next rule that it can carry.
    assert {m.truth for m in out if m.machine == "press-1"} == {"nan"}
    assert {m.truth for m in out if m.machine != "press-1"} == {"malformed_json"}
    assert ("malformed_json", "press-1") in asked
    refused = run(clean(200), [AnomalySpec("oversize", rate=1.0)], eligible=lambda kind, machine: False)
    assert {m.truth for m in refused} == {"valid"}


# -- what each kind writes ---------------------------------------------------------


def test_duplicate_yields_original_then_copy() -> None:
    messages = clean(200)
    out = run(messages, [AnomalySpec("duplicate", rate=0.3)])
    copies = [i for i, m in enumerate(out) if m.copy]
    assert copies
    for i in copies:
        original, copy = out[i - 1], out[i]
        assert original.truth == "valid" and not original.copy
        assert copy.truth == "duplicate"
        assert copy.seq == original.seq and copy.machine == original.machine
        assert copy.payload == original.payload == messages[copy.seq].payload
        assert copy.ts_ns == original.ts_ns
    assert [m.seq for m in out if not m.copy] == list(range(200))


def test_offset_timestamp_keeps_the_instant() -> None:
    messages = clean(60)
    out = labelled(run(messages, [AnomalySpec("offset_timestamp", rate=1.0)]), "offset_timestamp")
    offsets = set()
    for m in out:
        assert m.ts_ns == messages[m.seq].ts_ns
        parsed = datetime.fromisoformat(body(m)["ts"])
        offset = parsed.utcoffset()
        assert offset is not None and offset.total_seconds() != 0
        offsets.add(offset)
        assert ns(parsed) == m.ts_ns
    assert len(offsets) == 3
    fixed = labelled(run(messages, [AnomalySpec("offset_timestamp", rate=1.0, offset="-03:30")]), "offset_timestamp")
    assert all(body(m)["ts"].endswith("-03:30") and ns(datetime.fromisoformat(body(m)["ts"])) == m.ts_ns for m in fixed)


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York", "Asia/Kolkata", "UTC"])
def test_naive_timestamp_is_the_machine_wall_time(zone: str) -> None:
    messages = clean(40)
    out = labelled(
        run(messages, [AnomalySpec("naive_timestamp", rate=1.0)], zones=dict.fromkeys(MACHINES, zone)),
        "naive_timestamp",
    )
    assert len(out) == 40
    for m in out:
        wall = datetime.fromisoformat(body(m)["ts"])
        assert wall.tzinfo is None
        assert m.ts_ns == messages[m.seq].ts_ns
        assert ns(wall.replace(tzinfo=ZoneInfo(zone))) == m.ts_ns
        if zone != "UTC":
            assert ns(wall.replace(tzinfo=UTC)) != m.ts_ns


def test_dst_wall_times_for_paris() -> None:
    paris = ZoneInfo("Europe/Paris")
    out = run(
        clean(40), [AnomalySpec("dst_ambiguous", rate=0.5), AnomalySpec("dst_nonexistent", rate=1.0)], zones=PARIS
    )
    ambiguous, nonexistent = labelled(out, "dst_ambiguous"), labelled(out, "dst_nonexistent")
    assert ambiguous and nonexistent and len(ambiguous) + len(nonexistent) == 40
    for m in ambiguous + nonexistent:
        wall = datetime.fromisoformat(body(m)["ts"])
        assert wall.tzinfo is None
        assert m.ts_ns is None  # no single true instant
        early, late = wall.replace(tzinfo=paris, fold=0), wall.replace(tzinfo=paris, fold=1)
        assert early.utcoffset() != late.utcoffset()
        round_trip = early.astimezone(UTC).astimezone(paris).replace(tzinfo=None)
        assert (round_trip == wall) == (m.truth == "dst_ambiguous")
    # The nearest changes to 2023-11-14: clocks back on 2023-10-29, forward on 2024-03-31, at 02:30 wall time.
    assert {body(m)["ts"] for m in ambiguous} == {"2023-10-29T02:30:00.000000"}
    assert {body(m)["ts"] for m in nonexistent} == {"2024-03-31T02:30:00.000000"}


def test_epoch_timestamps() -> None:
    messages = clean(200, rate=7.0)  # sends off the whole millisecond, so the truncation shows
    out = run(messages, [AnomalySpec("epoch_seconds", rate=0.5), AnomalySpec("epoch_millis", rate=1.0)])
    seconds, millis = labelled(out, "epoch_seconds"), labelled(out, "epoch_millis")
    assert seconds and millis
    truncated = 0
    for m in seconds:
        value = body(m)["ts"]
        assert isinstance(value, float)
        text = repr(value)
        assert len(text.partition(".")[2]) <= 3, text  # an exact millisecond decimal, not x.0579998
        assert m.ts_ns == int(Decimal(text) * 10**9)
        assert m.ts_ns == messages[m.seq].ts_ns // 10**6 * 10**6  # type: ignore[operator]
        truncated += m.ts_ns != messages[m.seq].ts_ns
    for m in millis:
        value = body(m)["ts"]
        assert isinstance(value, int) and not isinstance(value, bool)
        assert m.ts_ns == value * 10**6 == messages[m.seq].ts_ns // 10**6 * 10**6  # type: ignore[operator]
    assert truncated > 0


def test_hostile_ids_are_verbatim() -> None:
    out = labelled(run(clean(60), [AnomalySpec("hostile_id", rate=1.0)]), "hostile_id")
    ids = [body(m)["machine"] for m in out]
    assert set(ids) == set(HOSTILE_IDS)
    assert ids[: len(HOSTILE_IDS)] == list(HOSTILE_IDS)


def test_broken_payloads() -> None:
    specs = [
        AnomalySpec("malformed_json", rate=0.3),
        AnomalySpec("invalid_utf8", rate=0.4),
        AnomalySpec("oversize", rate=1.0),
    ]
    out = run(clean(300), specs)
    malformed, invalid, oversize = (labelled(out, s) for s in ("malformed_json", "invalid_utf8", "oversize"))
    assert malformed and invalid and oversize
    for m in malformed:
        m.payload.decode("utf-8")
        with pytest.raises(ValueError):
            json.loads(m.payload)
    for m in invalid:
        with pytest.raises(UnicodeDecodeError):
            m.payload.decode("utf-8")
    for m in oversize:
        assert len(m.payload) > 65_536
        assert set(body(m)) > {"machine", "ts", "load_rate", "mileage", "seq"}
    small = labelled(run(clean(10), [AnomalySpec("oversize", rate=1.0, size=100)]), "oversize")
    assert all(len(m.payload) < 65_536 for m in small)


def test_value_kinds_write_what_they_say() -> None:
    specs = [AnomalySpec(k, rate=0.1) for k in ("nan", "inf", "null", "number_as_string", "bool_value")]
    out = run(clean(1000), specs)
    seen: dict[str, set[str]] = {}
    for m in out:
        if m.truth == "valid":
            continue
        b = body(m)
        if m.truth in ("nan", "inf", "null"):
            bad = [k for k in ("load_rate", "mileage") if b[k] is None or not math.isfinite(b[k])]
            assert len(bad) == 1
            seen.setdefault(m.truth, set()).add(bad[0])
        elif m.truth == "number_as_string":
            assert isinstance(b["load_rate"], str) and float(b["load_rate"]) == json.loads(b["load_rate"])
        else:
            assert b["load_rate"] is True
    assert seen == {"nan": {"load_rate", "mileage"}, "inf": {"load_rate", "mileage"}, "null": {"load_rate", "mileage"}}


def test_duplicate_key_names_one_field_twice_decoy_first_true_value_last() -> None:
    messages = clean(60)
    out = run(messages, [AnomalySpec("duplicate_key", rate=1.0)])
    by_seq = {m.seq: m for m in messages}
    seen: Counter[str] = Counter()
    for m in labelled(out, "duplicate_key"):
        pairs: list[tuple[str, Any]] = []

        def keep(found: list[tuple[str, Any]], pairs: list[tuple[str, Any]] = pairs) -> dict[str, Any]:
            pairs.extend(found)
            return dict(found)

        json.loads(m.payload, object_pairs_hook=keep)
        names = Counter(name for name, _ in pairs)
        repeated = [name for name, count in names.items() if count > 1]
        assert len(repeated) == 1 and names[repeated[0]] == 2, m.payload
        name = repeated[0]
        seen[name] += 1
        first, last = (value for n, value in pairs if n == name)
        assert first != last
        # A last-wins reading is the clean message, field for field (order aside).
        assert json.loads(m.payload) == body(by_seq[m.seq])
        assert (m.ts_ns, m.copy) == (by_seq[m.seq].ts_ns, False)
        if name == "seq":
            assert first == m.seq + 1  # another message's seq: the dangerous decoy
        if name == "machine":
            assert first == f"{m.machine}-other"
    assert seen == {"machine": 20, "seq": 20, "load_rate": 20}


def test_duplicate_key_field_can_be_chosen() -> None:
    out = run(clean(20), [AnomalySpec("duplicate_key", rate=1.0, field="mileage")])
    for m in out:
        assert m.payload.count(b'"mileage":') == 2, m.payload


# -- the oracle against the real validator -----------------------------------------


@dataclass(frozen=True)
class Decided:
    category: str
    reason: str | None
    repairs: frozenset[str]
    ts_ns: int | None
    machine: str | None


def decided(result: Reading | Rejection) -> Decided:
    if isinstance(result, Rejection):
        return Decided("rejected", result.reason, frozenset(), None, result.machine)
    category = "repaired" if result.repairs else "accepted"
    return Decided(category, None, frozenset(result.repairs), result.ts_ns, result.machine)


def disagreement(got: Decided, exp: Expectation) -> str | None:
    if got.category != exp.decision:
        return f"validator {got.category} ({got.reason or sorted(got.repairs)}), oracle {exp.label()}"
    if exp.decision == "rejected":
        return None if got.reason in exp.reasons else f"reason {got.reason}, oracle {exp.label()}"
    if got.repairs != exp.repairs:
        return f"repairs {sorted(got.repairs)}, oracle {exp.label()}"
    if exp.instant_ns is not None and got.ts_ns != exp.instant_ns:
        return f"stored ts {got.ts_ns}, oracle {exp.instant_ns}"
    if exp.machine is not None and got.machine != exp.machine:
        return f"stored machine {got.machine!r}, oracle {exp.machine!r}"
    return None


def disagreements(messages: Iterable[Message], settings: ValidateSettings) -> tuple[list[str], Counter[str]]:
    """Feed ``messages`` in order through a fresh validator; every message whose decision the oracle did not predict."""
    validator = Validator(settings)
    problems: list[str] = []
    decisions: Counter[str] = Counter()
    for m in messages:
        now = m.intended_send_ns
        got = decided(validator.check(m.payload, TOPIC, now, now))
        exp = expect(m, settings, now)
        decisions[f"{m.truth}->{exp.label()}"] += 1
        problem = disagreement(got, exp)
        if problem is not None:
            problems.append(f"seq {m.seq} {m.truth} on {m.machine}: {problem}")
    return problems, decisions


POLICIES: dict[str, dict[str, Any]] = {
    "default": {},
    "lenient": {
        "naive_timestamps": "assume_machine_zone",
        "rules": RulePolicies(wrong_type="repair", late="accept", extra_fields="reject"),
    },
    "assume_utc": {
        "naive_timestamps": "assume_utc",
        "rules": RulePolicies(
            duplicate="accept",
            duplicate_key="accept",
            oversize="accept",
            unknown_machine="accept",
            out_of_range="accept",
            status_bad="accept",
            status_uncertain="accept",
            mileage_backwards="accept",
            offset_timestamp="reject",
            epoch_timestamp="reject",
        ),
    },
    "dst_repair": {
        "naive_timestamps": "assume_machine_zone",
        "rules": RulePolicies(
            ambiguous_local_time="repair",
            nonexistent_local_time="repair",
            future_timestamp="accept",
            far_past="accept",
            late="accept",
        ),
    },
}
ORACLE_N = 480  # 24 s at 20 msg/s: every kind gets ~100 hits at rate 0.25, and every machine a history


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("kind", KINDS)
def test_validator_decides_what_the_oracle_expects(kind: str, policy: str) -> None:
    settings = ValidateSettings(machines=MACHINES, timezones=MIXED_ZONES, **POLICIES[policy])
    out = run(clean(ORACLE_N), [AnomalySpec(kind, rate=0.25)], zones=MIXED_ZONES)
    assert len(labelled(out, kind)) >= 50
    problems, decisions = disagreements(out, settings)
    assert not problems, "\n".join(problems[:20])
    # The clean messages all went through as they are.
    assert decisions["valid->accepted"] == sum(m.truth == "valid" for m in out)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_validator_agrees_on_a_mixed_stream(policy: str) -> None:
    """All kinds at once, so per-machine state (watermark, dedup, mileage) carries the others' effects."""
    settings = ValidateSettings(machines=MACHINES, timezones=MIXED_ZONES, **POLICIES[policy])
    out = run(clean(2000), [AnomalySpec(kind, rate=0.03) for kind in KINDS], zones=MIXED_ZONES, seed=5)
    assert {m.truth for m in out} == {"valid", *KINDS}
    problems, _ = disagreements(out, settings)
    assert not problems, "\n".join(problems[:20])


def test_message_left_clean_by_a_dst_rule_still_counts_as_history() -> None:
    # One machine, one message every 30 s: seq 0 at 0 s, seq 1 at 30 s, seq 2 at 60 s.
    messages = clean(3, rate=1 / 30, machines=("m",))
    specs = [
        AnomalySpec("dst_ambiguous", at_s=30.0, duration_s=1.0),  # UTC machine: seq 1 stays clean
        AnomalySpec("late", at_s=60.0, duration_s=1.0, by=100.0),  # seq 2 says 60 - 100 = -40 s
    ]
    out = run(messages, specs)
    assert [m.truth for m in out] == ["valid", "valid", "late"]
    # The validator's newest reading of "m" is seq 1 (30 s): -40 s is 70 s behind, beyond the 60 s watermark.
    # The oracle is told newest_ns = seq 0's instant (0 s), so it expects the message accepted (40 s behind).
    assert out[2].newest_ns == out[1].ts_ns
    problems, _ = disagreements(out, ValidateSettings(machines=("m",)))
    assert not problems, problems
