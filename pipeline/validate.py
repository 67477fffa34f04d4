"""First-line validation: required fields, types, finite numbers, UTC timestamps.

Pure: given a decoded object and the pipeline clock's reading, return a
:class:`~pipeline.model.Reading` or a :class:`~pipeline.model.Rejection` with a
reason. Reasons are short stable names (``missing_field``, ``wrong_type``,
``non_finite``, ``bad_timestamp``, ``naive_timestamp``, ``future_timestamp``)
so that results can be counted by reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.decode import DecodeFailure, decode
from pipeline.model import Reading, Rejection

REQUIRED = ("machine", "ts", "load_rate", "mileage", "seq")
MAX_MACHINE_CHARS = 255


@dataclass(frozen=True, slots=True)
class Validator:
    """Validate decoded messages against the pipeline's rules.

    ``future_tolerance_ns``: a reading stamped further ahead of the clock than
    this is refused; a sensor clock that far off corrupts every per-minute
    aggregate it lands in.
    """

    future_tolerance_ns: int = 300 * 10**9

    def check(self, payload: bytes, topic: str, received_ns: int) -> Reading | Rejection:
        """Decode and validate one message; never raises."""
        obj = decode(payload)
        if isinstance(obj, DecodeFailure):
            return Rejection(obj.reason, obj.detail, payload, topic, received_ns)
        seq = obj.get("seq")
        # Only a seq that fits the int64 column counts as known; a huge one is
        # refused below instead of failing the whole batch at write time.
        seq_known = seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63 else None
        machine = obj.get("machine")
        machine_known = machine if isinstance(machine, str) and _is_utf8(machine) else None

        def reject(reason: str, detail: str) -> Rejection:
            return Rejection(reason, detail, payload, topic, received_ns, seq_known, machine_known)

        missing = [name for name in REQUIRED if name not in obj or obj[name] is None]
        if missing:
            return reject("missing_field", f"missing or null: {', '.join(missing)}")
        if seq_known is None:
            if isinstance(seq, int) and not isinstance(seq, bool):
                return reject("out_of_range", f"seq: expected 0 <= seq < 2**63, got {seq}")
            return reject("wrong_type", f"seq: expected an integer, got {_kind(seq)}")
        if machine_known is None or not machine_known:
            if isinstance(machine, str) and machine:
                # JSON may carry lone surrogates (\ud800) that no UTF-8 sink can store.
                return reject("invalid_utf8", f"machine: not encodable as UTF-8: {machine[:64]!r}")
            return reject("wrong_type", f"machine: expected a non-empty string, got {_kind(machine)}")
        if len(machine_known) > MAX_MACHINE_CHARS:
            # SQL keys are VARCHAR(255); one longer id would fail a whole batch there.
            return reject("bad_machine_id", f"machine: longer than {MAX_MACHINE_CHARS} characters")
        numbers: dict[str, float] = {}
        for name in ("load_rate", "mileage"):
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                return reject("wrong_type", f"{name}: expected a number, got {_kind(value)}")
            try:
                number = float(value)
            except OverflowError:
                return reject("out_of_range", f"{name}: integer too large for a float")
            if not math.isfinite(number):
                return reject("non_finite", f"{name}: {number}")
            numbers[name] = number
        status = obj.get("status", "Good")
        if status != "Good":
            # OPC UA Uncertain/Bad values: quarantined by default, never silently mixed with Good data.
            if isinstance(status, str) and status.startswith("Uncertain"):
                return reject("status_uncertain", f"status: {status}")
            if isinstance(status, str) and status.startswith("Bad"):
                return reject("status_bad", f"status: {status}")
            return reject("wrong_type", f"status: expected 'Good' or an OPC UA status name, got {str(status)[:64]!r}")
        ts = _parse_ts(obj["ts"])
        if isinstance(ts, str):
            return reject("naive_timestamp" if ts.startswith("naive") else "bad_timestamp", ts)
        if ts - received_ns > self.future_tolerance_ns:
            ahead = (ts - received_ns) / 1e9
            return reject("future_timestamp", f"ts is {ahead:.1f} s ahead of the pipeline clock")
        return Reading(
            machine=machine_known,
            ts_ns=ts,
            load_rate=numbers["load_rate"],
            mileage=numbers["mileage"],
            seq=seq_known,
            received_ns=received_ns,
        )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_ts(value: Any) -> int | str:
    """UTC nanoseconds from an ISO 8601 string with a zone, or an error text."""
    if not isinstance(value, str):
        return f"ts: expected an ISO 8601 string with a zone, got {_kind(value)}"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return f"ts: not ISO 8601: {value[:64]!r}"
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        return f"naive: ts has no zone: {value[:64]!r}"
    try:
        utc = parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return f"ts: outside the representable range: {value[:64]!r}"
    # Exact integer arithmetic: float seconds lose microseconds at epoch scale.
    delta = utc - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
