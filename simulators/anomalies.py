"""The anomaly catalogue: dirt a plant produces, injected on purpose, each message labelled with the truth.

:func:`inject` takes the clean stream of :mod:`simulators.stream` and rewrites
chosen messages into one anomaly each (never two, so every message has exactly
one truth label), by rate (a fraction of messages) or by schedule (a window of
the run), for all machines or some. Pure and seeded: the same inputs give the
same bytes. What each anomaly should become in the pipeline is not decided
here: the bench's scorer derives it from the validator's configured policies.

>>> from simulators.stream import PhaseSpec, StreamSpec, stream
>>> spec = StreamSpec(seed=1, machines=("m-0", "m-1"), phases=(PhaseSpec("steady", 2.0, 10.0),))
>>> out = list(inject(stream(spec, 0), [AnomalySpec("nan", rate=1.0)], seed=1))
>>> {m.truth for m in out}, out[0].payload.count(b"NaN")
({'nan'}, 1)
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

from simulators.stream import Message, format_ts

AnomalyKind = Literal[
    "nan",
    "inf",
    "null",
    "missing_field",
    "number_as_string",
    "bool_value",
    "out_of_range",
    "mileage_backwards",
    "future_timestamp",
    "far_past",
    "naive_timestamp",
    "offset_timestamp",
    "dst_ambiguous",
    "dst_nonexistent",
    "epoch_seconds",
    "epoch_millis",
    "duplicate",
    "out_of_order",
    "late",
    "oversize",
    "malformed_json",
    "invalid_utf8",
    "duplicate_key",
    "unknown_machine",
    "hostile_id",
    "extra_fields",
    "status_uncertain",
    "status_bad",
]
KINDS: tuple[str, ...] = AnomalyKind.__args__  # type: ignore[attr-defined]

# What an OPC UA plant can carry: a Double, a SourceTimestamp (always UTC) and a
# StatusCode. Malformed bytes, naive or offset timestamps, strings in number
# variables and the like do not exist on that wire.
OPCUA_KINDS = frozenset(
    {
        "nan",
        "inf",
        "out_of_range",
        "mileage_backwards",
        "future_timestamp",
        "far_past",
        "status_uncertain",
        "status_bad",
    }
)
# Kinds that need an earlier reading of the same machine to be relative to.
NEEDS_HISTORY = frozenset({"mileage_backwards", "out_of_order", "late"})

HOSTILE_IDS = (
    "O'Brien\"; DROP TABLE readings; --",
    "Robert'); DROP TABLE students;--",
    "../../etc/passwd",
    "..\\..\\windows\\system32",
    "machine=1/date=2026-01-01",
    "Presse-Müller-Ω-東京-🛠",
    "%s%n%x${jndi:ldap://x}",
    "<script>alert(1)</script>",
    "nul\x00byte",
    "x" * 300,
)
# duplicate_key: the field named twice, taking turns. machine and seq are the dangerous ones (a last-wins
# parser files the reading under another machine, or another message's seq); load_rate is the plain case.
DUPLICATED_KEYS = ("machine", "seq", "load_rate")
STATUS_UNCERTAIN = ("UncertainLastUsableValue", "UncertainSensorNotAccurate")
STATUS_BAD = ("BadSensorFailure", "BadCommunicationError")
OFFSETS = ("+05:30", "-08:00", "+14:00")

DEFAULT_BY_S = {
    "mileage_backwards": 500.0,  # km: far below any reading of the last 20 minutes
    "future_timestamp": 7200.0,
    "far_past": 3650 * 86400.0,
    "out_of_order": 2.0,
    "late": 600.0,
}


@dataclass(frozen=True, slots=True)
class AnomalySpec:
    """One kind of dirt: where and how often.

    ``rate`` is the fraction of eligible messages hit (1.0 inside a window
    when only ``at_s``/``duration_s`` are given). ``by`` is the size of a
    shift (seconds, or km for mileage); ``field`` the payload field for the
    value kinds, or the one ``duplicate_key`` names twice (default: machine,
    seq and load_rate take turns); ``offset`` a fixed UTC offset for ``offset_timestamp``;
    ``size`` the bytes of an ``oversize`` payload.
    """

    kind: str
    rate: float | None = None
    at_s: float | None = None
    duration_s: float | None = None
    machines: tuple[str, ...] | None = None
    field: str | None = None
    by: float | None = None
    offset: str | None = None
    size: int = 70_000


@dataclass
class _History:
    """What the generator knows about a machine's clean stream so far."""

    newest_ts_ns: int | None = None
    clean: int = 0


