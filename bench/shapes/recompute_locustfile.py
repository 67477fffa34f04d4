"""Readers of the recompute shape's read API: locust ``HttpUser``s, run headless in a subprocess.

``bench/shapes/recompute_readers.py`` starts it as ``python -m locust -f <this file> --headless ...``; never import
it into the bench's process (locust monkey-patches the standard library for gevent on import).

Each user picks ``GET /series?machine=<one of --machines>`` or ``GET /status`` at random (equally often), pausing
``--wait-s`` between requests. Latency is recorded here, per request, from locust's ``request`` event into
:class:`pipeline.probes.Recorder` (HdrHistogram counts in ns) and written as JSON to ``--latency-out`` when locust
quits: the bench merges those counts and summarises them the way it summarises every other latency (same
percentiles, same precision). Locust's own --json / --csv figures were not used: its percentiles are rounded
(response times above 100 ms are kept to two significant digits) and their layout changes between versions.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task

from pipeline.probes import Recorder

_latency: dict[str, Recorder] = {}
_failures: dict[str, int] = {}
_errors: list[str] = []
_window: dict[str, float] = {}


def _arguments(parser: Any) -> None:
    parser.add_argument("--machines", default="", help="comma-separated machine ids for GET /series?machine=ID")
    parser.add_argument("--wait-s", type=float, default=0.05, help="each user's pause between two requests")
    parser.add_argument("--latency-out", default="", help="JSON file the latency counts are written to at quit")
    parser.add_argument("--ready-file", default="", help="file written once every user is spawned")


def _on_request(name: str, response_time: float, exception: BaseException | None, **_: Any) -> None:
    _latency.setdefault(name, Recorder()).record_ns(round(response_time * 1e6))
    if exception is not None:
        _failures[name] = _failures.get(name, 0) + 1
        if len(_errors) < 5:
            _errors.append(f"{name}: {exception}")


def _on_spawned(user_count: int, **_: Any) -> None:
    # The readers' window starts when they all run: requests before it were the ramp, few and counted anyway.
    _window.setdefault("start", time.monotonic())
    ready = _options().ready_file
    if ready:
        Path(ready).write_text(str(user_count))


def _on_quitting(**_: Any) -> None:
    _window["stop"] = time.monotonic()
    out = _options().latency_out
    if not out:
        return
    body = {
        "duration_s": _window["stop"] - _window.get("start", _window["stop"]),
        "latency": {name: rec.to_json() for name, rec in _latency.items()},
        "failures": _failures,
        "errors": _errors,
    }
    tmp = Path(out + ".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(out)  # whole or absent: the bench never reads half a file


def _options() -> Any:
    return _ENV["env"].parsed_options


_ENV: dict[str, Any] = {}
"""The running locust environment (its init event hands it over; the other events do not carry it)."""


def _on_init(environment: Any, **_: Any) -> None:
    _ENV["env"] = environment


def _listen(hook: Any, handler: Callable[..., None]) -> None:
    hook.add_listener(handler)  # locust's EventHook is untyped


_listen(events.init_command_line_parser, _arguments)
_listen(events.request, _on_request)
_listen(events.spawning_complete, _on_spawned)
_listen(events.quitting, _on_quitting)
_listen(events.init, _on_init)


class ApiReader(HttpUser):
    """One reader: a machine's series or the status, at random, over one keep-alive session."""

    def wait_time(self) -> float:
        return float(self.environment.parsed_options.wait_s)

    def on_start(self) -> None:
        machines = [m for m in self.environment.parsed_options.machines.split(",") if m]
        self.machines = machines or [""]

    @task
    def series(self) -> None:
        machine = random.choice(self.machines)
        # One name for all machines: the figures are per kind of request, not per machine.
        self.client.get(f"/series?machine={machine}", name="/series?machine")

    @task
    def status(self) -> None:
        self.client.get("/status", name="/status")
