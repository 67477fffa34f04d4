"""The measured processes of ``bench calibrate``: ``python -m bench.calibrate.child CONFIG.json``.

Each measurement runs alone in a process of its own so that its CPU is its own. ``kind`` in the config says
which; all speak the JSON lines of :class:`bench.capacity.workers.Child` (``ready``, then ``done``):

- ``bench_publisher``: the capacity sweep's own publisher process (:mod:`bench.capacity.publish_worker`, run
  as it is), with one hook around :meth:`PacedPublisher.run` that reports the CPU time and clock when the
  sending starts (and, for tests only, burns ``burn_us`` of CPU per message sent: a slower publisher);
- ``bare_publisher``: a bare paho loop over the same (pre-built) messages, same client settings;
- ``bare_subscriber``: a bare paho subscriber, ``json.loads`` + ``list.append`` per message, sampling its CPU
  as :mod:`bench.capacity.pipeline_worker` does (the bench side of that row is the worker itself);
- ``chain_bench`` / ``chain_bare``: the pipeline's chain in process (decode + validate + buffer + Parquet
  flush, :class:`pipeline.runtime.Pipeline`) against ``json.loads`` + append, on the same payloads.

Rows that time themselves (everything but the two run-as-is workers) take the CPU time as
:func:`time.process_time` deltas around the measured part only: imports, connecting and building the
messages are outside it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.capacity.publish_worker import spec_from_json
from pipeline.runtime import freeze_startup_heap
from simulators.publisher import topic_segment
from simulators.stream import Message, stream


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _burn(us: float) -> None:
    """Busy CPU for ``us`` microseconds (a deliberately slower publisher, for tests)."""
    end = time.thread_time_ns() + int(us * 1000)
    while time.thread_time_ns() < end:
        pass


def _wait_start() -> int | None:
    """The parent's go: one line on stdin (the epoch, ns); None when it closed stdin instead."""
    line = sys.stdin.readline()
    return int(line) if line.strip() else None


def messages_of(config: dict[str, Any], epoch_ns: int) -> list[tuple[str, bytes]]:
    """The stream's (topic, payload) pairs, built before any measurement starts."""
    pattern = config["topic"]
    return [
        (pattern.format(machine=topic_segment(m.machine), seq=m.seq), m.payload)
        for m in stream(spec_from_json(config["spec"]), epoch_ns)
    ]


def bench_publisher(config_path: str, config: dict[str, Any]) -> int:
    from bench.capacity import publish_worker
    from pipeline.clock import Clock
    from simulators.publisher import PacedPublisher

    burn_us = float(config.get("burn_us", 0))
    original = PacedPublisher.run

    def run(
        self: PacedPublisher,
        messages: Iterable[Message],
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        on_sent: Callable[[Message, int], None] | None = None,
    ) -> int:
        # The process's CPU before its first send: the final record's cpu_s minus this is the sending alone.
        _emit({"cpu0_s": time.process_time(), "t0_ns": clock.now_ns()})
        hook = on_sent
        if burn_us > 0 and on_sent is not None:

            def hook(message: Message, sent_ns: int) -> None:
                _burn(burn_us)
                on_sent(message, sent_ns)

        return original(self, messages, clock, stop=stop, on_sent=hook)

    PacedPublisher.run = run  # type: ignore[method-assign]
    return publish_worker.main([config_path])


