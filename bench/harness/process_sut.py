"""The built-in pipeline as a process of its own (``python -m pipeline --config FILE``): a system under test that
process faults can kill and restart for real, read back from its files alone, as a user's pipeline would be.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from bench.errors import ServiceError
from bench.harness.ledger import read_back
from bench.harness.sut import Output, SourceSpec, end_process, log_tail
from pipeline.config import PipelineSettings
from pipeline.errors import PipelineError

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
REPORT_EVERY_S = 0.2
_COUNTERS = re.compile(rb"pipeline: received=(\d+) accepted=(\d+) rejected=(\d+)")


class _Generation:
    """One start of the process: its output lines read by a thread, its stderr in the log."""

    def __init__(self, command: list[str], log: IO[bytes], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env)
        self.ready = threading.Event()
        self.received = 0
        self.stalled = False
        """Its last status line said a sink is failing and it holds rows (``stalled=``)."""
        self.lines: list[bytes] = []
        self._reader = threading.Thread(target=self._read, name="pipeline-process-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines = [*self.lines[-19:], line]
            if line.startswith(b"pipeline: subscribed"):
                self.ready.set()
            elif match := _COUNTERS.search(line):
                self.received = int(match.group(1))
                self.stalled = b" stalled=" in line
        self.ready.set()  # ended: whoever waits for readiness must not wait forever

    def join(self) -> None:
        self._reader.join(5)


class ProcessPipeline:
    """``python -m pipeline`` under the bench's control: started, stopped (SIGTERM), killed (SIGKILL), restarted.

    Every start writes into the same output folder, as a restarted service would; what each start received is
    added up for the drain's progress (a killed start's last count is what it had reported).
    """

    def __init__(self, settings: PipelineSettings, out_dir: Path) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.config_path = out_dir / "pipeline-config.json"
        self.log_path = out_dir / "pipeline.log"
        self.generations: list[_Generation] = []
        self.exit_codes: list[int | None] = []
        self._sources: list[SourceSpec] = []
        self._log: IO[bytes] | None = None

    # -- the protocol ---------------------------------------------------------------------------------------

    def start(self, sources: Sequence[SourceSpec]) -> None:
        (spec,) = sources  # python -m pipeline has one source
        self._sources = list(sources)
        source = spec.settings.model_dump(mode="json", exclude_none=True)
        config = {
            "source": source,
            "output": str(self.out_dir),
            "pipeline": self.settings.model_dump(mode="json", by_alias=True),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        self._spawn()

    def received(self) -> int:
        return sum(g.received for g in self.generations)

    def stalled(self) -> bool | None:
        """Whether it says a sink is failing (its status line); None while it is not running."""
        if not self.alive:
            return None
        return self.generations[-1].stalled

    def stop(self) -> None:
        """SIGTERM: the pipeline flushes, finalises its files and exits; killed if it does not within a minute."""
        self._end(signal.SIGTERM, STOP_TIMEOUT_S)
        self.close_log()

    def kill(self) -> None:
        self._end(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        """Start again on the same config and output folder, as a supervisor restarts a service."""
        if self.settings.sql is not None and self.settings.sql.reset:
            # sql.reset drops the table at start-up: right for the run's first start, a loss of everything the
            # earlier starts wrote on a restart (a service's config would not reset on every restart either).
            config = json.loads(self.config_path.read_text(encoding="utf-8"))
            config["pipeline"]["sql"]["reset"] = False
            self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        self._spawn()

    def read_back(self) -> Output:
        s = self.settings
        back = read_back(self.out_dir / s.parquet.path, self.out_dir / s.quarantine.path, self.out_dir / "dropped")
        return Output(back, durable=[])

    def extras(self) -> dict[str, Any]:
        return {
            "starts": len(self.generations),
            "exit_codes": list(self.exit_codes),
            "sql_back": self._sql_back(),
        }

    def _sql_back(self) -> dict[str, Any] | None:
        """What its SQL table holds, read by the bench after it stopped (checked against the Parquet data)."""
        sql = self.settings.sql
        if sql is None or self.alive:
            return None
        from pipeline.sql_sink import SqlSink

        try:
            # Never reset: reading back must not drop what the pipeline wrote.
            sink = SqlSink(sql.model_copy(update={"reset": False}), self.out_dir)
        except PipelineError as exc:
            raise ServiceError(f"reading back the pipeline's SQL table: {exc}") from None
        try:
            back = sink.read_back()
        finally:
            sink.close()
        # The table is the run's own only if the pipeline dropped and re-created it at its first start.
        back["created_by_run"] = sql.reset
        return back

    # -- process handling -----------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return bool(self.generations) and self.generations[-1].proc.poll() is None

    def _spawn(self) -> None:
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed when the last generation ends
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=package_root + (os.pathsep + path if path else ""))
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "--config",
            str(self.config_path),
            "--report-every",
            str(REPORT_EVERY_S),
        ]
        generation = _Generation(command, self._log, env)
        self.generations.append(generation)
        if not generation.ready.wait(READY_TIMEOUT_S) or generation.proc.poll() is not None:
            tail = b"".join(generation.lines).decode(errors="replace") + self._log_tail()
            self._end(signal.SIGKILL, 5.0)
            raise ServiceError(
                f"the pipeline process did not subscribe within {READY_TIMEOUT_S:g} s "
                f"(exit code {generation.proc.poll()}); log {self.log_path}:\n{tail}"
            )

    def _end(self, how: signal.Signals, timeout_s: float) -> None:
        if not self.generations:
            return
        generation = self.generations[-1]
        proc = generation.proc
        end_process(proc, how, timeout_s)
        generation.join()
        if len(self.exit_codes) < len(self.generations):
            self.exit_codes.append(proc.returncode)

    def _log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log_path, lines)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_until(predicate: Any, timeout_s: float, every_s: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes (a process's state is only observable by polling)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return bool(predicate())
