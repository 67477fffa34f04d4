"""The ``windows:`` section of a scenario: sliding-window metrics behind a bounded buffer (``bench run``).

Imports only pydantic, :mod:`pipeline.config` and :mod:`bench.shapes.external_settings` (which imports only
those two), so :mod:`bench.scenario` can import it without a cycle.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from bench.shapes.external_settings import ShapeExternal
from pipeline.config import Duration, Frozen

Policy = Literal["block", "drop_oldest", "drop_newest"]
Strategy = Literal["naive", "improved"]
PositiveDuration = Annotated[Duration, Field(gt=0)]


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


class WindowsSettings(Frozen):
    """Producer -> bounded buffer -> consumer computing count / mean / max per machine over sliding windows.

    The stream is fed in process on a virtual clock (deterministic: no sockets, no sleeps); the buffer is the
    built-in pipeline's (its capacity from ``pipeline.buffer.capacity``), run once per overflow policy."""

    windows: tuple[PositiveDuration, ...] = Field(
        (10.0, 60.0), min_length=1, description="Window lengths (event time), each a multiple of slide."
    )
    slide: PositiveDuration = Field(1.0, description="Step between window ends (event time); the bucket width.")
    evaluate_every: PositiveDuration = Field(1.0, description="How often the consumer emits due windows (a tick).")
    allowed_lateness: Duration = Field(
        2.0, ge=0, description="The watermark trails the newest event time by this; older readings are late."
    )
    late_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of readings held back in transit (seeded), to exercise lateness."
    )
    late_delay_max: PositiveDuration = Field(5.0, description="A held-back reading arrives up to this much later.")
    consumer_rate: float = Field(
        100.0, gt=0, description="Rows per second the consumer handles; a burst above it fills the buffer."
    )
    strategies: tuple[Strategy, ...] = Field(("naive", "improved"), min_length=1)
    policies: tuple[Policy, ...] = Field(
        ("block", "drop_oldest", "drop_newest"), min_length=1, description="Buffer overflow policies, one run each."
    )
    memory_windows: tuple[PositiveDuration, ...] = Field(
        (60.0, 600.0),
        description="Window lengths of the memory / CPU-per-tick sweep (one window each, block policy).",
    )
    external: tuple[ShapeExternal, ...] = Field(
        (),
        description="Pipelines of the same shape run as processes beside the built-in strategies: the readings on "
        "their stdin as JSON lines in arrival order, window values read back from {dir}/windows.jsonl "
        "(docs/windows.md).",
    )

    @model_validator(mode="after")
    def _intervals_make_sense(self) -> WindowsSettings:
        slide = _ns(self.slide)
        for name, lengths in (("windows", self.windows), ("memory_windows", self.memory_windows)):
            for i, length in enumerate(lengths):
                if _ns(length) < slide:
                    raise ValueError(
                        f"slide: {self.slide:g} s is larger than {name}[{i}] ({length:g} s); expected slide <= "
                        "every window"
                    )
                if _ns(length) % slide:
                    raise ValueError(
                        f"{name}[{i}]: {length:g} s is not a multiple of slide ({self.slide:g} s); expected a "
                        "whole number of slides"
                    )
        builtin = {f"{s}-{p}" for s in self.strategies for p in self.policies}
        seen: set[str] = set()
        for i, ext in enumerate(self.external):
            if ext.name in builtin or ext.name in seen:
                raise ValueError(
                    f"external[{i}].name: {ext.name!r} is already a variant's name; expected a name unique among "
                    f"the variants ({', '.join(sorted(builtin | seen))})"
                )
            seen.add(ext.name)
        return self

    def variant_names(self) -> list[str]:
        """Every variant's name in run order: strategy-policy for the built-in, then each external pipeline."""
        return [f"{s}-{p}" for p in self.policies for s in self.strategies] + [e.name for e in self.external]

    def windows_ns(self) -> tuple[int, ...]:
        return tuple(_ns(w) for w in self.windows)

    def slide_ns(self) -> int:
        return _ns(self.slide)

    def lateness_ns(self) -> int:
        return _ns(self.allowed_lateness)
