"""The ``recompute:`` section of a scenario: the notify-and-recompute shape (``bench/shapes/recompute.py``).

Imports pydantic and ``pipeline.config`` only, so ``bench.scenario`` can import it without a cycle.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from bench.shapes.external_settings import ShapeExternal
from pipeline.config import Duration, Frozen


class RecomputeVariant(Frozen):
    """One strategy of the pipeline under test, run on the same stream as the others."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Column name in the summary.")
    recompute: Literal["full", "incremental"] = Field(
        description="full: every notification recomputes every machine's whole series; incremental: from the "
        "earliest changed time the notification carries."
    )
    coalesce: bool = Field(
        description="Merge the notifications that arrive while a recompute runs into one (single flight); "
        "false: serve each notification on its own."
    )


class RecomputeReaders(Frozen):
    """Concurrent readers of the read API (locust ``HttpUser``s in a subprocess), to measure its latency."""

    users: int = Field(
        4, ge=0, le=1000, description="How many readers (0: none; the API latency is then not measured)."
    )
    wait: Duration = Field(
        0.05, ge=0, le=60, description="Each reader's pause between two requests (GET /series?machine=ID, GET /status)."
    )


class RecomputeSettings(Frozen):
    """Gather -> notify -> recompute from the earliest changed point -> SQLite -> HTTP read API, per strategy.

    The readings travel in memory from the bench to the pipeline at their intended send times; late readings
    come from the scenario's ``anomalies`` (kinds ``out_of_order`` and ``late``: a timestamp behind the
    machine's newest reading).
    """

    variants: tuple[RecomputeVariant, ...] = Field(
        (
            RecomputeVariant(name="naive", recompute="full", coalesce=False),
            RecomputeVariant(name="improved", recompute="incremental", coalesce=True),
        ),
        description="The strategies, side by side (default: naive = full + a ping each; improved = incremental "
        "+ single flight); may be empty when external pipelines are given.",
    )
    gather_interval: Duration = Field(
        0.1, gt=0, le=60, description="How often the gatherer commits what arrived and notifies."
    )
    poll_interval: Duration = Field(
        0.05,
        gt=0,
        le=60,
        description="How often the bench's reader polls GET /status: staleness is measured to this resolution.",
    )
    drain_timeout: Duration = Field(
        120, gt=0, description="After the last send, how long to wait for the series to reflect every reading."
    )
    curve_bins: int = Field(10, ge=2, le=100, description="Points of the recompute cost curve (by series length).")
    readers: RecomputeReaders = Field(
        default_factory=RecomputeReaders,
        description="Concurrent readers measuring the API's latency while each variant runs (users: 0 for none).",
    )
    external: tuple[ShapeExternal, ...] = Field(
        (),
        description="Pipelines of this shape the user brings, run after the built-in variants on the same stream: "
        "readings as JSON lines on stdin; GET {url}/status with seq_through, GET {url}/series (docs/recompute.md).",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> RecomputeSettings:
        if not self.variants and not self.external:
            raise ValueError("variants: expected at least one variant (or an external pipeline), got none")
        names = [v.name for v in self.variants] + [e.name for e in self.external]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"variants and external: names must be unique, got {', '.join(dup)} more than once "
                f"(names: {', '.join(names)})"
            )
        return self
