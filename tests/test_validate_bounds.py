"""Bounds on what the validator believes and remembers: ``mileage_max`` and ``machines_tracked``.

One absurd mileage (1e300) must not become the bar every later reading of its machine is compared with, and
a stream of ever new machine ids must not grow the per-machine history without end. Both were issues: 10 of 10
valid readings after a 1e300 were quarantined as mileage_backwards, and 49,597 distinct ids took the pipeline
from 122 to 229 MB.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.config import RulePolicies, ValidateSettings
from pipeline.model import Reading, Rejection
from pipeline.validate import Validator

NOW_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z, the pipeline clock's reading
SECOND_NS = 10**9
TOPIC = "plant/m-1/telemetry"


def payload(machine: str = "m-1", *, seq: int, at: float = 0.0, mileage: Any = 1000.0) -> bytes:
    """A valid reading ``at`` seconds from the pipeline clock, its timestamp in UTC ISO 8601."""
    moment = datetime.fromtimestamp(NOW_NS // SECOND_NS, UTC) + timedelta(seconds=at)
    ts = moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
    body = {"machine": machine, "ts": ts, "load_rate": 50.0, "mileage": mileage, "seq": seq}
    return json.dumps(body).encode()


def check(
    v: Validator, machine: str = "m-1", *, seq: int, at: float = 0.0, mileage: Any = 1000.0
) -> Reading | Rejection:
    return v.check(payload(machine, seq=seq, at=at, mileage=mileage), TOPIC, NOW_NS)


def accepted(v: Validator, machine: str = "m-1", **kw: Any) -> Reading:
    result = check(v, machine, **kw)
    assert isinstance(result, Reading), result
    assert result.repairs == ()
    return result


def rejected(v: Validator, machine: str = "m-1", **kw: Any) -> Rejection:
    result = check(v, machine, **kw)
    assert isinstance(result, Rejection), result
    return result


def tracked(v: Validator) -> int:
    """How many machines' history the validator holds (internal: the bound is on exactly this)."""
    return len(v._state)


# --- mileage_max ---------------------------------------------------------------------------------


def test_a_mileage_of_1e300_is_refused_and_the_next_ten_readings_are_accepted() -> None:
    """The issue's reproduction: before, all 10 valid readings after the 1e300 were mileage_backwards."""
    v = Validator()
    accepted(v, seq=0, at=-20, mileage=1000.0)
    refused = rejected(v, seq=1, at=-19, mileage=1e300)
    assert refused.reason == "out_of_range"
    assert "mileage" in refused.detail and "mileage_max" in refused.detail and "1e+300" in refused.detail
    assert (refused.seq, refused.machine) == (1, "m-1")
    for i in range(10):
        reading = accepted(v, seq=2 + i, at=-18 + i, mileage=1000.5 + i)
        assert reading.mileage == 1000.5 + i
    # The history is still the valid readings': a real step back is still caught.
    assert rejected(v, seq=20, at=-5, mileage=999.0).reason == "mileage_backwards"


def test_a_refused_mileage_as_first_reading_leaves_no_history() -> None:
    v = Validator()
    assert rejected(v, "m-new", seq=1, mileage=1e300).reason == "out_of_range"
    assert tracked(v) == 0
    assert accepted(v, "m-new", seq=1, mileage=5.0).seq == 1  # the same seq: it was never seen


@pytest.mark.parametrize(
    ("mileage", "outcome"),
    [
        (1e9, "accepted"),
        (10**9, "accepted"),
        (math.nextafter(1e9, math.inf), "out_of_range"),
        (10**9 + 1, "out_of_range"),
        (1e300, "out_of_range"),
        (10**30, "out_of_range"),
        (10**400, "out_of_range"),  # no float holds it
        (1.7976931348623157e308, "out_of_range"),
        (0.0, "accepted"),
        (-0.5, "out_of_range"),
    ],
    ids=repr,
)
def test_mileage_max_is_inclusive(mileage: float, outcome: str) -> None:
    result = check(Validator(), seq=1, mileage=mileage)
    got = "accepted" if isinstance(result, Reading) else result.reason
    assert got == outcome, result


@pytest.mark.parametrize("literal", [b"Infinity", b"1e999", b"NaN", b"-Infinity"])
def test_non_finite_mileage_stays_non_finite(literal: bytes) -> None:
    """JSON's 1e999 parses to infinity: refused as non_finite before any range is looked at, as before."""
    text = payload(seq=1).replace(b'"mileage": 1000.0', b'"mileage": ' + literal)
    assert literal in text
    result = Validator().check(text, TOPIC, NOW_NS)
    assert isinstance(result, Rejection) and result.reason == "non_finite", result


def test_mileage_max_is_configurable() -> None:
    v = Validator(ValidateSettings(mileage_max=5000))
    assert accepted(v, seq=1, mileage=5000).mileage == 5000.0
    assert rejected(v, seq=2, mileage=5000.001).reason == "out_of_range"
    unbounded = Validator(ValidateSettings(mileage_max=math.inf))
    assert accepted(unbounded, seq=1, mileage=1e300).mileage == 1e300


