"""A tiny external pipeline for tests/test_external_ready.py that says nothing when it is ready.

It connects, with ``--decoy`` subscribes first to a topic the scenario does not publish on (which must not
count as ready), waits ``--delay`` seconds, and only then subscribes to the scenario's filter. A bench that
started publishing before that subscription would lose messages (clean session): the ledger shows whether
ready waited for it.
``--never`` never subscribes to the filter (the timeout's error).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker")
    parser.add_argument("topic")
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--never", action="store_true")
    parser.add_argument("--decoy", action="store_true")
    args = parser.parse_args()
    where = urlsplit(args.broker)
    out = open(args.out, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (closed on SIGTERM)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        reading = json.loads(msg.payload)
        out.write(json.dumps({"seq": reading["seq"], "machine": reading["machine"]}) + "\n")

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        if args.decoy:
            client.subscribe("ext-ready/unrelated/#", qos=1)
        if not args.never:
            threading.Timer(args.delay, lambda: client.subscribe(args.topic, qos=1)).start()
        print("ext-ready: connected", flush=True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message, client.on_connect = on_message, on_connect
    client.connect(where.hostname or "127.0.0.1", where.port or 1883)

    def stop(*_: Any) -> None:
        client.disconnect()
        out.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    client.loop_forever()


if __name__ == "__main__":
    main()
