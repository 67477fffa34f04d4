"""The hot path's shortcuts give exactly what the full paths they skip give (pipeline/decode.py, validate.py).

``Validator._fast`` accepts the usual message (the required fields, plain finite numbers, an ISO timestamp in
UTC, nothing the history refuses) in one pass and hands anything else to ``Validator._check``; ``decode``
calls the C JSON scanner directly and hands anything unusual (whitespace around the value, trailing data,
errors, repeated names) to ``_decode_full``. Here the same inputs go through a shortcut and through the full
path alone, under random settings, and the results, and the history a validator keeps, must be equal.

Example counts: 300 sequences of up to 12 messages per validator property, 1,000 payloads per decode property:
the file runs in about 15 s of CPU on the 2-core CI machine. ``derandomize=True``: a fixed seed, reproducible CI runs.
"""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ValidateSettings
from pipeline.decode import DecodeFailure, _decode_full, decode, encode_payload
from pipeline.model import Reading, Rejection
from pipeline.validate import FIELDS_MAX_BYTES, FIELDS_MAX_TS, MAX_MACHINE_CHARS, Validator
from tests.test_validate_properties import (
    MACHINES,
    NOW_NS,
    TOPIC,
    json_objects,
    json_values,
    mutated,
    pair_objects,
    payload_of_objects,
    same_json,
    to_payload,
    validate_settings,
)

PROPS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DECODE = settings(PROPS, max_examples=1_000)


class FullPathOnly(Validator):
    """The validator as it was before the fast path: every message through every rule in order."""

    def _fast(self, obj: dict[str, Any], received_ns: int, now: int) -> Reading | None:
        return None


def history(v: Validator) -> list[tuple[str, int | None, float, list[int]]]:
    """What the history rules remember, machines in eviction order."""
    return [(m, s.newest_ts_ns, s.newest_mileage, list(s.recent)) for m, s in v._state.items()]


# -- messages close to the usual one, so that most take the fast path and the rest fail it in one place -----

SECOND_NS = 10**9
near_ns = st.integers(-3_000 * SECOND_NS, 3_000 * SECOND_NS).map(lambda d: NOW_NS + d // 1000 * 1000)
zero_offsets = st.sampled_from(["Z", "+00:00", "-00:00"])


def utc_text(ns: int, style: int, zero: str) -> str:
    """An ISO 8601 spelling of ``ns`` in UTC: with microseconds, milliseconds, none, or another ISO layout."""
    moment = datetime(1970, 1, 1) + timedelta(microseconds=ns // 1000)
    spellings = [
        moment.isoformat(timespec="microseconds"),
        moment.isoformat(timespec="milliseconds"),
        moment.isoformat(timespec="seconds"),
        moment.isoformat(sep=" ", timespec="microseconds"),
        moment.strftime("%Y%m%dT%H%M%S"),
    ]
    return spellings[style] + zero


usual_ts: st.SearchStrategy[Any] = st.builds(utc_text, near_ns, st.integers(0, 4), zero_offsets)
odd_ts: st.SearchStrategy[Any] = st.one_of(
    near_ns.map(lambda ns: utc_text(ns, 0, "")),  # naive
    st.tuples(near_ns, st.integers(-14 * 60, 14 * 60)).map(
        lambda t: (
            (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=t[0] // 1000))
            .astimezone(timezone(timedelta(minutes=t[1])))
            .isoformat()
        )
    ),
    near_ns.map(lambda ns: ns // 10**6),  # epoch millis
    near_ns.map(lambda ns: utc_text(ns, 0, "Z\x00junk")),
    st.sampled_from(["2026-02-30T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z", "", "Z"]),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),  # far past and future
)
usual_numbers = st.floats(0, 100) | st.integers(0, 100)
odd_numbers = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e300, -1.0, 100.000001, 2**53, 2**53 + 1, 10**400]),
    st.booleans(),
    st.sampled_from(["42", " 7.5 ", "nan", "1_000", None]),
    st.floats(),
)


