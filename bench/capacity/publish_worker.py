"""One publisher process of a capacity sweep: ``python -m bench.capacity.publish_worker CONFIG.json``.

Each process regenerates the same deterministic stream (same seed, same epoch)
and publishes only its share: the machines whose index modulo ``shares`` is
``share``. Together the processes send every message exactly once, each at its
intended time, with more CPU than one process (one GIL) could give, so the
offered load can out-run the pipeline.

It records when each message really went out. A process that cannot keep its
schedule says so in its final record (send lag); the parent then reports the
step as publisher-limited instead of blaming the pipeline.

stdout, one JSON object per line: ``{"ready": true}`` once connected; then it
reads the run's epoch (ns) as one line on stdin and starts; ``{"sent": n}`` every
``sample_every_s``; ``{"done": true}`` after the final record is written to
``final_path`` (``seq, intended_ns, sent_ns`` triples, int64, in ``final_path + ".sent"``).
With ``seq_property`` in the config, it speaks MQTT 5 and sends each seq as a user property of that name too.
The final record counts messages of the share that were not sent, by reason
(``not_sent``; also one line on stderr), and the publish window's statistics
(``window``: at QoS > 0 a send waits for room in it, which is part of its send lag).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.clock import MonotonicWallClock
from pipeline.probes import Recorder
from simulators.errors import SimulatorError
from simulators.publisher import DEFAULT_WINDOW, PacedPublisher
from simulators.stream import Message, PhaseSpec, SignalSpec, StreamSpec, stream


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def share_of(messages: Iterable[Message], machines: tuple[str, ...], share: int, shares: int) -> Iterator[Message]:
    """The messages of the machines whose index modulo ``shares`` is ``share``, in send order."""
    if shares == 1:
        return iter(messages)  # all of them: no test per message
    mine = {m for i, m in enumerate(machines) if i % shares == share}
    return (m for m in messages if m.machine in mine)


def spec_to_json(spec: StreamSpec) -> dict[str, Any]:
    return asdict(spec)


def spec_from_json(data: dict[str, Any]) -> StreamSpec:
    return StreamSpec(
        seed=int(data["seed"]),
        machines=tuple(data["machines"]),
        phases=tuple(PhaseSpec(**p) for p in data["phases"]),
        signals=SignalSpec(**data["signals"]),
        arrival=data["arrival"],
        limit=data["limit"],
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    spec = spec_from_json(config["spec"])
    publisher = PacedPublisher(
        config["broker"],
        config["topic"],
        config["qos"],
        client_id=config["client_id"],
        window=int(config.get("window", DEFAULT_WINDOW)),
        # transport.mqtt.seq_property: MQTT 5, the seq as a user property of this name (absent: MQTT 3.1.1).
        seq_property=config.get("seq_property"),
    )
    try:
        publisher.connect()
    except SimulatorError as exc:
        _emit({"error": str(exc)})
        return 2
    _emit({"ready": True})
    clock = MonotonicWallClock()
    # The parent starts every process first, then hands all of them one epoch: start-up time is not in the schedule.
    line = sys.stdin.readline()
    if not line.strip():
        publisher.close()
        return 1
    epoch_ns = int(line)
    sent = array("q")  # (seq, intended_ns, sent_ns) triples: the parent rebuilds the backlog curve from them
    lag = Recorder()
    stop = threading.Event()

    def on_sent(message: Message, sent_ns: int) -> None:
        sent.extend((message.seq, message.intended_send_ns, sent_ns))
        lag.record_ns(sent_ns - message.intended_send_ns)

    def report() -> None:
        every = float(config.get("sample_every_s", 0.25))
        while not stop.wait(every):
            _emit({"sent": len(sent) // 3})

    reporter = threading.Thread(target=report, name="reporter", daemon=True)
    reporter.start()
    mine = share_of(stream(spec, epoch_ns), spec.machines, int(config["share"]), int(config["shares"]))
    accepted = publisher.run(mine, clock, on_sent=on_sent)
    finished_ns = clock.now_ns()
    acked = publisher.wait_acked(accepted, float(config.get("ack_timeout_s", 60))) if config["qos"] > 0 else True
    acked_ns = clock.now_ns()
    stop.set()
    reporter.join()
    publisher.close()
    Path(config["final_path"] + ".sent").write_bytes(sent.tobytes())
    problem = publisher.not_sent_problem()
    if problem:
        # The parent keeps this process's stderr in a log file beside the step: the reason lands there too.
        print(f"publisher {config['share']}/{config['shares']}: {problem}", file=sys.stderr, flush=True)
    final = {
        "sent": accepted,
        "not_sent": publisher.not_sent,
        "window": publisher.window_stats(),
        "acked": publisher.acked,
        "all_acked": acked,
        "finished_ns": finished_ns,
        "acked_ns": acked_ns,
        "send_lag": lag.to_json(),
        "cpu_s": time.process_time(),
    }
    Path(config["final_path"]).write_text(json.dumps(final), encoding="utf-8")
    _emit({"done": True, "sent": accepted, "not_sent": publisher.not_sent})
    return 0


if __name__ == "__main__":
    sys.exit(main())
