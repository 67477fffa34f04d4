"""Processes of a capacity step: the pipeline as N worker processes (a system under test), and publishers.

Each child is ``python -m <module> CONFIG.json`` speaking JSON lines on stdout (``ready``, progress counters,
``done``), its stderr in a log file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from bench.errors import ServiceError
from bench.harness.external_sut import ExternalPipeline
from bench.harness.ledger import ReadBack, durable_rows, read_back
from bench.harness.sut import NO_SINK_FAULT, Output, SinkFault, SourceSpec, log_tail
from pipeline.config import MqttSourceSettings, PipelineSettings
from pipeline.model import FlushStat

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 120.0


class Child:
    """A worker process speaking JSON lines on stdout; its stderr goes to a log file."""

    def __init__(self, module: str, config: dict[str, Any], config_path: Path, log_path: Path) -> None:
        config_path.write_text(json.dumps(config), encoding="utf-8")
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self.latest: dict[str, Any] = {}
        self.events: dict[str, threading.Event] = {"ready": threading.Event(), "done": threading.Event()}
        self.error: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"{module}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if "error" in msg:
                self.error = str(msg["error"])
            for key, event in self.events.items():
                if msg.get(key):
                    event.set()
            self.latest = {**self.latest, **msg}
        # EOF: the process ended; whoever waits on an event must not wait forever.
        for event in self.events.values():
            event.set()

    def wait_for(self, what: str, timeout_s: float, role: str) -> None:
        if not self.events[what].wait(timeout_s) or self.error or not self.latest.get(what):
            why = self.error or f"no '{what}' within {timeout_s:g} s (exit code {self.proc.poll()})"
            raise ServiceError(f"{role} failed: {why}; log: {self.log_path}\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log_path, lines)

    def send(self, line: str) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        if stdin is None or self.proc.poll() is not None:
            return
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float) -> None:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        self._log.close()


class WorkerPipelines:
    """The built-in pipeline as N worker processes (:mod:`bench.capacity.pipeline_worker`) sharing one
    subscription: a system under test in processes of its own, so its CPU and memory are its own.

    ``shared``: subscribe through ``$share/<group>/<filter>`` over MQTT v5 (a real broker), so 1 and N workers
    are measured the same way; the embedded broker (MQTT 3.1.1) takes one worker on the plain filter.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        step_dir: Path,
        workers: int,
        *,
        shared: bool,
        group: str,
        sink: SinkFault = NO_SINK_FAULT,
    ) -> None:
        self.settings, self.step_dir, self.workers = settings, step_dir, workers
        self.shared, self.group = shared, group
        self.sink = sink
        self.children: list[Child] = []
        self.finals: list[dict[str, Any]] = []
        self._stopped = False

    def worker_dir(self, w: int) -> Path:
        return self.step_dir / f"worker-{w}"

    def start(self, sources: Sequence[SourceSpec]) -> None:
        (spec,) = sources
        mqtt = spec.settings
        assert isinstance(mqtt, MqttSourceSettings)
        subscription = f"$share/{self.group}/{mqtt.topic}" if self.shared else mqtt.topic
        for w in range(self.workers):
            wdir = self.worker_dir(w)
            wdir.mkdir(parents=True, exist_ok=True)
            config = {
                "pipeline": self.settings.model_dump(mode="json", by_alias=True),
                "out_dir": str(wdir),
                "broker": mqtt.url,
                "subscription": subscription,
                "qos": mqtt.qos,
                "client_id": f"{mqtt.client_id}-{w}",
                "protocol": 5 if self.shared else 4,
                "final_path": str(wdir / "final.json"),
                "sink_delay_s": self.sink.delay_s,
                "sink_slowdown": self.sink.slowdown,
            }
            self.children.append(
                Child("bench.capacity.pipeline_worker", config, wdir / "config.json", wdir / "worker.log")
            )
        for child in self.children:
            child.wait_for("ready", READY_TIMEOUT_S, "pipeline worker")

    def received(self) -> int:
        return sum(int(c.latest.get("received", 0)) for c in self.children)

    def durable(self) -> int:
        return sum(int(c.latest.get("durable", 0)) for c in self.children)

    def check_alive(self) -> None:
        for c in self.children:
            if not c.alive:
                raise ServiceError(f"pipeline worker exited early; log: {c.log_path}\n{c.log_tail()}")

    def stop(self) -> None:
        """Graceful: each worker flushes and finalises, then reports ``done``. Idempotent; on a failure path
        (some worker never got going) the workers are ended without waiting for ``done``."""
        if self._stopped:
            return
        self._stopped = True
        try:
            for c in self.children:
                c.send("stop")
            for c in self.children:
                c.wait_for("done", STOP_TIMEOUT_S, "pipeline worker")
        finally:
            for c in self.children:
                c.send("")
                c.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        for c in self.children:
            if c.alive:
                c.proc.send_signal(signal.SIGKILL)
        for c in self.children:
            c.wait(5)
        self._stopped = True

    def read_back(self) -> Output:
        s = self.settings
        backs: list[ReadBack] = []
        durable: list[tuple[int, int]] = []
        flushes: list[FlushStat] = []
        self.finals = []
        for w in range(self.workers):
            wdir = self.worker_dir(w)
            final = json.loads((wdir / "final.json").read_text(encoding="utf-8"))
            self.finals.append(final)
            mine = [FlushStat(**f) for f in final["flushes"]]
            flushes.extend(mine)
            back = read_back(wdir / s.parquet.path, wdir / s.quarantine.path, wdir / "dropped")
            backs.append(back)
            durable.extend(durable_rows(back, mine))
        combined = ReadBack(
            persisted_seqs=[s for b in backs for s in b.persisted_seqs],
            persisted_batches=[s for b in backs for s in b.persisted_batches],
            rejected_seqs=[s for b in backs for s in b.rejected_seqs],
            rejected_reasons=[s for b in backs for s in b.rejected_reasons],
            files=sum(b.files for b in backs),
            unfinalised=[s for b in backs for s in b.unfinalised],
            unreadable=[u for b in backs for u in b.unreadable],
            dropped_seqs=[s for b in backs for s in b.dropped_seqs],
            dropped_reasons=[s for b in backs for s in b.dropped_reasons],
        )
        return Output(combined, durable, flushes)

    def extras(self) -> dict[str, Any]:
        """Each worker's final report (errors, lock probes, CPU and memory samples); after :meth:`read_back`."""
        return {"finals": self.finals}


