"""Tests for pipeline/decode.py and pipeline/validate.py: bytes -> Reading, or Rejection with a reason.

One test (at least) per rule and per policy. The validator is stateful per
machine (duplicate, late, mileage_backwards), so single-message tests use a
fresh :class:`Validator` each (``check(obj)`` builds one); stateful tests pass
theirs explicitly. Property-based tests live in ``test_validate_properties.py``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from pipeline.config import RulePolicies, ValidateSettings
from pipeline.decode import DecodeFailure, decode
from pipeline.model import Reading, Rejection
from pipeline.validate import REASONS, REPAIRS, REQUIRED, Validator

NOW_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z, the pipeline clock's reading
TS = "2023-11-14T22:13:20.123456Z"
TS_NS = NOW_NS + 123_456_000
TOPIC = "plant/m-1/telemetry"
SECOND_NS = 10**9
TOLERANCE_NS = 300 * SECOND_NS  # default future_tolerance
PAST_NS = 7 * 86_400 * SECOND_NS  # default past_tolerance
NEW_YEAR_NS = 1_767_225_600 * SECOND_NS  # 2026-01-01T00:00:00Z


def body(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"machine": "m-1", "ts": TS, "load_rate": 42.5, "mileage": 1234.25, "seq": 7}
    base.update(overrides)
    return base


def encode(obj: Any) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


def check(obj: Any, validator: Validator | None = None, *, now: int = NOW_NS) -> Reading | Rejection:
    """Check one message; with a fresh default Validator unless one is given."""
    v = validator if validator is not None else Validator()
    return v.check(encode(obj), TOPIC, now)


def accepted(obj: Any, validator: Validator | None = None, *, now: int = NOW_NS) -> Reading:
    result = check(obj, validator, now=now)
    assert isinstance(result, Reading), result
    return result


def rejected(obj: Any, validator: Validator | None = None, *, now: int = NOW_NS) -> Rejection:
    result = check(obj, validator, now=now)
    assert isinstance(result, Rejection), result
    assert result.reason in REASONS
    assert result.detail
    return result


def make(**settings: Any) -> Validator:
    """A Validator from ValidateSettings fields (``rules`` as a dict of policies)."""
    return Validator(ValidateSettings.model_validate(settings))


def policy(**rules: str) -> Validator:
    """A Validator with default settings but these rule policies."""
    return Validator(ValidateSettings(rules=RulePolicies.model_validate(rules)))


def ns_at(ts: datetime | str) -> int:
    """Exact UTC nanoseconds of an aware datetime (or ISO string with a zone)."""
    moment = datetime.fromisoformat(ts) if isinstance(ts, str) else ts
    assert moment.utcoffset() is not None
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def iso(ns: int) -> str:
    """ISO 8601 UTC text of an instant (microsecond precision)."""
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)).isoformat().replace("+00:00", "Z")


def test_helpers_round_trip() -> None:
    assert ns_at(TS) == TS_NS
    assert iso(TS_NS) == TS
    assert ns_at("2026-01-01T00:00:00Z") == NEW_YEAR_NS


def test_reasons_and_repairs_are_unique_names() -> None:
    assert len(set(REASONS)) == len(REASONS)
    assert len(set(REPAIRS)) == len(REPAIRS)
    assert not set(REASONS) & set(REPAIRS)


# --- accepted ----------------------------------------------------------------


def test_valid_message_gives_reading() -> None:
    result = check(body())
    assert result == Reading(machine="m-1", ts_ns=TS_NS, load_rate=42.5, mileage=1234.25, seq=7, received_ns=NOW_NS)
    assert result.repairs == ()


def test_default_validator_is_default_settings() -> None:
    assert Validator().settings == ValidateSettings()
    assert Validator(None).settings == ValidateSettings()


def test_integers_accepted_as_numbers() -> None:
    result = accepted(body(load_rate=5, mileage=0))
    assert (result.load_rate, result.mileage) == (5.0, 0.0)
    assert isinstance(result.load_rate, float)
    assert isinstance(result.mileage, float)


def test_ts_ns_is_exact_at_epoch_scale() -> None:
    """Integer arithmetic: the last microsecond digit survives (float seconds would lose it)."""
    result = accepted(body(ts="2023-11-14T22:13:20.999999Z"))
    assert result.ts_ns == NOW_NS + 999_999_000


def test_seq_max_int64_accepted() -> None:
    result = accepted(body(seq=2**63 - 1))
    assert result.seq == 2**63 - 1


def test_seq_zero_accepted() -> None:
    assert accepted(body(seq=0)).seq == 0


def test_now_ns_drives_the_time_rules_received_ns_is_stored() -> None:
    """A replay: the timestamp rules compare with now_ns, the row keeps received_ns."""
    replayed_at = NOW_NS + 30 * 86_400 * SECOND_NS  # a month later: TS would be far_past against it
    assert rejected(body(), Validator(), now=replayed_at).reason == "far_past"
    result = Validator().check(encode(body()), TOPIC, replayed_at, now_ns=NOW_NS)
    assert isinstance(result, Reading)
    assert (result.ts_ns, result.received_ns) == (TS_NS, replayed_at)


def test_decode_returns_the_object() -> None:
    assert decode(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


def test_decode_parses_nan_and_infinity_literals() -> None:
    obj = decode(b'{"a": NaN, "b": Infinity, "c": -Infinity}')
    assert isinstance(obj, dict)
    assert obj["a"] != obj["a"]
    assert (obj["b"], obj["c"]) == (float("inf"), float("-inf"))


# --- decode rejections -------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'{"machine": "m\xc3"}', "invalid_utf8"),  # truncated multi-byte sequence
        (b"\xed\xa0\x80", "invalid_utf8"),  # an encoded surrogate is not UTF-8
        (b"", "malformed_json"),
        (b"{", "malformed_json"),
        (b'{"seq": 1,}', "malformed_json"),
        (b"{'seq': 1}", "malformed_json"),
        (b'{"seq": nan}', "malformed_json"),  # only the exact NaN literal is taken
        (b"[" * 60_000, "malformed_json"),  # too deep for the parser: RecursionError is caught
        (b"[1]", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"3", "not_an_object"),
        (b"NaN", "not_an_object"),
        (b"null", "not_an_object"),
    ],
)
def test_decode_rejections(payload: bytes, reason: str) -> None:
    failure = decode(payload)
    assert isinstance(failure, DecodeFailure)
    assert failure.reason == reason
    assert failure.detail
    result = rejected(payload)
    assert (result.reason, result.payload, result.topic, result.received_ns) == (reason, payload, TOPIC, NOW_NS)
    assert result.seq is None and result.machine is None


# --- duplicate keys ----------------------------------------------------------------

GOOD_TEXT = '"machine":"m-1","ts":"2023-11-14T22:13:20.123456Z","load_rate":42.5,"mileage":1234.25,"seq":7'


def test_duplicate_machine_is_rejected_with_the_seq_known() -> None:
    payload = ('{"machine":"m-ok",' + GOOD_TEXT + ',"machine":"m-other"}').encode()
    result = rejected(payload)
    assert result.reason == "duplicate_key"
    assert "'machine'" in result.detail
    # The seq is named once: the bench matches the row by it. The machine is the ambiguous part: unknown.
    assert (result.seq, result.machine, result.payload) == (7, None, payload)


def test_duplicate_seq_is_rejected_with_the_seq_unknown() -> None:
    payload = ("{" + GOOD_TEXT + ',"seq":8}').encode()
    result = rejected(payload)
    assert result.reason == "duplicate_key"
    assert "'seq'" in result.detail
    assert (result.seq, result.machine) == (None, "m-1")


def test_same_value_twice_is_still_a_duplicate_key() -> None:
    assert rejected(("{" + GOOD_TEXT + ',"load_rate":42.5}').encode()).reason == "duplicate_key"


def test_duplicate_key_in_a_nested_object_is_rejected() -> None:
    payload = ("{" + GOOD_TEXT + ',"note":{"shift":"A","shift":"B"}}').encode()
    result = rejected(payload)
    assert (result.reason, result.seq, result.machine) == ("duplicate_key", 7, "m-1")
    assert "'shift'" in result.detail


def test_duplicate_key_detail_names_every_repeated_name_once() -> None:
    failure = decode(b'{"a":1,"b":2,"a":3,"b":4,"a":5}')
    assert isinstance(failure, DecodeFailure)
    assert failure.reason == "duplicate_key"
    assert failure.duplicated == {"a", "b"}
    assert failure.detail == "repeated in one object: 'a', 'b'"
    assert failure.obj == {"a": 5, "b": 4}  # what a last-wins parser reads


def test_duplicate_key_then_malformed_json_is_malformed() -> None:
    # The strict decoder stops at the repeated name; what follows is broken, so nothing can be stored anyway.
    failure = decode(b'{"a":1,"a":2,')
    assert isinstance(failure, DecodeFailure)
    assert failure.reason == "malformed_json"


def test_duplicate_key_accept_policy_keeps_the_last_value() -> None:
    payload = ('{"machine":"m-other",' + GOOD_TEXT + "}").encode()
    result = check(payload, policy(duplicate_key="accept"))
    assert isinstance(result, Reading)
    assert (result.machine, result.seq, result.repairs) == ("m-1", 7, ())


def test_duplicate_key_accept_policy_still_runs_the_other_rules() -> None:
    payload = ("{" + GOOD_TEXT + ',"load_rate":150}').encode()
    assert rejected(payload, policy(duplicate_key="accept")).reason == "out_of_range"


def test_duplicate_key_detail_survives_a_surrogate_key() -> None:
    # A JSON escape decodes to a lone surrogate, which no UTF-8 sink stores: the detail quotes it escaped.
    result = rejected(b'{"\\ud800":1,"\\ud800":2}')
    assert result.reason == "duplicate_key"
    assert result.detail == "repeated in one object: '\\ud800'"
    assert result.detail.encode("utf-8")


# --- oversize ------------------------------------------------------------------


def padded(size: int, **overrides: Any) -> bytes:
    """A valid message of exactly ``size`` bytes (padding in an extra field)."""
    bare = encode(body(pad="", **overrides))
    payload = encode(body(pad="x" * (size - len(bare)), **overrides))
    assert len(payload) == size
    return payload


def test_oversize_rejected_before_decode() -> None:
    v = make(max_payload=200)
    assert isinstance(check(padded(200), v), Reading)  # the limit itself is fine
    result = rejected(padded(201, seq=8), v)
    assert result.reason == "oversize"
    assert "201" in result.detail and "200" in result.detail
    assert (result.seq, result.machine) == (None, None)  # never decoded


def test_oversize_rejection_keeps_only_a_prefix_of_the_payload() -> None:
    payload = padded(100_000)
    result = rejected(payload)
    assert result.reason == "oversize"
    assert result.payload == payload[:4096]


def test_oversize_refused_even_if_not_json() -> None:
    assert rejected(b"\xff" * 70_000).reason == "oversize"


def test_oversize_accept_policy_decodes_it() -> None:
    v = make(max_payload=200, rules={"oversize": "accept"})
    result = check(padded(10_000), v)
    assert isinstance(result, Reading)
    assert result.seq == 7


# --- NaN / infinity ------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["load_rate", "mileage"])
def test_nan_and_infinity_literals_are_non_finite(literal: str, field: str) -> None:
    text = json.dumps(body()).replace(f'"{field}": {body()[field]}', f'"{field}": {literal}')
    assert literal in text
    result = rejected(text.encode())
    assert result.reason == "non_finite"
    assert field in result.detail
    assert (result.seq, result.machine) == (7, "m-1")  # decoded now: the rest of the message is known


def test_overflowing_float_is_non_finite() -> None:
    """1e999 is valid JSON that parses to inf; the validator must still refuse it."""
    payload = json.dumps(body()).replace("42.5", "1e999").encode()
    result = rejected(payload)
    assert result.reason == "non_finite"
    assert (result.seq, result.machine) == (7, "m-1")  # the rest of the message was readable


def test_nan_seq_is_wrong_type() -> None:
    payload = json.dumps(body()).replace('"seq": 7', '"seq": NaN').encode()
    result = rejected(payload)
    assert (result.reason, result.seq) == ("wrong_type", None)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_ts_is_bad_timestamp(literal: str) -> None:
    payload = json.dumps(body()).replace(f'"ts": "{TS}"', f'"ts": {literal}').encode()
    assert literal.encode() in payload
    assert rejected(payload).reason == "bad_timestamp"


def test_nan_in_an_extra_field_is_ignored() -> None:
    """Extra fields are never stored; with the default accept policy their value does not matter."""
    payload = json.dumps(body(extra=1)).replace('"extra": 1', '"extra": NaN').encode()
    assert b"NaN" in payload
    assert accepted(payload).repairs == ()


# --- missing fields ------------------------------------------------------------


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_field(field: str) -> None:
    obj = body()
    del obj[field]
    result = rejected(obj)
    assert result.reason == "missing_field"
    assert field in result.detail


@pytest.mark.parametrize("field", REQUIRED)
def test_null_field_counts_as_missing(field: str) -> None:
    result = rejected(body(**{field: None}))
    assert result.reason == "missing_field"
    assert field in result.detail


def test_missing_fields_all_named() -> None:
    result = rejected({"seq": 3})
    assert result.reason == "missing_field"
    for field in ("machine", "ts", "load_rate", "mileage"):
        assert field in result.detail
    assert result.seq == 3  # kept even though the message is refused


def test_status_is_optional() -> None:
    assert "status" not in body()
    assert accepted(body()).repairs == ()


# --- wrong types and number_from_string ---------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"seq": "7"},
        {"seq": 7.0},
        {"seq": 7.5},
        {"seq": True},
        {"seq": [7]},
        {"load_rate": "42.5"},
        {"load_rate": True},
        {"mileage": False},
        {"mileage": {"km": 1}},
        {"machine": 5},
        {"machine": ""},
        {"machine": ["m-1"]},
        {"status": 0},
        {"status": None},
        {"status": "good"},
        {"status": "OK"},
        {"status": ["Good"]},
    ],
    ids=repr,
)
def test_wrong_type(overrides: dict[str, Any]) -> None:
    result = rejected(body(**overrides))
    assert result.reason == "wrong_type"
    assert next(iter(overrides)) in result.detail


@pytest.mark.parametrize(
    ("text", "number"),
    [("42.5", 42.5), ("0", 0.0), ("-0", -0.0), (".5", 0.5), ("5.", 5.0), ("4.25e1", 42.5), (" 42.5 ", 42.5)],
)
def test_wrong_type_repair_parses_plain_decimal_strings(text: str, number: float) -> None:
    result = accepted(body(load_rate=text), policy(wrong_type="repair"))
    assert result.load_rate == number
    assert isinstance(result.load_rate, float)
    assert result.repairs == ("number_from_string",)


def test_wrong_type_repair_named_once_for_two_fields() -> None:
    result = accepted(body(load_rate="42.5", mileage="1234.25"), policy(wrong_type="repair"))
    assert (result.load_rate, result.mileage) == (42.5, 1234.25)
    assert result.repairs == ("number_from_string",)


@pytest.mark.parametrize(
    "text", ["1_000", "nan", "NaN", "inf", "-inf", "Infinity", " inf", "+1", "0x1A", "1,5", "", " ", "42.5 kW", "1e"]
)
def test_wrong_type_repair_refuses_what_is_not_a_plain_decimal(text: str) -> None:
    result = rejected(body(mileage=text), policy(wrong_type="repair"))
    assert result.reason == "wrong_type"
    assert "mileage" in result.detail


@pytest.mark.parametrize("text", ["٣", "１２", "४२"])
def test_wrong_type_repair_refuses_non_ascii_digits(text: str) -> None:
    assert rejected(body(mileage=text), policy(wrong_type="repair")).reason == "wrong_type"


@pytest.mark.parametrize("overrides", [{"seq": "7"}, {"machine": 5}, {"load_rate": [1]}, {"mileage": True}], ids=repr)
def test_wrong_type_repair_only_applies_to_numeric_strings(overrides: dict[str, Any]) -> None:
    assert rejected(body(**overrides), policy(wrong_type="repair")).reason == "wrong_type"


def test_wrong_type_repair_of_overflowing_string_is_non_finite() -> None:
    assert rejected(body(mileage="1e999"), policy(wrong_type="repair")).reason == "non_finite"


def test_wrong_type_repair_still_checks_the_range() -> None:
    assert rejected(body(load_rate="100.5"), policy(wrong_type="repair")).reason == "out_of_range"


# --- machine ids ---------------------------------------------------------------


@pytest.mark.parametrize("machine", ["x" * 255, "é" * 255, "🛠" * 255, "press 3/line-A"])
def test_machine_id_up_to_255_characters_accepted(machine: str) -> None:
    assert accepted(body(machine=machine)).machine == machine


def test_machine_id_longer_than_255_characters_is_bad() -> None:
    result = rejected(body(machine="x" * 256))
    assert result.reason == "bad_machine_id"
    assert "255" in result.detail


@pytest.mark.parametrize("machine", ["\x00", "m\x001", "m\x01", "m\t1", "m-1\n", "m\x1f", "m\x7f", "m\x85", "m\x9f"])
def test_machine_id_with_control_characters_is_bad(machine: str) -> None:
    result = rejected(body(machine=machine))
    assert result.reason == "bad_machine_id"
    assert "control" in result.detail


def test_unknown_machine_rejected_when_fleet_set() -> None:
    v = make(machines=("m-1", "m-2"))
    assert accepted(body(machine="m-2"), v).machine == "m-2"
    result = rejected(body(machine="m-3"), v)
    assert (result.reason, result.machine, result.seq) == ("unknown_machine", "m-3", 7)


def test_empty_fleet_knows_no_machine() -> None:
    assert rejected(body(), make(machines=())).reason == "unknown_machine"


def test_no_fleet_accepts_any_machine() -> None:
    assert accepted(body(machine="anything-at-all"), make(machines=None)).machine == "anything-at-all"


def test_unknown_machine_accept_policy() -> None:
    v = make(machines=("m-1",), rules={"unknown_machine": "accept"})
    assert accepted(body(machine="m-3"), v).machine == "m-3"


def test_bad_machine_id_checked_before_the_fleet() -> None:
    v = make(machines=("m-1",), rules={"unknown_machine": "accept"})
    assert rejected(body(machine="m\x00"), v).reason == "bad_machine_id"


# --- numeric ranges ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"load_rate": -0.1}, "load_rate"),
        ({"load_rate": 100.000001}, "load_rate"),
        ({"load_rate": -1}, "load_rate"),
        ({"load_rate": 1e308}, "load_rate"),
        ({"mileage": -0.5}, "mileage"),
        ({"mileage": -(10**20)}, "mileage"),
        ({"mileage": 1e300}, "mileage"),
        ({"mileage": 1_000_000_000.5}, "mileage"),
        ({"mileage": 10**10}, "mileage"),
    ],
    ids=repr,
)
def test_out_of_range(overrides: dict[str, Any], field: str) -> None:
    result = rejected(body(**overrides))
    assert result.reason == "out_of_range"
    assert field in result.detail
    assert (result.seq, result.machine) == (7, "m-1")


@pytest.mark.parametrize(("load_rate", "mileage"), [(0, 0), (100, 0), (0.0, 1e9), (0, 10**9), (-0.0, -0.0)])
def test_range_bounds_are_inclusive(load_rate: float, mileage: float) -> None:
    result = accepted(body(load_rate=load_rate, mileage=mileage))
    assert (result.load_rate, result.mileage) == (load_rate, mileage)


def test_load_rate_range_configurable() -> None:
    v = make(load_rate_range=(-50, 250))
    assert accepted(body(load_rate=-50), v).load_rate == -50.0
    assert accepted(body(load_rate=250, seq=8), v).load_rate == 250.0
    assert rejected(body(load_rate=250.5, seq=9), v).reason == "out_of_range"


def test_out_of_range_accept_policy() -> None:
    result = accepted(body(load_rate=-5, mileage=-3), policy(out_of_range="accept"))
    assert (result.load_rate, result.mileage) == (-5.0, -3.0)


def test_integer_too_large_for_a_float_is_refused_whatever_the_policy() -> None:
    """A finite float cannot hold 10**400: nothing to store, even with out_of_range accepted."""
    for v in (Validator(), policy(out_of_range="accept")):
        result = rejected(body(load_rate=10**400), v)
        assert result.reason == "out_of_range"
        assert "too large" in result.detail


@pytest.mark.parametrize("seq", [2**63, 2**64 + 5, -1, -(2**63)])
def test_seq_out_of_range(seq: int) -> None:
    result = rejected(body(seq=seq))
    assert result.reason == "out_of_range"
    assert result.seq is None  # not representable in the int64 column
    assert result.machine == "m-1"


# --- status --------------------------------------------------------------------


def test_status_good_accepted() -> None:
    assert accepted(body(status="Good")).repairs == ()


@pytest.mark.parametrize("status", ["Uncertain", "UncertainLastUsableValue", "UncertainInitialValue"])
def test_status_uncertain(status: str) -> None:
    result = rejected(body(status=status))
    assert result.reason == "status_uncertain"
    assert status in result.detail
    assert isinstance(check(body(status=status), policy(status_uncertain="accept")), Reading)


@pytest.mark.parametrize("status", ["Bad", "BadNoCommunication", "BadSensorFailure"])
def test_status_bad(status: str) -> None:
    result = rejected(body(status=status))
    assert result.reason == "status_bad"
    assert status in result.detail
    assert isinstance(check(body(status=status), policy(status_bad="accept")), Reading)


def test_status_checked_before_missing_fields() -> None:
    """An OPC UA Bad value may carry no value at all: status_bad says why better than missing_field."""
    obj = {"machine": "m-1", "seq": 3, "status": "BadNoCommunication"}
    result = rejected(obj)
    assert (result.reason, result.seq, result.machine) == ("status_bad", 3, "m-1")
    assert rejected(obj, policy(status_bad="accept")).reason == "missing_field"


def test_status_policies_are_independent() -> None:
    assert rejected(body(status="BadNoCommunication"), policy(status_uncertain="accept")).reason == "status_bad"
    assert rejected(body(status="UncertainInitialValue"), policy(status_bad="accept")).reason == "status_uncertain"


# --- extra fields --------------------------------------------------------------


def test_extra_fields_accepted_by_default() -> None:
    result = accepted(body(unit="km", note={"a": [1, None]}))
    assert result == Reading(machine="m-1", ts_ns=TS_NS, load_rate=42.5, mileage=1234.25, seq=7, received_ns=NOW_NS)


def test_extra_fields_reject_policy() -> None:
    v = policy(extra_fields="reject")
    result = rejected(body(zeta=1, alpha=2), v)
    assert result.reason == "extra_fields"
    assert "alpha, zeta" in result.detail
    assert accepted(body(status="Good"), v).seq == 7  # status is a known field


# --- timestamps: text ----------------------------------------------------------


@pytest.mark.parametrize(
    "ts",
    [
        "yesterday",
        "",
        "2023-13-01T00:00:00Z",
        "2023-11-14 25:00:00Z",
        "14/11/2023 22:13:20Z",
        "2023-11-14T22:13:20+24:00",
        "2023-11-14T22:13:20\x00junk",
        "\ud800",
    ],
)
def test_bad_timestamp_text(ts: str) -> None:
    assert rejected(body(ts=ts)).reason == "bad_timestamp"


@pytest.mark.parametrize("ts", [True, False, ["2023-11-14T22:13:20Z"], {"s": 1}], ids=repr)
def test_non_string_non_number_timestamp_is_bad_timestamp(ts: Any) -> None:
    assert rejected(body(ts=ts)).reason == "bad_timestamp"


@pytest.mark.parametrize(
    ("ts", "repairs"),
    [
        ("2023-11-15T03:43:20.123456+05:30", ("utc_normalised",)),
        ("2023-11-14T14:13:20.123456-08:00", ("utc_normalised",)),
        ("2023-11-15T00:13:20.123456+02:00", ("utc_normalised",)),
        ("2023-11-15T12:13:20.123456+14:00", ("utc_normalised",)),  # Pacific/Kiritimati
        ("2023-11-14T10:13:20.123456-12:00", ("utc_normalised",)),
        ("2023-11-14T22:13:20.123456+00:00", ()),  # UTC written as an offset: nothing to repair
        ("2023-11-14T22:13:20.123456-00:00", ()),
        ("2023-11-14T22:13:20.123456Z", ()),
    ],
)
def test_offsets_normalised_to_utc(ts: str, repairs: tuple[str, ...]) -> None:
    result = accepted(body(ts=ts))
    assert result.ts_ns == TS_NS
    assert result.repairs == repairs


def test_offset_crossing_the_date_line() -> None:
    result = accepted(body(ts="2026-01-01T00:00:00+14:00"), now=NEW_YEAR_NS)
    assert result.ts_ns == ns_at("2025-12-31T10:00:00Z")
    assert result.repairs == ("utc_normalised",)


@pytest.mark.parametrize("ts", ["2023-11-15T03:43:20+05:30", "2023-11-15T12:13:20+14:00"])
def test_offset_timestamp_reject_policy(ts: str) -> None:
    v = policy(offset_timestamp="reject")
    result = rejected(body(ts=ts), v)
    assert result.reason == "offset_timestamp"
    assert (result.seq, result.machine) == (7, "m-1")
    assert accepted(body(ts="2023-11-14T22:13:20+00:00"), v).repairs == ()  # +00:00 is UTC


@pytest.mark.parametrize("ts", ["2023-11-14T22:13:20", "2023-11-14T22:13:20.123456", "2023-11-14"])
def test_naive_timestamp(ts: str) -> None:
    result = rejected(body(ts=ts))
    assert result.reason == "naive_timestamp"
    assert (result.seq, result.machine) == (7, "m-1")


def test_naive_timestamp_assume_utc() -> None:
    v = make(naive_timestamps="assume_utc", timezones={"m-1": "Europe/Paris"})  # the zone is not used
    result = accepted(body(ts="2023-11-14T22:13:20.123456"), v)
    assert (result.ts_ns, result.repairs) == (TS_NS, ("assumed_utc",))
    v = make(naive_timestamps="assume_utc")
    date_only = accepted(body(ts="2023-11-14"), v)
    assert (date_only.ts_ns, date_only.repairs) == (ns_at("2023-11-14T00:00:00Z"), ("assumed_utc",))


def test_naive_timestamp_assume_utc_has_no_dst_trouble() -> None:
    v = make(naive_timestamps="assume_utc", timezones={"m-1": "Europe/Paris"})
    result = accepted(body(ts="2026-10-25T02:30:00"), v, now=ns_at("2026-10-25T02:30:00Z"))
    assert (result.ts_ns, result.repairs) == (ns_at("2026-10-25T02:30:00Z"), ("assumed_utc",))


# --- timestamps: machine zones and DST ----------------------------------------

PARIS = {"m-1": "Europe/Paris"}
LOS_ANGELES = {"m-1": "America/Los_Angeles"}


def zoned(zones: dict[str, str], **rules: str) -> Validator:
    return make(naive_timestamps="assume_machine_zone", timezones=zones, rules=rules)


@pytest.mark.parametrize(
    ("zones", "local", "utc"),
    [
        (PARIS, "2026-01-15T12:00:00", "2026-01-15T11:00:00Z"),  # CET
        (PARIS, "2026-07-01T12:00:00", "2026-07-01T10:00:00Z"),  # CEST
        (PARIS, "2026-03-29T01:59:59", "2026-03-29T00:59:59Z"),  # just before the gap
        (PARIS, "2026-03-29T03:00:00", "2026-03-29T01:00:00Z"),  # just after it
        (PARIS, "2026-10-25T01:59:59", "2026-10-24T23:59:59Z"),  # just before the overlap
        (PARIS, "2026-10-25T03:00:00", "2026-10-25T02:00:00Z"),  # just after it
        (LOS_ANGELES, "2026-01-15T08:00:00", "2026-01-15T16:00:00Z"),  # PST
        (LOS_ANGELES, "2026-07-01T05:00:00", "2026-07-01T12:00:00Z"),  # PDT
        (LOS_ANGELES, "2025-12-31T16:00:00.000001", "2026-01-01T00:00:00.000001Z"),
        ({"m-1": "Pacific/Kiritimati"}, "2026-01-01T14:00:00", "2026-01-01T00:00:00Z"),  # +14:00
        ({"m-1": "Asia/Kolkata"}, "2026-01-01T05:30:00", "2026-01-01T00:00:00Z"),
        ({"m-2": "Asia/Tokyo"}, "2026-01-01T00:00:00", "2026-01-01T00:00:00Z"),  # m-1 not listed: default UTC
    ],
)
def test_naive_timestamp_in_machine_zone(zones: dict[str, str], local: str, utc: str) -> None:
    result = accepted(body(ts=local), zoned(zones), now=ns_at(utc))
    assert result.ts_ns == ns_at(utc)
    assert result.repairs == ("assumed_machine_zone",)


def test_machine_zone_per_machine_and_default_zone() -> None:
    v = make(naive_timestamps="assume_machine_zone", timezones=PARIS, default_timezone="America/Los_Angeles")
    now = ns_at("2026-01-15T16:00:00Z")
    assert accepted(body(ts="2026-01-15T12:00:00"), v, now=now).ts_ns == ns_at("2026-01-15T11:00:00Z")
    assert accepted(body(machine="m-2", ts="2026-01-15T08:00:00"), v, now=now).ts_ns == now


def test_machine_zone_offset_timestamp_is_still_just_normalised() -> None:
    """An explicit offset wins over the machine's zone."""
    result = accepted(body(ts="2026-01-15T12:00:00+14:00"), zoned(PARIS), now=ns_at("2026-01-14T22:00:00Z"))
    assert result.ts_ns == ns_at("2026-01-14T22:00:00Z")
    assert result.repairs == ("utc_normalised",)


