"""First-line validation: one rule per anomaly class, each with a policy.

Given the raw bytes of a message and the pipeline clock's reading, return a
:class:`~pipeline.model.Reading` (accepted, or repaired with the repairs named)
or a :class:`~pipeline.model.Rejection` whose reason is the rule that caught it.
Never raises. Reasons and repairs are short stable names so results can be
counted by them; ``docs/validation.md`` lists every rule, its default policy
and why.

Most rules look at one message alone. Three compare it with what the same
machine sent before (``duplicate``, ``late`` beyond the watermark,
``mileage_backwards``); that per-machine state sits behind one lock, since
several source threads may validate at once, and is kept for the
``machines_tracked`` most recently seen machines only (least recently seen
evicted first): ids are input, and a stream of new ones must not grow memory
without end. A machine seen again after its eviction starts afresh.
A new process starts with no history; :meth:`Validator.seed_recent` gives it
back the recent seqs a crash-safe output holds (pipeline/recent.py), so that
what the broker delivers again after a restart is still a ``duplicate``.

>>> v = Validator()
>>> now = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
>>> ok = b'{"machine":"m","ts":"2026-01-01T05:30:00+05:30","load_rate":1,"mileage":2,"seq":1}'
>>> v.check(ok, "t", now).repairs
('utc_normalised',)
>>> v.check(ok, "t", now).reason
'duplicate'
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from pipeline.config import ValidateSettings
from pipeline.decode import DecodeFailure, decode, encode_payload, scan_plain
from pipeline.model import Reading, Rejection

REQUIRED = ("machine", "ts", "load_rate", "mileage", "seq")
KNOWN_FIELDS = frozenset((*REQUIRED, "status"))
MAX_MACHINE_CHARS = 255
# A plain decimal number, nothing Python's float() also takes ("1_000", " inf", "nan").
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# C0/C1 controls: PostgreSQL cannot store NUL at all, and none belongs in an id.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_fromisoformat = datetime.fromisoformat
_isfinite = math.isfinite
_new_tuple = tuple.__new__
"""Makes the fast path's Reading without the named tuple's own ``__new__``, a Python function around this
very call (0.29 us against 0.12 per reading here); the fields go in Reading's order, repairs last."""
MACHINE_CACHE = 16_384
"""Machine ids remembered as passing the id rules, for the fast path; ids are input, so the set is bounded (ids
beyond it are checked in full every time, with the same verdict)."""
# Epoch numbers by magnitude: below 1e11 seconds (until year 5138), then ms, us, ns.
_EPOCH_UNITS = ((1e11, 10**9, "epoch_seconds"), (1e14, 10**6, "epoch_millis"), (1e17, 10**3, "epoch_micros"))

# check_fields takes an object past the oversize rule without encoding it when max_payload is at least this:
# every object its fast path accepts encodes to fewer bytes. The largest: a machine id of 255 characters (the
# id rule) outside the BMP, escaped to 12 bytes each (3,060); a timestamp of at most FIELDS_MAX_TS characters
# (checked; at most 12 bytes each, 768); two floats of at most 24 characters and a seq under 2**63 (19); the
# names, "status":"Good" and the punctuation (77). tests/test_hot_path.py encodes that object.
FIELDS_MAX_BYTES = 4096
FIELDS_MAX_TS = 64
REASONS = (
    "oversize",
    "invalid_utf8",
    "malformed_json",
    "duplicate_key",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "bad_machine_id",
    "unknown_machine",
    "non_finite",
    "out_of_range",
    "status_uncertain",
    "status_bad",
    "extra_fields",
    "bad_timestamp",
    "naive_timestamp",
    "offset_timestamp",
    "epoch_timestamp",
    "ambiguous_local_time",
    "nonexistent_local_time",
    "future_timestamp",
    "far_past",
    "duplicate",
    "late",
    "mileage_backwards",
)
"""Every rejection reason the validator gives, in the order the rules run."""

