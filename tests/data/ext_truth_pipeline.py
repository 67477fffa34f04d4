"""A tiny external pipeline for tests/test_external_truth.py: it validates, stores the readings it accepts as JSON
lines, and drops what it refuses without a trace, or keeps it (``--rejects``) with its seq and reason.

    python ext_truth_pipeline.py BROKER_URL TOPIC OUT [--rejects FILE] [--drop-valid N] [--refuse-valid N]

Its checks are those of a hurried developer: the payload must be JSON (no NaN), with machine, ts and a numeric
load_rate; it never compares ts with the clock, so a reading from the future is stored. ``--drop-valid N`` also
drops every valid reading whose seq is N modulo 37 (a bug that loses good data), writing each such seq to
OUT.dropped so a test knows which; ``--refuse-valid N`` rejects those instead (a policy that refuses good data).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

EVERY = 37


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def problem(body: Any) -> str | None:
    """Why a decoded payload is refused, or None."""
    if not isinstance(body, dict):
        return "not_an_object"
    if not all(isinstance(body.get(k), str) for k in ("machine", "ts")):
        return "missing_field"
    value = body.get("load_rate")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "bad_value"
    try:
        datetime.fromisoformat(body["ts"].replace("Z", "+00:00"))
    except ValueError:
        return "bad_timestamp"
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker")
    parser.add_argument("topic")
    parser.add_argument("out")
    parser.add_argument("--rejects")
    parser.add_argument("--drop-valid", type=int)
    parser.add_argument("--refuse-valid", type=int)
    args = parser.parse_args()
    out = open(args.out, "a", buffering=1)  # noqa: SIM115 - open for the process's life, closed on SIGTERM
    rejects = open(args.rejects, "a", buffering=1) if args.rejects else None  # noqa: SIM115
    dropped = open(args.out + ".dropped", "a", buffering=1)  # noqa: SIM115

    def refuse(reason: str, seq: Any) -> None:
        if rejects is not None:
            rejects.write(json.dumps({"seq": seq, "reason": reason}) + "\n")

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload, parse_constant=_no_constant)
        except ValueError:
            refuse("invalid_json", None)  # nothing parsed: no seq to keep
            return
        seq = body.get("seq") if isinstance(body, dict) else None
        reason = problem(body)
        if reason is not None:
            refuse(reason, seq)
            return
        if isinstance(seq, int) and seq % EVERY in (args.drop_valid, args.refuse_valid):
            if seq % EVERY == args.refuse_valid:
                refuse("policy", seq)
            else:
                dropped.write(f"{seq}\n")
            return
        out.write(json.dumps({"seq": seq, "machine": body["machine"], "ts": body["ts"]}) + "\n")

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        print("truth-pipeline: subscribed", flush=True)

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(args.topic, qos=1)

    where = urlsplit(args.broker)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.on_message, client.on_subscribe, client.on_connect = on_message, on_subscribe, on_connect
    client.connect(where.hostname or "127.0.0.1", where.port or 1883)

    def stop(*_: Any) -> None:
        client.disconnect()
        for f in (out, rejects, dropped):
            if f is not None:
                f.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    client.loop_forever()


if __name__ == "__main__":
    main()