def field(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usual 7 times in 8: a sequence of a few messages then has some odd ones and many usual ones."""
    return st.integers(0, 7).flatmap(lambda n: odd if n == 0 else usual)


@st.composite
def near_usual(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "machine": draw(field(st.sampled_from(MACHINES), st.sampled_from(["", "x" * 256, "a\x01", "\ud800", 7]))),
        "ts": draw(field(usual_ts, odd_ts)),
        "load_rate": draw(field(usual_numbers, odd_numbers)),
        "mileage": draw(field(st.floats(0, 1e9) | st.integers(0, 10**9), odd_numbers)),
        # Few seqs: duplicates are common.
        "seq": draw(field(st.integers(0, 20), st.sampled_from([-1, 2**63, 2**63 - 1, True, 1.0, "3", None]))),
    }
    extra = draw(st.integers(0, 11))
    if extra == 0:
        obj["status"] = draw(st.sampled_from(["Good", "Bad", "UncertainInitialValue", "good", None]))
    elif extra == 1:
        obj["status"] = "Good"
    elif extra == 2:
        obj[draw(st.sampled_from(["extra", "machine_id", "Seq"]))] = draw(json_values)
    elif extra == 3:
        del obj[draw(st.sampled_from(sorted(obj)))]
    return obj


def near_usual_payloads() -> st.SearchStrategy[bytes]:
    return st.tuples(near_usual(), st.booleans()).map(lambda t: to_payload(*t))


# Received times that move forward by up to a minute and sometimes jump back: the history rules see
# readings in and out of order, and the clock ahead of and behind the timestamps.
steps = st.integers(-60 * SECOND_NS, 60 * SECOND_NS)


class Counting(Validator):
    """The validator under test, counting the messages its fast path accepted."""

    taken = 0

    def _fast(self, obj: dict[str, Any], received_ns: int, now: int) -> Reading | None:
        reading = super()._fast(obj, received_ns, now)
        self.taken += reading is not None
        return reading


def assert_same_path(s: ValidateSettings, payloads: list[bytes], clock_steps: list[int]) -> int:
    """Both validators judge the sequence alike, message by message; returns how many the fast path took."""
    fast, full = Counting(s), FullPathOnly(s)
    now = NOW_NS
    for payload, step in zip(payloads, clock_steps, strict=False):
        now += step
        # The pipeline clock and a replayed "now" that differ: received_ns is stored, now_ns judged.
        got = fast.check(payload, TOPIC, now, now + step // 2)
        want = full.check(payload, TOPIC, now, now + step // 2)
        assert got == want, (payload, got, want)
        assert history(fast) == history(full)
    return fast.taken


@PROPS
@given(
    validate_settings(),
    st.lists(near_usual_payloads(), min_size=1, max_size=12),
    st.lists(steps, min_size=12, max_size=12),
)
def test_fast_path_agrees_with_the_full_path_under_random_settings(
    s: ValidateSettings, payloads: list[bytes], clock_steps: list[int]
) -> None:
    assert_same_path(s, payloads, clock_steps)


@PROPS
@given(st.lists(near_usual_payloads(), min_size=1, max_size=12), st.lists(steps, min_size=12, max_size=12))
def test_fast_path_agrees_with_the_full_path_under_default_settings(
    payloads: list[bytes], clock_steps: list[int]
) -> None:
    assert_same_path(ValidateSettings(), payloads, clock_steps)


@settings(PROPS, max_examples=200)
@given(
    validate_settings(),
    st.lists(st.one_of(payload_of_objects, mutated(), near_usual_payloads()), min_size=1, max_size=6),
    st.lists(steps, min_size=6, max_size=6),
)
def test_fast_path_agrees_on_anything(s: ValidateSettings, payloads: list[bytes], clock_steps: list[int]) -> None:
    assert_same_path(s, payloads, clock_steps)


def test_the_agreement_properties_exercise_the_fast_path() -> None:
    """Not vacuous: most near-usual messages under default settings go the fast way, and some do not."""
    taken = total = 0

    @settings(PROPS, max_examples=100)
    @given(st.lists(near_usual_payloads(), min_size=1, max_size=12), st.lists(steps, min_size=12, max_size=12))
    def collect(payloads: list[bytes], clock_steps: list[int]) -> None:
        nonlocal taken, total
        taken += assert_same_path(ValidateSettings(), payloads, clock_steps)
        total += len(payloads)

    collect()
    # Each field is odd with probability 1/8 and status or names vary 1 time in 4: about half of the messages
    # are usual throughout; some of those are still refused by the history (duplicate seqs).
    assert 0 < taken < total, (taken, total)
    assert taken > total // 5, (taken, total)


def test_usual_messages_take_the_fast_path_and_others_do_not() -> None:
    v = Validator()
    usual = {"machine": "m-1", "ts": "2026-01-01T00:00:00.123456Z", "load_rate": 1.5, "mileage": 10, "seq": 1}
    assert v._fast(dict(usual), NOW_NS, NOW_NS) == Reading("m-1", NOW_NS + 123_456_000, 1.5, 10.0, 1, NOW_NS)
    assert v._fast({**usual, "seq": 2, "status": "Good"}, NOW_NS, NOW_NS) is not None
    assert v._fast({**usual, "seq": 3, "ts": "2026-01-01T00:00:01+00:00"}, NOW_NS, NOW_NS) is not None
    for odd in (
        {"seq": 1},  # a duplicate
        {"ts": "2026-01-01T01:00:00+01:00"},  # utc_normalised
        {"ts": "2026-01-01T00:00:00"},  # naive
        {"ts": 1_767_225_600},  # epoch
        {"load_rate": "1.5"},  # a string
        {"load_rate": True},
        {"mileage": math.nan},
        {"mileage": 5},  # backwards
        {"load_rate": 101.0},
        {"status": "Bad"},
        {"extra": 1},
        {"machine": "bad\x07id"},
        {"seq": 2**63},
    ):
        assert v._fast({**usual, "seq": 10, **odd}, NOW_NS, NOW_NS) is None, odd
    assert isinstance(v.check(json.dumps({**usual, "seq": 1}).encode(), TOPIC, NOW_NS), Rejection)


# -- decode -------------------------------------------------------------------------------------------------


def reference(payload: bytes, duplicate_keys: bool) -> dict[str, Any] | DecodeFailure:
    """decode as it was: the full path for every payload."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DecodeFailure("invalid_utf8", f"byte {exc.start}: {exc.reason}")
    return _decode_full(text, duplicate_keys)


def assert_same_decoding(payload: bytes) -> None:
    for duplicate_keys in (False, True):
        got, want = decode(payload, duplicate_keys=duplicate_keys), reference(payload, duplicate_keys)
        if isinstance(want, DecodeFailure):
            assert isinstance(got, DecodeFailure), (payload, got, want)
            assert (got.reason, got.detail, got.duplicated) == (want.reason, want.detail, want.duplicated)
            assert same_json(got.obj, want.obj)
        else:
            assert type(got) is dict and same_json(got, want), (payload, got, want)


spacing = st.sampled_from(["", " ", "\n", "\t", "\r\n ", "\ufeff", "x", "{}", "]"])


@DECODE
@given(
    st.one_of(
        pair_objects().map(lambda t: t[0]),
        st.tuples(json_values, st.booleans()).map(lambda t: json.dumps(t[0], ensure_ascii=t[1])),
        json_objects().map(json.dumps),
    ),
    spacing,
    spacing,
)
def test_decode_fast_path_agrees_with_the_full_path(text: str, before: str, after: str) -> None:
    lead = "" if before in ("x", "{}", "]") else before  # junk only after the value
    assert_same_decoding((lead + text + after).encode("utf-8", "surrogatepass"))


@DECODE
@given(st.binary(max_size=200) | mutated())
def test_decode_fast_path_agrees_on_any_bytes(payload: bytes) -> None:
    assert_same_decoding(payload)


# -- the quote count that stands in for the strict decoder's repeated-name check --------------------------------


NESTED = ["{}", "[]", "[1]", '{"x":1}', '["a"]']
STATUSES = ['"status":"Good"', '"status":"Go\\"od"', '"status":"Good","status":"Good"']


@st.composite
def near_usual_texts(draw: st.DrawFn) -> bytes:
    """A usual message spelled with the tricks the fast path's quote count must see through: a name repeated
    (with a string, number or object value), a nested object or array, escapes that decode to the usual text,
    a string holding a quote, whitespace. The strict decoder refuses or accepts each exactly as before."""
    obj = {
        "machine": draw(st.sampled_from(MACHINES)),
        "ts": utc_text(draw(near_ns), draw(st.integers(0, 2)), "Z"),
        "load_rate": draw(st.floats(0, 100)),
        "mileage": draw(st.floats(0, 1e6)),
        "seq": draw(st.integers(0, 20)),
    }
    parts = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in obj.items()]
    trick = draw(st.integers(0, 6))
    if trick == 1:  # a repeated name, anywhere, with any value
        name = draw(st.sampled_from([*obj, "status"]))
        value = draw(st.sampled_from(['"Good"', '"m-1"', "7", "1.5", '{"a":"b"}', "[]", "null"]))
        parts.insert(draw(st.integers(0, len(parts))), f"{json.dumps(name)}:{value}")
    elif trick == 2:  # a value nested one level down
        name = draw(st.sampled_from(sorted(obj)))
        parts[list(obj).index(name)] = '"' + name + '":' + draw(st.sampled_from(NESTED))
    elif trick == 3:  # an escape that decodes to the usual text
        parts[0] = '"mach\\u0069ne":' + json.dumps(obj["machine"])
    elif trick == 4:  # a string value that holds a quote
        parts[0] = '"machine":"m\\"1"'
    elif trick == 5:  # status Good, or a status with one quote too many
        parts.append(
            draw(st.sampled_from(['"status":"Good"', '"status":"Go\\"od"', '"status":"Good","status":"Good"']))
        )
    elif trick == 6:
        parts = [p.replace(":", ": ") for p in parts]
    return ("{" + ",".join(parts) + "}").encode()


