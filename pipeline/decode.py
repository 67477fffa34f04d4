"""Bytes off the wire to a JSON object, or a reason why not. Pure, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    reason: str
    detail: str
    obj: dict[str, Any] | None = None
    """For ``duplicate_key``: the object as a last-wins parser reads it (the seq and machine come from it)."""
    duplicated: frozenset[str] = frozenset()
    """For ``duplicate_key``: the names that appear more than once in one object (at any depth)."""


class _DuplicateKey(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The hot path: one dict() and one length comparison per JSON object; the slow path below only for
    # the rare payload that repeats a key.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateKey(name)
            seen.add(name)
    return obj


# One decoder, made once: json.loads(text, object_pairs_hook=...) would build a decoder per call.
_STRICT = json.JSONDecoder(object_pairs_hook=_unique_pairs)
# The fast path calls the C scanners behind these decoders directly: JSONDecoder.decode and raw_decode are two
# Python frames per message (about a quarter of decoding a 100-byte message).
_STRICT_SCAN = _STRICT.scan_once  # type: ignore[attr-defined]  # set in JSONDecoder.__init__; typeshed omits it
_LENIENT_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_orjson_loads = orjson.loads


# The bytes a source that builds its messages as objects (OPC UA) sends: compact JSON, through one encoder made
# once (json.dumps(..., separators=...) builds one per call). The standard library's, not orjson's: it writes
# NaN and Infinity as literals (the validator then refuses them as non_finite, with their seq and machine)
# where orjson writes null, and its text is what the quarantine keeps of a refused reading.
_encode_object = json.JSONEncoder(separators=(",", ":")).encode


def encode_payload(obj: dict[str, Any]) -> bytes:
    """``obj`` as the UTF-8 JSON payload an MQTT publisher would send (ASCII: other characters escaped)."""
    return _encode_object(obj).encode()


def _duplicated(pairs: list[tuple[str, Any]], found: set[str]) -> dict[str, Any]:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            found.add(name)
        seen.add(name)
    return dict(pairs)


def decode(payload: bytes, *, duplicate_keys: bool = False) -> dict[str, Any] | DecodeFailure:
    """Decode a UTF-8 JSON object; never raises.

    A name repeated in one object makes the payload ambiguous (which ``machine`` or ``seq`` did the sender
    mean?): a ``duplicate_key`` failure, unless ``duplicate_keys`` accepts it (the last value wins, as in
    most parsers).

    >>> decode(b'{"seq": 1}')
    {'seq': 1}
    >>> decode(b'[1]').reason
    'not_an_object'
    >>> decode(b'{"seq": 1, "seq": 2}').reason
    'duplicate_key'
    >>> decode(b'{"seq": 1, "seq": 2}', duplicate_keys=True)
    {'seq': 2}
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DecodeFailure("invalid_utf8", f"byte {exc.start}: {exc.reason}")
    try:
        obj, end = (_LENIENT_SCAN if duplicate_keys else _STRICT_SCAN)(text, 0)
    except Exception:  # StopIteration, ValueError, a repeated name...: the full path says which
        pass
    else:
        # Whitespace before or after the value, or anything after it, is left to the full path.
        if end == len(text) and type(obj) is dict:
            return obj
    return _decode_full(text, duplicate_keys)


def scan_plain(payload: bytes) -> dict[str, Any] | None:
    """The validator's fast path: a JSON object without a single backslash, decoded by orjson (0.6 us against
    2.4 for the standard library's C scanner, the largest part of a message's cost); None for anything else.

    What orjson reads differently is left to :func:`decode`: it refuses NaN and Infinity literals and numbers
    past a double's range (None here), and reads an integer past 64 bits as a float (as the validator would
    convert it, or refuse it as a seq). Repeated names are NOT ruled out here: a repeated name leaves the dict
    with fewer names than the text has. The caller rules them out by counting quotes: without backslashes each
    name and each string value is exactly two ``"`` bytes (no UTF-8 sequence holds that byte), so a payload
    with as many quotes as the dict's names and string values has no repeated name and nothing nested (see
    ``Validator.check``). Whatever fails that goes through :func:`decode`.
    """
    if b"\\" in payload:
        return None
    try:
        obj = _orjson_loads(payload)
    except orjson.JSONDecodeError:  # invalid UTF-8, NaN, a syntax error...: decode() says which
        return None
    return obj if type(obj) is dict else None


def _decode_full(text: str, duplicate_keys: bool) -> dict[str, Any] | DecodeFailure:
    """Every case: duplicate names found and named, errors explained."""
    try:
        # NaN/Infinity literals are not JSON, but plant gateways send them. Parse
        # them as floats so the validator refuses them as non_finite with the
        # message's seq and machine known, instead of as anonymous malformed JSON.
        obj = json.loads(text) if duplicate_keys else _STRICT.decode(text)
    except _DuplicateKey:
        return _duplicate_key(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and also integers past Python's
        # digit limit (int_max_str_digits), which json.loads raises plainly.
        return DecodeFailure("malformed_json", str(exc)[:200])
    if not isinstance(obj, dict):
        return DecodeFailure("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _duplicate_key(text: str) -> DecodeFailure:
    """The slow path: decode again, collecting every repeated name, so the rejection can say which and
    still name the message's seq and machine where they are unambiguous."""
    found: set[str] = set()
    try:
        obj = json.loads(text, object_pairs_hook=lambda pairs: _duplicated(pairs, found))
    except (ValueError, RecursionError) as exc:
        # Malformed further on: the strict decoder stopped at the repeated name before reaching the error.
        return DecodeFailure("malformed_json", str(exc)[:200])
    names = ", ".join(repr(name[:64]) for name in sorted(found)[:5])
    return DecodeFailure(
        "duplicate_key",
        f"repeated in one object: {names}",
        obj if isinstance(obj, dict) else None,
        frozenset(found),
    )
