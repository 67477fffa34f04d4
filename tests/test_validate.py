"""Tests for pipeline/decode.py and pipeline/validate.py: bytes -> Reading, or Rejection with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.decode import DecodeFailure, decode
from pipeline.model import Reading, Rejection
from pipeline.validate import REQUIRED, Validator

NOW_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z, the pipeline clock's reading
TS = "2023-11-14T22:13:20.123456Z"
TS_NS = NOW_NS + 123_456_000
TOPIC = "plant/m-1/telemetry"
TOLERANCE_NS = 300 * 10**9  # Validator's default future tolerance
REASONS = {
    "invalid_utf8",
    "malformed_json",
    "not_an_object",
    "non_finite",
    "missing_field",
    "wrong_type",
    "out_of_range",
    "bad_timestamp",
    "naive_timestamp",
    "future_timestamp",
}

V = Validator()


def body(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"machine": "m-1", "ts": TS, "load_rate": 42.5, "mileage": 1234.25, "seq": 7}
    base.update(overrides)
    return base


def check(obj: Any, validator: Validator = V) -> Reading | Rejection:
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return validator.check(payload, TOPIC, NOW_NS)


def rejected(obj: Any, validator: Validator = V) -> Rejection:
    result = check(obj, validator)
    assert isinstance(result, Rejection), result
    return result


def ns_at(ts: datetime) -> int:
    delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


# --- accepted ----------------------------------------------------------------


def test_valid_message_gives_reading() -> None:
    result = check(body())
    assert result == Reading(machine="m-1", ts_ns=TS_NS, load_rate=42.5, mileage=1234.25, seq=7, received_ns=NOW_NS)


def test_integers_accepted_as_numbers() -> None:
    result = check(body(load_rate=5, mileage=0))
    assert isinstance(result, Reading)
    assert (result.load_rate, result.mileage) == (5.0, 0.0)
    assert isinstance(result.load_rate, float)


@pytest.mark.parametrize(
    "ts",
    [
        "2023-11-15T03:43:20.123456+05:30",
        "2023-11-14T14:13:20.123456-08:00",
        "2023-11-14T22:13:20.123456+00:00",
        "2023-11-15T00:13:20.123456+02:00",
    ],
)
def test_offsets_normalised_to_utc(ts: str) -> None:
    result = check(body(ts=ts))
    assert isinstance(result, Reading)
    assert result.ts_ns == TS_NS


def test_ts_ns_is_exact_at_epoch_scale() -> None:
    """Integer arithmetic: the last microsecond digit survives (float seconds would lose it)."""
    result = check(body(ts="2023-11-14T22:13:20.999999Z"))
    assert isinstance(result, Reading)
    assert result.ts_ns == NOW_NS + 999_999_000


def test_seq_max_int64_accepted() -> None:
    result = check(body(seq=2**63 - 1))
    assert isinstance(result, Reading)
    assert result.seq == 2**63 - 1


def test_decode_returns_the_object() -> None:
    assert decode(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


# --- decode rejections -------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'{"machine": "m\xc3"}', "invalid_utf8"),  # truncated multi-byte sequence
        (b"", "malformed_json"),
        (b"{", "malformed_json"),
        (b'{"seq": 1,}', "malformed_json"),
        (b"[" * 100_000, "malformed_json"),  # too deep for the parser: RecursionError is caught
        (b"[1]", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"3", "not_an_object"),
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


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["load_rate", "mileage"])
def test_nan_and_infinity_literals_are_non_finite(literal: str, field: str) -> None:
    text = json.dumps(body()).replace(f'"{field}": {body()[field]}', f'"{field}": {literal}')
    assert literal in text
    assert rejected(text.encode()).reason == "non_finite"


def test_overflowing_float_is_non_finite() -> None:
    """1e999 is valid JSON that parses to inf; the validator must still refuse it."""
    payload = json.dumps(body()).replace("42.5", "1e999").encode()
    result = rejected(payload)
    assert result.reason == "non_finite"
    assert (result.seq, result.machine) == (7, "m-1")  # the rest of the message was readable


# --- field rejections --------------------------------------------------------


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
    ],
    ids=repr,
)
def test_wrong_type(overrides: dict[str, Any]) -> None:
    result = rejected(body(**overrides))
    assert result.reason == "wrong_type"
    assert next(iter(overrides)) in result.detail


@pytest.mark.parametrize("seq", [2**63, 2**64 + 5, -1, -(2**63)])
def test_seq_out_of_range(seq: int) -> None:
    result = rejected(body(seq=seq))
    assert result.reason == "out_of_range"
    assert result.seq is None  # not representable in the int64 column
    assert result.machine == "m-1"


@pytest.mark.parametrize(
    "ts",
    ["yesterday", "", "2023-13-01T00:00:00Z", "2023-11-14 25:00:00Z", "14/11/2023 22:13:20Z"],
)
def test_bad_timestamp_text(ts: str) -> None:
    assert rejected(body(ts=ts)).reason == "bad_timestamp"


@pytest.mark.parametrize("ts", [1_700_000_000, 1.7e9, True, ["2023-11-14T22:13:20Z"]], ids=repr)
def test_non_string_timestamp_is_bad_timestamp(ts: Any) -> None:
    assert rejected(body(ts=ts)).reason == "bad_timestamp"


@pytest.mark.parametrize("ts", ["2023-11-14T22:13:20", "2023-11-14T22:13:20.123456", "2023-11-14"])
def test_naive_timestamp(ts: str) -> None:
    assert rejected(body(ts=ts)).reason == "naive_timestamp"


def test_future_timestamp_beyond_tolerance() -> None:
    ahead = datetime.fromtimestamp(NOW_NS // 10**9, tz=UTC) + timedelta(seconds=300, microseconds=1)
    result = rejected(body(ts=ahead.isoformat()))
    assert result.reason == "future_timestamp"
    assert (result.seq, result.machine) == (7, "m-1")


def test_future_timestamp_within_tolerance_accepted() -> None:
    at_limit = datetime.fromtimestamp(NOW_NS // 10**9, tz=UTC) + timedelta(seconds=300)
    result = check(body(ts=at_limit.isoformat()))
    assert isinstance(result, Reading)
    assert result.ts_ns == NOW_NS + TOLERANCE_NS


def test_future_tolerance_is_configurable() -> None:
    strict = Validator(future_tolerance_ns=0)
    one_us_ahead = datetime.fromtimestamp(NOW_NS // 10**9, tz=UTC) + timedelta(microseconds=1)
    assert rejected(body(ts=one_us_ahead.isoformat()), strict).reason == "future_timestamp"
    assert isinstance(check(body(ts="2023-11-14T22:13:20Z"), strict), Reading)


def test_old_timestamps_accepted() -> None:
    """Only the future is bounded: late data is valid data."""
    result = check(body(ts="1999-01-01T00:00:00Z"))
    assert isinstance(result, Reading)
    assert result.ts_ns == 915_148_800 * 10**9


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


# --- never raises ------------------------------------------------------------

# Integers well past int64 and float range, and datetimes out to the year 1 / 9999
# limits: each once raised out of check() (see the regression tests below).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
offsets = st.builds(
    timezone,
    st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(lambda m: timedelta(minutes=m)),
)
timestamps = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.one_of(st.none(), offsets)
    ).map(lambda d: d.isoformat()),
    st.text(max_size=40),
)
required_dicts = st.fixed_dictionaries(
    {name: json_values for name in REQUIRED},
    optional={"extra": json_values},
)
plausible_dicts = st.fixed_dictionaries(
    {
        "machine": st.text(max_size=10) | json_values,
        "ts": timestamps,
        "load_rate": st.floats() | st.integers(min_value=-(10**400), max_value=10**400),
        "mileage": st.floats() | st.integers(min_value=0, max_value=2**70),
        "seq": st.integers(min_value=-(10**400), max_value=10**400) | json_values,
    }
)


def assert_well_formed(payload: bytes, result: Reading | Rejection) -> None:
    if isinstance(result, Rejection):
        assert result.reason in REASONS
        assert result.detail
        assert result.payload == payload
        assert result.seq is None or 0 <= result.seq < 2**63
    else:
        assert isinstance(result, Reading)
        assert isinstance(result.machine, str) and result.machine
        assert 0 <= result.seq < 2**63
        assert result.ts_ns - NOW_NS <= TOLERANCE_NS


# derandomize: a fixed seed per test, so a run is reproducible; database=None: nothing written to disk.
PROPERTY = settings(
    max_examples=2000, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    assert_well_formed(payload, V.check(payload, TOPIC, NOW_NS))


@PROPERTY
@given(json_values | required_dicts)
def test_arbitrary_json_never_raises(value: Any) -> None:
    payload = json.dumps(value).encode()  # NaN/inf floats become the non-standard literals
    assert_well_formed(payload, V.check(payload, TOPIC, NOW_NS))


@settings(PROPERTY, max_examples=1000)
@given(plausible_dicts)
def test_plausible_messages_never_raise(value: dict[str, Any]) -> None:
    payload = json.dumps(value).encode()
    assert_well_formed(payload, V.check(payload, TOPIC, NOW_NS))


# --- regressions: inputs that once raised out of check() or reached a sink unwritable ---


def test_regression_integer_with_too_many_digits_raises() -> None:
    payload = json.dumps(body()).replace('"seq": 7', '"seq": ' + "1" * 5000).encode()
    assert isinstance(V.check(payload, TOPIC, NOW_NS), Rejection)


def test_regression_huge_integer_number_raises() -> None:
    assert isinstance(check(body(load_rate=10**400)), Rejection)


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_regression_timestamp_at_datetime_limits_raises(ts: str) -> None:
    assert isinstance(check(body(ts=ts)), Rejection)


def test_regression_lone_surrogate_machine_accepted() -> None:
    # json.dumps escapes it as \ud800; json.loads turns it back into an unencodable str.
    result = check(body(machine="\ud800"))
    assert isinstance(result, Rejection)
