"""A pipeline the user brings (``system.kind: external``): any program, started by command (or already running),
fed through the scenario's transport, and read back from its own output alone.

The bench knows nothing of its insides: it is ready when it says so (a log line, a port, a file), it has
received what its output shows, a row is durable when the output shows it (watched at a stated resolution) or
when its own durable-time column says so, and it is stopped with SIGTERM, killed with SIGKILL and restarted
like any service.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from glob import glob
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from bench.errors import ScenarioError, ServiceError
from bench.harness.ledger import ReadBack
from bench.harness.rig import external_database, sql_placeholders
from bench.harness.sut import Output, SourceSpec, end_process, log_tail
from bench.scenario import READY_SIGNALS, ExternalSystem, OutputSettings
from pipeline.clock import Clock
from pipeline.config import resolve_env
from pipeline.errors import ConfigError
from simulators.subscriptions import Mark, SubscriptionWatch

STOP_TIMEOUT_S = 30.0
WATCH_EVERY_S = 0.05
"""How often the output is polled for new rows: the resolution of end-to-end latency measured by watching."""
SQL_WATCH_EVERY_S = 0.5
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def placeholders(sources: Sequence[SourceSpec], out_dir: Path, sql_url: str | None = None) -> dict[str, str]:
    """What the bench fills into the command, environment and output paths; ``sql_url``: its database's URL
    (system.external.database, or the bench's proxy in front of it), split into host and port too."""
    values = {"broker_url": "", "host": "", "port": "", "topic": "", "opcua_url": "", "out_dir": str(out_dir)}
    # The bench's own interpreter: a Python pipeline runs with what the bench's environment has installed.
    values.update(sql_placeholders(sql_url), python=sys.executable)
    for spec in sources:
        url = str(getattr(spec.settings, "url", ""))
        if url.startswith(("mqtt://", "tcp://")):
            where = urlsplit(url)
            values.update(
                broker_url=url,
                host=where.hostname or "",
                port=str(where.port or 1883),
                topic=str(getattr(spec.settings, "topic", "")),
            )
        elif url.startswith("opc.tcp://"):
            values["opcua_url"] = url
    return values


@dataclass
class _Rows:
    """What the output held when last read: seq -> first time seen (ns on the run's clock), and problems."""

    seen: dict[int, int] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    """Rejects with a reason field: the reason of each row of ``seqs``, in order."""
    files: int = 0
    unreadable: list[str] = field(default_factory=list)
    missing_column: str | None = None
    not_a_seq: list[str] = field(default_factory=list)
    """A few values of the seq field that hold no sequence id (a uuid, a name): evidence for a wrong mapping."""


def _number(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number


def _durable_ns(value: Any) -> int | None:
    """A durable-time value as ns since the epoch: ISO 8601, or epoch s / ms / us / ns told apart by size."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1e9)
    try:
        number = float(value)
    except (TypeError, ValueError):
        try:
            return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            return None
    for scale in (1e9, 1e6, 1e3, 1.0):  # seconds, ms, us, ns: whichever lands in a plausible epoch
        ns = number * scale
        if 1e18 <= ns < 1e19:
            return int(ns)
    return None


def _records(out: OutputSettings, path: Path, offset: int) -> tuple[Iterator[dict[str, Any]], int, str | None]:
    """Records of one file from byte ``offset`` on (JSON lines, CSV) or whole (Parquet); the new offset, and a
    problem with the file if it has one (a torn last line is only a problem once the system has stopped)."""
    if out.format == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            return iter(()), offset, f"{path}: {str(exc)[:160]}"
        return iter(table.to_pylist()), path.stat().st_size, None
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # complete lines only; the rest may still be being written
    text = data[:end].decode("utf-8", errors="replace")
    if out.format == "csv":
        if offset == 0:
            return iter(csv.DictReader(text.splitlines())), offset + end, None
        # Appended rows: the header is the file's first line.
        with path.open(encoding="utf-8", errors="replace") as f:
            header = f.readline()
        return iter(csv.DictReader([header, *text.splitlines()])), offset + end, None
    records: list[dict[str, Any]] = []
    problem = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problem = problem or f"{path}: a line that is not JSON ({line[:60]!r})"
            continue
        if isinstance(record, dict):
            records.append(record)
        del number
    torn = data[end:].strip()
    if torn:
        problem = problem or f"{path}: its last line is incomplete ({torn[:60]!r})"
    return iter(records), offset + end, problem


class _Watcher:
    """Polls the system's output for rows it has not seen, recording when each seq first appeared."""

    def __init__(self, out: OutputSettings, pattern: str, clock: Clock, every_s: float = WATCH_EVERY_S) -> None:
        self.out, self.pattern, self.clock, self.every_s = out, pattern, clock, every_s
        self.reason: str | None = getattr(out, "reason", None)
        seq_pattern = out.columns.seq_pattern
        self._seq_pattern = re.compile(seq_pattern) if seq_pattern is not None else None
        self.rows = _Rows()
        self.durable: dict[int, int] = {}
        """seq -> the time the row said it became durable (columns.durable_at), when it has that column."""
        self._offsets: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._engine: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="external-output-watcher", daemon=True)

    def _seq(self, value: Any) -> int | None:
        """The seq a field holds, or finds with columns.seq_pattern in its text (the topic, say)."""
        if self._seq_pattern is not None:
            match = self._seq_pattern.search(str(value))
            return _number(match.group(1)) if match else None
        return _number(value)

    def _not_a_seq(self, value: Any) -> None:
        if len(self.rows.not_a_seq) < 3:
            self.rows.not_a_seq.append(repr(value)[:40])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def count(self) -> int:
        with self._lock:
            return len(self.rows.seen)

    def _run(self) -> None:
        # A database is polled less often than a folder: each poll reads every seq of the table.
        every = max(self.every_s, SQL_WATCH_EVERY_S) if self.out.format == "sql" else self.every_s
        while not self._stop.wait(every):
            self.poll(final=False)

    def _sql_rows(self) -> list[dict[str, Any]]:
        """Every row of the mapped table (or query), the mapped columns only. Whole each time: rows may arrive
        in any order, and a poll of a few hundred thousand seqs is cheap next to the interval."""
        import sqlalchemy as sa

        if self._engine is None:
            self._engine = sa.create_engine(self.pattern)
        cols = self.out.columns
        names = [c for c in (cols.seq, cols.durable_at, self.reason) if c is not None]
        if self.out.query is not None:
            stmt: Any = sa.text(self.out.query)
        else:
            assert self.out.table is not None
            stmt = sa.select(*(sa.column(n) for n in names)).select_from(sa.table(self.out.table))
        with self._engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def poll(self, *, final: bool) -> None:
        if self.out.format == "sql":
            self._poll_sql(final=final)
            return
        cols = self.out.columns
        for name in sorted(glob(self.pattern, recursive=True)):
            path = Path(name)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size == self._sizes.get(name) and not final:
                continue
            self._sizes[name] = size
            offset = 0 if self.out.format == "parquet" else self._offsets.get(name, 0)
            if self.out.format == "parquet" and name in self._offsets and not final:
                continue  # a Parquet file is read once it exists whole; files are immutable once written
            records, self._offsets[name], problem = _records(self.out, path, offset)
            now = self.clock.now_ns()
            with self._lock:
                for record in records:
                    if cols.seq not in record:
                        self.rows.missing_column = self.rows.missing_column or f"{path}: no field {cols.seq!r}"
                        continue
                    seq = self._seq(record[cols.seq])
                    if seq is None:
                        self._not_a_seq(record[cols.seq])
                        continue
                    self.rows.seqs.append(seq)
                    self.rows.seen.setdefault(seq, now)
                    if self.reason is not None:
                        self.rows.reasons.append(str(record.get(self.reason) or "rejected"))
                    if cols.durable_at is not None and (at := _durable_ns(record.get(cols.durable_at))) is not None:
                        self.durable.setdefault(seq, at)
                if final and problem is not None:
                    self.rows.unreadable.append(problem)
        with self._lock:
            self.rows.files = len(self._sizes)

    def _poll_sql(self, *, final: bool) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        cols = self.out.columns
        try:
            records = self._sql_rows()
        except SQLAlchemyError as exc:
            # Not there yet (the system creates its table after it starts) or a wrong mapping: only the final
            # read-back reports it.
            if final:
                self.rows.missing_column = f"{self.out.table or 'query'}: {str(exc).splitlines()[0][:200]}"
            return
        now = self.clock.now_ns()
        seqs, reasons = [], []
        with self._lock:
            for record in records:
                seq = self._seq(record.get(cols.seq))
                if seq is None:
                    self._not_a_seq(record.get(cols.seq))
                    continue
                seqs.append(seq)
                if self.reason is not None:
                    reasons.append(str(record.get(self.reason) or "rejected"))
                self.rows.seen.setdefault(seq, now)
                if cols.durable_at is not None and (at := _durable_ns(record.get(cols.durable_at))) is not None:
                    self.durable.setdefault(seq, at)
            self.rows.files = 1
            if final:
                self.rows.seqs, self.rows.reasons = seqs, reasons


class _Process:
    """One start of the command: its output (stdout and stderr together) to a log and a ring of last lines."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], log: IO[bytes], ready: re.Pattern[str] | None):
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.ready = threading.Event()
        self.lines: list[str] = []
        self._log, self._pattern = log, ready
        self._reader = threading.Thread(target=self._read, name="external-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._log.write(raw)
            self._log.flush()
            line = raw.decode(errors="replace").rstrip()
            self.lines = [*self.lines[-19:], line]
            if self._pattern is not None and self._pattern.search(line):
                self.ready.set()

    def tail(self) -> str:
        return "\n".join(f"    {line}" for line in self.lines[-15:]) or "    (no output)"

    def join(self) -> None:
        self._reader.join(5)


class _Resources:
    """CPU seconds and peak RSS of a process tree (the command and its children), sampled with psutil.

    CPU time of a process that exited between samples is kept from its last sample; RSS is the tree's sum at
    each sample, so a peak between samples can be missed (the sampling interval is reported with it).
    Both count from the moment it is ready (:meth:`ready`): what a wrapper does before it serves (an
    ``npm ci`` on first use, a compile) is not the pipeline's cost per message."""

    EVERY_S = 0.2

    def __init__(self, clock: Clock | None = None) -> None:
        self.cpu_s: dict[int, float] = {}
        self.peak_rss = 0
        self.clock = clock
        self.samples: list[tuple[int, float, int]] = []
        """(ns on the run's clock, the tree's CPU s so far, its RSS bytes) per sample, with a clock: a capacity
        step's CPU % is taken over its measurement window, not over the whole life of the process."""
        self._roots: list[int] = []
        self._startup: dict[int, float] = {}
        """Per process, the CPU seconds it had used when the start it belongs to became ready."""
        self._serving = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="external-resources", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        self._roots.append(pid)

    def ready(self) -> None:
        """It is ready: what every process seen so far has used is startup, left out of the figures."""
        self.sample()
        for pid, used in self.cpu_s.items():
            self._startup.setdefault(pid, used)
        if not self._serving:
            self._serving, self.peak_rss = True, 0

    def _run(self) -> None:
        while not self._stop.wait(self.EVERY_S):
            self.sample()

    def sample(self) -> None:
        import psutil

        rss = 0
        for root in list(self._roots):
            try:
                proc = psutil.Process(root)
                tree = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                try:
                    times = p.cpu_times()
                    self.cpu_s[p.pid] = times.user + times.system
                    rss += p.memory_info().rss
                except psutil.Error:
                    continue
        if self._serving:
            self.peak_rss = max(self.peak_rss, rss)
        if self.clock is not None:
            self.samples.append((self.clock.now_ns(), sum(self.cpu_s.values()), rss))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(2)
        serving = sum(used - self._startup.get(pid, 0.0) for pid, used in self.cpu_s.items())
        return {"cpu_s": round(serving, 3), "peak_rss_mb": round(self.peak_rss / 2**20, 1)}


class ExternalPipeline:
    """The user's pipeline as a system under test (see the module's doc)."""

    def __init__(
        self, spec: ExternalSystem, scenario_dir: Path, out_dir: Path, clock: Clock, *, sql_url: str | None = None
    ) -> None:
        """``sql_url``: what it is given as {sql_url} instead of its database's own URL (the bench's proxy in
        front of the database during a db_outage); the bench itself reads back from the database directly."""
        self.spec, self.out_dir, self.clock, self.given_sql_url = spec, out_dir, clock, sql_url
        self.cwd = (scenario_dir / spec.cwd).resolve() if spec.cwd else scenario_dir.resolve()
        self.log_path = out_dir / "system.log"
        self.values: dict[str, str] = {}
        self.direct_values: dict[str, str] = {}
        """The placeholders as the bench fills them for itself (the read-back): the database's own address."""
        self.starts: list[_Process] = []
        self.exit_codes: list[int | None] = []
        self._log: IO[bytes] | None = None
        self.watcher: _Watcher | None = None
        self.rejects: _Watcher | None = None
        self.resources = _Resources(clock)
        self._usage: dict[str, float] | None = None
        self._subscriptions: SubscriptionWatch | None = None
        """ready: subscribed: the broker's view of new subscriptions, and where it stood at the last start."""
        self._subscriptions_mark: Mark | None = None

    # -- the protocol ---------------------------------------------------------------------------------------

    def start(self, sources: Sequence[SourceSpec]) -> None:
        database = external_database(self.spec)
        self.values = placeholders(sources, self.out_dir, self.given_sql_url or database)
        self.direct_values = {**self.values, **sql_placeholders(database)}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.watcher = self._watcher(self.spec.output, "output")
        if self.spec.rejects is not None:
            self.rejects = self._watcher(self.spec.rejects, "rejects")
        if not self.spec.attach and self.spec.ready is not None and self.spec.ready.subscribed:
            self._subscriptions = self._watch_subscriptions(sources, self.spec.ready.timeout)
        if not self.spec.attach:
            self._spawn()
        self.watcher.start()

    def received(self) -> int:
        """Rows its output shows so far (accepted, and refused where it keeps them): what the drain waits on."""
        seen = self.watcher.count() if self.watcher is not None else 0
        return seen + (self.rejects.count() if self.rejects is not None else 0)

    def stop(self) -> None:
        self.resources.sample()  # the last figures before it exits
        if not self.spec.attach:
            self._end(signal.SIGTERM, STOP_TIMEOUT_S)
        if self._usage is None:
            self._usage = self.resources.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self._subscriptions is not None:
            self._subscriptions.close()
            self._subscriptions = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        self.resources.sample()  # what it used until the kill counts too
        self._end(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        self._spawn()

    def read_back(self) -> Output:
        watcher = self.watcher
        if watcher is None:
            raise ServiceError("the external system never started: nothing to read back")
        watcher.poll(final=True)
        rows = watcher.rows
        if self.spec.output.format == "sql" and rows.missing_column is not None:
            raise ServiceError(
                f"system.external.output: cannot read {rows.missing_column}; check table, query and columns"
            )
        if not rows.files:
            raise ServiceError(
                f"system.external.output.path: no file matches {watcher.pattern!r} after the run; "
                f"check the path and the system's log {self.log_path}"
            )
        if rows.missing_column is not None and not rows.seqs:
            raise ServiceError(
                f"system.external.output.columns.seq: {rows.missing_column}; map the field that holds the seq "
                "the bench sent (e.g. columns: {seq: sequence_id})"
            )
        if rows.not_a_seq and not rows.seqs:
            raise ServiceError(
                f"system.external.output.columns.seq: field {self.spec.output.columns.seq!r} holds no sequence id "
                f"(e.g. {', '.join(rows.not_a_seq)}); map the field that holds the seq the bench sent"
                + ("" if self.spec.output.columns.seq_pattern else ", or give seq_pattern to find it in the text")
            )
        rejected_seqs: list[int | None] = []
        reasons: list[str] = []
        if self.rejects is not None:
            self.rejects.poll(final=True)
            kept = self.rejects.rows
            rejected_seqs.extend(kept.seqs)
            # Its own reason names where it gave one; "rejected" where it keeps no reason field.
            reasons.extend(kept.reasons if len(kept.reasons) == len(kept.seqs) else ["rejected"] * len(kept.seqs))
        back = ReadBack(
            persisted_seqs=list(rows.seqs),
            persisted_batches=[0] * len(rows.seqs),
            rejected_seqs=rejected_seqs,
            rejected_reasons=reasons,
            files=rows.files,
            unfinalised=[],
            unreadable=list(rows.unreadable),
        )
        if self.spec.output.columns.durable_at is not None:
            durable = sorted(watcher.durable.items())
        else:
            durable = sorted(rows.seen.items())
        return Output(back, durable=durable)

    def extras(self) -> dict[str, Any]:
        durable_from = "column" if self.spec.output.columns.durable_at is not None else "watching"
        usage = self._usage or self.resources.stop()
        return {
            "starts": len(self.starts),
            "exit_codes": list(self.exit_codes),
            "durable_from": durable_from,
            "durable_resolution_ms": None if durable_from == "column" else self._watch_every_s() * 1000,
            # An attached system is not the bench's child: its usage is unknown, not zero.
            "cpu_s": None if self.spec.attach else usage["cpu_s"],
            "peak_rss_mb": None if self.spec.attach else usage["peak_rss_mb"],
            "resources_every_s": _Resources.EVERY_S,
        }

    def _watch_every_s(self) -> float:
        return SQL_WATCH_EVERY_S if self.spec.output.format == "sql" else WATCH_EVERY_S

    # -- process handling -----------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return bool(self.starts) and self.starts[-1].proc.poll() is None

    def _watcher(self, out: OutputSettings, where: str) -> _Watcher:
        # Filled with the database's own address, not the proxy's: the read-back must not suffer a db_outage.
        direct = self.direct_values
        if out.format != "sql":
            return _Watcher(out, self._fill(out.path or "", f"{where}.path", direct), self.clock)
        url = out.url or ""
        if _ENV_REF.match(url):
            try:
                url = resolve_env(url, f"system.external.{where}.url") or ""
            except ConfigError as exc:
                raise ScenarioError(str(exc)) from None
        return _Watcher(out, self._fill(url, f"{where}.url", direct), self.clock)

    def _fill(self, text: str, where: str, values: dict[str, str] | None = None) -> str:
        try:
            return text.format(**(self.values if values is None else values))
        except (KeyError, IndexError, ValueError) as exc:
            raise ScenarioError(f"system.external.{where}: {exc}") from None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.spec.env.items():
            if _ENV_REF.match(value):
                try:
                    resolved = resolve_env(value, f"system.external.env.{key}")
                except ConfigError as exc:
                    raise ScenarioError(str(exc)) from None
                env[key] = resolved or ""
            else:
                env[key] = self._fill(value, f"env.{key}")
        return env

    def _argv(self) -> list[str]:
        argv = [self._fill(arg, "command") for arg in self.spec.argv()]
        program = argv[0]
        # Not resolved: a venv's python is a symlink, and resolving it would leave the venv.
        found = (
            os.path.abspath(self.cwd / program) if "/" in program and (self.cwd / program).exists() else None
        ) or shutil.which(program)
        if found is None:
            raise ScenarioError(
                f"system.external.command: {program!r} not found (on PATH, or relative to {self.cwd}); "
                "expected an installed program or a path to one"
            )
        return [found, *argv[1:]]

    def _spawn(self) -> None:
        if not self.cwd.is_dir():
            raise ScenarioError(f"system.external.cwd: {self.cwd} is not a folder")
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        ready = self.spec.ready
        assert ready is not None  # the scenario refuses a command without ready
        pattern = re.compile(ready.log) if ready.log is not None else None
        if self._subscriptions is not None:
            self._subscriptions_mark = self._subscriptions.mark()  # only a subscription after this start counts
        process = _Process(self._argv(), self.cwd, self._env(), self._log, pattern)
        self.starts.append(process)
        self.resources.watch(process.proc.pid)
        problem = self._wait_ready(process, ready.timeout)
        if problem is None:
            self.resources.ready()
        if problem is not None:
            self._end(signal.SIGKILL, 5.0)
            raise ServiceError(f"the external system {problem}; its last output ({self.log_path}):\n{process.tail()}")

    def _wait_ready(self, process: _Process, timeout_s: float) -> str | None:
        ready = self.spec.ready
        assert ready is not None
        checks: dict[str, Callable[[], bool]] = {
            "log": process.ready.is_set,
            "port": lambda: _port_open(ready.port or 0),
            "file": lambda: Path(self._fill(ready.file or "", "ready.file")).exists(),
            "subscribed": self._subscribed,
        }
        what = next(k for k in READY_SIGNALS if getattr(ready, k) is not None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if checks[what]():
                return None
            if process.proc.poll() is not None:
                return f"exited with code {process.proc.returncode} before it was ready"
            time.sleep(0.05)  # polling another process's signs of life
        if self._subscriptions is not None:
            seen = self._subscriptions.explain(self._subscriptions_mark)
            return f"was not ready within {timeout_s:g} s (system.external.ready.subscribed: {seen})"
        return f"was not ready within {timeout_s:g} s (ready: {what} {getattr(ready, what)!r})"

    def _subscribed(self) -> bool:
        watch, mark = self._subscriptions, self._subscriptions_mark
        return watch is not None and mark is not None and watch.seen_since(mark)

    def _watch_subscriptions(self, sources: Sequence[SourceSpec], timeout_s: float) -> SubscriptionWatch:
        """Watch the broker the system subscribes at, once it has shown how it reports subscriptions."""
        where = "system.external.ready.subscribed"
        url = self.values["broker_url"]
        mqtt = next((s.settings for s in sources if str(getattr(s.settings, "url", "")) == url), None)
        if mqtt is None or not url:
            raise ScenarioError(f"{where}: needs an MQTT transport (a broker to watch); use ready: log, port or file")
        try:
            username = resolve_env(getattr(mqtt, "username", None), "transport.mqtt.username")
            password = resolve_env(getattr(mqtt, "password", None), "transport.mqtt.password")
        except ConfigError as exc:
            raise ScenarioError(str(exc)) from None
        watch = SubscriptionWatch(url, self.values["topic"], username=username, password=password)
        watch.start()
        if not watch.settle(timeout_s):
            watch.close()
            raise ServiceError(f"{where}: within {timeout_s:g} s, {watch.explain()}")
        return watch

    def _end(self, how: signal.Signals, timeout_s: float) -> None:
        if not self.starts:
            return
        process = self.starts[-1]
        proc = process.proc
        end_process(proc, how, timeout_s)
        process.join()
        if len(self.exit_codes) < len(self.starts):
            self.exit_codes.append(proc.returncode)

    def log_tail(self) -> str:
        return log_tail(self.log_path, 15)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def check_seqs_found(back: ReadBack, persisted: int, output: OutputSettings) -> None:
    """Rows in its output, and not one of them holds a seq the bench sent: the mapping points at another
    number (its own row id, an offset), and every message would be reported lost. Say that instead."""
    if persisted or not back.persisted_seqs:
        return
    sample = ", ".join(str(s) for s in sorted(set(back.persisted_seqs))[:5])
    raise ServiceError(
        f"system.external.output.columns.seq: none of the {len(back.persisted_seqs):,} rows of its output holds a "
        f"seq the bench sent (field {output.columns.seq!r} holds e.g. {sample}); map the field that holds the seq "
        "of each payload (or set transport.mqtt.seq_property / a {seq} topic level if it drops unknown fields)"
    )
