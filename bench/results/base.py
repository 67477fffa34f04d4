"""The base of every part of results.json, on its own (pydantic only).

``bench.results.model`` and the shapes' result parts (``bench/shapes/*_results.py``, which ``model`` imports for
its ``Variant``) both derive from it, so the parts share one configuration without an import cycle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ResultsModel(BaseModel):
    """Base of every part of results.json: immutable, unknown keys are errors (older files: see the model)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )
