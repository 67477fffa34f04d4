"""A store-and-forward pipeline of the external contract, small on purpose: reads JSON lines from stdin, posts
each to ``{upstream}/ingest`` with an idempotency key, retries until acknowledged, exits at end of input.

``--stall-after N``: on its first run (no ``stalled`` marker in ``--dir``), stop reading stdin after N lines and
sleep, so a kill finds lines it never read in the pipe; started again, it reads normally. ``--no-key``: post
without a key.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def post(host: str, port: int, record: dict[str, object]) -> None:
    while True:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("POST", "/ingest", json.dumps({"records": [record]}).encode())
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass  # down or no answer: try again
        finally:
            conn.close()
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--stall-after", type=int, default=0)
    parser.add_argument("--no-key", action="store_true")
    args = parser.parse_args()
    parts = urlsplit(args.upstream)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    marker = args.dir / "stalled"
    stall = args.stall_after if args.stall_after and not marker.exists() else 0
    print("stub: ready", flush=True)
    taken = 0
    # Unbuffered (one read per byte): it never takes a line from the pipe before it handles it.
    raw = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115 - stdin, not closed
    while line := raw.readline():
        body = json.loads(line)
        values = [body.get("load_rate"), body.get("mileage")]
        if not all(isinstance(v, float | int) and math.isfinite(v) for v in values):
            continue  # its filter: a NaN (json.loads reads it as a float) or a missing number
        record = {"machine": body["machine"], "seq": body["seq"], "body": body}
        if not args.no_key:
            record["key"] = f"{body['machine']}:{body['seq']}"
        post(host, port, record)
        taken += 1
        if stall and taken >= stall:
            marker.touch()
            time.sleep(3600)  # stalled: what is written from now on stays in the pipe until the kill
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
