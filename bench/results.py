"""results.json: one plain, versioned JSON file per run.

Schema changelog (bump ``SCHEMA_VERSION`` on every change, note it here and in
``docs/results.md``):

1. First version: scenario, environment, one variant with config, ledger,
   throughput, latency_ms (end_to_end, send_lag), probes.flush, publisher.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

SCHEMA_VERSION = 1
PACKAGES = (
    "iiot-bench",
    "asyncua",
    "amqtt",
    "paho-mqtt",
    "pyarrow",
    "SQLAlchemy",
    "pydantic",
    "PyYAML",
    "hdrhistogram",
    "rich",
)
# Latencies are recorded in microseconds, from 1 us to 1 hour, 3 significant digits.
_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 3_600_000_000, 3


class LatencyRecorder:
    """An HdrHistogram in microseconds that reports milliseconds."""

    def __init__(self) -> None:
        self._h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
        self.below_zero = 0
        self.clipped = 0

    def record_ns(self, value_ns: int) -> None:
        us = value_ns // 1000
        if us < 0:
            # A negative latency means clocks disagree; count it, never hide it.
            self.below_zero += 1
            us = 0
        if us > _HIGHEST_US:
            self.clipped += 1
            us = _HIGHEST_US
        self._h.record_value(max(us, _LOWEST_US))

    def record_all_ns(self, values: Iterable[int]) -> None:
        for v in values:
            self.record_ns(v)

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def summary(self) -> dict[str, Any]:
        if self.count == 0:
            return {"count": 0}
        pct = self._h.get_percentile_to_value_dict([50, 90, 99, 99.9])
        out: dict[str, Any] = {
            "p50": pct[50] / 1000,
            "p90": pct[90] / 1000,
            "p99": pct[99] / 1000,
            "p999": pct[99.9] / 1000,
            "max": self._h.get_max_value() / 1000,
            "mean": round(self._h.get_mean_value() / 1000, 3),
            "count": self.count,
        }
        if self.below_zero:
            out["below_zero"] = self.below_zero
        if self.clipped:
            out["clipped"] = self.clipped
        return out


def environment() -> dict[str, Any]:
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "host_load": list(load) if load else None,
        "packages": packages,
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
