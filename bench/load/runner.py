"""``bench load``: locust as the load engine, for loads larger than one process or machine.

The pipeline under test runs in this process, as in ``bench run``, behind the
embedded broker (or OPC UA plant server); the load comes from a locust master
and N worker processes running :mod:`bench.load.locustfile`, which replay the
scenario's stream, each message once, paced by its intended send time. Then
the bench does what it always does: drain, read back what was persisted and
reconcile it against what the workers say they sent (their ``sent/`` files)::

    bench load scenarios/burst.yaml --workers 4
    # reports/burst-load-<UTC time>/: results.json, report.html, locust.html,
    # locust_stats.csv ..., locust-master.log, locust-worker-<i>.log, sent/

Locust's response time is the publish acknowledgement (PUBACK, or the OPC UA
Write response), not the end-to-end latency: that one comes from the read-back
(durable time minus intended send time), under ``latency_ms.end_to_end``.

With ``system.kind: external`` the system under test is the user's own program
(:class:`~bench.harness.external_sut.ExternalPipeline`), started and stopped
here as ``bench run`` does, drained by watching its output and reconciled from
that output alone; what only the built-in pipeline can tell (flushes, lock
waits, its counters) is then absent from the results, not zero.

Locust monkey-patches the whole process with gevent when imported, so this
module never imports it (nor the locustfile): locust runs in subprocesses.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from bench.errors import ServiceError, UsageError
from bench.harness import accounting
from bench.harness import session as harness
from bench.harness.external_sut import ExternalPipeline, check_seqs_found
from bench.harness.ledger import Ledger
from bench.harness.probes import (
    lock_summary,
)
from bench.harness.progress import LoadProgress
from bench.harness.runner import make_run_dir, scenario_ref
from bench.harness.scoring import judge_external
from bench.harness.sut import InProcessPipeline, Output, SinkFault
from bench.results import SCHEMA_VERSION, environment
from bench.results.model import SystemPart
from bench.scenario import MANAGED_BROKERS, LoadedScenario, Scenario, SlowSinkFault, apply_overrides
from pipeline.clock import MonotonicWallClock
from pipeline.probes import Recorder
from simulators.anomalies import inject
from simulators.stream import Message, planned_count, stream, total_duration_s

if TYPE_CHECKING:
    # asyncua only for OPC UA runs (see bench/harness/runner.py).
    pass

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASS = {"mqtt": "MqttUser", "opcua": "OpcUaUser"}
SEND_REQUEST = {"mqtt": "MQTT publish", "opcua": "OPCUA write"}
"""The locust request (type and name) that is one send; "connect" requests are counted apart."""
SENT_DIR = "sent"
SENT_GLOB = "sent-*.npz"
PLAN_FILE = "plan.json"
MASTER_PORT_FILE = "locust-master.port"
LOCUST_CSV_PREFIX = "locust"
LOCUST_HTML = "locust.html"
SENT_FORMAT = 1
START_LEAD_S = 2.0
"""The first send is planned this long after the master has sent the plan: users connect in that time."""
ACK_TIMEOUT_S = 30.0
LOCUST_START_TIMEOUT_S = 60.0
REMOTE_WORKERS_WAIT_S = 600.0
"""How long the master waits for workers started by hand on other machines."""
DEFAULT_MASTER_PORT = 5557
WORKERS_EXIT_TIMEOUT_S = 30.0
PROGRESS_EVERY_S = 0.5


# ----------------------------------------------------------------------------- what the workers sent


@dataclass(frozen=True)
class SentRecords:
    """What one locust process published: the bench's side of the ledger, one file per process.

    Times are nanoseconds on the master's timeline (each worker corrects its clock by the master's).
    ``ack_ns`` is -1 where no acknowledgement came. ``copy`` marks a scenario's deliberate second
    send of a seq (the ``duplicate`` anomaly). ``payload_key``/``payload_seq`` name the seq of
    payloads that cannot carry one (malformed JSON, invalid UTF-8, oversize; see
    :func:`bench.harness.ledger.payload_key`).
    """

    meta: dict[str, Any]
    seq: NDArray[np.int64]
    intended_ns: NDArray[np.int64]
    sent_ns: NDArray[np.int64]
    ack_ns: NDArray[np.int64]
    copy: NDArray[np.bool_]
    failed_seq: NDArray[np.int64]
    payload_key: NDArray[np.str_]
    payload_seq: NDArray[np.int64]

    @classmethod
    def empty(cls, meta: dict[str, Any]) -> SentRecords:
        none = np.zeros(0, dtype=np.int64)
        return cls(meta, none, none, none, none, np.zeros(0, dtype=np.bool_), none, np.zeros(0, dtype=np.str_), none)


def sent_bytes(records: SentRecords) -> bytes:
    """``records`` as the bytes of a NumPy ``.npz`` file (what a worker also sends to the master)."""
    arrays = {k: v for k, v in asdict(records).items() if k != "meta"}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps({"format": SENT_FORMAT, **records.meta})), **arrays)
    return buffer.getvalue()


def write_sent_bytes(path: Path, data: bytes) -> None:
    """Write a sent file atomically: a reader never sees half a file, two writers never mix theirs."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_sent(path: Path, records: SentRecords) -> None:
    write_sent_bytes(path, sent_bytes(records))


