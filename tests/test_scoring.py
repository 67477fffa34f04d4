"""Tests for bench/harness/scoring.py: pairing each send with an observed outcome and judging it against the oracle."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.harness.scoring import Decision, Expectation, Observed, Outcomes, Score, expect, score
from pipeline.config import RulePolicies, ValidateSettings
from pipeline.model import Reading, Rejection
from pipeline.validate import Validator
from simulators.stream import Message, format_ts

NOW_NS = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z
SETTINGS = ValidateSettings(machines=("m-0", "m-1"))


def payload(seq: int, machine: str = "m-0", ts_ns: int = NOW_NS, **overrides: Any) -> bytes:
    body: dict[str, Any] = {"machine": machine, "ts": format_ts(ts_ns), "load_rate": 42.5, "mileage": 1234.5}
    body["seq"] = seq
    body.update(overrides)
    return json.dumps(body, separators=(",", ":"), allow_nan=True).encode()


def message(seq: int, truth: str = "valid", *, machine: str = "m-0", copy: bool = False, **overrides: Any) -> Message:
    at = NOW_NS + seq * 10**9
    return Message(
        seq=seq,
        machine=machine,
        intended_send_ns=at,
        payload=payload(seq, machine, at, **overrides),
        truth=truth,
        ts_ns=at,
        copy=copy,
    )


def oracle(settings: ValidateSettings = SETTINGS) -> Callable[[Message], Expectation]:
    return lambda m: expect(m, settings, m.intended_send_ns)


def persisted(m: Message, *, ts_ns: int | None = None, machine: str | None = None) -> Observed:
    return Observed("accepted", None, frozenset(), m.ts_ns if ts_ns is None else ts_ns, machine or m.machine)


def judge(
    sends: list[tuple[int, list[Message]]], outcomes: Outcomes, overrides: dict[str, Decision] | None = None
) -> Score:
    return score(sends, outcomes, oracle(), overrides)


def test_clean_persisted_is_no_mismatch() -> None:
    m = message(0)
    out = Outcomes()
    out.persisted[0].append(persisted(m))
    result = judge([(0, [m])], out)
    assert result.mismatches == 0
    assert result.confusion["valid"] == {"accepted": 1}
    assert result.expected["valid"] == {"accepted": 1}
    assert result.sample == []


@pytest.mark.parametrize(
    ("ts_shift_ns", "machine", "problem"),
    [
        (1000, None, "stored ts"),
        (10**9, None, "stored ts"),
        (0, "m-1", "stored machine"),
    ],
)
def test_persisted_with_wrong_ts_or_machine_is_a_mismatch(ts_shift_ns: int, machine: str | None, problem: str) -> None:
    m = message(3)
    assert m.ts_ns is not None
    out = Outcomes()
    out.persisted[3].append(persisted(m, ts_ns=m.ts_ns + ts_shift_ns, machine=machine))
    result = judge([(3, [m])], out)
    assert result.mismatches == 1
    assert result.mismatches_by_class == {"valid": 1}
    assert len(result.sample) == 1
    assert result.sample[0]["seq"] == 3 and result.sample[0]["truth"] == "valid"
    assert result.sample[0]["problem"].startswith(problem), result.sample[0]


def test_sub_microsecond_instant_is_compared_at_storage_precision() -> None:
    # Parquet stores microseconds: an instant with nanoseconds matches its truncation, not more.
    m = Message(0, "m-0", NOW_NS, payload(0), ts_ns=NOW_NS + 999)
    out = Outcomes()
    out.persisted[0].append(Observed("accepted", None, frozenset(), NOW_NS, "m-0"))
    assert judge([(0, [m])], out).mismatches == 0


def test_rejection_reason_must_match() -> None:
    m = message(1, "nan", load_rate=float("nan"))
    right, wrong = Outcomes(), Outcomes()
    right.rejected[1].append("non_finite")
    wrong.rejected[1].append("out_of_range")
    assert judge([(1, [m])], right).mismatches == 0
    result = judge([(1, [m])], wrong)
    assert result.mismatches == 1
    assert result.confusion["nan"] == {"rejected:out_of_range": 1}
    assert result.expected["nan"] == {"rejected:non_finite": 1}
    assert "reason out_of_range" in result.sample[0]["problem"]


def test_rejected_where_accepted_was_expected_is_a_mismatch() -> None:
    m = message(2)
    out = Outcomes()
    out.rejected[2].append("late")
    result = judge([(2, [m])], out)
    assert result.mismatches == 1
    assert result.confusion["valid"] == {"rejected:late": 1}


def test_repairs_must_match() -> None:
    m = message(4, "number_as_string", load_rate="42.5")
    lenient = ValidateSettings(rules=RulePolicies(wrong_type="repair"))
    good, bad = Outcomes(), Outcomes()
    good.persisted[4].append(Observed("repaired", None, frozenset({"number_from_string"}), m.ts_ns, "m-0"))
    bad.persisted[4].append(Observed("repaired", None, frozenset({"utc_normalised"}), m.ts_ns, "m-0"))
    assert score([(4, [m])], good, oracle(lenient)).mismatches == 0
    assert score([(4, [m])], bad, oracle(lenient)).mismatches == 1
    # Under the default policy the same message must have been rejected.
    assert score([(4, [m])], good, oracle()).mismatches == 1


@pytest.mark.parametrize("order", ["clean_first", "copy_first"])
def test_duplicate_pairs_one_persisted_one_rejected(order: str) -> None:
    original = message(5)
    copy = message(5, "duplicate", copy=True)
    assert copy.payload == original.payload
    out = Outcomes()
    out.persisted[5].append(persisted(original))
    out.rejected[5].append("duplicate")
    # Pairing must not depend on the order of the sends: each takes the observation that fits it.
    sent = [original, copy] if order == "clean_first" else [copy, original]
    result = judge([(5, sent)], out)
    assert result.mismatches == 0, result.sample
    assert result.confusion["valid"] == {"accepted": 1}
    assert result.confusion["duplicate"] == {"rejected:duplicate": 1}


def test_duplicate_persisted_twice_is_a_mismatch() -> None:
    original = message(6)
    copy = message(6, "duplicate", copy=True)
    out = Outcomes()
    out.persisted[6] += [persisted(original), persisted(original)]
    result = judge([(6, [original, copy])], out)
    assert result.mismatches == 1
    assert result.mismatches_by_class == {"duplicate": 1}


def test_override_turns_a_mismatch_into_a_match_and_back() -> None:
    m = message(7, "nan", load_rate=float("nan"))
    stored, refused = Outcomes(), Outcomes()
    stored.persisted[7].append(persisted(m))
    refused.rejected[7].append("non_finite")
    overrides: dict[str, Decision] = {"nan": "accepted"}
    # Without an override, the oracle wants non_finite.
    assert judge([(7, [m])], stored).mismatches == 1
    assert judge([(7, [m])], refused).mismatches == 0
    # The scenario says this plant's NaN must be accepted: now storing it is right and refusing it wrong.
    ok = judge([(7, [m])], stored, overrides)
    assert ok.mismatches == 0
    assert ok.expected["nan"] == {"accepted": 1}
    wrong = judge([(7, [m])], refused, overrides)
    assert wrong.mismatches == 1
    assert "the scenario expects accepted" in wrong.sample[0]["problem"]
    # An override names a truth: it leaves other classes alone.
    clean = message(8)
    other = Outcomes()
    other.rejected[8].append("non_finite")
    assert judge([(8, [clean])], other, overrides).mismatches == 1


def test_lost_and_dropped_are_labelled_not_counted() -> None:
    lost, dropped, kept = message(10), message(11, "nan", load_rate=float("nan")), message(12)
    out = Outcomes()
    out.dropped[11] = "buffer_full"
    out.persisted[12].append(persisted(kept))
    result = judge([(10, [lost]), (11, [dropped]), (12, [kept])], out)
    assert result.mismatches == 0
    assert result.sample == []
    assert result.confusion["valid"] == {"lost": 1, "accepted": 1}
    assert result.confusion["nan"] == {"dropped:buffer_full": 1}
    assert result.expected["valid"] == {"accepted": 2}
    assert result.expected["nan"] == {"rejected:non_finite": 1}
    report = result.to_json()
    assert report["mismatches"] == 0
    assert report["classes"]["valid"]["injected"] == 2
    assert report["classes"]["nan"]["decisions"] == {"dropped:buffer_full": 1}


def test_a_duplicate_copy_lost_while_the_original_was_kept() -> None:
    # One observation for two sends: the clean one takes it, the copy is lost (not a validator mismatch).
    original, copy = message(13), message(13, "duplicate", copy=True)
    out = Outcomes()
    out.persisted[13].append(persisted(original))
    result = judge([(13, [original, copy])], out)
    assert result.mismatches == 0
    assert result.confusion["duplicate"] == {"lost": 1}


def test_mismatch_sample_is_capped() -> None:
    sends = [(seq, [message(seq)]) for seq in range(80)]
    out = Outcomes()
    for seq in range(80):
        out.rejected[seq].append("late")
    result = judge(sends, out)
    assert result.mismatches == 80
    assert len(result.sample) == 50
    assert result.to_json()["classes"]["valid"]["mismatches"] == 80


def duplicate_key_message(seq: int) -> Message:
    """seq named twice, a decoy first and the true value last (as the generator writes it)."""
    m = message(seq, "duplicate_key")
    text = m.payload.decode()
    return Message(
        seq=seq,
        machine=m.machine,
        intended_send_ns=m.intended_send_ns,
        payload=('{"seq":' + str(seq + 1) + "," + text[1:]).encode(),
        truth="duplicate_key",
        ts_ns=m.ts_ns,
    )


def test_duplicate_key_is_expected_rejected_by_default_and_accepted_last_wins_when_allowed() -> None:
    m = duplicate_key_message(20)
    assert m.payload.count(b'"seq":') == 2
    assert expect(m, SETTINGS, NOW_NS).label() == "rejected:duplicate_key"
    lenient = ValidateSettings(machines=("m-0", "m-1"), rules=RulePolicies(duplicate_key="accept"))
    exp = expect(m, lenient, m.intended_send_ns)
    assert (exp.decision, exp.machine, exp.instant_ns) == ("accepted", "m-0", m.ts_ns)


def test_duplicate_key_scored_against_the_quarantine() -> None:
    m = duplicate_key_message(21)
    right, stored, wrong = Outcomes(), Outcomes(), Outcomes()
    right.rejected[21].append("duplicate_key")
    stored.persisted[21].append(persisted(m))
    wrong.rejected[21].append("malformed_json")
    ok = judge([(21, [m])], right)
    assert ok.mismatches == 0
    assert ok.confusion["duplicate_key"] == {"rejected:duplicate_key": 1}
    # Stored silently (last value wins) is what the rule exists to prevent: a mismatch under the default.
    assert judge([(21, [m])], stored).sample[0]["problem"] == "accepted, expected rejected:duplicate_key"
    assert "reason malformed_json" in judge([(21, [m])], wrong).sample[0]["problem"]


# --- mileage_max: the oracle agrees with the validator around the bound ------------------------------------------


def around(bound: float) -> st.SearchStrategy[float | int]:
    """Mileages at the bound, a few ulps and units either side, and the integers next to it."""
    ulps = st.integers(-3, 3).map(lambda k: _ulps(bound, k))
    units = st.sampled_from([-1, -0.001, 0.001, 1]).map(lambda d: bound + d)
    ints = st.integers(-2, 2).map(lambda k: max(0, math.floor(bound) + k))
    return ulps | units | ints | st.floats(0, bound * 2, allow_nan=False)


def _ulps(value: float, k: int) -> float:
    for _ in range(abs(k)):
        value = math.nextafter(value, math.inf if k > 0 else 0.0)
    return value


def spikes(bound: float) -> st.SearchStrategy[float | int]:
    """One absurd counter reading (the issue's 1e300), and integers no float holds."""
    return st.sampled_from([1e300, 1.7976931348623157e308, 10**30, 10**400]) | st.just(bound * 4)


@st.composite
def bound_cases(draw: st.DrawFn) -> tuple[ValidateSettings, list[Message]]:
    """One machine whose mileage climbs across mileage_max, with maybe one absurd spike among its readings."""
    bound = draw(st.sampled_from([1e9, 1000.0, 0.5]) | st.floats(1e-3, 1e12))
    settings = ValidateSettings(
        machines=("m-0", "m-1"),
        mileage_max=bound,
        rules=RulePolicies(out_of_range=draw(st.sampled_from(["reject", "accept"]))),
    )
    mileages: list[float | int] = sorted(draw(st.lists(around(bound), min_size=1, max_size=8)))
    labels = ["valid"] * len(mileages)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(mileages)))
        mileages.insert(at, draw(spikes(bound)))
        labels.insert(at, "out_of_range")  # what the catalogue calls it; the oracle must not rely on the label
    messages = [message(seq, truth, mileage=m) for seq, (m, truth) in enumerate(zip(mileages, labels, strict=True))]
    return settings, messages