@pytest.mark.parametrize(
    ("zones", "local"),
    [
        (PARIS, "2026-03-29T02:30:00"),
        (PARIS, "2026-03-29T02:00:00"),
        (PARIS, "2026-03-29T02:59:59.999999"),
        (LOS_ANGELES, "2026-03-08T02:30:00"),
    ],
)
def test_nonexistent_local_time_rejected(zones: dict[str, str], local: str) -> None:
    result = rejected(body(ts=local), zoned(zones), now=NEW_YEAR_NS)
    assert result.reason == "nonexistent_local_time"
    assert zones["m-1"] in result.detail
    assert (result.seq, result.machine) == (7, "m-1")


@pytest.mark.parametrize(
    ("zones", "local"),
    [
        (PARIS, "2026-10-25T02:30:00"),
        (PARIS, "2026-10-25T02:00:00"),
        (PARIS, "2026-10-25T02:59:59.999999"),
        (LOS_ANGELES, "2026-11-01T01:30:00"),
        ({"m-1": "Australia/Lord_Howe"}, "2026-04-05T01:45:00"),  # a 30-minute DST shift
    ],
)
def test_ambiguous_local_time_rejected(zones: dict[str, str], local: str) -> None:
    result = rejected(body(ts=local), zoned(zones), now=NEW_YEAR_NS)
    assert result.reason == "ambiguous_local_time"
    assert zones["m-1"] in result.detail


