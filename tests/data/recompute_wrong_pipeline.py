"""A deliberately wrong recompute pipeline (an external one, standard library only) for the oracle to catch.

It keeps each machine's series append-only: a reading whose timestamp is behind the machine's newest one (a late
reading, which should change every point after it) is dropped, so its series misses the late readings'
corrections. Everything else follows the contract in docs/recompute.md: JSON readings on stdin, ``GET /status``
with ``seq_through``, ``GET /series``. Usage: ``python recompute_wrong_pipeline.py PORT``; exits when stdin closes.
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NS_PER_HOUR = 3_600_000_000_000
lock = threading.Lock()
series: dict[str, list[list[Any]]] = {}
state = {"seq_through": None}


def ts_ns(text: str) -> int:
    delta = datetime.fromisoformat(text).astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        with lock:
            if self.path.startswith("/status"):
                body: dict[str, Any] = {"seq_through": state["seq_through"]}
            elif self.path.startswith("/series"):
                body = {"series": {m: list(points) for m, points in series.items()}}
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("wrong pipeline ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        r = json.loads(line)
        t, machine = ts_ns(r["ts"]), r["machine"]
        with lock:
            points = series.setdefault(machine, [])
            if not points:
                points.append([t, r["seq"], r["load_rate"], 0.0])
            elif t >= points[-1][0]:  # the mistake: a late reading (t behind the newest) is dropped
                energy = points[-1][3] + r["load_rate"] * (t - points[-1][0]) / NS_PER_HOUR
                points.append([t, r["seq"], r["load_rate"], energy])
            state["seq_through"] = r["seq"]
    server.shutdown()


if __name__ == "__main__":
    main()