def test_a_number_string_repaired_is_bounded_too() -> None:
    v = Validator(ValidateSettings(rules=RulePolicies(wrong_type="repair")))
    result = v.check(payload(seq=1, mileage="2e9"), TOPIC, NOW_NS)
    assert isinstance(result, Rejection) and result.reason == "out_of_range", result


def test_out_of_range_accepted_stores_it_but_never_makes_it_the_bar() -> None:
    """With out_of_range at accept the reading is stored as sent, and still kept out of the machine's history:
    mileage_max is the largest mileage the validator believes, whatever it stores."""
    v = Validator(ValidateSettings(rules=RulePolicies(out_of_range="accept")))
    accepted(v, seq=0, at=-20, mileage=1000.0)
    assert accepted(v, seq=1, at=-19, mileage=1e300).mileage == 1e300
    for i in range(10):
        accepted(v, seq=2 + i, at=-18 + i, mileage=1001.0 + i)
    assert rejected(v, seq=20, at=-5, mileage=999.0).reason == "mileage_backwards"


# --- machines_tracked ------------------------------------------------------------------------------


def test_an_evicted_machine_comes_back_as_new() -> None:
    """Beyond machines_tracked the least recently seen machine is forgotten: its seqs, watermark and mileage."""
    v = Validator(ValidateSettings(machines_tracked=2))
    accepted(v, "m-a", seq=1, at=0, mileage=1000.0)
    accepted(v, "m-b", seq=1, at=0)
    assert rejected(v, "m-a", seq=1, at=0).reason == "duplicate"  # still tracked (and now the most recent)
    accepted(v, "m-c", seq=1, at=0)  # m-b is the least recently seen: evicted
    assert tracked(v) == 2
    assert rejected(v, "m-a", seq=1, at=0).reason == "duplicate"  # m-a was kept
    accepted(v, "m-d", seq=1, at=0)  # evicts m-c
    accepted(v, "m-e", seq=1, at=0)  # evicts m-a
    # m-a is new again: its copy of seq 1, a reading far behind its old watermark and a mileage below its old
    # newest are all accepted, as for a machine never seen.
    assert accepted(v, "m-a", seq=1, at=-3600, mileage=10.0).seq == 1
    assert tracked(v) == 2
    # ...and from now on its history builds up again.
    assert rejected(v, "m-a", seq=1, at=-3600).reason == "duplicate"
    assert rejected(v, "m-a", seq=2, at=-3599, mileage=5.0).reason == "mileage_backwards"


def test_a_refused_reading_does_not_refresh_a_machine() -> None:
    """Only messages that reach the history rules count as a sighting: one refused earlier never touched it."""
    v = Validator(ValidateSettings(machines_tracked=2))
    accepted(v, "m-a", seq=1)
    accepted(v, "m-b", seq=1)
    assert rejected(v, "m-a", seq=2, mileage=-1).reason == "out_of_range"
    accepted(v, "m-c", seq=1)  # m-a is still the least recently seen
    assert accepted(v, "m-a", seq=1).seq == 1
    assert rejected(v, "m-c", seq=1).reason == "duplicate"


def test_a_history_rejection_is_a_sighting() -> None:
    v = Validator(ValidateSettings(machines_tracked=2))
    accepted(v, "m-a", seq=1)
    accepted(v, "m-b", seq=1)
    assert rejected(v, "m-a", seq=1).reason == "duplicate"  # refreshes m-a
    accepted(v, "m-c", seq=1)  # evicts m-b
    assert rejected(v, "m-a", seq=1).reason == "duplicate"
    assert accepted(v, "m-b", seq=1).seq == 1


def test_memory_stays_bounded_by_machines_tracked() -> None:
    """50,000 distinct ids (the issue saw 49,597) leave the history of 1,000 machines: the newest ones."""
    v = Validator(ValidateSettings(machines_tracked=1000))
    for i in range(50_000):
        accepted(v, f"m-{i:05d}", seq=i)
        assert tracked(v) <= 1000
    assert tracked(v) == 1000
    assert list(v._state) == [f"m-{i:05d}" for i in range(49_000, 50_000)]
    assert rejected(v, "m-49999", seq=49_999).reason == "duplicate"
    assert accepted(v, "m-00000", seq=0).seq == 0  # long evicted: new again


def test_machines_tracked_holds_under_threads() -> None:
    """Several source threads validate at once: the bound and the duplicate rule hold under the one lock."""
    v = Validator(ValidateSettings(machines_tracked=50))
    results: list[list[Reading | Rejection]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def work(k: int) -> None:
        start.wait()
        for i in range(3000):
            results[k].append(check(v, f"m-{(i * 7 + k) % 400}", seq=i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert tracked(v) <= 50
    reasons = {r.reason for rs in results for r in rs if isinstance(r, Rejection)}
    assert reasons <= {"duplicate"}, reasons