@pytest.mark.parametrize(
    ("zones", "local", "utc"),
    [
        (PARIS, "2026-03-29T02:30:00", "2026-03-29T01:30:00Z"),  # = 03:30 CEST
        (PARIS, "2026-03-29T02:00:00", "2026-03-29T01:00:00Z"),  # = 03:00 CEST
        (LOS_ANGELES, "2026-03-08T02:30:00", "2026-03-08T10:30:00Z"),  # = 03:30 PDT
    ],
)
def test_nonexistent_local_time_repair_shifts_forward(zones: dict[str, str], local: str, utc: str) -> None:
    result = accepted(body(ts=local), zoned(zones, nonexistent_local_time="repair"), now=ns_at(utc))
    assert result.ts_ns == ns_at(utc)
    assert result.repairs == ("assumed_machine_zone", "nonexistent_shifted")


@pytest.mark.parametrize(
    ("zones", "local", "utc"),
    [
        (PARIS, "2026-10-25T02:30:00", "2026-10-25T00:30:00Z"),  # the first 02:30, still CEST
        (PARIS, "2026-10-25T02:00:00", "2026-10-25T00:00:00Z"),
        (LOS_ANGELES, "2026-11-01T01:30:00", "2026-11-01T08:30:00Z"),  # the first 01:30, still PDT
        ({"m-1": "Australia/Lord_Howe"}, "2026-04-05T01:45:00", "2026-04-04T14:45:00Z"),  # +11:00, not +10:30
    ],
)
def test_ambiguous_local_time_repair_takes_the_earlier_instant(zones: dict[str, str], local: str, utc: str) -> None:
    result = accepted(body(ts=local), zoned(zones, ambiguous_local_time="repair"), now=ns_at(utc))
    assert result.ts_ns == ns_at(utc)
    assert result.repairs == ("assumed_machine_zone", "ambiguous_earlier")


