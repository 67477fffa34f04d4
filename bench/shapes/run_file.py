"""The part of a shape run's results.json that every shape writes alike: its id, start, scenario, environment."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness.accounting import write_run_results
from bench.results import SCHEMA_VERSION, environment

if TYPE_CHECKING:
    from bench.results.model import Results
    from bench.scenario import LoadedScenario


@dataclass(frozen=True)
class ShapeRunFile:
    """Taken when a shape run starts (as ``bench run``'s runner does); :meth:`write` at its end."""

    run_id: str
    started: float
    env_before: dict[str, Any] = field(repr=False)

    @classmethod
    def begin(cls, loaded: LoadedScenario) -> ShapeRunFile:
        return cls(f"{loaded.scenario.name}-{uuid.uuid4().hex[:8]}", time.time(), environment())

    def write(
        self,
        loaded: LoadedScenario,
        run_dir: Path,
        variants: Sequence[dict[str, Any]],
        failures: Mapping[str, str],
    ) -> Results:
        """results.json with the variants that ran to their ledger and why the others could not."""
        from bench.harness.runner import scenario_ref  # the runner imports the shapes lazily

        return write_run_results(
            run_dir,
            {
                "schema_version": SCHEMA_VERSION,
                "run_id": self.run_id,
                "started_at": datetime.fromtimestamp(self.started, UTC).isoformat(),
                "scenario": scenario_ref(loaded),
                "environment": {**self.env_before, "host_load_after": environment()["host_load"]},
                "variants": list(variants),
                "failures": [{"variant": name, "error": why} for name, why in failures.items()],
            },
        )