REPAIRS = (
    "number_from_string",
    "utc_normalised",
    "epoch_seconds",
    "epoch_millis",
    "epoch_micros",
    "epoch_nanos",
    "assumed_utc",
    "assumed_machine_zone",
    "ambiguous_earlier",
    "nonexistent_shifted",
)


class _Reject(Exception):
    """Raised inside a check to stop at the first rule that refuses the message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class _MachineState:
    newest_ts_ns: int | None = None
    newest_mileage: float = -math.inf
    recent: deque[int] = field(default_factory=deque)
    recent_set: set[int] = field(default_factory=set)


class Validator:
    """Validate raw messages against the rules and policies of ``settings``."""

    def __init__(self, settings: ValidateSettings | None = None) -> None:
        self.settings = settings if settings is not None else ValidateSettings()
        s = self.settings
        self.rules = s.rules
        self._future_ns = int(s.future_tolerance * 1e9)
        self._past_ns = int(s.past_tolerance * 1e9)
        self._watermark_ns = int(s.watermark * 1e9)
        self._fleet = frozenset(s.machines) if s.machines is not None else None
        self._zones = {machine: ZoneInfo(zone) for machine, zone in s.timezones.items()}
        self._default_zone = ZoneInfo(s.default_timezone)
        self._mileage_max = s.mileage_max
        self._machines_tracked = s.machines_tracked
        # Least recently seen first: a sighting moves the machine to the end, eviction pops the front.
        self._state: OrderedDict[str, _MachineState] = OrderedDict()
        self._lock = threading.Lock()
        self._accept_duplicate_keys = self.rules.duplicate_key == "accept"
        # For the fast path (_fast): settings are frozen, so each policy is read once here, not per message.
        rules = self.rules
        self._reject_range = rules.out_of_range == "reject"
        self._load_low, self._load_high = s.load_rate_range
        self._reject_future = rules.future_timestamp == "reject"
        self._reject_past = rules.far_past == "reject"
        self._reject_duplicate = rules.duplicate == "reject"
        self._reject_late = rules.late == "reject"
        self._reject_backwards = rules.mileage_backwards == "reject"
        self._dedup_window = s.dedup_window
        self._reject_oversize = rules.oversize == "reject"
        self._max_payload = s.max_payload
        self._good_machines: set[str] = set()
        # Whether check_fields may judge an object without encoding it: no fast-path object can be oversize.
        self._fields_fit = not self._reject_oversize or self._max_payload >= FIELDS_MAX_BYTES

    def check(self, payload: bytes, topic: str, received_ns: int, now_ns: int | None = None) -> Reading | Rejection:
        """Decode and validate one message; never raises.

        ``received_ns`` is stored with the row; ``now_ns`` (default: the same)
        is what the timestamp rules compare with, which differs when a run
        replays another time.
        """
        now = received_ns if now_ns is None else now_ns
        if self._reject_oversize and len(payload) > self._max_payload:
            detail = f"{len(payload)} bytes, more than max_payload {self.settings.max_payload}"
            return Rejection("oversize", detail, payload[:4096], topic, received_ns)
        fields = scan_plain(payload)
        # Names and string values are two quotes each in a payload without backslashes; the fast path takes
        # 5 names with 2 string values (machine, ts) or 6 with 3 (and status): 14 or 18 quotes, that is
        # 4 * names - 6. More quotes: a repeated name or something nested, which decode() judges.
        if fields is not None and payload.count(b'"') == 4 * len(fields) - 6:
            reading = self._fast(fields, received_ns, now)
            if reading is not None:
                return reading
        obj = decode(payload, duplicate_keys=self._accept_duplicate_keys)
        if isinstance(obj, DecodeFailure):
            seq_of, machine_of = _identity(obj)
            return Rejection(obj.reason, obj.detail, payload, topic, received_ns, seq_of, machine_of)
        seq_known, machine_known = _known_seq(obj.get("seq")), _known_machine(obj.get("machine"))
        try:
            return self._check(obj, received_ns, now, seq=seq_known, machine=machine_known)
        except _Reject as refused:
            # Details quote input; a lone surrogate there would make the quarantine batch unwritable.
            detail = refused.detail.encode("utf-8", "backslashreplace").decode("utf-8")
            return Rejection(refused.reason, detail, payload, topic, received_ns, seq_known, machine_known)

    def check_fields(
        self, fields: dict[str, Any], topic: str, received_ns: int, now_ns: int | None = None
    ) -> Reading | Rejection:
        """:meth:`check` of a message a source built as an object (OPC UA) rather than received as bytes: the
        verdict of ``check(encode_payload(fields), ...)``, without that encode and its decode when the fast path
        accepts the object (4 us of a reading's 5.6 here). ``fields`` is JSON-shaped (str keys; str, int,
        float, bool, None, list or dict values) and is not changed.

        The fast path judges the object as it would the payload's decoded copy: that copy has the same names
        once each and equal values (a float's JSON text reads back as the same float), and the payloads the
        bytes path sends to the full decoder instead (escapes, non-ASCII text) are accepted by it identically,
        which the property tests check for both paths.
        """
        now = received_ns if now_ns is None else now_ns
        if self._fields_fit:
            ts = fields.get("ts")
            if type(ts) is not str or len(ts) <= FIELDS_MAX_TS:
                reading = self._fast(fields, received_ns, now)
                if reading is not None:
                    return reading
        return self.check(encode_payload(fields), topic, received_ns, now)

    def _fast(self, obj: dict[str, Any], received_ns: int, now: int) -> Reading | None:
        """The usual message in one pass: exactly the required fields (or those and status ``Good``), a known
        good machine id, an int seq, finite plain numbers in range, an ISO timestamp in UTC, nothing the
        history refuses. Returns None, having changed nothing, whenever any rule might refuse or repair it;
        :meth:`_check` then judges it in full. What it accepts, :meth:`_check` accepts identically (the
        property tests compare the two)."""
        size = len(obj)
        if size != 5 and (size != 6 or obj.get("status") != "Good"):
            return None
        get = obj.get
        seq = get("seq")
        # type() is, not isinstance: a bool is an int to isinstance, and the full path refuses bools.
        if type(seq) is not int or not 0 <= seq < 9_223_372_036_854_775_808:  # 2**63
            return None
        machine = get("machine")
        if type(machine) is not str or (machine not in self._good_machines and not self._good_machine(machine)):
            return None
        load_rate = get("load_rate")
        mileage = get("mileage")
        if type(load_rate) is not float:
            # Ints within 2**53 convert exactly; larger ones (and every other type) go the full way.
            if type(load_rate) is not int or not -9_007_199_254_740_992 <= load_rate <= 9_007_199_254_740_992:
                return None
            load_rate = float(load_rate)
        if type(mileage) is not float:
            if type(mileage) is not int or not -9_007_199_254_740_992 <= mileage <= 9_007_199_254_740_992:
                return None
            mileage = float(mileage)
        if not (_isfinite(load_rate) and _isfinite(mileage)):
            return None
        if self._reject_range and not (
            self._load_low <= load_rate <= self._load_high and 0 <= mileage <= self._mileage_max
        ):
            return None
        ts = get("ts")
        if type(ts) is not str or "\x00" in ts:
            return None
        try:
            parsed = _fromisoformat(ts)
        except ValueError:
            return None
        # fromisoformat gives UTC itself for Z, +00:00 and -00:00: no repair, and no conversion to make.
        if parsed.tzinfo is not UTC:
            return None
        delta = parsed - _EPOCH
        ts_ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
        if self._reject_future and ts_ns - now > self._future_ns:
            return None
        if self._reject_past and now - ts_ns > self._past_ns:
            return None
        states = self._state
        with self._lock:
            state = states.get(machine)
            if state is None:
                # A first sighting (or one after eviction): no history to refuse it.
                state = states[machine] = _MachineState()
                if len(states) > self._machines_tracked:
                    states.popitem(last=False)
                later = True
            else:
                if self._reject_duplicate and seq in state.recent_set:
                    return None
                newest = state.newest_ts_ns
                if self._reject_late and newest is not None and ts_ns < newest - self._watermark_ns:
                    return None
                later = newest is None or ts_ns >= newest
                if self._reject_backwards and later and mileage < state.newest_mileage:
                    return None
                states.move_to_end(machine)
            # _remember, inlined: a call with keywords is a noticeable part of this path.
            recent = state.recent
            recent.append(seq)
            state.recent_set.add(seq)
            if len(recent) > self._dedup_window:
                state.recent_set.discard(recent.popleft())
            if later:
                state.newest_ts_ns = ts_ns if ts_ns < now else now
                if mileage <= self._mileage_max:
                    state.newest_mileage = mileage
        return _new_tuple(Reading, (machine, ts_ns, load_rate, mileage, seq, received_ns, ()))

    def _good_machine(self, machine: str) -> bool:
        """Whether ``machine`` passes every id rule (those of :func:`_known_machine` and :meth:`_machine`);
        remembered when it does, while the cache has room."""
        if not (
            machine
            and len(machine) <= MAX_MACHINE_CHARS
            and _is_utf8(machine)
            and not _CONTROL.search(machine)
            and (self._fleet is None or self.rules.unknown_machine != "reject" or machine in self._fleet)
        ):
            return False
        if len(self._good_machines) < MACHINE_CACHE:
            self._good_machines.add(machine)
        return True

    def _check(
        self,
        obj: dict[str, Any],
        received_ns: int,
        now: int,
        *,
        seq: int | None,
        machine: str | None,
    ) -> Reading:
        rules = self.rules
        repairs: list[str] = []
        # First: an OPC UA Bad value may carry no value at all, and "status_bad" says why better than
        # "missing_field" would.
        self._status(obj.get("status", "Good"))
        if None in map(obj.get, REQUIRED):
            # Listed by name only when one is missing or null: the usual message pays one pass, not two.
            missing = [name for name in REQUIRED if name not in obj]
            nulls = [name for name in REQUIRED if name in obj and obj[name] is None]
            parts = ([f"missing: {', '.join(missing)}"] if missing else []) + (
                [f"null: {', '.join(nulls)}"] if nulls else []
            )
            raise _Reject("missing_field", "; ".join(parts))
        if seq is None:
            raw = obj["seq"]
            if isinstance(raw, int) and not isinstance(raw, bool):
                raise _Reject("out_of_range", f"seq: expected 0 <= seq < 2**63, got {raw}")
            raise _Reject("wrong_type", f"seq: expected an integer, got {_kind(raw)}")
        machine = self._machine(obj["machine"], machine)
        numbers: dict[str, float] = {}
        for name in ("load_rate", "mileage"):
            numbers[name] = self._number(name, obj[name], repairs)
        low, high = self.settings.load_rate_range
        if rules.out_of_range == "reject":
            if not low <= numbers["load_rate"] <= high:
                raise _Reject(
                    "out_of_range", f"load_rate: expected {low:g} <= load_rate <= {high:g}, got {numbers['load_rate']}"
                )
            if not 0 <= numbers["mileage"] <= self._mileage_max:
                # Checked before the history: one absurd counter (1e300) would otherwise stay the machine's newest
                # mileage and make every later reading of it mileage_backwards.
                raise _Reject(
                    "out_of_range",
                    f"mileage: expected 0 <= mileage <= {self._mileage_max:g} (mileage_max), got {numbers['mileage']}",
                )
        if rules.extra_fields == "reject":
            extra = sorted(set(obj) - KNOWN_FIELDS)
            if extra:
                raise _Reject("extra_fields", f"unknown fields: {', '.join(extra)[:200]}")
        ts = self._timestamp(obj["ts"], machine, repairs)
        if rules.future_timestamp == "reject" and ts - now > self._future_ns:
            raise _Reject("future_timestamp", f"ts is {(ts - now) / 1e9:.1f} s ahead of the pipeline clock")
        if rules.far_past == "reject" and now - ts > self._past_ns:
            raise _Reject("far_past", f"ts is {(now - ts) / 86400e9:.1f} days behind the pipeline clock")
        self._against_history(machine, seq, ts, numbers["mileage"], now)
        return Reading(
            machine=machine,
            ts_ns=ts,
            load_rate=numbers["load_rate"],
            mileage=numbers["mileage"],
            seq=seq,
            received_ns=received_ns,
            repairs=tuple(repairs),
        )

    def seed_recent(self, per_machine: Mapping[str, Sequence[int]]) -> int:
        """Remember seqs accepted before this process started, for the ``duplicate`` rule.

        Returns how many seqs the seeded machines remember now.

        ``per_machine``: each machine's seqs, oldest first, machines least recently seen first (what
        :func:`pipeline.recent.recent_seqs` returns). Each keeps its last ``dedup_window`` seqs, and at most
        ``machines_tracked`` machines are kept, the most recently seen ones. Seeded machines count as seen
        before any machine this validator has already checked: those stay, and are evicted last.

        Only the seq window is seeded, never the newest timestamp or mileage behind the ``late`` and
        ``mileage_backwards`` rules: a restarted validator judges those as after an eviction, from the next
        reading on. Read back from files they would not be what the dead process held (it also knew the rows
        it accepted but never flushed; its watermark was capped by its clock at acceptance, which the files
        do not record; settings may have changed), and a wrong bar quarantines valid readings, whereas a
        missing one only lets through what the first process would have refused. Redelivered copies need
        only the seq window to be caught.
        """
        window = self.settings.dedup_window
        with self._lock:
            states = self._state
            seeded: OrderedDict[str, _MachineState] = OrderedDict()
            for machine, seqs in per_machine.items():
                state = states.get(machine)
                if state is None:
                    state = seeded[machine] = _MachineState()
                # Seeded seqs are older than any this validator accepted itself: they go first, and a seq is
                # remembered once (a file may hold a copy stored twice before this fix).
                recent: deque[int] = deque()
                remembered: set[int] = set()
                for seq in (*seqs[-window:], *state.recent):
                    if seq not in remembered:
                        recent.append(seq)
                        remembered.add(seq)
                while len(recent) > window:
                    remembered.discard(recent.popleft())
                state.recent, state.recent_set = recent, remembered
            # Least recently seen first: the seeded machines, then the ones checked already, in their order.
            seeded.update(states)
            while len(seeded) > self._machines_tracked:
                seeded.popitem(last=False)
            states.clear()
            states.update(seeded)
            return sum(len(states[m].recent) for m in per_machine if m in states)

    # -- one rule each -----------------------------------------------------------

    def _machine(self, raw: Any, machine: str | None) -> str:
        if machine is None or not machine:
            if isinstance(raw, str) and raw:
                # JSON may carry lone surrogates (\ud800) that no UTF-8 sink can store.
                raise _Reject("invalid_utf8", f"machine: not encodable as UTF-8: {raw[:64]!r}")
            raise _Reject("wrong_type", f"machine: expected a non-empty string, got {_kind(raw)}")
        if len(machine) > MAX_MACHINE_CHARS:
            # SQL keys are VARCHAR(255); one longer id would fail a whole batch there.
            raise _Reject("bad_machine_id", f"machine: longer than {MAX_MACHINE_CHARS} characters")
        if _CONTROL.search(machine):
            raise _Reject("bad_machine_id", f"machine: contains control characters: {machine[:64]!r}")
        if self._fleet is not None and self.rules.unknown_machine == "reject" and machine not in self._fleet:
            raise _Reject("unknown_machine", f"machine: not in the fleet: {machine[:64]!r}")
        return machine

    def _number(self, name: str, value: Any, repairs: list[str]) -> float:
        if isinstance(value, str) and self.rules.wrong_type == "repair" and _NUMBER.fullmatch(value.strip()):
            number = float(value)
            if "number_from_string" not in repairs:
                repairs.append("number_from_string")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise _Reject("wrong_type", f"{name}: expected a number, got {_kind(value)}")
        else:
            try:
                number = float(value)
            except OverflowError:
                raise _Reject("out_of_range", f"{name}: integer too large for a float") from None
        if not math.isfinite(number):
            raise _Reject("non_finite", f"{name}: {number}")
        return number

    def _status(self, status: Any) -> None:
        if status == "Good":
            return
        # OPC UA Uncertain/Bad values: quarantined by default, never silently mixed with Good data.
        if isinstance(status, str) and status.startswith("Uncertain"):
            if self.rules.status_uncertain == "reject":
                raise _Reject("status_uncertain", f"status: {status[:64]}")
            return
        if isinstance(status, str) and status.startswith("Bad"):
            if self.rules.status_bad == "reject":
                raise _Reject("status_bad", f"status: {status[:64]}")
            return
        raise _Reject("wrong_type", f"status: expected 'Good' or an OPC UA status name, got {str(status)[:64]!r}")

    def _timestamp(self, value: Any, machine: str, repairs: list[str]) -> int:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return self._epoch(value, repairs)
        if not isinstance(value, str):
            raise _Reject("bad_timestamp", f"ts: expected an ISO 8601 string with a zone, got {_kind(value)}")
        if "\x00" in value:
            # CPython 3.11's fromisoformat stops at a NUL after "Z" and would accept trailing garbage.
            raise _Reject("bad_timestamp", f"ts: contains NUL: {value[:64]!r}")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise _Reject("bad_timestamp", f"ts: not ISO 8601: {value[:64]!r}") from None
        offset = parsed.utcoffset()
        if offset is None:
            parsed = self._naive(parsed, value, machine, repairs)
        elif offset:
            if self.rules.offset_timestamp == "reject":
                raise _Reject("offset_timestamp", f"ts: offset other than UTC: {value[:64]!r}")
            repairs.append("utc_normalised")
        return _ns(parsed, value)

    def _naive(self, parsed: datetime, value: str, machine: str, repairs: list[str]) -> datetime:
        policy = self.settings.naive_timestamps
        if policy == "reject":
            raise _Reject("naive_timestamp", f"ts has no zone: {value[:64]!r}")
        if policy == "assume_utc":
            repairs.append("assumed_utc")
            return parsed.replace(tzinfo=UTC)
        zone = self._zones.get(machine, self._default_zone)
        early, late = parsed.replace(tzinfo=zone, fold=0), parsed.replace(tzinfo=zone, fold=1)
        repairs.append("assumed_machine_zone")
        if early.utcoffset() == late.utcoffset():
            return early
        # The wall time survives a round trip through UTC only if it exists.
        exists = early.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == parsed.replace(tzinfo=None)
        if exists:
            if self.rules.ambiguous_local_time == "reject":
                raise _Reject("ambiguous_local_time", f"ts: {value[:64]!r} happens twice in {zone.key}")
            repairs.append("ambiguous_earlier")
            return early
        if self.rules.nonexistent_local_time == "reject":
            raise _Reject("nonexistent_local_time", f"ts: {value[:64]!r} never happens in {zone.key}")
        repairs.append("nonexistent_shifted")
        # fold=0 reads the wall time with the offset before the gap: shifted forward by it.
        return early

    def _epoch(self, value: float, repairs: list[str]) -> int:
        if self.rules.epoch_timestamp == "reject":
            raise _Reject("epoch_timestamp", f"ts: a number ({value!r}), expected an ISO 8601 string")
        if isinstance(value, float) and not math.isfinite(value):
            raise _Reject("bad_timestamp", f"ts: {value}")
        try:
            # repr() is the shortest exact decimal of a float: 1767225600.123 stays .123, not .12299990654.
            exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        except InvalidOperation:
            raise _Reject("bad_timestamp", f"ts: {value!r}") from None
        scale, name = 1, "epoch_nanos"
        for limit, factor, unit in _EPOCH_UNITS:
            if abs(exact) < limit:
                scale, name = factor, unit
                break
        ns = int(exact * scale)
        if not -62_135_596_800 * 10**9 <= ns <= 253_402_300_799 * 10**9:
            raise _Reject("bad_timestamp", f"ts: {value!r} is outside years 1..9999")
        repairs.append(name)
        # Stored at microsecond precision, like every other timestamp.
        return ns // 1000 * 1000

    def _against_history(self, machine: str, seq: int, ts: int, mileage: float, now: int) -> None:
        rules = self.rules
        with self._lock:
            states = self._state
            state = states.get(machine)
            if state is None:
                state = states[machine] = _MachineState()
                if len(states) > self._machines_tracked:
                    states.popitem(last=False)
            else:
                states.move_to_end(machine)
            if rules.duplicate == "reject" and seq in state.recent_set:
                raise _Reject("duplicate", f"seq {seq} of {machine[:64]!r} was already accepted")
            newest = state.newest_ts_ns
            if rules.late == "reject" and newest is not None and ts < newest - self._watermark_ns:
                behind = (newest - ts) / 1e9
                raise _Reject("late", f"ts is {behind:.1f} s behind the machine's newest reading (watermark)")
            later = newest is None or ts >= newest
            if rules.mileage_backwards == "reject" and later and mileage < state.newest_mileage:
                raise _Reject(
                    "mileage_backwards", f"mileage {mileage} is below the last accepted {state.newest_mileage}"
                )
            self._remember(state, seq, ts, mileage, later=later, now=now)

    def _remember(self, state: _MachineState, seq: int, ts: int, mileage: float, *, later: bool, now: int) -> None:
        """An accepted reading's mark on its machine's history; with the lock held. (:meth:`_fast` inlines
        the same steps: change both.)"""
        state.recent.append(seq)
        state.recent_set.add(seq)
        if len(state.recent) > self._dedup_window:
            state.recent_set.discard(state.recent.popleft())
        if later:
            # The watermark never runs ahead of the pipeline clock: a reading from a clock that is fast
            # (within the future tolerance, or accepted by policy) would otherwise make every later
            # reading of its machine late.
            state.newest_ts_ns = min(ts, now)
            if mileage <= self._mileage_max:
                # Above it only when out_of_range is accepted: stored, but never the bar for later readings.
                state.newest_mileage = mileage


def _known_seq(seq: Any) -> int | None:
    # Only a seq that fits the int64 column counts as known; a huge one is
    # refused by the rules instead of failing the whole batch at write time.
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63 else None


def _known_machine(machine: Any) -> str | None:
    return machine if isinstance(machine, str) and _is_utf8(machine) else None


def _identity(failure: DecodeFailure) -> tuple[int | None, str | None]:
    """The seq and machine of a payload refused at decoding, where it names them once (``duplicate_key``).

    A repeated ``seq`` or ``machine`` is exactly what cannot be trusted: left unknown, the bench matches the
    quarantined row to what was sent by its payload instead.
    """
    obj = failure.obj
    if obj is None:
        return None, None
    seq = None if "seq" in failure.duplicated else _known_seq(obj.get("seq"))
    machine = None if "machine" in failure.duplicated else _known_machine(obj.get("machine"))
    return seq, machine


def _ns(parsed: datetime, value: str) -> int:
    try:
        utc = parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise _Reject("bad_timestamp", f"ts: outside the representable range: {value[:64]!r}") from None
    # Exact integer arithmetic: float seconds lose microseconds at epoch scale.
    delta = utc - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
