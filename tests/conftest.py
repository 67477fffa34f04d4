"""Shared fixtures: real loopback services, skipped (or failed) when unreachable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


def require_service(name: str, host: str, port: int) -> None:
    """Skip when a service is down, unless BENCH_REQUIRE_SERVICES=1 demands it (CI)."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        reason = f"{name} is not reachable on {host}:{port} ({exc})"
        if os.environ.get("BENCH_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason}; BENCH_REQUIRE_SERVICES=1 requires it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def mosquitto_url() -> str:
    host = os.environ.get("BENCH_MOSQUITTO_HOST", "127.0.0.1")
    port = int(os.environ.get("BENCH_MOSQUITTO_PORT", "1883"))
    require_service("Mosquitto", host, port)
    return f"mqtt://{host}:{port}"


@pytest.fixture
def write_scenario(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a scenario YAML text to a file in the test's folder."""

    def write(text: str, name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def run_module(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` from the project root, as a user runs it: exit code and output captured."""
    return subprocess.run(
        [sys.executable, "-m", *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s
    )


@pytest.fixture
def make_db(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """A SQL sink test database per backend name (tests.test_sql_sink.Db), closed after the test."""
    from tests.test_sql_sink import Db

    made: list[Db] = []

    def make(backend: str) -> Db:
        db = Db(backend, tmp_path)
        made.append(db)
        return db

    yield make
    for db in made:
        db.close()
