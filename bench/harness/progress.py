"""Progress snapshots the running commands hand to the CLI's display (``bench run``, ``load``, ``capacity``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """A snapshot for the progress display."""

    variant: str
    variant_index: int
    variants: int
    elapsed_s: float
    planned: int
    sent: int
    received: int
    persisted: int
    rejected: int
    send_rate: float
    lag_s: float
    backlog: int
    phase: str


@dataclass(frozen=True)
class LoadProgress:
    """A snapshot for the progress display."""

    stage: str
    elapsed_s: float
    """Seconds since the first planned send (negative before it)."""
    planned: int
    received: int
    persisted: int
    rejected: int
    backlog: int
    locust_requests: int


@dataclass(frozen=True)
class StepProgress:
    """A snapshot of the running step, for the progress display."""

    workers: int
    step: int
    steps: int
    offered_per_s: float
    elapsed_s: float
    step_s: float
    sent: int
    durable: int
    phase: str
    """"send", "drain" or the verdict of the finished step."""