@dataclass
class _Counters:
    by_kind: dict[str, int] = field(default_factory=dict)

    def next(self, kind: str) -> int:
        n = self.by_kind.get(kind, 0)
        self.by_kind[kind] = n + 1
        return n


def inject(
    messages: Iterable[Message],
    specs: Iterable[AnomalySpec],
    *,
    seed: int,
    start_ns: int | None = None,
    zones: dict[str, str] | None = None,
    eligible: Callable[[str, str], bool] | None = None,
) -> Iterator[Message]:
    """Yield ``messages`` with anomalies applied; a ``duplicate`` adds a copy right after its original.

    ``start_ns`` is the intended send time of the stream's start (schedule
    windows count from it; default: the first message's). ``zones`` maps
    machines to IANA zones (default UTC) for local-time kinds. ``eligible(kind,
    machine)`` may refuse a kind for a machine (e.g. one on OPC UA).
    """
    rules = list(specs)
    # One random stream per rule, one draw per message: adding a rule never reshuffles the others' hits.
    rngs = [random.Random(f"{seed}:anomalies:{i}") for i in range(len(rules))]
    zone_of = {m: ZoneInfo(z) for m, z in (zones or {}).items()}
    history: dict[str, _History] = {}
    counters = _Counters()
    start = start_ns
    for message in messages:
        if start is None:
            start = message.intended_send_ns
        past = history.setdefault(message.machine, _History())
        elapsed_s = (message.intended_send_ns - start) / 1e9
        chosen: AnomalySpec | None = None
        for spec, rng in zip(rules, rngs, strict=True):
            draw = rng.random()
            if chosen is not None or not _applies(spec, message, elapsed_s, past, eligible):
                continue
            if draw < _rate(spec):
                chosen = spec
        if chosen is None:
            _remember(past, message)
            yield message
            continue
        zone = zone_of.get(message.machine, ZoneInfo("UTC"))
        changed = _apply(chosen, message, past, zone, counters.next(chosen.kind))
        if changed is message:
            # Left clean (a DST kind in a zone without DST): it is history like any clean message.
            _remember(past, message)
            yield message
            continue
        if chosen.kind == "duplicate":
            _remember(past, message)
            yield message
        yield changed


def _rate(spec: AnomalySpec) -> float:
    if spec.rate is not None:
        return spec.rate
    return 1.0 if spec.at_s is not None else 0.0


def _applies(
    spec: AnomalySpec,
    message: Message,
    elapsed_s: float,
    past: _History,
    eligible: Callable[[str, str], bool] | None,
) -> bool:
    if message.truth != "valid":
        return False
    if spec.machines is not None and message.machine not in spec.machines:
        return False
    if spec.at_s is not None:
        end = math.inf if spec.duration_s is None else spec.at_s + spec.duration_s
        if not spec.at_s <= elapsed_s < end:
            return False
    if spec.kind in NEEDS_HISTORY and past.clean == 0:
        return False
    return eligible is None or eligible(spec.kind, message.machine)


def _remember(past: _History, message: Message) -> None:
    past.clean += 1
    if message.ts_ns is not None and (past.newest_ts_ns is None or message.ts_ns > past.newest_ts_ns):
        past.newest_ts_ns = message.ts_ns


def _dumps(body: dict[str, Any]) -> bytes:
    # allow_nan: NaN and Infinity go out as the non-standard literals real gateways send.
    return json.dumps(body, separators=(",", ":"), allow_nan=True).encode()


