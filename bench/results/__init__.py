"""results.json: one plain, versioned JSON file per run.

Schema changelog (bump ``SCHEMA_VERSION`` on every change, note it here and in
``docs/results.md``):

1. First version: scenario, environment, one variant with config, ledger,
   throughput, latency_ms (end_to_end, send_lag), probes.flush, publisher.
2. One entry per matrix variant; probes.lock, probes.append_cost,
   probes.queue_depth, probes.loop_lag_ms, probes.overhead;
   throughput.sink_rows_per_s; sql; faults; pipeline.dropped_by_reason and
   refused_after_close; latency summaries gain "total" (ms).
3. opcua (source statistics, security, reference), publisher.not_sent;
   ledger dropped reasons opcua_queue_overflow and server_outage.
4. validation; ledger.redelivered and quarantine_rows.
5. timeline per variant; percentile ladders in flush total_ms and lock
   wait_ms; capacity runs (kind, capacity).
6. probes.cpu (thread CPU time: hot path per message, sinks per row); latency
   summaries' mean is exact (total / count), no longer HdrHistogram's bucket mean.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from pipeline.probes import Recorder

SCHEMA_VERSION = 7
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
    "jinja2",
    "matplotlib",
    "numpy",
    "locust",
)
# Latency histograms: one implementation, shared with the pipeline's probes.
LatencyRecorder = Recorder


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
