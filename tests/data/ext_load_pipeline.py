"""A tiny external pipeline for tests/test_load_external.py: subscribes with paho, writes one JSON line per reading.

    python ext_load_pipeline.py BROKER_URL TOPIC OUT.jsonl [--drop-every N]

Each line holds the reading's seq and machine, and ``at``: the wall time the line was written (flushed per
line), which the scenario maps as the durable time. With ``--drop-every N`` it silently drops every reading
whose seq is a multiple of N, as a buggy pipeline would. It prints "ext_load: subscribed" once the broker has
granted the subscription, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker_url")
    parser.add_argument("topic")
    parser.add_argument("out")
    parser.add_argument("--drop-every", type=int, default=0)
    args = parser.parse_args()
    where = urlsplit(args.broker_url)
    out = open(args.out, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed on SIGTERM

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            reading = json.loads(msg.payload)
            seq = int(reading["seq"])
        except (ValueError, KeyError, TypeError):
            return  # not a reading it understands: dropped, as a simple pipeline would
        if args.drop_every and seq % args.drop_every == 0:
            return
        out.write(json.dumps({"seq": seq, "machine": reading.get("machine"), "at": time.time()}) + "\n")

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        print("ext_load: subscribed", flush=True)

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.on_message, client.on_connect, client.on_subscribe = on_message, on_connect, on_subscribe

    def stop(*_: Any) -> None:
        client.disconnect()
        out.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    client.connect(where.hostname or "127.0.0.1", where.port or 1883)
    client.loop_forever()


if __name__ == "__main__":
    main()
