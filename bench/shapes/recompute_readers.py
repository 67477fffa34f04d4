"""Concurrent readers of a recompute pipeline's read API: locust headless in a subprocess.

Locust monkey-patches the standard library for gevent when imported, so it never enters the bench's process: it
runs as ``python -m locust -f bench/shapes/recompute_locustfile.py --headless ...`` (as ``bench load`` runs its
own locust), writes its latency counts to a JSON file when it quits, and this module reads them back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pipeline.probes import Recorder

LOCUSTFILE = Path(__file__).with_name("recompute_locustfile.py")
START_TIMEOUT_S = 60.0
"""From starting locust to every user spawned (importing locust and gevent takes a second or two, more on a busy
machine)."""
STOP_TIMEOUT_S = 30.0


class Readers:
    """``users`` locust ``HttpUser``s reading ``url`` from :meth:`start` to :meth:`stop`."""

    def __init__(self, url: str, machines: Sequence[str], users: int, wait_s: float, folder: Path) -> None:
        self.url, self.machines, self.users, self.wait_s = url, list(machines), users, wait_s
        self.folder = folder.resolve()
        self.out = self.folder / "readers-latency.json"
        self.ready_file = self.folder / "readers.ready"
        self.log_path = self.folder / "locust-readers.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.errors: list[str] = []

    def start(self, safety_s: float) -> bool:
        """Start locust and wait until every user runs; False (and a line in :attr:`errors`) when it does not.

        ``safety_s``: its --run-time, so a locust the bench never stops (the bench was killed) ends on its own."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in (self.out, self.ready_file):
            stale.unlink(missing_ok=True)
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=package_root + (os.pathsep + path if path else ""))
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--host",
            self.url,
            "--users",
            str(self.users),
            "--spawn-rate",
            str(max(self.users, 1) * 10),  # all of them at once: the window is the variant's, not a ramp
            "--run-time",
            f"{max(1, round(safety_s))}s",
            "--only-summary",
            "--loglevel",
            "WARNING",
            "--machines",
            ",".join(self.machines),
            "--wait-s",
            repr(self.wait_s),
            "--latency-out",
            str(self.out),
            "--ready-file",
            str(self.ready_file),
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self._log.write((" ".join(command) + "\n\n").encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            command, cwd=self.folder, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                self.errors.append(
                    f"readers: locust exited with code {self.proc.returncode} as it started; {self._tail()}"
                )
                return False
            if time.monotonic() > deadline:
                self.errors.append(
                    f"readers: locust did not spawn its users within {START_TIMEOUT_S:g} s; {self._tail()}"
                )
                self.stop()
                return False
            time.sleep(0.05)  # polling for a file another process writes
        return True

    def stop(self) -> dict[str, Any] | None:
        """Stop locust (SIGTERM: it runs its quit hooks, which write the latency file) and summarise; None when
        it wrote nothing."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child, by its handle
                proc.wait(5)
                self.errors.append(f"readers: locust did not stop within {STOP_TIMEOUT_S:g} s of SIGTERM; killed it")
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None
        try:
            body = json.loads(self.out.read_text())
        except (OSError, ValueError) as exc:
            self.errors.append(f"readers: no latency from locust ({exc}); {self._tail()}")
            return None
        return summarise(body, self.users, self.wait_s)

    def _tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no {self.log_path}"
        return f"see {self.log_path}: " + " | ".join(line.strip() for line in text if line.strip())


def summarise(body: dict[str, Any], users: int, wait_s: float) -> dict[str, Any]:
    """The ``readers`` part of a recompute result from the locustfile's JSON."""
    total = Recorder()
    by_request: dict[str, Any] = {}
    for name, counts in sorted(body["latency"].items()):
        rec = Recorder.from_json(counts)
        total.merge(rec)
        by_request[name] = rec.summary()
    failures = sum(int(n) for n in body["failures"].values())
    duration = float(body["duration_s"])
    return {
        "users": users,
        "wait_ms": wait_s * 1000,
        "duration_s": duration,
        "requests": total.count,
        "failures": failures,
        "requests_per_s": total.count / duration if duration > 0 else 0.0,
        "latency_ms": total.summary(ladder=True),
        "by_request": by_request,
    }
