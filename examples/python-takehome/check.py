"""Reproducible check of the take-home pipeline against a real MQTT broker (stdlib + paho-mqtt 2).

    python check.py --broker mqtt://127.0.0.1:1883            # all three phases
    python check.py --phases happy,kill9 --keep                # keep the SQLite files and stderr logs

Phases (each starts its own pipeline.py process on a unique topic prefix and a fresh SQLite file):
- happy:      publish --count readings (default 3,000) at --rate msg/s (default 500) from 6 machines,
              QoS 1, wait until stored, SIGTERM; every seq must be stored exactly once, the process
              must exit 0 and the loading_rate counts must add up to --count.
- throughput: publish --burst readings (default 20,000) as fast as QoS 1 allows; report how long
              publishing took, how long until the last one was stored, and how many were lost.
- kill9:      publish 900 readings spread over 3 past minutes per machine at --kill9-rate msg/s (slow
              enough to lose nothing), wait until stored, kill -9; report how many loading_rate
              rows and readings the open (last) minute of each machine lost.

Prints one JSON line per phase; exits 1 when the happy phase fails. The happy phase fails whenever
--rate is above what the pipeline can commit (one fsync'd commit per reading): the broker queues
what the pipeline has not taken yet, and Mosquitto's default max_queued_messages (1000) then drops
QoS 1 messages for that client ("Outgoing messages are being dropped" in the broker log). Against a
broker with `max_queued_messages 0` (unlimited) nothing is lost, the pipeline just falls behind.
"""

import argparse
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

HERE = Path(__file__).resolve().parent
MACHINES = [f"m-{i:02d}" for i in range(1, 7)]
PLUS_TWO = timezone(timedelta(hours=2))


class Run:
    """One pipeline.py process on its own topic prefix and SQLite file."""

    def __init__(self, args, workdir, name):
        self.prefix = f"takehome-check/{uuid.uuid4().hex[:12]}"
        self.db = workdir / f"{name}.db"
        self.stderr_path = workdir / f"{name}.stderr.log"
        cmd = [args.python, str(HERE / "pipeline.py"), "--broker", args.broker]
        cmd += ["--topic", f"{self.prefix}/+/telemetry", "--db", str(self.db)]
        self.cmd = cmd
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=15)
        except queue.Empty:
            self.proc.kill()
            raise SystemExit(f"{name}: pipeline printed nothing in 15 s, see {self.stderr_path}") from None
        if not line.startswith("takehome: subscribed to "):
            raise SystemExit(f"{name}: unexpected first line {line!r}")

    def stored(self):
        with sqlite3.connect(self.db, timeout=30) as db:
            return db.execute("SELECT count(*) FROM readings").fetchone()[0]

    def wait_stored(self, expected, idle=5.0):
        """Poll until `expected` rows are stored or nothing new arrived for `idle` s; return (rows, when)."""
        last, last_change = -1, time.monotonic()
        while True:
            n = self.stored()
            now = time.monotonic()
            if n != last:
                last, last_change = n, now
            if n >= expected or now - last_change > idle:
                return n, last_change
            time.sleep(0.5)  # every poll takes a read lock the pipeline may wait for

    def stop(self, sig):
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self.stderr.close()
        return rc

    def stored_rate(self):
        """Rows per second between the first and the last received_at: the rate the pipeline kept up while busy."""
        first, last, n = self.query("SELECT min(received_at), max(received_at), count(*) FROM readings")[0]
        span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds() if n > 1 else 0
        return round((n - 1) / span) if span else None

    def query(self, sql):
        with sqlite3.connect(self.db) as db:
            return db.execute(sql).fetchall()


class Publisher:
    def __init__(self, broker):
        url = urlparse(broker)
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        self.client.connect(url.hostname or "127.0.0.1", url.port or 1883)
        self.client.loop_start()

    def publish_all(self, prefix, readings, rate=None):
        """Publish (machine, payload) pairs at `rate` msg/s (None: as fast as QoS 1 allows); wait for every PUBACK."""
        t0 = time.monotonic()
        infos = []
        for i, (machine, payload) in enumerate(readings):
            if rate:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            infos.append(self.client.publish(f"{prefix}/{machine}/telemetry", json.dumps(payload), qos=1))
        for info in infos:
            info.wait_for_publish(timeout=120)
        return t0, time.monotonic()

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def live_readings(count):
    """`count` readings stamped with the current time; every 7th with a +02:00 offset instead of Z."""
    for seq in range(count):
        now = datetime.now(UTC)
        ts = (
            now.astimezone(PLUS_TWO).isoformat(timespec="microseconds")
            if seq % 7 == 0
            else now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        )
        machine = MACHINES[seq % len(MACHINES)]
        yield machine, {"machine": machine, "ts": ts, "load_rate": 20 + seq % 60, "mileage": seq * 0.1, "seq": seq}


def phase_happy(args, workdir, pub):
    run = Run(args, workdir, "happy")
    t0, t1 = pub.publish_all(run.prefix, live_readings(args.count), rate=args.rate)
    rows, _ = run.wait_stored(args.count)
    rc = run.stop(signal.SIGTERM)
    seqs = run.query("SELECT seq, count(*) FROM readings GROUP BY seq")
    once = sum(1 for _, n in seqs if n == 1)
    twice = sum(1 for _, n in seqs if n > 1)
    missing = args.count - len(seqs)
    agg_total = run.query("SELECT coalesce(sum(count), 0) FROM loading_rate")[0][0]
    agg_rows = run.query("SELECT count(*) FROM loading_rate")[0][0]
    ok = rc == 0 and once == args.count and twice == 0 and missing == 0 and agg_total == args.count
    report(
        "happy",
        ok,
        published=args.count,
        publish_s=round(t1 - t0, 2),
        readings_rows=rows,
        seq_once=once,
        seq_more_than_once=twice,
        seq_missing=missing,
        loading_rate_rows=agg_rows,
        loading_rate_count_sum=agg_total,
        stored_msg_s=run.stored_rate(),
        exit_code=rc,
        command=" ".join(run.cmd),
    )
    return ok


def phase_throughput(args, workdir, pub):
    run = Run(args, workdir, "throughput")
    t0, t1 = pub.publish_all(run.prefix, live_readings(args.burst))
    rows, t_last = run.wait_stored(args.burst)
    rc = run.stop(signal.SIGTERM)
    distinct = run.query("SELECT count(DISTINCT seq) FROM readings")[0][0]
    report(
        "throughput",
        True,
        published=args.burst,
        publish_s=round(t1 - t0, 2),
        publish_msg_s=round(args.burst / (t1 - t0)),
        stored=rows,
        distinct_seq=distinct,
        lost=args.burst - distinct,
        last_stored_after_s=round(t_last - t0, 2),
        stored_msg_s=run.stored_rate(),
        exit_code=rc,
    )
    return True


def phase_kill9(args, workdir, pub, per_minute=50, minutes=3):
    run = Run(args, workdir, "kill9")
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    readings, seq = [], 0
    for step in range(minutes * per_minute):  # time-ordered, machines interleaved
        ts = base + timedelta(minutes=step // per_minute, seconds=(step % per_minute) * 50 / per_minute)
        for machine in MACHINES:
            payload = {
                "machine": machine,
                "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "load_rate": 50.0,
                "mileage": float(step),
                "seq": seq,
            }
            readings.append((machine, payload))
            seq += 1
    pub.publish_all(run.prefix, readings, rate=args.kill9_rate)  # slow enough that the broker drops nothing
    rows, _ = run.wait_stored(len(readings))
    rc = run.stop(signal.SIGKILL)
    agg_rows = run.query("SELECT count(*) FROM loading_rate")[0][0]
    agg_total = run.query("SELECT coalesce(sum(count), 0) FROM loading_rate")[0][0]
    expected_rows = minutes * len(MACHINES)
    report(
        "kill9",
        True,
        published=len(readings),
        readings_rows=rows,
        loading_rate_rows=agg_rows,
        loading_rate_rows_expected=expected_rows,
        loading_rate_rows_lost=expected_rows - agg_rows,
        readings_missing_from_aggregates=len(readings) - agg_total,
        exit_code=rc,
    )
    return True


def report(phase, ok, **figures):
    print(json.dumps({"phase": phase, "ok": ok, **figures}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--phases", default="happy,throughput,kill9")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--burst", type=int, default=20000)
    parser.add_argument("--kill9-rate", type=float, default=60.0, help="msg/s for the kill9 phase")
    parser.add_argument("--python", default=sys.executable, help="interpreter for pipeline.py (needs paho-mqtt)")
    parser.add_argument("--workdir", help="where the SQLite files go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="takehome-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    phases = {"happy": phase_happy, "throughput": phase_throughput, "kill9": phase_kill9}
    pub = Publisher(args.broker)
    ok = True
    try:
        for name in args.phases.split(","):
            ok = phases[name](args, workdir, pub) and ok
    finally:
        pub.close()
        if args.keep or args.workdir:
            print(f"files kept in {workdir}", file=sys.stderr)
        else:
            for f in workdir.iterdir():
                f.unlink()
            os.rmdir(workdir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
