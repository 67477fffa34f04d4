"""The OPC UA reference: what asyncua itself delivers on this machine, measured in the same run.

Two capacity measurements on the same kind of plant server, each replaying the
same messages as fast as possible (intended send times all due): a bare
asyncua subscription whose handler only counts notifications, and the
pipeline's OPC UA source feeding the real validate -> buffer -> Parquet chain.
Their ratio states the pipeline's OPC UA throughput as a fraction of the
library's own: the median over alternated trials, each trial one bare run and
one pipeline run back to back on one plant server (its values reset to "no
reading yet" in between), so a slow spell of the shared machine hits both
sides of the ratio it skews, and so does the server itself. The server runs in
this process and costs about 3x the client per notification (thread CPU); a fresh
server per run made the same side's CPU per notification vary by 89-114 us
from run to run (heap layout, the collector), and single ratios by 0.80-1.19;
both sides on one server, the ratios of one server's pairs agree within 0.06.

Both sides are timed alike: from the start of the replay (after the server's
initial placeholder values have arrived and been skipped) to the moment the
last notification (bare) or the last reading (pipeline) was handled; the
completion checks are plain counters, so no side pays for bookkeeping the
other does not.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asyncua.client.client import Client

from pipeline.clock import MonotonicWallClock
from pipeline.config import PipelineSettings
from pipeline.opcua_source import FIELDS, OpcUaSource, monitored_item_requests, subscription_parameters
from pipeline.runtime import Pipeline
from simulators.opcua_server import PlantServer
from simulators.stream import Message

QUEUE = 100_000  # large enough that nothing overflows: this measures speed, not loss
TIMEOUT_S = 120.0
TRIALS = 3
SETTLE_S = 0.5  # the server's initial placeholder values arrive (and are skipped) before the clock starts


@contextmanager
def _quiet_heap() -> Iterator[None]:
    """Collect, then keep the heap built so far out of the cyclic collector while a side is timed.

    Each trial builds a fresh plant server (an address space of some 10^5 objects) in this process, beside
    whatever the bench holds: a full collection of that heap landing in a 2 s window took 0.2-0.6 s, on
    either side at random. Neither side owns that heap; both are timed alike.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _due_now(messages: Iterable[Message]) -> list[Message]:
    return [Message(m.seq, m.machine, 0, m.payload, m.truth) for m in messages]


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.done = threading.Event()
        self.target = 0

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.count += 1
        self.last = time.perf_counter()
        if self.count >= self.target:
            self.done.set()


def _bare(plant: PlantServer, messages: list[Message], publishing_ms: float) -> float:
    counter = _Counter()
    # One notification per variable written: load rate, mileage, status, seq.
    counter.target = 4 * len(messages)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def subscribe() -> Client:
        client = Client(plant.url)
        await client.connect()
        sub = await client.create_subscription(subscription_parameters(publishing_ms), counter)
        plant_node = (await client.nodes.objects.get_children())[-1]
        nodes = [v for m in await plant_node.get_children() for v in await m.get_children()]
        await sub.create_monitored_items(monitored_item_requests([n.nodeid for n in nodes], QUEUE, 0.0))
        return client

    def serve() -> None:
        asyncio.set_event_loop(loop)
        client = loop.run_until_complete(subscribe())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(client.disconnect())
        loop.close()

    thread = threading.Thread(target=serve, name="opcua-reference", daemon=True)
    thread.start()
    ready.wait(TIMEOUT_S)
    # Initial placeholder notifications arrive first; count only what the replay causes.
    time.sleep(SETTLE_S)
    counter.count = 0
    with _quiet_heap():
        start = time.perf_counter()
        plant.run(messages, MonotonicWallClock())
        counter.done.wait(TIMEOUT_S)
    elapsed = max(counter.last - start, 1e-9)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    return counter.count / elapsed


class _Readings:
    """The pipeline side's completion check: a plain count of the readings submitted.

    Never ``pipeline.statistics()`` per reading: it snapshots the pipeline's and both buffers' statistics (locks,
    copies), a cost the bare side does not pay; it was about a seventh of the source's handler time.
    """

    def __init__(self, pipeline: Pipeline, target: int) -> None:
        self._submit = pipeline.submit_fields  # as a run's source hands readings on (sut.InProcessPipeline)
        self.target = target
        self.count = 0
        self.last = 0.0
        self.done = threading.Event()

    def __call__(self, fields: dict[str, Any], topic: str) -> None:
        self._submit(fields, topic)
        self.count += 1
        # As the bare counter: the time of the last one handled, so a side that never completes (a lost
        # notification) still reports the rate of what it did handle rather than count / timeout.
        self.last = time.perf_counter()
        if self.count >= self.target:
            self.done.set()


def _through_pipeline(
    plant: PlantServer, messages: list[Message], publishing_ms: float, settings: PipelineSettings
) -> float:
    with tempfile.TemporaryDirectory(prefix="iiot-bench-reference-") as folder:
        pipeline = Pipeline(settings, Path(folder), MonotonicWallClock())
        pipeline.start()
        readings = _Readings(pipeline, len(messages))
        source = OpcUaSource(
            plant.url, pipeline.submit, on_fields=readings, publishing_ms=publishing_ms, queue_size=QUEUE
        )
        source.start()
        time.sleep(SETTLE_S)  # as the bare side: the placeholders are not part of the timed replay
        with _quiet_heap():
            start = time.perf_counter()
            plant.run(messages, MonotonicWallClock())
            readings.done.wait(TIMEOUT_S)
        # Before close(): it hands on what is still pending, after the timed window.
        handled, elapsed = readings.count, readings.last - start
        source.close()
        pipeline.close()
    # The same unit as the bare reference: notifications (len(FIELDS) + status per reading).
    return (len(FIELDS) + 1) * handled / max(elapsed, 1e-9)


def measure(
    machines: Iterable[str], messages: Iterable[Message], publishing_ms: float, settings: PipelineSettings
) -> dict[str, Any]:
    """Notifications per second: bare asyncua subscription vs the pipeline's source + chain.

    ``pipeline_fraction`` is the median of the per-trial ratios, ``fraction_trials`` every trial's ratio (the
    spread); the two rates are each side's median.
    """
    machine_list = list(machines)
    batch = _due_now(messages)
    plain = settings.model_copy(update={"sql": None})
    bare_runs: list[float] = []
    piped_runs: list[float] = []
    for trial in range(TRIALS):
        with PlantServer(machine_list) as plant:
            # Which side goes first alternates, so neither always runs on the warmer (or the busier) machine, nor
            # always on a server that has served one client already.
            first_bare = trial % 2 == 0
            for side_is_bare in (first_bare, not first_bare):
                if side_is_bare:
                    bare_runs.append(_bare(plant, batch, publishing_ms))
                else:
                    piped_runs.append(_through_pipeline(plant, batch, publishing_ms, plain))
                if side_is_bare == first_bare:
                    plant.reset_values()
    return summarise(len(batch), bare_runs, piped_runs)


def summarise(messages: int, bare_runs: list[float], piped_runs: list[float]) -> dict[str, Any]:
    """The reference's results.json part from each trial's pair of rates (bare_runs[i] beside piped_runs[i])."""
    fractions = [p / b for b, p in zip(bare_runs, piped_runs, strict=True) if b > 0]
    return {
        "messages": messages,
        "bare_notifications_per_s": round(statistics.median(bare_runs), 1),
        "pipeline_notifications_per_s": round(statistics.median(piped_runs), 1),
        "pipeline_fraction": round(statistics.median(fractions), 3) if fractions else None,
        "fraction_trials": [round(f, 3) for f in fractions],
        "bare_trials": [round(x, 1) for x in bare_runs],
        "pipeline_trials": [round(x, 1) for x in piped_runs],
        "method": f"same messages replayed as fast as possible into a fresh plant server, queues large enough "
        f"not to overflow; bare = asyncua subscription whose handler only counts; {len(bare_runs)} trials, each "
        "one bare and one pipeline run back to back on one plant server, reset in between (alternating which goes "
        "first); pipeline_fraction = median of the per-trial ratios, fraction_trials = each trial's ratio",
    }
