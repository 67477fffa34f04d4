"""Bytes off the wire to a JSON object, or a reason why not. Pure, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    reason: str
    detail: str


def decode(payload: bytes) -> dict[str, Any] | DecodeFailure:
    """Decode a UTF-8 JSON object; never raises.

    >>> decode(b'{"seq": 1}')
    {'seq': 1}
    >>> decode(b'[1]').reason
    'not_an_object'
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DecodeFailure("invalid_utf8", f"byte {exc.start}: {exc.reason}")
    try:
        # NaN/Infinity literals are not JSON, but plant gateways send them. Parse
        # them as floats so the validator refuses them as non_finite with the
        # message's seq and machine known, instead of as anonymous malformed JSON.
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and also integers past Python's
        # digit limit (int_max_str_digits), which json.loads raises plainly.
        return DecodeFailure("malformed_json", str(exc)[:200])
    if not isinstance(obj, dict):
        return DecodeFailure("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj
