"""Check and measure the Node.js pipeline (examples/node-jsonl) against a real MQTT broker.

Run with the project's venv (stdlib + paho-mqtt 2):

    .venv/bin/python examples/node-jsonl/check.py [--broker mqtt://127.0.0.1:1883]

What it does, each part on its own topic prefix (node-check/<uuid>/+/telemetry) and output folder:

1. install: deletes node_modules and starts ./run.sh, so `npm ci` runs from scratch (with an empty
   npm cache unless --warm-cache); reports the time to the "subscribed" line.
2. correctness: 3,000 readings at ~500 msg/s from 6 machines (QoS 1) plus 5 malformed payloads,
   then SIGTERM; every seq must be in readings-*.jsonl exactly once (in the file of its ts minute),
   the 5 malformed ones in rejected.jsonl with the expected reason, and the exit code 0.
3. flood: 50,000 readings published as fast as paho can (QoS 1); the time until all are in the
   files (or until no new line for --idle seconds), the drain rate, lines lost, the pipeline's
   peak RSS and CPU time.
4. steps: paced rates (--steps, each for --step-seconds); "keeps up" = every message stored and
   the last one within 1 s of the last publish.
   Flood and steps run against --broker and then (--own-broker, the default) against a private
   Mosquitto on a free loopback port whose queue per client is 1,000,000 instead of Mosquitto's
   default 1,000: that separates the pipeline's own ceiling from the broker's drops.
5. kill -9: a 300 msg/s stream, SIGKILL right after the 2,000th publish is acknowledged by the broker;
   how many of those 2,000 are not in the files, is any file's last line half-written, is
   progress.json readable. Repeated --kill-trials times.
6. kill -9 mid-flood: the same checks for a SIGKILL while lines are written at full speed
   (--kill-flood-trials times).

Exit code 0 when the correctness part passes (the measurements are reported, not judged).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

HERE = Path(__file__).resolve().parent
RUN_SH = HERE / "run.sh"
MACHINES = [f"m-{i:02d}" for i in range(1, 7)]
TS0 = datetime(2026, 1, 1, tzinfo=UTC)
READY = re.compile(r"^node-pipeline: subscribed to (.+)$")


def ts_of(seq: int) -> str:
    """100 ms apart, microsecond digits: 3,000 readings span 5 minutes (5 files)."""
    return (TS0 + timedelta(microseconds=seq * 100_000 + 456)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def reading(seq: int) -> tuple[str, bytes]:
    machine = MACHINES[seq % len(MACHINES)]
    body = {
        "machine": machine,
        "ts": ts_of(seq),
        "load_rate": round(40 + (seq * 7919 % 1000) / 100, 2),
        "mileage": round(1000 + seq * 0.5, 3),
        "seq": seq,
    }
    return machine, json.dumps(body, separators=(",", ":")).encode()


MALFORMED: list[tuple[str, bytes]] = [
    ("invalid_json", b'{"machine":"m-01","ts":"2026-01-01T00:00:00.000001Z","load_rate":'),
    ("invalid_json", b"not json at all"),
    ("missing_field", b'{"ts":"2026-01-01T00:00:00.000002Z","load_rate":1.5,"seq":-3}'),
    ("missing_field", b'{"machine":"m-02","load_rate":1.5,"seq":-4}'),
    ("bad_value", b'{"machine":"m-03","ts":"2026-01-01T00:00:00.000005Z","load_rate":"NaN","seq":-5}'),
]


# --------------------------------------------------------------------------- the pipeline process


class Pipeline:
    """./run.sh as a child process; waits for its ready line."""

    def __init__(self, broker: str, topic: str, out: Path, env: dict[str, str] | None = None) -> None:
        self.out = out
        self.topic = topic
        self.stderr_path = out.parent / f"{out.name}.stderr.log"
        self._stderr = self.stderr_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(RUN_SH), "--broker", broker, "--topic", topic, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, **(env or {})},
        )
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.stdout_lines.append(line)
            m = READY.match(line)
            if m and m.group(1) == self.topic:
                self._ready.set()

    def wait_ready(self, timeout: float) -> float:
        if not self._ready.wait(timeout):
            self.proc.kill()
            raise SystemExit(
                f"pipeline not ready after {timeout:.0f} s; stdout={self.stdout_lines!r}; "
                f"stderr={self.stderr_path.read_text(errors='replace')[-2000:]!r}"
            )
        return time.monotonic() - self.started

    def peak_rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_seconds(self) -> float | None:
        """user + system CPU time the node process has used so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._stderr.close()
        return rc


# --------------------------------------------------------------------------- publisher


class Publisher:
    def __init__(self, broker: str) -> None:
        url = urlsplit(broker)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"node-check-pub-{uuid.uuid4().hex[:8]}", clean_session=True
        )
        self.client.max_inflight_messages_set(0)  # unlimited; our bursts stay under paho's 65,535 ids
        self.client.max_queued_messages_set(0)
        self.client.connect(url.hostname or "127.0.0.1", url.port or 1883)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise SystemExit(f"publisher could not connect to {broker}")
            time.sleep(0.01)

    def publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise SystemExit(f"publish refused: {mqtt.error_string(info.rc)}")
        return info

    def wait_all(self, infos: list[mqtt.MQTTMessageInfo], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise SystemExit("publisher: not all publishes acknowledged by the broker")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def paced(count: int, rate: float) -> Iterator[int]:
    """Yield 0..count-1, each at its intended time t0 + i/rate (catching up if late)."""
    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i


# --------------------------------------------------------------------------- reading the output back


def reading_files(out: Path) -> list[Path]:
    return sorted(out.glob("readings-*.jsonl"))


class LineCounter:
    """Counts complete lines in readings-*.jsonl incrementally (for polling while it runs)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.offsets: dict[Path, int] = {}
        self.lines = 0

    def poll(self) -> int:
        for f in reading_files(self.out):
            start = self.offsets.get(f, 0)
            with f.open("rb") as fh:
                fh.seek(start)
                chunk = fh.read()
            # only count up to the last newline: a partial line is counted when it completes
            end = chunk.rfind(b"\n") + 1
            self.lines += chunk.count(b"\n", 0, end)
            self.offsets[f] = start + end
        return self.lines


def read_back(out: Path) -> dict[str, Any]:
    seqs: Counter[int] = Counter()
    wrong_file: list[int] = []
    bad_lines: list[str] = []
    half_written: list[str] = []
    for f in reading_files(out):
        data = f.read_bytes()
        if data and not data.endswith(b"\n"):
            tail = data[data.rfind(b"\n") + 1 :]
            half_written.append(f"{f.name}: last line has no newline: {tail[:80]!r}")
        for line in data.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                bad_lines.append(f"{f.name}: {line[:80]!r}")
                continue
            seqs[row["seq"]] += 1
            minute = row["ts"][:16].replace("-", "").replace(":", "")
            if f.name != f"readings-{minute}.jsonl":
                wrong_file.append(row["seq"])
            if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row.get("received_at", "")):
                bad_lines.append(f"{f.name}: received_at {row.get('received_at')!r}")
    rejected = []
    rej = out / "rejected.jsonl"
    if rej.exists():
        rejected = [json.loads(line) for line in rej.read_bytes().splitlines()]
    # b"(no file)": never written (it is written 1 s after the start); b"": caught empty (truncated, not yet rewritten)
    progress_raw = (out / "progress.json").read_bytes() if (out / "progress.json").exists() else b"(no file)"
    try:
        progress = json.loads(progress_raw)
    except ValueError:
        progress = None
    return {
        "seqs": seqs,
        "files": [f.name for f in reading_files(out)],
        "wrong_file": wrong_file,
        "bad_lines": bad_lines,
        "half_written": half_written,
        "rejected": rejected,
        "progress": progress,
        "progress_raw": progress_raw,
    }


def ranges(values: list[int]) -> str:
    values = sorted(values)
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out) if out else "none"


# --------------------------------------------------------------------------- the parts


def new_topic() -> tuple[str, str]:
    prefix = f"node-check/{uuid.uuid4()}"
    return prefix, f"{prefix}/+/telemetry"


def part_install(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    shutil.rmtree(HERE / "node_modules", ignore_errors=True)
    env = {}
    cache = None
    if not args.warm_cache:
        cache = tempfile.mkdtemp(prefix="npm-cache-")
        env["npm_config_cache"] = cache
    _, topic = new_topic()
    p = Pipeline(args.broker, topic, work / "install", env)
    ready_s = p.wait_ready(timeout=300)
    rc = p.stop()
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    ok = (HERE / "node_modules" / "mqtt").is_dir() and rc == 0
    print(
        f"[install] run.sh with no node_modules ({'empty' if cache else 'warm'} npm cache): "
        f"subscribed after {ready_s:.2f} s (npm ci + start); exit {rc}; {'ok' if ok else 'FAILED'}"
    )
    # the start alone, with node_modules present
    _, topic = new_topic()
    p = Pipeline(args.broker, topic, work / "install2")
    start_s = p.wait_ready(timeout=60)
    p.stop()
    print(f"[install] run.sh with node_modules present: subscribed after {start_s:.2f} s")
    return {"ok": ok, "ready_s_with_npm_ci": ready_s, "ready_s_installed": start_s, "cold_cache": cache is not None}


def part_correctness(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    prefix, topic = new_topic()
    out = work / "correctness"
    p = Pipeline(args.broker, topic, out)
    p.wait_ready(timeout=60)
    pub = Publisher(args.broker)
    n = 3000
    inject_at = {500 + 500 * i: m for i, m in enumerate(MALFORMED)}  # at 500, 1000, ... 2500
    infos = []
    t0 = time.monotonic()
    for i in paced(n, args.rate):
        if i in inject_at:
            infos.append(pub.publish(f"{prefix}/m-0{1 + i % 6}/telemetry", inject_at[i][1]))
        machine, payload = reading(i)
        infos.append(pub.publish(f"{prefix}/{machine}/telemetry", payload))
    pub.wait_all(infos)
    send_s = time.monotonic() - t0
    pub.close()
    counter = LineCounter(out)
    deadline = time.monotonic() + 30
    while counter.poll() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    rc = p.stop(signal.SIGTERM)
    r = read_back(out)
    seqs = r["seqs"]
    missing = [s for s in range(n) if seqs[s] == 0]
    dups = [s for s, c in seqs.items() if c > 1]
    extra = [s for s in seqs if not 0 <= s < n]
    want = Counter((reason, payload.decode()) for reason, payload in MALFORMED)
    got = Counter((x["reason"], x["payload"]) for x in r["rejected"])
    rejected_ok = want == got
    progress = r["progress"] or {}
    progress_ok = progress.get("received") == n + 5 and progress.get("accepted") == n and progress.get("rejected") == 5
    problems = []
    if rc != 0:
        problems.append(f"exit code {rc} after SIGTERM")
    if missing:
        problems.append(f"missing seqs: {ranges(missing)}")
    if dups:
        problems.append(f"duplicated seqs: {ranges(dups)}")
    if extra:
        problems.append(f"unexpected seqs: {ranges(extra)}")
    if r["wrong_file"]:
        problems.append(f"{len(r['wrong_file'])} rows in the wrong minute file")
    if r["bad_lines"] or r["half_written"]:
        problems.append(f"bad lines: {(r['bad_lines'] + r['half_written'])[:5]}")
    if not rejected_ok:
        problems.append(f"rejected.jsonl: expected {sorted(want)}, got {sorted(got)}")
    if not progress_ok:
        problems.append(f"progress.json after SIGTERM: {r['progress_raw']!r}")
    ok = not problems
    print(
        f"[correctness] {n} readings + 5 malformed at {args.rate:.0f} msg/s (sent in {send_s:.1f} s, "
        f"{(n + 5) / send_s:.0f} msg/s): {sum(seqs.values())} lines in {len(r['files'])} files "
        f"({', '.join(r['files'])}), {len(r['rejected'])} rejected "
        f"({', '.join(f'{k}={v}' for k, v in sorted(Counter(x['reason'] for x in r['rejected']).items()))}), "
        f"exit {rc}: {'ok, every seq exactly once' if ok else 'FAILED'}"
    )
    for problem in problems:
        print(f"[correctness]   {problem}")
    return {"ok": ok, "problems": problems, "send_s": send_s}


class BrokerLog:
    """New "Outgoing messages are being dropped" lines in a Mosquitto log since construction (if readable)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        try:
            self.start = path.stat().st_size if path else 0
        except OSError:
            self.path = None

    def drops(self) -> list[str] | None:
        if self.path is None:
            return None
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.start)
                text = fh.read().decode(errors="replace")
        except OSError:
            return None
        return [line for line in text.splitlines() if "being dropped" in line]


def part_flood(args: argparse.Namespace, work: Path, broker: str, label: str, log: Path | None) -> dict[str, Any]:
    prefix, topic = new_topic()
    out = work / f"flood-{label}"
    p = Pipeline(broker, topic, out)
    p.wait_ready(timeout=60)
    broker_log = BrokerLog(log)
    cpu0 = p.cpu_seconds()
    pub = Publisher(broker)
    n = args.flood
    payloads = [(f"{prefix}/{m}/telemetry", pl) for m, pl in (reading(i) for i in range(n))]
    counter = LineCounter(out)
    samples: list[tuple[float, int]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            samples.append((time.monotonic() - t0, counter.poll()))
            time.sleep(0.05)

    t0 = time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    infos = [pub.publish(t, pl) for t, pl in payloads]
    handed_s = time.monotonic() - t0
    pub.wait_all(infos, timeout=300)
    acked_s = time.monotonic() - t0
    pub.close()
    # wait until all are in the files, or no new line for --idle seconds
    last_change, last = time.monotonic(), -1
    while True:
        lines = samples[-1][1] if samples else 0
        if lines != last:
            last, last_change = lines, time.monotonic()
        if lines >= n or time.monotonic() - last_change > args.idle:
            break
        time.sleep(0.05)
    stop_sampling.set()
    sampler.join()
    lines_final = samples[-1][1]
    first_full = next((t for t, c in samples if c >= lines_final), samples[-1][0])
    peak_rss = p.peak_rss_mib()
    cpu1 = p.cpu_seconds()
    cpu_s = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else float("nan")
    rc = p.stop(signal.SIGTERM)
    r = read_back(out)
    seqs = r["seqs"]
    stored = len(seqs)
    missing = [s for s in range(n) if seqs[s] == 0]
    dups = sum(c - 1 for c in seqs.values() if c > 1)
    progress = r["progress"] or {}
    drain_rate = lines_final / first_full if first_full else float("nan")
    # the steadiest stretch: lines/s between 10% and 90% of what was stored
    lo = next((t, c) for t, c in samples if c >= 0.1 * lines_final)
    hi = next((t, c) for t, c in samples if c >= 0.9 * lines_final)
    mid_rate = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else float("nan")
    print(
        f"[flood {label}] {n} published as fast as possible (QoS 1): handed to paho in {handed_s:.2f} s, "
        f"all acknowledged by the broker after {acked_s:.2f} s ({n / acked_s:.0f} msg/s offered)"
    )
    print(
        f"[flood {label}]   pipeline: {lines_final} lines in the files after {first_full:.2f} s "
        f"({drain_rate:.0f} lines/s overall, {mid_rate:.0f} lines/s between 10% and 90%); "
        f"received {progress.get('received')} (progress.json after SIGTERM); "
        f"missing {len(missing)} ({ranges(missing)[:120]}...); duplicates {dups}; peak RSS {peak_rss:.0f} MiB; "
        f"node CPU {cpu_s:.2f} s ({cpu_s / max(lines_final, 1) * 1e6:.0f} us per stored line); exit {rc}"
    )
    drops = broker_log.drops()
    if missing and progress.get("received") is not None:
        print(
            f"[flood {label}]   {n - progress['received']} never reached the pipeline: dropped by the broker, "
            f"which queues at most max_queued_messages for a subscriber that falls behind"
            + (f"; its log says: {drops[0].split(': ', 1)[-1]}" if drops else "")
        )
    return {
        "n": n,
        "acked_s": acked_s,
        "lines": lines_final,
        "all_in_files_s": first_full,
        "drain_rate": drain_rate,
        "mid_rate": mid_rate,
        "received": progress.get("received"),
        "missing": len(missing),
        "duplicates": dups,
        "stored_distinct": stored,
        "peak_rss_mib": peak_rss,
        "cpu_s": cpu_s,
        "broker_log_drop_lines": drops,
    }


def part_kill_flood(args: argparse.Namespace, work: Path, trial: int) -> dict[str, Any]:
    """SIGKILL in the middle of a flood: are lines torn? (a write(2) of many pages can stop short on SIGKILL)"""
    prefix, topic = new_topic()
    out = work / f"kill-flood-{trial}"
    p = Pipeline(args.broker, topic, out)
    p.wait_ready(timeout=60)
    pub = Publisher(args.broker)
    counter = LineCounter(out)
    n = 30_000
    payloads = [(f"{prefix}/{m}/telemetry", pl) for m, pl in (reading(i) for i in range(n))]
    infos: list[mqtt.MQTTMessageInfo] = []
    # publish from another thread, so that this one watches the files while the flood is on
    sender = threading.Thread(target=lambda: infos.extend(pub.publish(t, pl) for t, pl in payloads), daemon=True)
    sender.start()
    target = 2_000 * trial
    deadline = time.monotonic() + 10
    while counter.poll() < target and time.monotonic() < deadline:
        time.sleep(0.001)
    p.proc.send_signal(signal.SIGKILL)
    seen = counter.lines
    rc = p.stop()
    sender.join()
    pub.wait_all(infos)
    pub.close()
    r = read_back(out)
    print(
        f"[kill -9 mid-flood #{trial}] SIGKILL once {seen} lines were seen in the files ({n}-message flood): "
        f"{sum(r['seqs'].values())} lines after; half-written last line: {'; '.join(r['half_written']) or 'none'}; "
        f"unparsable lines: {len(r['bad_lines'])}; progress.json: {r['progress_raw'][:100]!r}"
    )
    return {
        "lines": sum(r["seqs"].values()),
        "half_written": r["half_written"],
        "bad_lines": r["bad_lines"][:5],
        "progress_raw": r["progress_raw"][:120],
        "exit": rc,
    }


def part_kill(args: argparse.Namespace, work: Path, trial: int) -> dict[str, Any]:
    prefix, topic = new_topic()
    out = work / f"kill-{trial}"
    p = Pipeline(args.broker, topic, out)
    p.wait_ready(timeout=60)
    pub = Publisher(args.broker)
    n = args.kill_after
    info = None
    for i in paced(n, args.kill_rate):
        machine, payload = reading(i)
        info = pub.publish(f"{prefix}/{machine}/telemetry", payload)
    assert info is not None
    info.wait_for_publish(5)  # the broker has the 2,000th
    p.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    rc = p.stop()
    pub.close()
    r = read_back(out)
    seqs = r["seqs"]
    missing = [s for s in range(n) if seqs[s] == 0]
    progress = r["progress"]
    age = None
    if progress:
        updated = datetime.fromisoformat(progress["updated_at"].replace("Z", "+00:00"))
        age = (datetime.now(UTC) - updated).total_seconds()
    result = {
        "missing": len(missing),
        "missing_seqs": ranges(missing),
        "half_written": r["half_written"],
        "bad_lines": r["bad_lines"],
        "duplicates": sum(c - 1 for c in seqs.values() if c > 1),
        "progress": progress,
        "progress_raw": r["progress_raw"][:120],
        "exit": rc,
    }
    print(
        f"[kill -9 #{trial}] {n} at {args.kill_rate:.0f} msg/s, SIGKILL after the broker acked #{n}: "
        f"{len(seqs)} stored, missing {len(missing)} ({ranges(missing)}); "
        f"half-written last line: {'; '.join(r['half_written']) or 'none'}; unparsable lines: {len(r['bad_lines'])}; "
        f"progress.json: {json.dumps(progress) if progress else repr(r['progress_raw'][:80])}"
        + (f" (written {age - (time.monotonic() - killed_at):.2f} s before the kill)" if age is not None else "")
    )
    return result


class OwnMosquitto:
    """A private Mosquitto on a free loopback port that queues up to 1,000,000 messages per client (the machine's
    own broker keeps Mosquitto's default of 1,000 and drops the rest), to see the pipeline's own ceiling."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
        )
        if binary is None:
            raise FileNotFoundError("mosquitto")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
            "persistence false\nmax_queued_messages 1000000\nmax_queued_bytes 0\n"
            f"log_dest file {folder / 'mosquitto.log'}\n"
        )
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("own mosquitto did not start") from None
                time.sleep(0.05)
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.log = folder / "mosquitto.log"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _sample_backlog(counter: LineCounter, sent: list[int], max_backlog: list[int], done: threading.Event) -> None:
    while not done.is_set():
        max_backlog[0] = max(max_backlog[0], sent[0] - counter.poll())
        time.sleep(0.05)


def part_steps(args: argparse.Namespace, work: Path, broker: str, label: str) -> list[dict[str, Any]]:
    """Paced rates, each for --step-seconds: does it keep up (all stored, drained within 1 s of the last publish)?"""
    results = []
    for rate in args.steps:
        prefix, topic = new_topic()
        out = work / f"step-{label}-{rate:g}"
        p = Pipeline(broker, topic, out)
        p.wait_ready(timeout=60)
        pub = Publisher(broker)
        n = int(rate * args.step_seconds)
        counter = LineCounter(out)
        sent = [0]
        max_backlog = [0]
        done = threading.Event()
        sampler = threading.Thread(target=_sample_backlog, args=(counter, sent, max_backlog, done), daemon=True)
        sampler.start()
        t0 = time.monotonic()
        infos = []
        for i in paced(n, rate):
            machine, payload = reading(i)
            infos.append(pub.publish(f"{prefix}/{machine}/telemetry", payload))
            sent[0] = i + 1
        send_s = time.monotonic() - t0
        last_publish = time.monotonic()
        pub.wait_all(infos)
        pub.close()
        last, last_change = -1, time.monotonic()
        while True:
            lines = counter.lines
            if lines != last:
                last, last_change = lines, time.monotonic()
            if lines >= n or time.monotonic() - last_change > 3:
                break
            time.sleep(0.02)
        drained_s = last_change - last_publish
        done.set()
        sampler.join()
        p.stop()
        lines = counter.poll()
        kept_up = lines == n and drained_s <= 1.0
        results.append(
            {
                "rate": rate,
                "achieved_rate": n / send_s,
                "n": n,
                "stored": lines,
                "drain_after_last_publish_s": drained_s,
                "max_backlog": max_backlog[0],
                "kept_up": kept_up,
            }
        )
        print(
            f"[step {label} {rate:g} msg/s] {n} sent at {n / send_s:.0f} msg/s: {lines} stored "
            f"({n - lines} lost), max backlog {max_backlog[0]} messages, all in {drained_s:.2f} s after the last "
            f"publish: {'keeps up' if kept_up else 'does NOT keep up'}"
        )
    return results


def _jsonable(o: object) -> str:
    return o.decode(errors="replace") if isinstance(o, bytes) else str(o)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument(
        "--broker-log",
        type=Path,
        default=Path("/var/log/mosquitto/mosquitto.log"),
        help="the given broker's log, read (if readable) for its drop notices",
    )
    ap.add_argument("--work", type=Path, help="where the output folders go (default: a temp folder, kept)")
    ap.add_argument("--skip-install", action="store_true", help="keep node_modules (no npm ci timing)")
    ap.add_argument("--warm-cache", action="store_true", help="npm ci with the user's npm cache, not an empty one")
    ap.add_argument("--rate", type=float, default=500.0, help="correctness stream rate (msg/s)")
    ap.add_argument("--flood", type=int, default=50_000, help="flood size (0: skip)")
    ap.add_argument(
        "--own-broker",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the flood and the steps against a private Mosquitto with a 1,000,000-message queue",
    )
    ap.add_argument(
        "--steps",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[1000, 2000, 4000, 6000, 8000],
        help="paced rates (msg/s) for the keeps-up sweep, comma-separated ('' to skip)",
    )
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--idle", type=float, default=10.0, help="flood: give up after this long without a new line (s)")
    ap.add_argument("--kill-after", type=int, default=2000)
    ap.add_argument("--kill-rate", type=float, default=300.0)
    ap.add_argument("--kill-trials", type=int, default=3, help="kill -9 trials (0: skip)")
    ap.add_argument("--kill-flood-trials", type=int, default=3, help="kill -9 in the middle of a flood (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="node-jsonl-check-"))
    work.mkdir(parents=True, exist_ok=True)
    node = subprocess.run(["node", "--version"], check=False, capture_output=True, text=True).stdout.strip()
    print(f"output folders under {work}; broker {args.broker}; node {node}")
    results: dict[str, Any] = {}
    if not args.skip_install:
        results["install"] = part_install(args, work)
    elif not (HERE / "node_modules").is_dir():
        print("[install] node_modules missing: run.sh will install it on the first start")
    results["correctness"] = part_correctness(args, work)
    if args.flood:
        results["flood"] = {"given_broker": part_flood(args, work, args.broker, "given-broker", args.broker_log)}
    if args.steps:
        results["steps"] = {"given_broker": part_steps(args, work, args.broker, "given-broker")}
    if args.own_broker and (args.flood or args.steps):
        try:
            own = OwnMosquitto(work / "own-mosquitto")
        except FileNotFoundError:
            print("[own-broker] skipped: mosquitto is not installed")
        else:
            try:
                if args.flood:
                    results["flood"]["own_broker"] = part_flood(args, work, own.url, "own-broker", own.log)
                if args.steps:
                    results["steps"]["own_broker"] = part_steps(args, work, own.url, "own-broker")
            finally:
                own.close()
    results["kill"] = [part_kill(args, work, t) for t in range(1, args.kill_trials + 1)]
    results["kill_flood"] = [part_kill_flood(args, work, t) for t in range(1, args.kill_flood_trials + 1)]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=_jsonable))
    ok = results["correctness"]["ok"] and results.get("install", {"ok": True})["ok"]
    print("check:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