def _apply(spec: AnomalySpec, message: Message, past: _History, zone: ZoneInfo, n: int) -> Message:
    kind = spec.kind
    body: dict[str, Any] = json.loads(message.payload)
    ts_ns = message.ts_ns
    assert ts_ns is not None, "the clean stream states every message's instant"
    by = spec.by if spec.by is not None else DEFAULT_BY_S.get(kind, 0.0)
    instant: int | None = ts_ns
    payload: bytes | None = None
    label = kind
    if kind in ("nan", "inf", "null"):
        name = spec.field or ("load_rate", "mileage")[n % 2]
        body[name] = {"nan": math.nan, "inf": (math.inf, -math.inf)[n % 2], "null": None}[kind]
    elif kind == "missing_field":
        del body[spec.field or ("ts", "load_rate", "mileage", "machine")[n % 4]]
    elif kind == "number_as_string":
        body["load_rate"] = str(body["load_rate"])
    elif kind == "bool_value":
        body["load_rate"] = True
    elif kind == "out_of_range":
        name, value = (("load_rate", 150.0), ("load_rate", -5.0), ("mileage", -1.0))[n % 3]
        body[name] = value
    elif kind == "mileage_backwards":
        body["mileage"] = round(body["mileage"] - by, 3)
    elif kind in ("future_timestamp", "far_past"):
        instant = ts_ns + round(by * 1e9) * (1 if kind == "future_timestamp" else -1)
        body["ts"] = format_ts(instant)
    elif kind in ("out_of_order", "late"):
        # Shifted back from its own time (unique per message, so two shifted readings of a machine never
        # share a timestamp), which puts it about `by` behind the machine's newest reading.
        instant = ts_ns - round(by * 1e9)
        body["ts"] = format_ts(instant)
    elif kind == "naive_timestamp":
        local = _utc(ts_ns).astimezone(zone)
        body["ts"] = local.replace(tzinfo=None).isoformat(timespec="microseconds")
        label = _local_kind(local.replace(tzinfo=None), zone) or kind
    elif kind == "offset_timestamp":
        text = spec.offset or OFFSETS[n % len(OFFSETS)]
        body["ts"] = _utc(ts_ns).astimezone(_fixed(text)).isoformat(timespec="microseconds")
    elif kind in ("dst_ambiguous", "dst_nonexistent"):
        wall = _dst_wall_time(ts_ns, zone, ambiguous=kind == "dst_ambiguous")
        if wall is None:
            # A zone without DST has no such times: the message stays clean, and says so.
            return message
        body["ts"] = wall.isoformat(timespec="microseconds")
        instant = None  # no single true instant: that is the point
    elif kind == "epoch_seconds":
        instant = ts_ns // 10**6 * 10**6
        # Rounded to the millisecond, so the float's shortest repr is the exact decimal (x.058, not x.0579998).
        body["ts"] = round(instant / 1e9, 3)
    elif kind == "epoch_millis":
        instant = ts_ns // 10**6 * 10**6
        body["ts"] = instant // 10**6
    elif kind == "duplicate":
        pass
    elif kind == "oversize":
        body["padding"] = "x" * spec.size
    elif kind == "malformed_json":
        payload = _dumps(body)[:-1] + b",}"
    elif kind == "invalid_utf8":
        payload = _dumps(body).replace(b'"machine":"', b'"machine":"\xff\xfe', 1)
    elif kind == "duplicate_key":
        payload = _duplicate_key(body, spec.field or DUPLICATED_KEYS[n % len(DUPLICATED_KEYS)])
    elif kind == "unknown_machine":
        body["machine"] = f"ghost-{n % 7}"
    elif kind == "hostile_id":
        body["machine"] = HOSTILE_IDS[n % len(HOSTILE_IDS)]
    elif kind == "extra_fields":
        body["firmware"] = "4.2.1"
        body["operator_note"] = {"shift": "B", "ok": True}
    elif kind in ("status_uncertain", "status_bad"):
        names = STATUS_UNCERTAIN if kind == "status_uncertain" else STATUS_BAD
        body["status"] = names[n % len(names)]
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {', '.join(KINDS)}")
    return replace(
        message,
        payload=payload if payload is not None else _dumps(body),
        truth=label,
        ts_ns=instant,
        copy=kind == "duplicate",
        newest_ns=past.newest_ts_ns,
    )