def test_dst_policies_are_independent() -> None:
    only_ambiguous = zoned(PARIS, ambiguous_local_time="repair")
    assert rejected(body(ts="2026-03-29T02:30:00"), only_ambiguous).reason == "nonexistent_local_time"
    only_gap = zoned(PARIS, nonexistent_local_time="repair")
    assert rejected(body(ts="2026-10-25T02:30:00"), only_gap).reason == "ambiguous_local_time"


# --- timestamps: epoch numbers -------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "ts_ns", "repair"),
    [
        (1_767_225_600, NEW_YEAR_NS, "epoch_seconds"),
        (1_767_225_600.0, NEW_YEAR_NS, "epoch_seconds"),
        (1_767_225_600.123, NEW_YEAR_NS + 123_000_000, "epoch_seconds"),
        (1_767_225_600.000001, NEW_YEAR_NS + 1_000, "epoch_seconds"),
        (1_767_225_600_123, NEW_YEAR_NS + 123_000_000, "epoch_millis"),
        (1_767_225_600_123.5, NEW_YEAR_NS + 123_500_000, "epoch_millis"),
        (1_767_225_600_123_456, NEW_YEAR_NS + 123_456_000, "epoch_micros"),
        (1_767_225_600_123_456_789, NEW_YEAR_NS + 123_456_000, "epoch_nanos"),  # stored at us precision
    ],
    ids=repr,
)
def test_epoch_timestamp_repaired_by_magnitude(ts: float, ts_ns: int, repair: str) -> None:
    result = accepted(body(ts=ts), now=NEW_YEAR_NS)
    assert result.ts_ns == ts_ns
    assert result.repairs == (repair,)