class ExternalWorker:
    """The user's pipeline (``system.kind: external``) as a capacity step's system under test: one instance,
    started for the step on the step's folder, fed on the scenario's topic, read back from its own output.

    It offers what :class:`WorkerPipelines` offers the sweep: received and durable counts for the progress and
    the drain (both are the rows its output shows), a liveness check, and a ``final`` report shaped like a
    worker's, so the step's CPU % and memory come from its process tree over the step's window (psutil).
    """

    def __init__(self, system: ExternalPipeline) -> None:
        self.system = system
        self.workers = 1
        self.finals: list[dict[str, Any]] = []

    def start(self, sources: Sequence[SourceSpec]) -> None:
        self.system.start(sources)

    def received(self) -> int:
        return self.system.received()

    def durable(self) -> int:
        return self.system.received()

    def check_alive(self) -> None:
        if self.system.spec.attach or self.system.alive:
            return
        codes = self.system.exit_codes or [s.proc.poll() for s in self.system.starts[-1:]]
        raise ServiceError(
            f"the external system exited early (exit code {codes[-1] if codes else None}); "
            f"its last output ({self.system.log_path}):\n{self.system.log_tail()}"
        )

    def stop(self) -> None:
        self.system.stop()

    def kill(self) -> None:
        self.system.kill()

    def read_back(self) -> Output:
        output = self.system.read_back()
        samples = self.system.resources.samples
        # An attached system is not the bench's child: no samples, so its CPU and memory stay unknown.
        self.finals = [{"errors": [], "lock": None, "samples": [list(x) for x in samples]}]
        return output

    def extras(self) -> dict[str, Any]:
        return self.system.extras()
