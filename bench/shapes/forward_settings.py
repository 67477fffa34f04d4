"""The ``forward:`` scenario section: store-and-forward strategies and the upstream's fault timeline.

Imports only pydantic and pipeline.config (never bench.scenario), so bench.scenario can import it without a cycle.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import Duration, Frozen


class UpstreamFault(Frozen):
    """One fault of the upstream, on for ``duration`` from ``at`` (seconds after the first send)."""

    kind: Literal["down", "error", "lost_ack", "slow"] = Field(
        description="down: connection refused; error: answer 500 to `fraction` of requests; lost_ack: store, then "
        "close without answering, for `fraction` of requests; slow: wait `delay` before each answer."
    )
    at: Duration = Field(ge=0, description="Start, seconds after the first send.")
    duration: Duration = Field(gt=0, description="How long it lasts.")
    fraction: float | None = Field(None, gt=0, le=1, description="error and lost_ack: fraction of requests hit.")
    delay: Duration | None = Field(None, gt=0, le=60, description="slow: added before each answer.")

    @model_validator(mode="after")
    def _parameters(self) -> UpstreamFault:
        if self.kind in ("error", "lost_ack") and self.fraction is None:
            raise ValueError(f"{self.kind}: expected a fraction of requests, e.g. fraction: 0.2")
        if self.kind == "slow" and self.delay is None:
            raise ValueError("slow: expected a delay, e.g. delay: 300ms")
        if self.kind in ("down", "slow") and self.fraction is not None:
            raise ValueError(f"{self.kind}: fraction applies to error and lost_ack only")
        if self.kind != "slow" and self.delay is not None:
            raise ValueError(f"{self.kind}: delay applies to slow only")
        return self


class ForwardSettings(Frozen):
    """Store-and-forward: filter -> SQLite outbox -> sender -> an upstream HTTP server the bench starts."""

    strategies: tuple[Literal["naive", "outbox"], ...] = Field(
        ("naive", "outbox"),
        min_length=1,
        description="Run each on the same stream, side by side (naive: delete before the upstream's answer).",
    )
    batch_size: int = Field(50, gt=0, le=10_000, description="Records per request.")
    max_rows: int = Field(100_000, gt=0, description="Outbox bound; beyond it the overflow policy drops.")
    overflow: Literal["drop_newest", "drop_oldest"] = Field("drop_newest", description="What a full outbox drops.")
    timeout: Duration = Field(1.0, gt=0, le=60, description="Per request; a slower answer is a failure.")
    backoff_base: Duration = Field(0.05, gt=0, description="First retry delay bound (doubles per attempt).")
    backoff_cap: Duration = Field(2.0, gt=0, description="Largest retry delay bound.")
    drain_timeout: Duration = Field(15.0, gt=0, description="After the last send, wait this long without progress.")
    faults: tuple[UpstreamFault, ...] = Field((), description="The upstream's fault timeline.")

    @model_validator(mode="after")
    def _distinct(self) -> ForwardSettings:
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies: each at most once, got {list(self.strategies)}")
        if self.backoff_cap < self.backoff_base:
            raise ValueError(f"backoff_cap: expected >= backoff_base ({self.backoff_base}), got {self.backoff_cap}")
        return self
