"""The ingestion pipeline under test: source -> decode -> validate -> buffer -> sinks.

Runs on its own against a real broker (``python -m pipeline --config FILE``) and
is driven in-process by the bench. It never imports ``bench`` or ``simulators``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import PipelineSettings
    from pipeline.runtime import Pipeline

__all__ = ["Pipeline", "PipelineSettings"]


def __getattr__(name: str) -> Any:
    # Imported on first use: importing pipeline.config (a scenario check, `bench validate`) must not pay for
    # the runtime's pyarrow and SQL imports.
    if name == "Pipeline":
        from pipeline.runtime import Pipeline

        return Pipeline
    if name == "PipelineSettings":
        from pipeline.config import PipelineSettings

        return PipelineSettings
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
