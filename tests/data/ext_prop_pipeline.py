"""A tiny external pipeline for tests/test_seq_property.py: MQTT 5, the seq taken from a user property.

It keeps only the fields it knows (machine) and drops the payload's seq, as a pipeline that forwards message
properties but not unknown payload fields would. The payload's seq is written under another name only so that
the test can check the property carried the same number.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    url, topic, out_path, name = sys.argv[1:5]
    where = urlsplit(url)
    out = open(out_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (closed on SIGTERM)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        reading = json.loads(msg.payload)
        props = dict(getattr(msg.properties, "UserProperty", []))
        row = {"seq": props.get(name), "machine": reading["machine"], "payload_seq": reading.get("seq")}
        out.write(json.dumps(row) + "\n")

    def on_subscribe(*_: Any) -> None:
        print("ext-prop: subscribed", flush=True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message, client.on_subscribe = on_message, on_subscribe
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.connect(where.hostname or "127.0.0.1", where.port or 1883)

    def stop(*_: Any) -> None:
        client.disconnect()
        out.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    client.loop_forever()


if __name__ == "__main__":
    main()
