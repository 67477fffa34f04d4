"""A tiny external pipeline for the gate's tests (tests/test_gate_external.py): subscribes with paho, writes each
reading's seq as a JSON line, prints "subscribed" once it is ready.

``--burn-ms N`` spends N ms of this thread's CPU time on every message, as a slower version of the same
pipeline would: the gate must see it in the process tree's CPU per thousand messages. The burn spins on
``time.thread_time`` (CPU time, not wall time), so a busy machine makes it neither cheaper nor dearer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker")
    parser.add_argument("topic")
    parser.add_argument("out")
    parser.add_argument("--burn-ms", type=float, default=0.0)
    args = parser.parse_args()
    burn_s = args.burn_ms / 1000
    where = urlsplit(args.broker)
    out = open(args.out, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (closed on SIGTERM)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        reading = json.loads(msg.payload)
        if burn_s:
            until = time.thread_time() + burn_s
            while time.thread_time() < until:
                pass
        out.write(json.dumps({"seq": reading["seq"], "machine": reading["machine"]}) + "\n")

    def on_subscribe(*_: Any) -> None:
        # Which copy of this file runs (a gate's baseline runs it from a worktree of an older revision).
        print(f"ext-gate: subscribed from {os.path.abspath(__file__)}", flush=True)

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.on_message, client.on_subscribe = on_message, on_subscribe
    client.on_connect = lambda c, *_: c.subscribe(args.topic, qos=1)
    client.connect(where.hostname or "127.0.0.1", where.port or 1883)

    def stop(*_: Any) -> None:
        client.disconnect()
        out.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    client.loop_forever()


if __name__ == "__main__":
    main()
