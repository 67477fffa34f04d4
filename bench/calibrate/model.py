"""``calibration.json``: what ``bench calibrate`` measured (docs/calibrate.md). Imports only pydantic.

``bench capacity --calibration FILE`` reads :attr:`Calibration.generator_ceiling_per_s`: the most messages per
second one of the bench's publisher processes sent, unpaced, at each QoS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

CALIBRATION_NAME = "calibration.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Spread(_Model):
    """One side of a row over the repetitions: their median, min and max, and every value in run order."""

    median: float
    min: float
    max: float
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        ordered = sorted(values)
        n = len(ordered)
        median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        return cls(median=median, min=ordered[0], max=ordered[-1], values=list(values))


class Row(_Model):
    """One comparison: the bench's own code against the bare floor, same messages, same broker."""

    key: str
    """Stable name, e.g. ``publisher_cpu_qos0``."""
    label: str
    unit: str
    """``ms/1k msgs`` (CPU per 1,000 messages), ``msg/s`` (wall rate) or ``us/msg`` (CPU per message)."""
    higher_is_better: bool
    bench: Spread
    bare: Spread
    ratio: float
    """median(bench) / median(bare). For a cost, how many times the floor the bench pays; for a rate, < 1."""


class Machine(_Model):
    cores: int | None
    python: str
    platform: str
    paho: str | None
    load_before: list[float] | None
    load_after: list[float] | None


class Calibration(_Model):
    """The whole file."""

    version: Literal[1] = 1
    kind: Literal["calibration"] = "calibration"
    created_at: str
    broker: str
    """``mosquitto`` (started by the bench), ``embedded`` (amqtt) or the URL given with --broker."""
    broker_url: str
    messages: int
    repeats: int
    payload_bytes_mean: float
    machine: Machine
    rows: list[Row]
    generator_ceiling_per_s: dict[str, float]
    """QoS (as a string, JSON keys) -> the bench publisher process's median unpaced rate (msg/s)."""
    warnings: list[str] = []

    def ceiling(self, qos: int) -> float:
        """One publisher process's ceiling at ``qos``; QoS 2 is not measured and gets QoS 1's (an upper bound:
        QoS 2 costs more round trips)."""
        key = str(min(qos, 1))
        return self.generator_ceiling_per_s[key]

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)


def load_calibration(path: Path) -> Calibration:
    """Read ``calibration.json`` (or a run folder holding one); ValueError with a one-line reason otherwise."""
    file = path / CALIBRATION_NAME if path.is_dir() else path
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{file}: cannot read ({exc.strerror or exc}); expected a calibration.json") from None
    try:
        return Calibration.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(file)"
        raise ValueError(
            f"{file}: {where}: {first['msg']}; expected a calibration.json written by bench calibrate"
        ) from None