@settings(PROPS, max_examples=600)
@given(st.lists(near_usual_texts(), min_size=1, max_size=8), st.lists(steps, min_size=8, max_size=8))
def test_fast_path_agrees_on_repeated_names_nesting_and_escapes(payloads: list[bytes], clock_steps: list[int]) -> None:
    assert_same_path(ValidateSettings(), payloads, clock_steps)
    accept = ValidateSettings.model_validate({"rules": {"duplicate_key": "accept"}})
    assert_same_path(accept, payloads, clock_steps)


def test_a_repeated_name_never_takes_the_fast_path() -> None:
    usual = '"ts":"2026-01-01T00:00:00Z","load_rate":1.5,"mileage":10,"seq":1'
    v = Counting()
    got = v.check(('{"machine":"m-1","machine":"m-2",' + usual + "}").encode(), TOPIC, NOW_NS)
    assert isinstance(got, Rejection) and got.reason == "duplicate_key"
    got = v.check(('{"machine":"m-1","seq":9,' + usual + "}").encode(), TOPIC, NOW_NS)
    assert isinstance(got, Rejection) and got.reason == "duplicate_key"
    assert v.taken == 0
    got = v.check(('{"machine":"m-1",' + usual + "}").encode(), TOPIC, NOW_NS)
    assert isinstance(got, Reading) and v.taken == 1  # the same message without the repeat goes the fast way