def read_sent(path: Path) -> SentRecords:
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return SentRecords(
                meta,
                seq=data["seq"].astype(np.int64),
                intended_ns=data["intended_ns"].astype(np.int64),
                sent_ns=data["sent_ns"].astype(np.int64),
                ack_ns=data["ack_ns"].astype(np.int64),
                copy=data["copy"].astype(np.bool_),
                failed_seq=data["failed_seq"].astype(np.int64),
                payload_key=data["payload_key"].astype(np.str_),
                payload_seq=data["payload_seq"].astype(np.int64),
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ServiceError(f"{path}: not a readable sent file ({exc.__class__.__name__}: {exc})") from None


@dataclass(frozen=True)
class Sent:
    """Every worker's records, put together."""

    files: list[str]
    metas: list[dict[str, Any]]
    seq: NDArray[np.int64]
    intended_ns: NDArray[np.int64]
    sent_ns: NDArray[np.int64]
    ack_ns: NDArray[np.int64]
    copy: NDArray[np.bool_]
    failed_seq: NDArray[np.int64]
    payloads: dict[bytes, int]
    epoch_ns: int | None
    problems: list[str]

    @property
    def sends(self) -> int:
        """Messages handed to the transport, copies included."""
        return len(self.seq)

    def coverage(self, planned: int) -> dict[str, Any]:
        """Did the users, together, publish every planned message exactly once?"""
        originals = self.seq[~self.copy]
        unique, counts = np.unique(originals, return_counts=True)
        failed = np.setdiff1d(np.unique(self.failed_seq), unique)
        covered = np.union1d(unique, failed)
        in_plan = covered[(covered >= 0) & (covered < planned)]
        missing = np.setdiff1d(np.arange(planned, dtype=np.int64), in_plan)
        twice = unique[counts > 1]
        return {
            "planned": planned,
            "published": len(unique),
            "failed": len(failed),
            "not_published": len(missing),
            "not_published_sample": [int(s) for s in missing[:20]],
            "published_twice": len(twice),
            "published_twice_sample": [int(s) for s in twice[:20]],
            "outside_plan": int(np.count_nonzero((unique < 0) | (unique >= planned))),
        }


def collect_sent(folder: Path) -> Sent:
    """Read every ``sent-*.npz`` in ``folder``."""
    paths = sorted(folder.glob(SENT_GLOB))
    records = [read_sent(p) for p in paths]
    problems: list[str] = []
    epochs = {int(e) for r in records if (e := r.meta.get("epoch_ns")) is not None}
    if len(epochs) > 1:
        problems.append(f"sent files disagree on the epoch (first send time): {sorted(epochs)}; were they one test?")
    payloads: dict[bytes, int] = {}
    for r in records:
        payloads.update({bytes.fromhex(k): int(s) for k, s in zip(r.payload_key, r.payload_seq, strict=True)})
        problems += [f"{Path(r.meta.get('file', '?')).name}: {e}" for e in r.meta.get("errors", [])]

    def cat(name: str, dtype: Any) -> Any:
        parts = [getattr(r, name) for r in records]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    return Sent(
        files=[p.name for p in paths],
        metas=[r.meta for r in records],
        seq=cat("seq", np.int64),
        intended_ns=cat("intended_ns", np.int64),
        sent_ns=cat("sent_ns", np.int64),
        ack_ns=cat("ack_ns", np.int64),
        copy=cat("copy", np.bool_),
        failed_seq=cat("failed_seq", np.int64),
        payloads=payloads,
        epoch_ns=min(epochs) if epochs else None,
        problems=problems,
    )


# ----------------------------------------------------------------------------- locust's own numbers


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def parse_locust_stats(path: Path) -> dict[str, Any]:
    """The aggregated row and one entry per request type of locust's ``<prefix>_stats.csv``."""

    def entry(row: dict[str, str]) -> dict[str, Any]:
        requests = int(_number(row.get("Request Count")) or 0)
        return {
            "requests": requests,
            "failures": int(_number(row.get("Failure Count")) or 0),
            "median_ms": _number(row.get("Median Response Time")),
            "avg_ms": _number(row.get("Average Response Time")),
            "min_ms": _number(row.get("Min Response Time")),
            "max_ms": _number(row.get("Max Response Time")),
            "p95_ms": _number(row.get("95%")),
            "p99_ms": _number(row.get("99%")),
            "p999_ms": _number(row.get("99.9%")),
            "requests_per_s": _number(row.get("Requests/s")),
            "failures_per_s": _number(row.get("Failures/s")),
        }

    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {"requests": 0, "failures": 0, "by_type": {}, "missing": str(path.name)}
    out: dict[str, Any] = {"requests": 0, "failures": 0}
    by_type: dict[str, Any] = {}
    for row in rows:
        if row.get("Name") == "Aggregated":
            out.update(entry(row))
        else:
            by_type[f"{row.get('Type', '')} {row.get('Name', '')}".strip()] = entry(row)
    out["by_type"] = by_type
    return out


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class LoadOptions(accounting.CommandOptions):
    """``bench load``'s options (the command line's, or a test's)."""

    workers: int = 2
    users: int | None = None
    """Locust users over all workers (default: 4 per worker, at most one per machine)."""
    messages: int | None = None
    variant: str | None = None
    start_lead_s: float = START_LEAD_S
    ack_timeout_s: float = ACK_TIMEOUT_S
    remote_workers: int = 0
    """Workers started by hand on other machines (``locust -f ... --worker --master-host <this host>``)."""
    master_bind: str | None = None
    """HOST[:PORT] the master listens on; default 127.0.0.1 on a free port, 0.0.0.0:5557 with remote workers."""

    def bind(self) -> tuple[str, int]:
        default_port = DEFAULT_MASTER_PORT if self.remote_workers else 0
        if self.master_bind is None:
            return ("0.0.0.0" if self.remote_workers else "127.0.0.1"), default_port
        host, sep, port = self.master_bind.rpartition(":")
        if not sep:
            host, port = self.master_bind, ""
        try:
            number = int(port) if port else default_port
        except ValueError:
            number = -1
        if not host or not 0 <= number <= 65535:
            raise UsageError(f"--master-bind: expected HOST or HOST:PORT, e.g. 0.0.0.0:5557, got {self.master_bind!r}")
        return host, number


@dataclass(frozen=True)
class LoadOutcome(accounting.RunRecord):
    ledger: Ledger
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ledger.reconciled and not self.problems


def pick_variant(loaded: LoadedScenario, variant: str | None) -> tuple[str, Scenario]:
    if variant is None:
        return "default", loaded.scenario
    names = dict(loaded.variants)
    if variant not in names or not loaded.scenario.matrix:
        known = ", ".join(names) if loaded.scenario.matrix else "none: the scenario has no matrix"
        raise UsageError(f"--variant {variant}: no such variant in {loaded.path} (variants: {known})")
    return variant, names[variant]


def _check_supported(loaded: LoadedScenario, sc: Scenario, broker: str | None) -> None:
    kind = sc.transport.kind
    if kind not in USER_CLASS:
        raise UsageError(
            f"{loaded.path}: transport.kind: bench load replays over mqtt or opcua, got {kind!r} "
            "(use bench run for memory and both)"
        )
    if kind == "opcua" and sc.transport.opcua.security != "None":
        raise UsageError(
            f"{loaded.path}: transport.opcua.security: the locust OPC UA user writes without security; "
            "use bench run for Sign/SignAndEncrypt"
        )
    if sc.system.kind == "process":
        # Its subscribers would be the in-process pipeline: a load run would measure that, not a worker process.
        raise UsageError(
            f"{loaded.path}: system.kind: bench load drives the built-in pipeline in its own process or an "
            "external system; process is not supported yet (use bench run)"
        )
    if sc.system.kind == "external":
        if kind != "mqtt":
            # An external system subscribes to a broker; the OPC UA users write into a plant server it never reads.
            raise UsageError(
                f"{loaded.path}: transport.kind: bench load feeds an external system over mqtt only (MqttUser), "
                f"got {kind!r}"
            )
        slow = [f.kind for f in sc.faults if isinstance(f, SlowSinkFault)]
        if slow:
            raise UsageError(
                f"{loaded.path}: faults: slow_sink slows the built-in pipeline's Parquet sink; not available "
                "for system.kind external"
            )
    timed = sorted({f.kind for f in sc.faults if not isinstance(f, SlowSinkFault)})
    if timed:
        # Timed faults are bench run's: its ledger names their losses per fault; a load run would ignore them.
        raise UsageError(f"{loaded.path}: faults: {', '.join(timed)} not supported by bench load; use bench run")
    if broker is not None and not broker.startswith(("mqtt://", "tcp://")):
        raise UsageError(f"--broker: expected a URL like mqtt://127.0.0.1:1883, got {broker!r}")
    if broker is not None and kind != "mqtt":
        raise UsageError(f"--broker: the scenario {loaded.path} replays over {kind}, not mqtt")


def _check_reachable(loaded: LoadedScenario, sc: Scenario, broker: str | None) -> None:
    """Workers on other machines cannot reach a broker or plant server bound to this host's loopback."""
    if sc.transport.kind == "mqtt" and (broker or sc.transport.mqtt.broker) == "embedded":
        raise UsageError(
            "--remote-workers: workers on other machines cannot reach the embedded broker (loopback only); "
            "give --broker mqtt://<host every machine reaches>:1883"
        )
    if sc.transport.kind == "opcua" and sc.transport.opcua.server == "embedded":
        raise UsageError(
            f"{loaded.path}: transport.opcua.server: workers on other machines cannot reach the embedded plant "
            "server (loopback only); name a server every machine reaches"
        )


def default_users(machines: int, workers: int) -> int:
    return max(1, min(machines, 4 * workers))


class _Locust:
    """A locust master and its workers as subprocesses, output captured into the run folder."""

    def __init__(self, run_dir: Path, user_class: str, options: list[str], workers: int, bind: tuple[str, int]) -> None:
        self.run_dir = run_dir
        self.bind = bind
        self.user_class = user_class
        self.options = options
        self.workers = workers
        self.master: subprocess.Popen[bytes] | None = None
        self.worker_procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=package_root + (os.pathsep + path if path else ""))

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / log_name, "wb")  # noqa: SIM115 (closed in close())
        self._logs.append(log)
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), self.user_class, *args]
        log.write((" ".join(command) + "\n\n").encode())
        log.flush()
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)

    def start(self, master_args: list[str]) -> None:
        port_file = self.run_dir / MASTER_PORT_FILE
        bind = ["--master-bind-host", self.bind[0], "--master-bind-port", str(self.bind[1])]
        self.master = self._spawn(["--master", *bind, *master_args, *self.options], "locust-master.log")
        # By default the master binds port 0 (no clash with another locust on 5557); its init hook writes the port.
        deadline = time.monotonic() + LOCUST_START_TIMEOUT_S
        while not port_file.exists():
            if self.master.poll() is not None:
                raise ServiceError(f"locust master exited with code {self.master.returncode}: {self._tail('master')}")
            if time.monotonic() > deadline:
                raise ServiceError(f"locust master did not start within {LOCUST_START_TIMEOUT_S:g} s")
            time.sleep(0.1)  # polling for a file another process writes
        port = int(port_file.read_text().strip())
        port_file.unlink()
        host = "127.0.0.1" if self.bind[0] in ("0.0.0.0", "*", "::") else self.bind[0]
        for i in range(self.workers):
            self.worker_procs.append(
                self._spawn(["--worker", "--master-host", host, "--master-port", str(port)], f"locust-worker-{i}.log")
            )

    def _tail(self, which: str, lines: int = 15) -> str:
        name = "locust-master.log" if which == "master" else f"locust-worker-{which}.log"
        try:
            text = (self.run_dir / name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no {name})"
        return f"see {self.run_dir / name}; last lines:\n    " + "\n    ".join(text)

    def wait_workers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for proc in self.worker_procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._stop(proc)

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        # SIGTERM lets locust run its shutdown: workers then still write their sent files.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        for proc in [*self.worker_procs, *([self.master] if self.master else [])]:
            self._stop(proc)
        for log in self._logs:
            log.close()

    def exit_codes(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {"master": self.master.returncode if self.master else None}
        codes.update({f"worker-{i}": p.returncode for i, p in enumerate(self.worker_procs)})
        return codes


def _locust_requests(run_dir: Path) -> int:
    """The aggregated request count locust has written so far (its CSV is rewritten every second)."""
    try:
        with (run_dir / f"{LOCUST_CSV_PREFIX}_stats.csv").open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("Name") == "Aggregated":
                    return int(_number(row.get("Request Count")) or 0)
    except (OSError, csv.Error):
        pass
    return 0


def _read_plan(path: Path) -> dict[str, Any] | None:
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # not written yet (it is replaced atomically, so never half)
    return plan if isinstance(plan, dict) else None


class _LoadRun:
    """One ``bench load``: a session (transport + the pipeline under test) fed by a locust master and workers."""

    def __init__(self, loaded: LoadedScenario, options: LoadOptions) -> None:
        self.workers = options.workers + options.remote_workers
        if options.workers < 0 or options.remote_workers < 0 or self.workers < 1:
            raise UsageError(
                f"--workers {options.workers}, --remote-workers {options.remote_workers}: expected a worker"
            )
        self.bind = options.bind()
        self.name, self.sc = pick_variant(loaded, options.variant)
        _check_supported(loaded, self.sc, options.broker)
        if options.remote_workers:
            _check_reachable(loaded, self.sc, options.broker)
        self.loaded, self.options = loaded, options
        self.spec = apply_overrides(self.sc.stream_spec(), options.messages)
        self.planned = planned_count(self.spec)
        self.users = options.users or default_users(len(self.spec.machines), self.workers)
        self.credentials = harness.Credentials.of(self.sc, loaded.path)
        run_dir = make_run_dir(f"{self.sc.name}-load", options.out, options.reports_dir)
        shutil.copyfile(loaded.path, run_dir / "scenario.yaml")
        self.run_dir = run_dir.resolve()  # the locust processes get absolute paths, whatever their working folder
        self.sent_dir = self.run_dir / SENT_DIR
        self.sent_dir.mkdir()
        self.run_id = f"{self.sc.name}-load-{uuid.uuid4().hex[:8]}"
        self.clock = MonotonicWallClock()
        self.settings = self.sc.validation()
        self.duration_s = total_duration_s(self.spec)
        # The master quits the test when every user is done; this limit only stops a test that hangs.
        self.run_time_s = math.ceil(
            options.start_lead_s + self.duration_s + max(60.0, self.duration_s / 2) + options.ack_timeout_s
        )
        self.problems: list[str] = []
        self.samples: list[tuple[float, int, int]] = []
        self.epoch_ns: int | None = None
        self.broker_setting = options.broker or self.sc.transport.mqtt.broker
        self.sut: InProcessPipeline | ExternalPipeline
        if self.sc.system.external is not None:
            # The user's program, started by the session like bench run's (placeholders from the MQTT source).
            self.sut = ExternalPipeline(self.sc.system.external, loaded.path.parent, self.run_dir, self.clock)
        else:
            with harness.service_errors():
                self.sut = InProcessPipeline(
                    self.settings,
                    self.run_dir,
                    self.clock,
                    SinkFault.of(self.sc),
                )

    def session_config(self, broker_url: str | None) -> harness.SessionConfig:
        on_opcua = self.sc.transport.kind == "opcua"
        return harness.SessionConfig(
            scenario=self.sc,
            scenario_path=self.loaded.path,
            run_id=self.run_id,
            out_dir=self.run_dir,
            broker_url=broker_url or self.broker_setting,
            opcua_machines=self.spec.machines if on_opcua else (),
            credentials=self.credentials,
            clock=self.clock,
        )

    def locust_args(self, endpoints: harness.Endpoints) -> tuple[list[str], list[str]]:
        """The locustfile's own arguments, and the master's."""
        options = self.options
        if endpoints.mqtt_url is not None:
            target = ["--broker-url", endpoints.mqtt_url, "--topic", endpoints.mqtt_topic or ""]
        else:
            target = ["--opcua-url", endpoints.opcua_url or ""]
        custom = [
            "--scenario",
            str(self.loaded.path.resolve()),
            "--run-id",
            self.run_id,
            "--sent-dir",
            str(self.sent_dir),
            "--start-lead",
            str(options.start_lead_s),
            "--ack-timeout",
            str(options.ack_timeout_s),
            *(["--messages", str(options.messages)] if options.messages else []),
            *(["--variant", self.name] if options.variant else []),
            *target,
        ]
        master = [
            "--headless",
            "--expect-workers",
            str(self.workers),
            "--expect-workers-max-wait",
            str(int(REMOTE_WORKERS_WAIT_S if options.remote_workers else LOCUST_START_TIMEOUT_S)),
            "--users",
            str(self.users),
            "--spawn-rate",
            str(self.users),
            "--run-time",
            f"{self.run_time_s}s",
            "--csv",
            str(self.run_dir / LOCUST_CSV_PREFIX),
            "--csv-full-history",
            "--html",
            str(self.run_dir / LOCUST_HTML),
            "--only-summary",
            "--master-port-file",
            str(self.run_dir / MASTER_PORT_FILE),
        ]
        return custom, master

    def snapshot(self, stage: str) -> LoadProgress:
        if isinstance(self.sut, ExternalPipeline):
            return self.external_snapshot(stage, self.sut)
        stats = self.sut.pipeline.statistics()
        durable = sum(b.flushed_rows + b.dropped for b in (stats.readings, stats.rejections) if b is not None)
        elapsed = (self.clock.now_ns() - self.epoch_ns) / 1e9 if self.epoch_ns is not None else -1.0
        if self.epoch_ns is not None:
            self.samples.append((elapsed, stats.readings.buffered if stats.readings else 0, stats.received - durable))
        return LoadProgress(
            stage=stage,
            elapsed_s=elapsed,
            planned=self.planned,
            received=stats.received,
            persisted=stats.readings.flushed_rows if stats.readings else 0,
            rejected=stats.rejected,
            backlog=max(0, stats.received - durable),
            locust_requests=_locust_requests(self.run_dir),
        )

    def external_snapshot(self, stage: str, sut: ExternalPipeline) -> LoadProgress:
        """What an external system's output shows so far; it has no buffer the bench can see (backlog -1)."""
        elapsed = (self.clock.now_ns() - self.epoch_ns) / 1e9 if self.epoch_ns is not None else -1.0
        persisted = sut.watcher.count() if sut.watcher is not None else 0
        return LoadProgress(
            stage=stage,
            elapsed_s=elapsed,
            planned=self.planned,
            received=sut.received(),
            persisted=persisted,
            rejected=sut.received() - persisted,
            backlog=-1,
            locust_requests=_locust_requests(self.run_dir),
        )

    def drive(
        self,
        locust: _Locust,
        master_args: list[str],
        on_progress: Callable[[LoadProgress], None] | None,
        every_s: float,
    ) -> tuple[dict[str, Any], dict[str, int | None], float]:
        """Run locust to the end; returns its plan, exit codes and run time."""
        started = time.monotonic()
        if on_progress:
            on_progress(self.snapshot("starting locust"))
        locust.start(master_args)
        assert locust.master is not None
        wait_s = REMOTE_WORKERS_WAIT_S if self.options.remote_workers else LOCUST_START_TIMEOUT_S
        deadline = started + self.run_time_s + wait_s + 30
        plan: dict[str, Any] | None = None
        while locust.master.poll() is None:
            if plan is None and (plan := _read_plan(self.sent_dir / PLAN_FILE)) is not None:
                self.epoch_ns = int(plan["epoch_ns"])
                if self.sc.run.start is not None and isinstance(self.sut, InProcessPipeline):
                    # Replaying another time: the validator's clock reads that time too.
                    self.sut.pipeline.replay_offset_ns = int(self.sc.run.start.timestamp() * 1e9) - self.epoch_ns
            if time.monotonic() > deadline:
                self.problems.append(f"locust did not finish within {deadline - started:.0f} s; stopped it")
                break
            if on_progress:
                on_progress(self.snapshot("waiting for locust workers" if plan is None else "sending"))
            time.sleep(every_s)  # polling the master process and the pipeline's counters
        if locust.master.poll() is None:
            locust.close()
        else:
            locust.wait_workers(WORKERS_EXIT_TIMEOUT_S)
        locust_s = time.monotonic() - started
        codes = locust.exit_codes()
        locust.close()
        if plan is None:
            plan = _read_plan(self.sent_dir / PLAN_FILE)
        if plan is None:
            raise ServiceError(f"locust never started the test (no plan was made): {locust._tail('master')}")
        self.epoch_ns = int(plan["epoch_ns"])
        return plan, codes, locust_s

    def execute(self, on_progress: Callable[[LoadProgress], None] | None, every_s: float) -> LoadOutcome:
        started_wall = time.time()
        env_before = environment()
        managed = {self.broker_setting} & set(MANAGED_BROKERS) if self.sc.transport.kind == "mqtt" else set()
        with (
            harness.managed_brokers(managed, self.run_dir) as brokers,
            harness.Session(self.session_config(brokers.get(self.broker_setting)), self.sut) as session,
        ):
            endpoints = session.start()
            custom, master_args = self.locust_args(endpoints)
            locust = _Locust(self.run_dir, USER_CLASS[self.sc.transport.kind], custom, self.options.workers, self.bind)
            session.on_close(locust.close)
            plan, codes, locust_s = self.drive(locust, master_args, on_progress, every_s)
            sent = collect_sent(self.sent_dir)
            self.problems += sent.problems
            # Drain: wait until the pipeline has received every send, or until it makes no progress
            # for drain_timeout (then the ledger shows the loss). An external system's output shows each seq
            # once, however often it was sent: it is drained when every seq sent shows.
            expected = len(np.unique(sent.seq)) if isinstance(self.sut, ExternalPipeline) else sent.sends
            harness.wait_received(
                self.sut.received,
                expected,
                self.sc.run.drain_timeout,
                tick=lambda: on_progress(self.snapshot("draining")) if on_progress else None,
                every_s=every_s,
            )
            if isinstance(self.sut, InProcessPipeline):
                self.sut.close_sources()
            opcua_stats = self.opcua_stats()
            session.stop()
            if on_progress:
                on_progress(self.snapshot("reading back"))
            extras = self.sut.extras()
        variant, ledger = self.account(sent, extras, opcua_stats, plan=plan, codes=codes, locust_s=locust_s)
        results = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "started_at": datetime.fromtimestamp(started_wall, UTC).isoformat(),
            "scenario": scenario_ref(self.loaded),
            "environment": {**env_before, "host_load_after": environment()["host_load"]},
            "variants": [variant],
        }
        return LoadOutcome(self.run_dir, accounting.write_run_results(self.run_dir, results), ledger, self.problems)

    def opcua_stats(self) -> dict[str, Any] | None:
        if self.sc.transport.kind != "opcua" or not isinstance(self.sut, InProcessPipeline):
            return None
        from pipeline.opcua_source import OpcUaSource

        source = next((s for s in self.sut.closed_sources if isinstance(s, OpcUaSource)), None)
        return asdict(source.stats) if source is not None else None

    def coverage_problems(self, coverage: dict[str, Any], codes: dict[str, int | None]) -> None:
        if coverage["not_published"]:
            self.problems.append(
                f"{coverage['not_published']} planned message(s) were never published by any locust user "
                f"(seq ids include {coverage['not_published_sample'][:10]}); see locust-*.log"
            )
        if coverage["failed"]:
            self.problems.append(f"{coverage['failed']} publish(es) failed (see {LOCUST_CSV_PREFIX}_failures.csv)")
        if coverage["published_twice"]:
            self.problems.append(
                f"{coverage['published_twice']} message(s) were published by more than one user "
                f"(seq ids include {coverage['published_twice_sample'][:10]})"
            )

    def account(
        self,
        sent: Sent,
        extras: dict[str, Any],
        opcua_stats: dict[str, Any] | None,
        *,
        plan: dict[str, Any],
        codes: dict[str, int | None],
        locust_s: float,
    ) -> tuple[dict[str, Any], Ledger]:
        assert self.epoch_ns is not None
        epoch_ns, planned = self.epoch_ns, self.planned
        output = self.sut.read_back()
        originals = sent.seq[~sent.copy]
        intended = np.full(planned, -1, dtype=np.int64)
        in_plan = (originals >= 0) & (originals < planned)
        intended[originals[in_plan]] = sent.intended_ns[~sent.copy][in_plan]
        intended_list: list[int] = intended.tolist()
        sends = accounting.Sends(
            seqs=[int(s) for s in originals],
            intended_ns=intended_list,
            sent=lambda seq: intended_list[seq] >= 0,
            copies=Counter(int(s) for s in sent.seq[sent.copy]),
            payloads=sent.payloads,
        )
        kind = self.sc.transport.kind
        on_opcua = self.spec.machines if kind == "opcua" else ()
        books = accounting.account(sends, output, self.spec, opcua_machines=on_opcua)
        coverage = sent.coverage(planned)
        self.coverage_problems(coverage, codes)
        external = isinstance(self.sut, ExternalPipeline)
        truth = None
        if external and self.sc.system.external is not None:
            check_seqs_found(output.back, books.ledger.persisted, self.sc.system.external.output)
            # As bench run judges it: a message missing from its output is lost only when its truth label says
            # it should have been stored.
            ext = self.sc.system.external
            ledger, truth = judge_external(
                books.ledger,
                output.back,
                sends.seqs,
                self.anomalous(epoch_ns),
                expect_rejected=ext.expect_rejected,
                anomaly_expect={a.kind: a.expect for a in self.sc.anomalies if a.expect is not None},
                rejects_kept=ext.rejects is not None,
            )
            books = accounting.Accounting(ledger, books.e2e)
        errors = list(extras.get("errors", []))
        self.problems += [f"pipeline: {e}" for e in errors]
        bad_codes = {k: c for k, c in codes.items() if c not in (0, 1)}  # 1: locust saw failed requests
        if bad_codes:
            self.problems.append(f"locust exited with {bad_codes} (see locust-*.log)")
        send_lag = Recorder()
        send_lag.record_all_ns(int(v) for v in sent.sent_ns - sent.intended_ns)
        acked = sent.ack_ns >= 0
        ack = Recorder()
        ack.record_all_ns(int(v) for v in sent.ack_ns[acked] - sent.sent_ns[acked])
        mq = self.sc.transport.mqtt
        variant = accounting.variant_parts(
            self.name,
            self.sc,
            self.settings,
            self.spec,
            transport={
                "kind": kind,
                "broker": self.broker_setting if kind == "mqtt" else None,
                "qos": mq.qos if kind == "mqtt" else None,
                "topic": mq.topic if kind == "mqtt" else None,
                "producers": self.users,
            },
            overrides={"messages": self.options.messages, "duration_s": None},
            ledger=books.ledger,
            latency={"end_to_end": books.e2e, "send_lag": send_lag, "ack": ack},
            flushes=output.flushes,
            epoch_ns=epoch_ns,
            last_sent_ns=int(sent.sent_ns.max()) if sent.sends else epoch_ns,
            timeline=_timeline(sent, _durable_steps(output, external), epoch_ns),
            samples=self.samples,
            lock=lock_summary(extras.get("lock_probes"), self.sc.pipeline.buffer.lock),
            pipeline=None if external else accounting.pipeline_part(extras, errors),
            files=output.back.files,
        )
        if external:
            self.external_parts(variant, extras, output, books.ledger.sent, epoch_ns)
        variant["publisher"] = {
            "accepted": sent.sends,
            "acked": int(np.count_nonzero(acked)),
            "all_acked": bool(acked.all()),
            "failed": coverage["failed"],
        }
        variant["opcua"] = opcua_stats
        variant["load"] = self.load_part(sent, coverage, plan=plan, codes=codes, locust_s=locust_s)
        if truth is not None:
            variant["truth"] = truth
        return variant, books.ledger

    def anomalous(self, epoch_ns: int) -> dict[int, list[Message]]:
        """The messages the locust users sent with a truth label other than valid, by seq: the same stream,
        rebuilt here from the scenario, seed and epoch the users were given (the users keep no copy)."""
        sc = self.sc
        if not sc.anomalies:
            return {}
        ts_epoch = None if sc.run.start is None else int(sc.run.start.timestamp() * 1e9)
        messages = inject(
            stream(self.spec, epoch_ns, ts_epoch),
            [a.spec() for a in sc.anomalies],
            seed=sc.seed,
            start_ns=epoch_ns,
            zones=sc.machines.zones(),
        )
        out: dict[int, list[Message]] = {}
        for m in messages:
            if m.truth != "valid":
                out.setdefault(m.seq, []).append(m)
        return out

    @staticmethod
    def external_parts(
        variant: dict[str, Any], extras: dict[str, Any], output: Output, sent: int, epoch_ns: int
    ) -> None:
        """An external system's figures in a variant, and none of the built-in pipeline's.

        Flush records, lock probes, the buffer's depth and the pipeline's own counters exist only inside the
        built-in pipeline: absent (null), so no reader takes a zero for a measurement. The persist rate comes
        from the rows' durable times instead of flush records; its CPU and memory are its process tree's.
        """
        variant["probes"] = {"flush": {}, "lock": None, "append_cost": None, "queue_depth": None}
        variant["throughput"]["sink_rows_per_s"] = None
        last_durable = max((at for _, at in output.durable), default=None)
        persisted = variant["ledger"]["persisted"]
        variant["throughput"]["persisted_per_s"] = (
            None if last_durable is None else round(persisted / max((last_durable - epoch_ns) / 1e9, 1e-9), 1)
        )
        cpu_s = extras.get("cpu_s")
        # Only the keys results.json defines: what else the external system reports stays out of the file.
        known = {k: v for k, v in extras.items() if k in SystemPart.model_fields}
        variant["system"] = {
            **known,
            "kind": "external",
            "cpu_s_per_1k": None if cpu_s is None or not sent else round(cpu_s / sent * 1000, 4),
        }

    def load_part(
        self,
        sent: Sent,
        coverage: dict[str, Any],
        *,
        plan: dict[str, Any],
        codes: dict[str, int | None],
        locust_s: float,
    ) -> dict[str, Any]:
        locust_stats = parse_locust_stats(self.run_dir / f"{LOCUST_CSV_PREFIX}_stats.csv")
        locust_stats["sends"] = SEND_REQUEST[self.sc.transport.kind]
        plan_workers = [
            {"index": w["index"], "users": sum(w["users"].values()), "host": w.get("host")}
            for w in plan.get("workers", [])
        ]
        return {
            "engine": "locust",
            "workers": self.workers,
            "remote_workers": self.options.remote_workers,
            "users": self.users,
            "user_class": USER_CLASS[self.sc.transport.kind],
            "plan": {"epoch_ns": self.epoch_ns, "workers": plan_workers},
            "coverage": coverage,
            "locust": locust_stats,
            "exit_codes": codes,
            "locust_s": round(locust_s, 3),
            "sent_files": sent.files,
            "clock_offsets_ms": {
                str(m.get("worker_index")): round(float(m.get("clock_offset_ns", 0)) / 1e6, 3) for m in sent.metas
            },
            "files": sorted(
                p.name for p in self.run_dir.iterdir() if p.name.startswith(LOCUST_CSV_PREFIX) and p.is_file()
            ),
        }