def bare_publisher(config: dict[str, Any]) -> int:
    from urllib.parse import urlsplit

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    qos = int(config["qos"])
    url = urlsplit(config["broker"])
    connected = threading.Event()
    # Written by paho's network thread alone and only read here: a plain counter, no lock, no wake-up per
    # message (the floor should not pay for bookkeeping the loop does not need).
    acked = [0]
    # paho numbers unacknowledged publishes with 16-bit ids: keep fewer than that in flight (as PacedPublisher).
    window = 16_384

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        connected.set()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        acked[0] += 1

    def wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)  # polling paho's counter: cheaper than a condition notified per message
        return True

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config["client_id"], protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(0)  # as PacedPublisher: no queue inside paho
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        _emit({"error": f"no CONNACK from {config['broker']}"})
        return 2
    _emit({"ready": True})
    epoch_ns = _wait_start()
    if epoch_ns is None:
        return 1
    pairs = messages_of(config, epoch_ns)
    burn_us = float(config.get("burn_us", 0))
    t0, cpu0 = time.monotonic_ns(), time.process_time()
    publish = client.publish
    for n, (topic, payload) in enumerate(pairs):
        if qos and n - acked[0] >= window:
            wait_until(lambda n=n: n - acked[0] < window // 2, 60)  # type: ignore[misc]
        publish(topic, payload, qos=qos)
        if burn_us:
            _burn(burn_us)
    loop_end = time.monotonic_ns()
    # QoS 1: every acknowledgement; QoS 0: every message written out (the CPU of writing them is the loop's).
    all_done = wait_until(lambda: acked[0] >= len(pairs), 120)
    acked_end = time.monotonic_ns()
    client.disconnect()
    client.loop_stop()
    cpu = time.process_time() - cpu0
    wall_ns = (acked_end if qos else loop_end) - t0
    _emit(
        {
            "done": True,
            "sent": len(pairs),
            "acked": acked[0],
            "all_acked": all_done,
            "cpu_s": cpu,
            "wall_s": wall_ns / 1e9,
        }
    )
    return 0


def bare_subscriber(config: dict[str, Any]) -> int:
    from urllib.parse import urlsplit

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    url = urlsplit(config["broker"])
    subscribed = threading.Event()
    received: list[Any] = []
    loads, append = json.loads, received.append

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(config["subscription"], qos=int(config["qos"]))

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        append(loads(message.payload))

    protocol = mqtt.MQTTv5 if int(config.get("protocol", 4)) == 5 else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config["client_id"], protocol=protocol)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=30)
    client.loop_start()
    if not subscribed.wait(10):
        _emit({"error": f"no SUBACK from {config['broker']}"})
        return 2
    freeze_startup_heap()  # as the pipeline worker beside it does: the floor is not the collector's
    _emit({"ready": True})
    stop = threading.Event()

    def sample() -> None:
        # As pipeline_worker samples (same period, same fields): the parent reads both the same way.
        every = float(config.get("sample_every_s", 0.25))
        while not stop.wait(every):
            n = len(received)
            _emit({"t_ns": time.time_ns(), "received": n, "durable": n, "cpu_s": time.process_time()})

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    sampler.start()
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    client.disconnect()
    client.loop_stop()
    stop.set()
    sampler.join()
    _emit({"done": True, "received": len(received)})
    return 0


def chain(config: dict[str, Any], *, bench: bool) -> int:
    """The chain in process: every message through Pipeline.submit and a final close (flush), or json.loads.

    Each side first runs the same messages once untimed (a pipeline of its own, into ``warm-up/``): a fresh
    process's first pass pays for its new heap (some 4,000 page faults, kernel time) and first-call costs, 1 to
    2 us a message of a 20,000-message run that a running pipeline does not pay per message; the bare side
    warms up alike. What is timed is the second pass, the steady state the row compares.
    """
    from pipeline.clock import MonotonicWallClock
    from pipeline.config import PipelineSettings
    from pipeline.runtime import Pipeline

    clock = MonotonicWallClock()
    pairs = messages_of(config, clock.now_ns())
    burn_us = float(config.get("burn_us", 0))
    settings = PipelineSettings.model_validate(config["pipeline"]) if bench else None

    def new_pipeline(folder: Path) -> Pipeline | None:
        if settings is None:
            return None
        pipeline = Pipeline(settings, folder, clock)
        pipeline.start()
        return pipeline

    def one_pass(pipeline: Pipeline | None) -> int:
        if pipeline is not None:
            submit = pipeline.submit
            for topic, payload in pairs:
                submit(payload, topic)
                if burn_us:
                    _burn(burn_us)
            pipeline.close()  # the last flush and the file's footer are part of the chain's cost
            stats = pipeline.statistics()
            return stats.readings.flushed_rows if stats.readings else 0
        out: list[Any] = []
        loads, append = json.loads, out.append
        for _topic, payload in pairs:
            append(loads(payload))
            if burn_us:
                _burn(burn_us)
        return len(out)

    one_pass(new_pipeline(Path(config["out_dir"]) / "warm-up"))
    pipeline = new_pipeline(Path(config["out_dir"]))
    # Both sides, as the pipeline's own process does once started: the imports and the 20,000 messages built
    # above are not the chain's, and the collector's passes over them were 15% of its CPU, at random.
    freeze_startup_heap()
    _emit({"ready": True})
    if _wait_start() is None:
        return 1
    cpu0 = time.process_time()
    kept = one_pass(pipeline)
    cpu = time.process_time() - cpu0
    _emit({"done": True, "sent": len(pairs), "kept": kept, "cpu_s": cpu})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    kind = config["kind"]
    if kind == "bench_publisher":
        return bench_publisher(args[0], config)
    if kind == "bare_publisher":
        return bare_publisher(config)
    if kind == "bare_subscriber":
        return bare_subscriber(config)
    if kind in ("chain_bench", "chain_bare"):
        return chain(config, bench=kind == "chain_bench")
    _emit({"error": f"unknown kind {kind!r}"})
    return 2


if __name__ == "__main__":
    sys.exit(main())
