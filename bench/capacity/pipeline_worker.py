"""One pipeline worker process of a capacity sweep: ``python -m bench.capacity.pipeline_worker CONFIG.json``.

The pipeline under test runs here, alone in its process, so its CPU, memory and
throughput are its own and not shared with the publishers or the bench. Several
workers share one MQTT subscription (``$share/<group>/<filter>``) to scale out.

Protocol with the parent (:mod:`bench.capacity.sweep`), one JSON object per line:

- stdout ``{"ready": true}`` once subscribed; then ``{"t_ns", "received", "durable", "cpu_s", "rss_bytes"}``
  every ``sample_every_s`` (for the progress display and the CPU/RSS figures);
- stdin ``stop``: close the subscription, flush, finalise files, then write the
  final record (flushes, lock probes, errors) to ``final_path`` and print ``{"done": true}``.

A line on stdout that is not JSON is never printed by this module: the parent
treats one as a crash report.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from pipeline.clock import MonotonicWallClock
from pipeline.config import PipelineSettings
from pipeline.errors import PipelineError
from pipeline.model import FlushStat
from pipeline.mqtt_source import MqttSource
from pipeline.runtime import Pipeline, freeze_startup_heap


def rss_bytes() -> int:
    """Resident set size now (not the peak)."""
    return int(psutil.Process().memory_info().rss)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    settings = PipelineSettings.model_validate(config["pipeline"])
    out_dir = Path(config["out_dir"])
    clock = MonotonicWallClock()
    flushes: list[FlushStat] = []
    pipeline = Pipeline(
        settings,
        out_dir,
        clock,
        on_flush=flushes.append,
        sink_delay_s=config.get("sink_delay_s", 0),
        sink_slowdown=config.get("sink_slowdown", 0),
    )
    source = MqttSource(
        config["broker"],
        config["subscription"],
        config["qos"],
        pipeline.submit,
        client_id=config["client_id"],
        protocol=config.get("protocol", 4),
    )
    try:
        pipeline.start()
        source.start()
    except PipelineError as exc:
        _emit({"error": str(exc)})
        pipeline.close()
        return 2
    # As the pipeline's own process does (python -m pipeline): the startup heap out of the collector's passes.
    freeze_startup_heap()
    _emit({"ready": True})
    stop = threading.Event()
    samples: list[tuple[int, float, int]] = []

    def sample() -> None:
        every = float(config.get("sample_every_s", 0.25))
        while not stop.wait(every):
            stats = pipeline.statistics()
            durable = stats.readings.flushed_rows if stats.readings else 0
            t_ns, cpu, rss = clock.now_ns(), time.process_time(), rss_bytes()
            samples.append((t_ns, cpu, rss))
            _emit({"t_ns": t_ns, "received": stats.received, "durable": durable, "cpu_s": cpu, "rss_bytes": rss})

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    sampler.start()
    for line in sys.stdin:  # blocks until the parent says stop (or dies: EOF)
        if line.strip() == "stop":
            break
    source.close()
    pipeline.close()
    stop.set()
    sampler.join()
    stats = pipeline.statistics()
    probes = pipeline.lock_probes
    final = {
        "received": stats.received,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "rejected_by_reason": stats.rejected_by_reason,
        "dropped_by_reason": pipeline.drops.counts(),
        "flushes": [asdict(f) for f in flushes],
        "lock": {name: getattr(probes, name).to_json() for name in ("wait", "hold", "stall")} if probes else None,
        "samples": samples,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "errors": [str(e) for e in pipeline.errors],
    }
    tmp = Path(config["final_path"] + ".tmp")
    tmp.write_text(json.dumps(final), encoding="utf-8")
    tmp.replace(config["final_path"])
    _emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