def test_freezing_the_startup_heap_collects_its_garbage_first_and_keeps_the_rest_out_of_later_passes() -> None:
    """pipeline.runtime.freeze_startup_heap: what is garbage at startup is freed, not kept forever; what is alive
    is no longer walked by the collector (it moved to the permanent generation)."""
    import gc
    import weakref

    from pipeline.runtime import freeze_startup_heap

    class Node:
        other: Node | None = None

    garbage, alive = Node(), Node()
    garbage.other = garbage  # a cycle: only the cyclic collector frees it
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_startup_heap()
        assert gone() is None, "garbage at startup must be collected, not frozen"
        assert gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects()), "a frozen object is not walked by later passes"
    finally:
        gc.unfreeze()


# -- objects a source builds (OPC UA): Validator.check_fields against check of the same object's bytes -----------


def assert_same_as_bytes(s: ValidateSettings, objects: list[dict[str, Any]], clock_steps: list[int]) -> int:
    """check_fields(obj) judges each object as check(encode_payload(obj)) judges its bytes, message by message,
    and leaves the same history; returns how many objects the fast path took without encoding."""
    fields, raw = Counting(s), Validator(s)
    now = NOW_NS
    for obj, step in zip(objects, clock_steps, strict=False):
        now += step
        before = copy.deepcopy(obj)
        got = fields.check_fields(obj, TOPIC, now, now + step // 2)
        assert same_json(obj, before), "check_fields must not change the object"
        want = raw.check(encode_payload(obj), TOPIC, now, now + step // 2)
        assert got == want, (obj, got, want)
        assert history(fields) == history(raw)
    return fields.taken


@PROPS
@given(
    validate_settings(),
    st.lists(near_usual(), min_size=1, max_size=12),
    st.lists(steps, min_size=12, max_size=12),
)
def test_check_fields_agrees_with_checking_the_encoded_bytes_under_random_settings(
    s: ValidateSettings, objects: list[dict[str, Any]], clock_steps: list[int]
) -> None:
    assert_same_as_bytes(s, objects, clock_steps)


@settings(PROPS, max_examples=200)
@given(
    validate_settings(),
    st.lists(st.one_of(json_objects(), near_usual()), min_size=1, max_size=6),
    st.lists(steps, min_size=6, max_size=6),
)
def test_check_fields_agrees_on_any_object(
    s: ValidateSettings, objects: list[dict[str, Any]], clock_steps: list[int]
) -> None:
    assert_same_as_bytes(s, objects, clock_steps)


def test_check_fields_takes_the_usual_object_without_encoding_it() -> None:
    """Not vacuous: under default settings most near-usual objects skip the encode, and some do not."""
    taken = total = 0

    @settings(PROPS, max_examples=100)
    @given(st.lists(near_usual(), min_size=1, max_size=12), st.lists(steps, min_size=12, max_size=12))
    def collect(objects: list[dict[str, Any]], clock_steps: list[int]) -> None:
        nonlocal taken, total
        taken += assert_same_as_bytes(ValidateSettings(), objects, clock_steps)
        total += len(objects)

    collect()
    assert total // 5 < taken < total, (taken, total)


def test_no_object_the_fields_path_takes_unencoded_can_be_oversize() -> None:
    """FIELDS_MAX_BYTES bounds the encoded size of every object check_fields may judge without encoding: the
    longest machine id the id rule lets through, in characters that escape to 12 bytes each, the longest
    timestamp it lets through (FIELDS_MAX_TS characters) likewise, the longest floats and seq, and status."""
    widest = "\U0001f600"
    machine = widest * MAX_MACHINE_CHARS
    worst: dict[str, Any] = {
        "machine": machine,
        "ts": widest * FIELDS_MAX_TS,
        "load_rate": -1.7976931348623157e308,
        "mileage": -2.2250738585072014e-308,
        "seq": 2**63 - 1,
        "status": "Good",
    }
    assert len(encode_payload(worst)) < FIELDS_MAX_BYTES
    v = Validator(ValidateSettings())
    assert v._good_machine(machine) and not v._good_machine(widest * (MAX_MACHINE_CHARS + 1))
    # Below the bound, with oversize refused, every object is encoded and its size judged first.
    usual = {"machine": "m-1", "ts": utc_text(NOW_NS, 0, "Z"), "load_rate": 1.0, "mileage": 1.0, "seq": 1}
    assert Validator(ValidateSettings()).check_fields(dict(usual), TOPIC, NOW_NS) == Reading(
        "m-1", NOW_NS // 1000 * 1000, 1.0, 1.0, 1, NOW_NS
    )
    got = Validator(ValidateSettings(max_payload=50)).check_fields(dict(usual), TOPIC, NOW_NS)
    assert isinstance(got, Rejection) and got.reason == "oversize"
    # A timestamp parses with any number of fractional digits: one past FIELDS_MAX_TS characters is encoded too.
    long_ts = {**usual, "ts": utc_text(NOW_NS, 0, "") + "1" * 70_000 + "Z"}
    got = Validator(ValidateSettings()).check_fields(long_ts, TOPIC, NOW_NS)
    assert isinstance(got, Rejection) and got.reason == "oversize"