def validator_label(result: Reading | Rejection) -> str:
    if isinstance(result, Rejection):
        return f"rejected:{result.reason}"
    return "repaired:" + ",".join(sorted(result.repairs)) if result.repairs else "accepted"


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(bound_cases())
def test_oracle_and_validator_agree_around_mileage_max(case: tuple[ValidateSettings, list[Message]]) -> None:
    """Each reading, in order, through one validator: the oracle predicts every decision and reason, so a mileage
    above the bound is out_of_range (or, accepted by policy, stored without becoming the bar for what follows)."""
    s, messages = case
    v = Validator(s)
    for m in messages:
        got = validator_label(v.check(m.payload, "t", m.intended_send_ns))
        exp = expect(m, s, m.intended_send_ns)
        assert got == exp.label(), (m.truth, json.loads(m.payload)["mileage"], s.mileage_max, s.rules.out_of_range)
        if got == "accepted":
            mileage = json.loads(m.payload)["mileage"]
            assert s.rules.out_of_range == "accept" or 0 <= mileage <= s.mileage_max


def test_oracle_knows_mileage_max_whatever_the_label() -> None:
    s = ValidateSettings(machines=("m-0", "m-1"), mileage_max=5000)
    assert expect(message(1, mileage=5000), s, NOW_NS + 10**9).label() == "accepted"
    assert expect(message(1, mileage=5000.5), s, NOW_NS + 10**9).label() == "rejected:out_of_range"
    # Out of range comes before the history: a reading above the bound is never mileage_backwards.
    assert expect(message(2, "mileage_backwards", mileage=1e300), s, NOW_NS + 2 * 10**9).label() == (
        "rejected:out_of_range"
    )
    lenient = ValidateSettings(machines=("m-0", "m-1"), mileage_max=5000, rules=RulePolicies(out_of_range="accept"))
    assert expect(message(1, mileage=1e300), lenient, NOW_NS + 10**9).label() == "accepted"
    # An integer no float can hold is refused whatever the policy, by the validator and so by the oracle.
    assert expect(message(1, mileage=10**400), lenient, NOW_NS + 10**9).label() == "rejected:out_of_range"