def _duplicate_key(body: dict[str, Any], name: str) -> bytes:
    """``body`` with ``name`` twice: first a different value, then the true one.

    Both orders are the same ambiguity to a validator; true-last means a pipeline that accepts the payload
    (rule ``duplicate_key: accept``, last value wins) stores what the machine sent, so that policy can be
    scored too. The decoy machine is a stranger's id, the decoy seq another message's.
    """
    true = body[name]
    decoy: Any
    if isinstance(true, str):
        decoy = f"{true}-other"
    elif isinstance(true, int):
        decoy = true + 1
    else:
        decoy = round(float(true) + 1.0, 3)
    rest = _dumps({k: v for k, v in body.items() if k != name})
    # dict and json.dumps cannot repeat a key: the decoy goes in as text, before the fields, the true value last.
    first = json.dumps({name: decoy}, separators=(",", ":"))[1:-1]
    last = json.dumps({name: true}, separators=(",", ":"))[1:-1]
    return b"{" + first.encode() + b"," + rest[1:-1] + b"," + last.encode() + b"}"


def _utc(ns: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)


def _fixed(text: str) -> timezone:
    sign = -1 if text.startswith("-") else 1
    hours, minutes = text[1:].split(":")
    return timezone(sign * timedelta(hours=int(hours), minutes=int(minutes)))


def _local_kind(wall: datetime, zone: ZoneInfo) -> str | None:
    """``dst_ambiguous`` / ``dst_nonexistent`` if a naive wall time is one in ``zone``, else None."""
    early, late = wall.replace(tzinfo=zone, fold=0), wall.replace(tzinfo=zone, fold=1)
    if early.utcoffset() == late.utcoffset():
        return None
    exists = early.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall
    return "dst_ambiguous" if exists else "dst_nonexistent"


def _dst_wall_time(ts_ns: int, zone: ZoneInfo, *, ambiguous: bool) -> datetime | None:
    # The search is per hour of the stream: cached, since every such message of an hour asks the same.
    return _dst_wall_time_cached(ts_ns // (3600 * 10**9), zone.key, ambiguous)


@functools.lru_cache(maxsize=256)
def _dst_wall_time_cached(hour: int, key: str, ambiguous: bool) -> datetime | None:
    """A naive wall time in the hour around the zone's DST change nearest to ``ts_ns``.

    Looks hour by hour up to 200 days either side for the offset change of the
    wanted direction (clocks back: ambiguous; clocks forward: nonexistent), and
    returns a wall time 30 minutes into the repeated or skipped hour.
    """
    zone = ZoneInfo(key)
    base = _utc(hour * 3600 * 10**9)
    for hours in range(200 * 24):
        for sign in (1, -1):
            t = base + timedelta(hours=sign * hours)
            before, after = t.astimezone(zone).utcoffset(), (t + timedelta(hours=1)).astimezone(zone).utcoffset()
            assert before is not None and after is not None
            if before == after or (after < before) != ambiguous:
                continue
            change = t + timedelta(hours=1)
            # The exact instant of the change, to the minute (zones change on the hour or half hour).
            while change.astimezone(zone).utcoffset() == after:
                change -= timedelta(minutes=30)
            change += timedelta(minutes=30)
            gap = abs(after - before)
            # Clocks back: the wall clock repeats the `gap` after the change. Clocks forward: it skipped
            # the `gap` before it. Aware arithmetic in one zone is wall-clock arithmetic.
            local = change.astimezone(zone)
            wall = (local + gap / 2 if ambiguous else local - gap / 2).replace(tzinfo=None)
            kind = _local_kind(wall, zone)
            if kind == ("dst_ambiguous" if ambiguous else "dst_nonexistent"):
                return wall
    return None