def test_epoch_float_seconds_keep_exact_microseconds() -> None:
    result = accepted(body(ts=1767225600.123), now=NEW_YEAR_NS)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=result.ts_ns // 1000)
    assert moment == datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert result.ts_ns % SECOND_NS == 123_000_000


def test_epoch_seconds_of_the_pipeline_clock() -> None:
    for ts in (1_700_000_000, 1.7e9):
        result = accepted(body(ts=ts))
        assert (result.ts_ns, result.repairs) == (NOW_NS, ("epoch_seconds",))


@pytest.mark.parametrize("ts", [10**21, -(10**21), 10**400, 1e300, -1e300], ids=repr)
def test_epoch_outside_years_1_to_9999_is_bad_timestamp(ts: float) -> None:
    result = rejected(body(ts=ts), now=NEW_YEAR_NS)
    assert result.reason == "bad_timestamp"


def test_epoch_zero_is_far_past() -> None:
    assert rejected(body(ts=0), now=NEW_YEAR_NS).reason == "far_past"


@pytest.mark.parametrize("ts", [1_767_225_600, 1_767_225_600_123, 1.5])
def test_epoch_timestamp_reject_policy(ts: float) -> None:
    result = rejected(body(ts=ts), policy(epoch_timestamp="reject"), now=NEW_YEAR_NS)
    assert result.reason == "epoch_timestamp"
    assert (result.seq, result.machine) == (7, "m-1")


# --- timestamps: future and past -----------------------------------------------


