"""The ``forward:`` scenario section: store-and-forward strategies, external pipelines of the same shape, and the
fault timeline (the upstream's faults, and kill -9 of the external pipelines' processes).

Imports only pydantic, pipeline.config and the shared external pipeline settings (which import only those two),
never bench.scenario, so bench.scenario can import it without a cycle.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from pydantic import Field, model_validator

from bench.shapes.external_settings import ShapeExternal
from pipeline.config import Duration, Frozen


class UpstreamFault(Frozen):
    """One fault, from ``at`` (seconds after the first send): of the upstream for ``duration``, or a kill -9 of
    the external pipelines' processes, restarted ``restart_after`` later."""

    kind: Literal["down", "error", "lost_ack", "slow", "kill"] = Field(
        description="down: connection refused; error: answer 500 to `fraction` of requests; lost_ack: store, then "
        "close without answering, for `fraction` of requests; slow: wait `delay` before each answer; kill: SIGKILL "
        "every external pipeline's process, start it again `restart_after` later (built-in strategies run in the "
        "bench's process and are not killed)."
    )
    at: Duration = Field(ge=0, description="Start, seconds after the first send.")
    duration: Duration | None = Field(None, gt=0, description="How long it lasts (all kinds but kill).")
    fraction: float | None = Field(None, gt=0, le=1, description="error and lost_ack: fraction of requests hit.")
    delay: Duration | None = Field(None, gt=0, le=60, description="slow: added before each answer.")
    restart_after: Duration | None = Field(
        None, ge=0, le=600, description="kill: how long the process stays dead before the bench starts it again."
    )

    @model_validator(mode="after")
    def _parameters(self) -> UpstreamFault:
        if self.kind == "kill":
            if self.restart_after is None:
                raise ValueError("kill: expected restart_after, e.g. {kind: kill, at: 7s, restart_after: 1s}")
            if self.duration is not None:
                raise ValueError("kill: takes restart_after, not duration")
        else:
            if self.duration is None:
                raise ValueError(f"{self.kind}: expected a duration, e.g. duration: 2s")
            if self.restart_after is not None:
                raise ValueError(f"{self.kind}: restart_after applies to kill only")
        if self.kind in ("error", "lost_ack") and self.fraction is None:
            raise ValueError(f"{self.kind}: expected a fraction of requests, e.g. fraction: 0.2")
        if self.kind == "slow" and self.delay is None:
            raise ValueError("slow: expected a delay, e.g. delay: 300ms")
        if self.kind not in ("error", "lost_ack") and self.fraction is not None:
            raise ValueError(f"{self.kind}: fraction applies to error and lost_ack only")
        if self.kind != "slow" and self.delay is not None:
            raise ValueError(f"{self.kind}: delay applies to slow only")
        return self

    @property
    def end(self) -> float:
        """When it is over: the upstream back to normal, or the killed process started again."""
        return self.at + ((self.restart_after if self.kind == "kill" else self.duration) or 0.0)


class ForwardExternal(ShapeExternal):
    """A store-and-forward pipeline the user brings (or the built-in one as its own process): the bench writes
    the readings to its standard input, it posts to ``{upstream_url}/ingest`` (docs/forward.md)."""

    baseline: bool = Field(
        False,
        description="A baseline whose failures during faults are its point (like the built-in naive): losses and "
        "duplicates named by a fault do not fail the run; unexplained ones still do.",
    )


class ForwardSettings(Frozen):
    """Store-and-forward: filter -> SQLite outbox -> sender -> an upstream HTTP server the bench starts."""

    strategies: tuple[Literal["naive", "retry", "outbox"], ...] = Field(
        ("naive", "retry", "outbox"),
        description="Run each on the same stream, side by side (naive: delete before the upstream's answer; "
        "retry: delete after a 2xx, back off and retry, no idempotency key; outbox: retry with keys).",
    )
    external: tuple[ForwardExternal, ...] = Field(
        (), description="Pipelines of the same shape run as processes, beside the strategies (docs/forward.md)."
    )
    batch_size: int = Field(50, gt=0, le=10_000, description="Records per request.")
    max_rows: int = Field(100_000, gt=0, description="Outbox bound; beyond it the overflow policy drops.")
    overflow: Literal["drop_newest", "drop_oldest"] = Field("drop_newest", description="What a full outbox drops.")
    timeout: Duration = Field(1.0, gt=0, le=60, description="Per request; a slower answer is a failure.")
    backoff_base: Duration = Field(0.05, gt=0, description="First retry delay bound (doubles per attempt).")
    backoff_cap: Duration = Field(2.0, gt=0, description="Largest retry delay bound.")
    drain_timeout: Duration = Field(15.0, gt=0, description="After the last send, wait this long without progress.")
    faults: tuple[UpstreamFault, ...] = Field((), description="The fault timeline.")

    @model_validator(mode="after")
    def _distinct(self) -> ForwardSettings:
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies: each at most once, got {list(self.strategies)}")
        names = [*self.strategies, *(e.name for e in self.external)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"external: names must be unique among strategies and external pipelines, {twice[0]!r} is used "
                f"twice (strategies {list(self.strategies)}, external {[e.name for e in self.external]})"
            )
        if not names:
            raise ValueError("strategies: expected at least one strategy or an external pipeline")
        if self.backoff_cap < self.backoff_base:
            raise ValueError(f"backoff_cap: expected >= backoff_base ({self.backoff_base}), got {self.backoff_cap}")
        if not self.external and any(f.kind == "kill" for f in self.faults):
            raise ValueError(
                "faults: kill stops external pipelines' processes, and forward.external lists none; expected an "
                "external pipeline (e.g. the built-in one: {python} -m pipeline.forward ...) or no kill"
            )
        kills = sorted((f for f in self.faults if f.kind == "kill"), key=lambda f: f.at)
        for a, b in pairwise(kills):
            if b.at <= a.end:
                raise ValueError(f"faults: a kill at {b.at:g} s while the one at {a.at:g} s is not restarted yet")
        return self