def run_load(
    loaded: LoadedScenario, options: LoadOptions, *, on_progress: Callable[[LoadProgress], None] | None = None
) -> LoadOutcome:
    """Start broker (or plant server) and pipeline here, locust master + workers as subprocesses; reconcile."""
    return _LoadRun(loaded, options).execute(on_progress, PROGRESS_EVERY_S)


def _durable_steps(output: Output, external: bool) -> list[tuple[int, int]]:
    """(when, rows) that became durable: the built-in pipeline's flushes, or an external system's rows one by one
    (at their durable_at, or when the bench first saw them)."""
    if external:
        return [(at, 1) for _, at in output.durable]
    return [(f.durable_ns, f.rows) for f in output.flushes if f.sink in ("parquet", "quarantine")]


def _timeline(
    sent: Sent, durable_steps: list[tuple[int, int]], epoch_ns: int, step_s: float = 0.25
) -> list[tuple[float, int, int]]:
    """Cumulative sends and durable rows against seconds since the epoch, rebuilt from the records."""
    durable = sorted(durable_steps)
    durable_at = np.array([d for d, _ in durable], dtype=np.int64)
    durable_cum = np.cumsum([r for _, r in durable]) if durable else np.zeros(0, dtype=np.int64)
    sent_at = np.sort(sent.sent_ns)
    end = max(int(sent_at[-1]) if len(sent_at) else epoch_ns, int(durable_at[-1]) if len(durable_at) else epoch_ns)
    points: list[tuple[float, int, int]] = []
    steps = max(1, math.ceil((end - epoch_ns) / 1e9 / step_s))
    for i in range(steps + 1):
        t = epoch_ns + round(i * step_s * 1e9)
        n_sent = int(np.searchsorted(sent_at, t, side="right"))
        k = int(np.searchsorted(durable_at, t, side="right"))
        points.append((round(i * step_s, 3), n_sent, int(durable_cum[k - 1]) if k else 0))
    return points