def test_future_timestamp_beyond_tolerance() -> None:
    ahead = datetime.fromtimestamp(NOW_NS // 10**9, tz=UTC) + timedelta(seconds=300, microseconds=1)
    result = rejected(body(ts=ahead.isoformat()))
    assert result.reason == "future_timestamp"
    assert (result.seq, result.machine) == (7, "m-1")


def test_future_timestamp_within_tolerance_accepted() -> None:
    at_limit = datetime.fromtimestamp(NOW_NS // 10**9, tz=UTC) + timedelta(seconds=300)
    result = accepted(body(ts=at_limit.isoformat()))
    assert result.ts_ns == NOW_NS + TOLERANCE_NS


def test_future_tolerance_is_configurable() -> None:
    strict = make(future_tolerance=0)
    one_us_ahead = datetime.fromtimestamp(NOW_NS // 10**9, tz=UTC) + timedelta(microseconds=1)
    assert rejected(body(ts=one_us_ahead.isoformat()), strict).reason == "future_timestamp"
    assert isinstance(check(body(ts="2023-11-14T22:13:20Z"), strict), Reading)
    assert rejected(body(ts=iso(NOW_NS + 61 * SECOND_NS)), make(future_tolerance="1m")).reason == "future_timestamp"


def test_future_timestamp_accept_policy() -> None:
    result = accepted(body(ts="9999-12-31T23:59:59Z"), policy(future_timestamp="accept"))
    assert result.ts_ns == ns_at("9999-12-31T23:59:59Z")


def test_timestamps_within_past_tolerance_accepted() -> None:
    """Backfill after an outage is fine, up to past_tolerance (7 days) back."""
    six_days = accepted(body(ts=iso(NOW_NS - 6 * 86_400 * SECOND_NS)))
    assert six_days.ts_ns == NOW_NS - 6 * 86_400 * SECOND_NS
    at_limit = accepted(body(ts=iso(NOW_NS - PAST_NS)))
    assert at_limit.ts_ns == NOW_NS - PAST_NS


@pytest.mark.parametrize("ts", [iso(NOW_NS - PAST_NS - 1000), "1999-01-01T00:00:00Z", "0001-01-01T00:00:00Z"])
def test_far_past_beyond_tolerance(ts: str) -> None:
    result = rejected(body(ts=ts))
    assert result.reason == "far_past"
    assert "days" in result.detail
    assert (result.seq, result.machine) == (7, "m-1")


def test_past_tolerance_is_configurable() -> None:
    v = make(past_tolerance="1h")
    assert rejected(body(ts=iso(NOW_NS - 3601 * SECOND_NS)), v).reason == "far_past"
    assert accepted(body(ts=iso(NOW_NS - 1800 * SECOND_NS)), v).ts_ns == NOW_NS - 1800 * SECOND_NS


def test_far_past_accept_policy() -> None:
    result = accepted(body(ts="1999-01-01T00:00:00Z"), policy(far_past="accept"))
    assert result.ts_ns == 915_148_800 * 10**9
    assert accepted(body(ts="1700-01-01T00:00:00Z"), policy(far_past="accept")).ts_ns == ns_at("1700-01-01T00:00Z")


@pytest.mark.parametrize("ts", ["1600-01-01T00:00:00Z", "0001-01-01T00:00:00Z"])
def test_first_reading_before_1677_is_not_late(ts: str) -> None:
    assert accepted(body(ts=ts), policy(far_past="accept")).ts_ns == ns_at(ts)


# --- per-machine history: duplicate, late, mileage_backwards --------------------


def at(seconds: float) -> str:
    """ISO text of the pipeline clock plus ``seconds`` (history tests are relative to it)."""
    return iso(NOW_NS + round(seconds * SECOND_NS))


def test_duplicate_seq_rejected() -> None:
    v = Validator()
    accepted(body(), v)
    result = rejected(body(), v)
    assert result.reason == "duplicate"
    assert (result.seq, result.machine) == (7, "m-1")
    assert rejected(body(ts=at(-1), mileage=2000), v).reason == "duplicate"  # whatever the content


def test_duplicate_is_per_machine() -> None:
    v = Validator()
    accepted(body(machine="m-1"), v)
    accepted(body(machine="m-2"), v)
    assert rejected(body(machine="m-2"), v).reason == "duplicate"


def test_rejected_message_does_not_count_as_seen() -> None:
    v = Validator()
    assert rejected(body(load_rate=500), v).reason == "out_of_range"
    assert accepted(body(), v).seq == 7


def test_duplicate_accept_policy() -> None:
    v = policy(duplicate="accept")
    first, second = accepted(body(), v), accepted(body(), v)
    assert first == second


def test_dedup_window_bounds_memory() -> None:
    v = make(dedup_window=3)
    for seq in (1, 2, 3):
        accepted(body(seq=seq), v)
    assert rejected(body(seq=1), v).reason == "duplicate"  # two newer seqs: still remembered
    accepted(body(seq=4), v)  # three newer seqs than 1: it falls out of the window
    assert accepted(body(seq=1), v).seq == 1
    assert rejected(body(seq=4), v).reason == "duplicate"
    assert accepted(body(seq=2), v).seq == 2  # 3, 4, 1 came after it


def test_dedup_window_remembers_exactly_the_last_n_seqs() -> None:
    v = make(dedup_window=1000)
    for seq in range(5000):
        accepted(body(seq=seq), v)
    for seq in (4000, 4500, 4999):
        assert rejected(body(seq=seq), v).reason == "duplicate"
    assert accepted(body(seq=3999), v).seq == 3999
    assert accepted(body(seq=0), v).seq == 0


def test_out_of_order_within_watermark_accepted() -> None:
    v = Validator()
    accepted(body(seq=1, ts=at(0)), v)
    two_s_older = accepted(body(seq=2, ts=at(-2)), v)
    assert two_s_older.ts_ns == NOW_NS - 2 * SECOND_NS
    assert accepted(body(seq=3, ts=at(-60)), v).seq == 3  # exactly the watermark


def test_late_beyond_watermark_rejected() -> None:
    v = Validator()
    accepted(body(seq=1, ts=at(0)), v)
    result = rejected(body(seq=2, ts=at(-120)), v)
    assert result.reason == "late"
    assert "120.0 s" in result.detail
    assert (result.seq, result.machine) == (2, "m-1")
    assert rejected(body(seq=3, ts=at(-60.000001)), v).reason == "late"


def test_late_is_measured_from_the_newest_not_the_last() -> None:
    v = Validator()
    accepted(body(seq=1, ts=at(0)), v)
    accepted(body(seq=2, ts=at(-50)), v)
    assert rejected(body(seq=3, ts=at(-61)), v).reason == "late"


def test_late_is_per_machine() -> None:
    v = Validator()
    accepted(body(machine="m-1", seq=1, ts=at(0)), v)
    assert accepted(body(machine="m-2", seq=2, ts=at(-3600)), v).machine == "m-2"


def test_watermark_is_configurable() -> None:
    v = make(watermark=0)
    accepted(body(seq=1, ts=at(-10)), v)
    assert accepted(body(seq=2, ts=at(-10)), v).ts_ns == NOW_NS - 10 * SECOND_NS  # same instant is not behind
    assert rejected(body(seq=3, ts=at(-10.000001)), v).reason == "late"
    wide = make(watermark="1h")
    accepted(body(seq=1, ts=at(0)), wide)
    assert accepted(body(seq=2, ts=at(-3599)), wide).seq == 2
    assert rejected(body(seq=3, ts=at(-3601)), wide).reason == "late"


def test_late_accept_policy() -> None:
    v = policy(late="accept")
    accepted(body(seq=1, ts=at(0)), v)
    late = accepted(body(seq=2, ts=at(-120)), v)
    assert late.ts_ns == NOW_NS - 120 * SECOND_NS


def test_late_reading_does_not_become_the_newest() -> None:
    v = policy(late="accept")
    accepted(body(seq=1, ts=at(-10), mileage=100), v)
    accepted(body(seq=2, ts=at(-3600), mileage=1), v)
    # The newest reading is still seq 1: its mileage is the bar, its ts the watermark.
    assert rejected(body(seq=3, ts=at(-5), mileage=50), v).reason == "mileage_backwards"


def test_mileage_backwards_rejected() -> None:
    v = Validator()
    accepted(body(seq=1, ts=at(-10), mileage=100), v)
    result = rejected(body(seq=2, ts=at(-9), mileage=99.5), v)
    assert result.reason == "mileage_backwards"
    assert "99.5" in result.detail and "100" in result.detail
    assert accepted(body(seq=3, ts=at(-8), mileage=100), v).mileage == 100.0  # equal is fine
    assert rejected(body(seq=4, ts=at(-8), mileage=50), v).reason == "mileage_backwards"  # same ts compares


def test_mileage_of_an_older_reading_is_not_compared() -> None:
    """Out of order within the watermark: an older reading naturally has a lower mileage."""
    v = Validator()
    accepted(body(seq=2, ts=at(-1), mileage=100), v)
    assert accepted(body(seq=1, ts=at(-3), mileage=90), v).mileage == 90.0


def test_mileage_backwards_is_per_machine() -> None:
    v = Validator()
    accepted(body(machine="m-1", mileage=100), v)
    assert accepted(body(machine="m-2", mileage=1), v).mileage == 1.0


def test_mileage_backwards_accept_policy() -> None:
    v = policy(mileage_backwards="accept")
    accepted(body(seq=1, ts=at(-10), mileage=100), v)
    assert accepted(body(seq=2, ts=at(-9), mileage=1), v).mileage == 1.0


@pytest.mark.parametrize(
    "rules", [{"future_timestamp": "accept"}, {"future_timestamp": "accept", "far_past": "accept"}]
)
def test_accepted_future_timestamp_does_not_make_the_next_reading_late(rules: dict[str, str]) -> None:
    """The watermark never runs ahead of the pipeline clock: one reading from a broken clock
    (accepted by policy) cannot hold back the machine's on-time readings."""
    v = policy(**rules)
    assert accepted(body(seq=1, ts="2030-01-01T00:00:00Z"), v).ts_ns == ns_at("2030-01-01T00:00:00Z")
    assert accepted(body(seq=2, ts=at(0)), v).ts_ns == NOW_NS
    assert accepted(body(seq=3, ts=at(-59)), v).seq == 3
    assert rejected(body(seq=4, ts=at(-61)), v).reason == "late"  # measured from the clock, not from 2030


def test_future_timestamp_within_tolerance_does_not_make_the_next_reading_late() -> None:
    v = Validator()
    accepted(body(seq=1, ts=at(240)), v)  # a fast clock, within future_tolerance
    assert accepted(body(seq=2, ts=at(0)), v).ts_ns == NOW_NS
    assert accepted(body(seq=3, ts=at(-60)), v).seq == 3


def test_watermark_follows_the_clock_of_each_check() -> None:
    """now_ns moves on: the clamp is to the clock of the check that accepted the reading."""
    v = policy(future_timestamp="accept")
    accepted(body(seq=1, ts="2030-01-01T00:00:00Z"), v, now=NOW_NS)
    accepted(body(seq=2, ts=at(3600)), v, now=NOW_NS + 3600 * SECOND_NS)  # an hour later, on time
    assert rejected(body(seq=3, ts=at(0)), v, now=NOW_NS + 3600 * SECOND_NS).reason == "late"


@pytest.mark.xfail(
    strict=True,
    reason="BUG in pipeline/validate.py: newest_ts_ns is clamped to the pipeline clock, and the same clamped value "
    "decides which readings are compared for mileage_backwards; so readings of a machine whose clock is ahead "
    "(within future_tolerance) that arrive out of order are all compared, and an older one is refused",
)
def test_out_of_order_readings_ahead_of_the_clock_keep_their_mileage() -> None:
    v = Validator()
    accepted(body(seq=2, ts=at(2), mileage=100), v)  # the machine's clock is 2 s fast
    # seq 1 was measured a second earlier (lower mileage) and arrives second: out of order, not backwards.
    assert accepted(body(seq=1, ts=at(1), mileage=99), v).mileage == 99.0


def test_history_survives_rule_rejections() -> None:
    """Rejections in between (any rule) leave the machine's state as it was."""
    v = Validator()
    accepted(body(seq=1, ts=at(-10), mileage=100), v)
    for bad in (body(seq=2, load_rate=-1), body(seq=2, ts="2030-01-01T00:00:00Z"), body(seq=2, status="Bad")):
        rejected(bad, v)
    assert rejected(body(seq=2, ts=at(-9), mileage=99), v).reason == "mileage_backwards"
    assert accepted(body(seq=2, ts=at(-9), mileage=101), v).seq == 2


# --- thread safety -------------------------------------------------------------


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond so the interleavings actually vary."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.usefixtures("fast_switching")
def test_threads_with_distinct_seqs_all_accepted() -> None:
    v = Validator()
    threads, per_thread = 8, 400
    barrier = threading.Barrier(threads, timeout=30)

    def work(index: int) -> list[Reading | Rejection]:
        payloads = [encode(body(seq=index * per_thread + i)) for i in range(per_thread)]
        barrier.wait()
        return [v.check(p, TOPIC, NOW_NS) for p in payloads]

    with ThreadPoolExecutor(threads) as pool:
        results = [r for chunk in pool.map(work, range(threads)) for r in chunk]
    assert not [r for r in results if isinstance(r, Rejection)]
    assert sorted(r.seq for r in results if isinstance(r, Reading)) == list(range(threads * per_thread))
    # Every seq is now remembered, whichever thread accepted it.
    assert all(rejected(body(seq=s), v).reason == "duplicate" for s in range(0, threads * per_thread, 97))


@pytest.mark.usefixtures("fast_switching")
def test_same_seq_from_two_threads_accepted_exactly_once() -> None:
    v = Validator()
    rounds = 300
    barrier = threading.Barrier(2, timeout=30)

    def work(_: int) -> list[Reading | Rejection]:
        out: list[Reading | Rejection] = []
        for seq in range(rounds):
            payload = encode(body(seq=seq))
            barrier.wait()
            out.append(v.check(payload, TOPIC, NOW_NS))
        return out

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(work, range(2))
    for seq, pair in enumerate(zip(first, second, strict=True)):
        readings = [r for r in pair if isinstance(r, Reading)]
        rejections = [r for r in pair if isinstance(r, Rejection)]
        assert [r.seq for r in readings] == [seq]
        assert [(r.reason, r.seq) for r in rejections] == [("duplicate", seq)]


# --- what a rejection keeps --------------------------------------------------


def test_rejection_keeps_readable_seq_and_machine() -> None:
    result = rejected(body(load_rate="high", seq=11, machine="press-3"))
    assert (result.seq, result.machine) == (11, "press-3")
    assert result.payload == json.dumps(body(load_rate="high", seq=11, machine="press-3")).encode()
    assert (result.topic, result.received_ns) == (TOPIC, NOW_NS)


def test_rejection_drops_unreadable_seq_keeps_machine() -> None:
    result = rejected(body(seq="11"))
    assert (result.seq, result.machine) == (None, "m-1")


def test_rejection_drops_unreadable_machine_keeps_seq() -> None:
    result = rejected(body(machine=17))
    assert (result.seq, result.machine) == (7, None)


# --- every reason and repair is reachable -----------------------------------------

# One message (and the settings it needs) per reason; the dedicated tests above go into detail.
REASON_EXAMPLES: dict[str, tuple[dict[str, Any], bytes]] = {
    "oversize": ({"max_payload": 10}, encode(body())),
    "invalid_utf8": ({}, b"\xff"),
    "malformed_json": ({}, b"{"),
    "duplicate_key": ({}, b'{"seq": 1, "seq": 2}'),
    "not_an_object": ({}, b"[]"),
    "missing_field": ({}, encode({"seq": 1})),
    "wrong_type": ({}, encode(body(load_rate="1"))),
    "bad_machine_id": ({}, encode(body(machine="m\x00"))),
    "unknown_machine": ({"machines": ["m-2"]}, encode(body())),
    "non_finite": ({}, json.dumps(body(mileage=float("nan"))).encode()),
    "out_of_range": ({}, encode(body(load_rate=101))),
    "status_uncertain": ({}, encode(body(status="UncertainInitialValue"))),
    "status_bad": ({}, encode(body(status="BadSensorFailure"))),
    "extra_fields": ({"rules": {"extra_fields": "reject"}}, encode(body(x=1))),
    "bad_timestamp": ({}, encode(body(ts="noon"))),
    "naive_timestamp": ({}, encode(body(ts="2023-11-14T22:13:20"))),
    "offset_timestamp": ({"rules": {"offset_timestamp": "reject"}}, encode(body(ts="2023-11-14T23:13:20+01:00"))),
    "epoch_timestamp": ({"rules": {"epoch_timestamp": "reject"}}, encode(body(ts=1_700_000_000))),
    "ambiguous_local_time": (
        {"naive_timestamps": "assume_machine_zone", "default_timezone": "Europe/Paris"},
        encode(body(ts="2023-10-29T02:30:00")),
    ),
    "nonexistent_local_time": (
        {"naive_timestamps": "assume_machine_zone", "default_timezone": "Europe/Paris"},
        encode(body(ts="2023-03-26T02:30:00")),
    ),
    "future_timestamp": ({}, encode(body(ts="2030-01-01T00:00:00Z"))),
    "far_past": ({}, encode(body(ts="2000-01-01T00:00:00Z"))),
}
HISTORY_EXAMPLES: dict[str, tuple[bytes, bytes]] = {
    "duplicate": (encode(body()), encode(body())),
    "late": (encode(body(seq=1)), encode(body(seq=2, ts=iso(TS_NS - 120 * SECOND_NS)))),
    "mileage_backwards": (encode(body(seq=1)), encode(body(seq=2, mileage=1))),
}


def test_examples_cover_every_reason() -> None:
    assert sorted([*REASON_EXAMPLES, *HISTORY_EXAMPLES]) == sorted(REASONS)


@pytest.mark.parametrize("reason", sorted(REASON_EXAMPLES))
def test_every_reason_is_reachable(reason: str) -> None:
    settings, payload = REASON_EXAMPLES[reason]
    assert rejected(payload, make(**settings)).reason == reason


@pytest.mark.parametrize("reason", sorted(HISTORY_EXAMPLES))
def test_every_history_reason_is_reachable(reason: str) -> None:
    first, second = HISTORY_EXAMPLES[reason]
    v = Validator()
    accepted(first, v)
    assert rejected(second, v).reason == reason


def test_every_repair_is_reachable() -> None:
    zones = {"naive_timestamps": "assume_machine_zone", "default_timezone": "Europe/Paris"}
    dst = {"ambiguous_local_time": "repair", "nonexistent_local_time": "repair"}
    examples: list[tuple[dict[str, Any], dict[str, Any], int]] = [
        ({"rules": {"wrong_type": "repair"}}, body(load_rate="1"), NOW_NS),
        ({}, body(ts="2023-11-14T23:13:20+01:00"), NOW_NS),
        ({}, body(ts=1_700_000_000), NOW_NS),
        ({}, body(ts=1_700_000_000_000), NOW_NS),
        ({}, body(ts=1_700_000_000_000_000), NOW_NS),
        ({}, body(ts=1_700_000_000_000_000_000), NOW_NS),
        ({"naive_timestamps": "assume_utc"}, body(ts="2023-11-14T22:13:20"), NOW_NS),
        ({**zones, "rules": dst}, body(ts="2023-10-29T02:30:00"), ns_at("2023-10-29T00:30:00Z")),
        ({**zones, "rules": dst}, body(ts="2023-03-26T02:30:00"), ns_at("2023-03-26T01:30:00Z")),
    ]
    seen: set[str] = set()
    for settings, obj, now in examples:
        seen.update(accepted(obj, make(**settings), now=now).repairs)
    assert sorted(seen) == sorted(REPAIRS)


# --- regressions: inputs that once raised out of check() or reached a sink unwritable ---


def test_regression_integer_with_too_many_digits_raises() -> None:
    payload = json.dumps(body()).replace('"seq": 7', '"seq": ' + "1" * 5000).encode()
    assert rejected(payload).reason == "malformed_json"


def test_regression_huge_integer_number_raises() -> None:
    assert rejected(body(load_rate=10**400)).reason == "out_of_range"


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_regression_timestamp_at_datetime_limits_raises(ts: str) -> None:
    assert rejected(body(ts=ts)).reason == "bad_timestamp"
    everything_accepted = policy(far_past="accept", future_timestamp="accept")
    assert rejected(body(ts=ts), everything_accepted).reason == "bad_timestamp"


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00", "9999-12-31T23:59:59.999999"])
def test_regression_naive_timestamp_at_datetime_limits_in_a_zone(ts: str) -> None:
    v = make(
        naive_timestamps="assume_machine_zone",
        default_timezone="Asia/Tokyo" if ts.startswith("0001") else "Pacific/Pago_Pago",
        rules={"far_past": "accept", "future_timestamp": "accept"},
    )
    assert rejected(body(ts=ts), v).reason == "bad_timestamp"  # a year 0 or 10000 instant


@pytest.mark.parametrize("ts", ["2023-11-14T22:13:20Z\x00", "2023-11-14T22:13:20Z\x00garbage"])
def test_timestamp_with_nul_and_trailing_garbage_is_bad(ts: str) -> None:
    assert rejected(body(ts=ts)).reason == "bad_timestamp"


def test_regression_lone_surrogate_machine_accepted() -> None:
    # json.dumps escapes it as \ud800; json.loads turns it back into an unencodable str.
    result = rejected(body(machine="\ud800"))
    assert result.reason == "invalid_utf8"
    assert result.machine is None
    assert result.detail.encode()  # repr() escaped it


@pytest.mark.parametrize(
    ("obj", "rules", "reason"),
    [
        (body(status="Bad\ud800"), {}, "status_bad"),
        (body(status="Uncertain\udfff"), {}, "status_uncertain"),
        (body(**{"\ud800": 1}), {"extra_fields": "reject"}, "extra_fields"),
    ],
    ids=["status_bad", "status_uncertain", "extra_fields"],
)
def test_rejection_with_lone_surrogate_is_writable_to_quarantine(
    obj: dict[str, Any], rules: dict[str, str], reason: str
) -> None:
    """Details quote the input; a lone surrogate there once made the whole quarantine batch unwritable."""
    result = rejected(obj, policy(**rules))
    assert result.reason == reason
    assert pa.array([result.detail], pa.string()).to_pylist() == [result.detail]  # raised UnicodeEncodeError
    assert "\\ud" in result.detail  # escaped, still legible
