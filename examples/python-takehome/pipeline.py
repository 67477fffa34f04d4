"""Take-home style telemetry pipeline: MQTT -> SQLite, with per-minute load-rate aggregates.

This is a deliberately naive, stand-alone pipeline, written the way a candidate typically
hands in a take-home exercise. It is measured by iiot-bench as an *external* pipeline: the
bench starts it as a separate process and reads its SQLite output back. It imports nothing
from the bench; only the standard library and paho-mqtt 2.

    python pipeline.py --broker mqtt://127.0.0.1:1883 --topic 'plant/+/telemetry' --db out/takehome.db

It prints "takehome: subscribed to <topic>" once the broker has acknowledged the subscription.

Deliberate weaknesses, left in on purpose (the bench's job is to find them, do not fix them):
- One INSERT and one COMMIT per reading, in the paho callback thread: every reading costs a
  journal sync, so a slow disk slows consumption, and there is no batching or backpressure
  (the broker queues, then drops, what it cannot deliver).
- Clean session with a random client id: anything published while it is down is lost.
- The open minute of each machine lives only in memory: it is written at a clean shutdown
  (SIGTERM/SIGINT) and lost on a crash or kill -9.
- No duplicate detection: a redelivered or replayed reading is stored (and counted) twice.
  A late reading for a minute already written produces a second, partial row for that minute.
- Invalid input is dropped silently: one broad `except Exception` around the handler prints a
  warning on stderr and moves on (bad JSON, missing field, unparsable or zone-less ts, a ts that
  is a number). No quarantine, no counter, nothing the bench can read back.
- The only validation is "ts is not more than 5 s in the future": no NaN, range, type, unknown
  machine or mileage checks. NaN is stored (SQLite turns it into NULL) and makes its minute's avg
  NULL; a null or non-numeric load_rate is stored, then breaks its minute's aggregate (it is
  counted but not summed, so count, avg, min and max disagree).
- ts is stored as received (Z or +02:00 offsets mixed), so readings.ts does not sort as time.
"""

import argparse
import json
import signal
import sqlite3
import sys
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (machine TEXT, ts TEXT, load_rate REAL, mileage REAL, seq INTEGER,
                                     received_at TEXT);
CREATE TABLE IF NOT EXISTS loading_rate (machine TEXT, minute TEXT, count INTEGER, avg REAL, min REAL, max REAL);
"""
MAX_FUTURE = timedelta(seconds=5)


class Pipeline:
    def __init__(self, db_path, topic):
        self.topic = topic
        self.db = sqlite3.connect(db_path)
        self.db.executescript(SCHEMA)
        self.minutes = {}  # (machine, minute) -> {count, sum, min, max}

    def on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            print(f"takehome: connect failed: {reason_code}", file=sys.stderr)
            return
        client.subscribe(self.topic, qos=1)

    def on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        print(f"takehome: subscribed to {self.topic}", flush=True)

    def on_message(self, client, userdata, msg):
        try:
            self.handle(msg)
        except Exception as e:  # one bad message must not kill the consumer
            print(f"takehome: WARNING dropping message on {msg.topic}: {e!r}", file=sys.stderr)

    def handle(self, msg):
        received_at = datetime.now(UTC)
        data = json.loads(msg.payload)
        machine, ts, load_rate = data["machine"], data["ts"], data["load_rate"]
        mileage, seq = data["mileage"], data["seq"]
        when = datetime.fromisoformat(ts)
        if when > received_at + MAX_FUTURE:
            print(f"takehome: WARNING dropping reading from the future: {ts}", file=sys.stderr)
            return

        self.db.execute(
            "INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?)",
            (machine, ts, load_rate, mileage, seq, received_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
        )
        self.db.commit()
        self.aggregate(machine, when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M"), load_rate)

    def aggregate(self, machine, minute, load_rate):
        agg = self.minutes.setdefault((machine, minute), {"count": 0, "sum": 0.0, "min": load_rate, "max": load_rate})
        agg["count"] += 1
        agg["sum"] += load_rate
        agg["min"] = min(agg["min"], load_rate)
        agg["max"] = max(agg["max"], load_rate)
        # A reading for a later minute means the earlier minutes of this machine are finished.
        for key in [k for k in self.minutes if k[0] == machine and k[1] < minute]:
            self.write_minute(key)

    def write_minute(self, key):
        agg = self.minutes.pop(key)
        row = (*key, agg["count"], agg["sum"] / agg["count"], agg["min"], agg["max"])
        self.db.execute("INSERT INTO loading_rate VALUES (?, ?, ?, ?, ?, ?)", row)
        self.db.commit()

    def close(self):
        for key in list(self.minutes):
            self.write_minute(key)
        self.db.close()


def main():
    parser = argparse.ArgumentParser(description="Take-home MQTT -> SQLite telemetry pipeline")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://HOST:PORT")
    parser.add_argument("--topic", default="plant/+/telemetry", help="subscription filter")
    parser.add_argument("--db", default="takehome.db", help="SQLite file (created if missing)")
    args = parser.parse_args()

    url = urlparse(args.broker)
    pipeline = Pipeline(args.db, args.topic)
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"takehome-{uuid.uuid4().hex[:8]}",
        clean_session=True,
    )
    client.on_connect = pipeline.on_connect
    client.on_subscribe = pipeline.on_subscribe
    client.on_message = pipeline.on_message

    def stop(signum, frame):
        client.disconnect()  # makes loop_forever() return

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=60)
    client.loop_forever()
    pipeline.close()
    print("takehome: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
