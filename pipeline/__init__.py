"""The ingestion pipeline under test: source -> decode -> validate -> buffer -> sinks.

Runs on its own against a real broker (``python -m pipeline --config FILE``) and
is driven in-process by the bench. It never imports ``bench`` or ``simulators``.
"""

from pipeline.config import PipelineSettings
from pipeline.runtime import Pipeline

__all__ = ["Pipeline", "PipelineSettings"]
