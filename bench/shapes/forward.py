"""The store-and-forward shape's harness: generator -> filter -> outbox -> sender -> an upstream with faults.

For each variant of the scenario's ``forward:`` section (built-in strategies, then external pipelines), on the same
seeded stream:

1. start the fake upstream (simulators.forward_upstream, port 0) and the pipeline: a built-in strategy
   (pipeline.forward) in this process with its SQLite outbox in the variant's folder, or an external one as a
   process (bench.shapes.external.ShapeProcess, ``{upstream_url}`` filled in);
2. feed the stream's payloads to it, each at its intended send time (open model): in process for a built-in
   strategy, as JSON lines on its standard input for an external one. The stream does not travel over MQTT here:
   the shape under test starts at the filter, and an MQTT hop would only add a transport this shape does not
   exercise. A timeline thread switches the upstream's faults on and off; the feeder itself carries out the
   ``kill`` faults (external pipelines only), between two readings;
3. let the pipeline drain (built-in: ``drain_timeout`` without progress; external: it exits after its input
   closes, within its ``stop_timeout``), stop it, stop the upstream;
4. reconcile from what was *stored*, never from the sender's counters: delivered and duplicates from the
   upstream's store; filtered / dropped / still queued from the outbox file (built-in), or, for an external
   pipeline whose storage the bench cannot see, the readings its filter should refuse judged by their truth label.

A lost seq is named by a fault when there is evidence: the upstream answered 500 to a request that held it (its
own log), it was sent while the upstream was down (intended send time inside the outage, widened by
``DOWN_SLACK_S`` either side for the batch in flight when the listener closed and reopened), or it was handed to
an external pipeline in the ``DOWN_SLACK_S`` before it was killed. A duplicate is named when the upstream stored
it in a request whose acknowledgement it withheld (``lost_ack``) or answered late (``slow``), or stored it before
a kill and again after the restart (``kill``). The baselines' named failures are their point (naive: losses;
retry: duplicates) and do not fail the run; anything unexplained does, and for the outbox any loss, duplicate or
reordering does.

The kill, precisely (docs/forward.md): at its time the feeder stops writing, waits until the pipeline has read
everything written (the pipe's unread byte count, ``FIONREAD``, is 0; at most ``PIPE_EMPTY_WAIT_S``), then
``KILL_QUIET_S`` more, then SIGKILLs it. Bytes still unread in the pipe after the kill (the pipeline never took
them) are written again to the restarted process (``resent_after_kill``); readings due while it was dead are
held by the bench and written once it is back (``held_during_kill``, their latency includes the wait). Neither is
the pipeline's loss; what it had taken and not delivered or made durable is.
"""

from __future__ import annotations

import array
import fcntl
import os
import sqlite3
import termios
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import ScenarioError, ServiceError
from bench.harness.ledger import Ledger
from bench.harness.progress import Progress
from bench.scenario import LoadedScenario, apply_overrides
from bench.shapes.external import ShapeProcess
from bench.shapes.forward_settings import ForwardExternal, ForwardSettings, UpstreamFault
from bench.shapes.run_file import ShapeRunFile
from pipeline.forward import ForwardConfig, ForwardPipeline, SenderStats
from pipeline.probes import Recorder
from simulators.anomalies import inject
from simulators.forward_upstream import Upstream, UpstreamLog
from simulators.stream import Message, planned_count, stream, total_duration_s

if TYPE_CHECKING:  # the runner imports this module lazily; importing it back at load time would be a cycle
    from bench.harness.runner import RunOptions, RunOutcome

START_LEAD_NS = 200_000_000
DOWN_SLACK_S = 1.0
"""Seconds either side of an outage (and before a kill) within which a lost seq counts as in flight during it."""
KILL_QUIET_S = 0.2
"""After the pipe is empty, this long without a write before the kill: the pipeline has had time to store the
last reading it read (a kill racing a reading's own hand-over measures the pipe, not the pipeline)."""
PIPE_EMPTY_WAIT_S = 2.0
LATE_FRACTION = 0.5
"""An answer slower than this fraction of the sender's timeout is evidence its acknowledgement may have been lost
(the sender's clock starts before the upstream's: connect and send)."""
PROGRESS_EVERY_NS = 250_000_000
# Anomalies whose payload cannot name its seq: the filter's rejects table could not be matched to the send.
_UNREADABLE = frozenset({"malformed_json", "invalid_utf8", "oversize", "duplicate_key"})
FILTER_REFUSES = frozenset(
    {"nan", "inf", "null", "missing_field", "number_as_string", "bool_value", "epoch_seconds", "epoch_millis"}
)
"""Truth labels of readings a store-and-forward filter refuses (no finite number, or no ``ts`` string): the
built-in filter's decisions (tests/test_shape_forward.py checks they agree), used to judge external pipelines."""


def _timeline(
    upstream: Upstream, faults: tuple[UpstreamFault, ...], epoch_ns: int
) -> list[tuple[int, Callable[[], None]]]:
    """(monotonic ns, action) pairs that switch each upstream fault on at ``at`` and off after ``duration``."""
    events: list[tuple[int, Callable[[], None]]] = []
    for f in faults:
        if f.kind == "kill":
            continue  # the feeder's, not the upstream's
        start, end = epoch_ns + round(f.at * 1e9), epoch_ns + round(f.end * 1e9)
        if f.kind == "down":
            events += [(start, upstream.down), (end, upstream.up)]
        elif f.kind == "error":
            events += [(start, _setter(upstream, "error_fraction", f.fraction or 0.0))]
            events += [(end, _setter(upstream, "error_fraction", 0.0))]
        elif f.kind == "lost_ack":
            events += [(start, _setter(upstream, "lost_ack_fraction", f.fraction or 0.0))]
            events += [(end, _setter(upstream, "lost_ack_fraction", 0.0))]
        else:
            events += [(start, _setter(upstream, "delay_s", f.delay or 0.0))]
            events += [(end, _setter(upstream, "delay_s", 0.0))]
    return sorted(events, key=lambda e: e[0])


def _setter(upstream: Upstream, name: str, value: float) -> Callable[[], None]:
    return lambda: setattr(upstream, name, value)


def _play(events: list[tuple[int, Callable[[], None]]], stop: threading.Event) -> None:
    for at_ns, action in events:
        while (wait := at_ns - time.monotonic_ns()) > 0:
            if stop.wait(min(wait / 1e9, 0.05)):
                break
        action()  # also when stopped early: every fault is switched off again


def _sleep_until(ns: int) -> None:
    while (wait := ns - time.monotonic_ns()) > 0:
        time.sleep(wait / 1e9)


def _read_outbox(path: Path) -> tuple[set[int], set[int], Counter[str], set[int]]:
    """(filtered seqs, dropped seqs, dropped by reason, seqs still in the outbox), read back from the file."""
    db = sqlite3.connect(path)
    try:
        filtered = {s for (s,) in db.execute("SELECT seq FROM rejected WHERE seq IS NOT NULL")}
        dropped_rows = db.execute("SELECT seq, reason FROM dropped").fetchall()
        queued = {s for (s,) in db.execute("SELECT seq FROM outbox")}
    finally:
        db.close()
    return filtered, {s for s, _ in dropped_rows}, Counter(r for _, r in dropped_rows), queued


@dataclass
class FeedLog:
    """The bench's side of a variant's input: what it handed over, when, and what a kill made it do."""

    send_lag: Recorder = field(default_factory=Recorder)
    handed_ns: dict[int, int] = field(default_factory=dict)
    """seq -> when it was last handed to the pipeline (monotonic ns)."""
    kills: list[tuple[int, int]] = field(default_factory=list)
    """(SIGKILL sent, process ready again), monotonic ns."""
    held: int = 0
    """Readings due while the process was dead, written once it was back."""
    resent: int = 0
    """Readings written before a kill but still unread in the pipe after it, written again after the restart."""
    not_written: list[int] = field(default_factory=list)
    """Seqs the bench could not write: the process had exited (counted lost: the pipeline was not there)."""


class _Target:
    """Where the feeder hands readings: a built-in strategy in process, or an external pipeline's stdin."""

    refused = 0
    """Readings refused at the put (built-in only: an external pipeline's decisions are not visible)."""

    def put(self, m: Message, log: FeedLog) -> None:
        raise NotImplementedError

    def crash(self, kill_ns: int, restart_ns: int, log: FeedLog) -> None:
        del kill_ns, restart_ns, log  # a built-in strategy runs in the bench's process: nothing to kill

    def backlog(self, delivered: int, handed: int) -> int:
        return max(0, handed - delivered)


class _InProcess(_Target):
    def __init__(self, pipeline: ForwardPipeline) -> None:
        self.pipeline = pipeline

    def put(self, m: Message, log: FeedLog) -> None:
        if self.pipeline.put(m.payload) is not None:
            self.refused += 1

    def backlog(self, delivered: int, handed: int) -> int:
        return self.pipeline.outbox.rows


def _unread(fd: int) -> int:
    """Bytes written to a pipe and not read yet (Linux answers on the write end too, after the reader died)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return int(buf[0])


class _Process(_Target):
    def __init__(self, proc: ShapeProcess) -> None:
        self.proc = proc
        self._recent: deque[tuple[int, bytes]] = deque()
        self._recent_bytes = 0
        self._keep = 1 << 20  # the pipe's capacity, read once it runs (below): what may still be unread

    def started(self) -> None:
        p = self.proc.proc
        if p is not None and p.stdin is not None:
            self._keep = fcntl.fcntl(p.stdin.fileno(), fcntl.F_GETPIPE_SZ)

    def _write(self, seq: int, line: bytes, log: FeedLog) -> None:
        if not self.proc.send(line):
            log.not_written.append(seq)
            return
        self._recent.append((seq, line))
        self._recent_bytes += len(line) + 1
        while self._recent and self._recent_bytes - len(self._recent[0][1]) - 1 >= self._keep:
            self._recent_bytes -= len(self._recent.popleft()[1]) + 1

    def put(self, m: Message, log: FeedLog) -> None:
        self._write(m.seq, m.payload, log)

    def crash(self, kill_ns: int, restart_ns: int, log: FeedLog) -> None:
        _sleep_until(kill_ns)
        p = self.proc.proc
        unread = 0
        if p is not None and p.stdin is not None and not p.stdin.closed and self.proc.alive():
            # A second handle on the pipe's write end: kill() closes the bench's, and the count is read after it.
            fd = os.dup(p.stdin.fileno())
            try:
                deadline = time.monotonic() + PIPE_EMPTY_WAIT_S
                while _unread(fd) and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(KILL_QUIET_S)
                killed = time.monotonic_ns()
                self.proc.kill()
                unread = _unread(fd)
            finally:
                os.close(fd)
        else:
            killed = time.monotonic_ns()
            self.proc.kill()
        # The lines any of whose bytes are among the last ``unread`` were not (wholly) taken: written again.
        again: list[tuple[int, bytes]] = []
        covered = 0
        for seq, line in reversed(self._recent):
            if covered >= unread:
                break
            again.append((seq, line))
            covered += len(line) + 1
        self._recent.clear()
        self._recent_bytes = 0
        _sleep_until(restart_ns)
        self.proc.restart()
        self.started()
        log.kills.append((killed, time.monotonic_ns()))
        for seq, line in reversed(again):
            self._write(seq, line, log)
        log.resent += len(again)


def _feed(
    messages: Sequence[Message],
    target: _Target,
    log: FeedLog,
    *,
    kills: Sequence[tuple[int, int]],
    tick: Callable[[int, int, int], None] | None,
) -> None:
    """Hand each reading over at its intended send time; carry out the kills, in order, at theirs."""
    pending = sorted(kills)
    next_tick = 0
    for sent, m in enumerate(messages, 1):
        while pending and pending[0][0] <= m.intended_send_ns:
            kill_ns, restart_ns = pending.pop(0)
            target.crash(kill_ns, restart_ns, log)
            _, hi = log.kills[-1] if log.kills else (kill_ns, kill_ns)
            log.held += sum(1 for x in messages if kill_ns <= x.intended_send_ns < hi)
        _sleep_until(m.intended_send_ns)
        now = time.monotonic_ns()
        log.send_lag.record_ns(now - m.intended_send_ns)
        target.put(m, log)
        log.handed_ns[m.seq] = now
        if tick is not None and now >= next_tick:
            next_tick = now + PROGRESS_EVERY_NS
            tick(sent, now, now - m.intended_send_ns)
    for kill_ns, restart_ns in pending:  # after the last reading: it is killed while it drains
        target.crash(kill_ns, restart_ns, log)


def _explain_duplicates(
    log: UpstreamLog, kills: Sequence[tuple[int, int]], intended: dict[int, int]
) -> tuple[int, Counter[str], list[int]]:
    """(seqs stored more than once, those named by a fault, the unexplained ones)."""
    times: dict[int, list[int]] = {}
    for s in log.stored:
        if s.seq in intended:
            times.setdefault(s.seq, []).append(s.at_ns)
    lost_ack, late = set(log.lost_ack_seqs), set(log.late_seqs)
    by_fault: Counter[str] = Counter()
    unexplained: list[int] = []
    dups = sorted(seq for seq, t in times.items() if len(t) > 1)
    for seq in dups:
        first, last = times[seq][0], times[seq][-1]
        if seq in lost_ack:
            by_fault["lost_ack"] += 1
        elif seq in late:
            by_fault["slow"] += 1
        elif any(first <= k and last >= r for k, r in kills):
            by_fault["kill"] += 1
        else:
            unexplained.append(seq)
    return len(dups), by_fault, unexplained


def reconcile(
    strategy: str,
    *,
    sent: list[Message],
    log: UpstreamLog,
    outbox_file: Path | None,
    faults: tuple[UpstreamFault, ...],
    epoch_ns: int,
    stats: SenderStats | None,
    baseline: bool | None = None,
    feed: FeedLog | None = None,
) -> tuple[dict[str, Any], Ledger, Recorder]:
    """The variant's ``forward`` part, its generic ledger, and delivery latency (intended send -> stored).

    ``outbox_file`` None: an external pipeline, whose storage the bench cannot read: its filter's expected
    refusals are judged by truth label (``FILTER_REFUSES``) and nothing is known to be still queued.
    ``baseline``: its named failures are its point (default: the naive and retry strategies)."""
    external = outbox_file is None
    intended = {m.seq: m.intended_send_ns for m in sent}
    kills = feed.kills if feed is not None else []
    stored = Counter(s.seq for s in log.stored)
    delivered = set(stored) & intended.keys()
    unexpected = len(set(stored) - intended.keys())
    n_dups, dups_by_fault, dups_unexplained = _explain_duplicates(log, kills, intended)
    latency = Recorder()
    first: set[int] = set()
    last_by_machine: dict[str, int] = {}
    out_of_order = 0
    for s in log.stored:
        if s.seq not in intended or s.seq in first:
            continue  # order is judged on first storage: a re-sent batch is a duplicate, counted as such
        first.add(s.seq)
        latency.record_ns(s.at_ns - intended[s.seq])
        if s.seq < last_by_machine.get(s.machine, -1):
            out_of_order += 1
        last_by_machine[s.machine] = max(s.seq, last_by_machine.get(s.machine, -1))
    dropped_by_reason: Counter[str] = Counter()
    passed_bad: int | None = None
    by_truth: Counter[str] = Counter()
    if outbox_file is None:
        should_refuse = {m.seq for m in sent if m.truth in FILTER_REFUSES}
        filtered, dropped, queued = should_refuse - delivered, set[int](), set[int]()
        passed_bad = len(should_refuse & delivered)
        by_truth = Counter(m.truth for m in sent if m.seq in filtered)
    else:
        filtered, dropped, dropped_by_reason, queued = _read_outbox(outbox_file)
    # A seq is counted once, in the first place that explains it: delivered, then filtered, dropped, queued.
    explained = delivered | filtered | dropped | queued
    missing = sorted(intended.keys() - explained)
    refused_500 = set(log.answered_500)
    outages = [
        (epoch_ns + round((f.at - DOWN_SLACK_S) * 1e9), epoch_ns + round((f.end + DOWN_SLACK_S) * 1e9))
        for f in faults
        if f.kind == "down"
    ]
    handed = feed.handed_ns if feed is not None else {}
    by_fault: Counter[str] = Counter()
    unexplained: list[int] = []
    for seq in missing:
        if seq in refused_500:
            by_fault["error"] += 1
        elif any(lo <= intended[seq] <= hi for lo, hi in outages):
            by_fault["down"] += 1
        elif any(k - DOWN_SLACK_S * 1e9 <= handed.get(seq, -1) <= k for k, _ in kills):
            by_fault["kill"] += 1  # taken by the process just before it was killed, never delivered
        else:
            unexplained.append(seq)
    expected_loss = strategy == "naive" if baseline is None else baseline
    expected_duplicates = strategy in ("naive", "retry") if baseline is None else baseline
    n_filtered = len(filtered - delivered)
    n_dropped = len(dropped - delivered - filtered)
    n_queued = len(queued - delivered - filtered - dropped)
    part: dict[str, Any] = {
        "strategy": strategy,
        "external": external,
        "sent": len(intended),
        "filtered": n_filtered,
        "dropped": n_dropped,
        "dropped_by_reason": dict(sorted(dropped_by_reason.items())),
        "delivered": len(delivered),
        "passed_bad": passed_bad,
        "duplicates": n_dups,
        "duplicates_by_fault": dict(sorted(dups_by_fault.items())),
        "unexplained_duplicates": len(dups_unexplained),
        "deduplicated": log.deduplicated,
        "in_outbox": None if external else n_queued,
        "lost": len(missing),
        "lost_by_fault": dict(sorted(by_fault.items())),
        "unexplained": len(unexplained),
        "expected_loss": expected_loss,
        "expected_duplicates": expected_duplicates,
        "out_of_order": out_of_order,
        "requests": stats.requests if stats is not None else log.requests,
        "retries": stats.retries if stats is not None else None,
        "failed_requests": dict(sorted(stats.failures.items())) if stats is not None else {},
        "acks_lost": log.acks_lost,
        "lost_sample": missing[:20],
    }
    if feed is not None and external:
        part |= {
            "kills": len(feed.kills),
            "held_during_kill": feed.held,
            "resent_after_kill": feed.resent,
            "not_written": len(feed.not_written),
        }
    # The generic ledger: named losses of a baseline are set aside by name (like a fault the configuration never
    # promised to survive), and so are its named duplicates; what is still queued is named too. Everything else
    # missing is lost.
    named = {f"deleted_before_ack:{k}": n for k, n in by_fault.items()} if expected_loss else {}
    reasons = dict(dropped_by_reason)
    if n_queued:
        reasons["still_in_outbox"] = n_queued
    reasons.update(named)
    lost = len(unexplained) if expected_loss else len(missing)
    ledger = Ledger(
        sent=len(intended),
        persisted=len(delivered),
        rejected=n_filtered if not external else 0,
        dropped=n_dropped + n_queued + sum(named.values()),
        lost=lost,
        duplicates=len(dups_unexplained) if expected_duplicates else n_dups,
        unexpected=unexpected,
        missing_seq_sample=(unexplained if expected_loss else missing)[:20],
        dropped_by_reason=reasons,
        not_persisted_expected=n_filtered if external else None,
        not_persisted_by_truth=dict(sorted(by_truth.items())) if external else None,
    )
    return part, ledger, latency


def _problems(part: dict[str, Any]) -> list[str]:
    """What fails the run beyond the ledger: for a strategy that promises delivery, any loss (named or not) and
    any reordering. The naive baseline's reordering is expected (a timed-out batch still being stored while the
    next one is), like its named losses."""
    out: list[str] = []
    if part["expected_loss"]:
        return out
    if part["out_of_order"]:
        out.append(f"{part['out_of_order']} record(s) stored upstream out of per-machine order")
    if part["lost"]:
        out.append(f"{part['lost']} lost during faults {part['lost_by_fault']} by a pipeline that promises none")
    return out


@dataclass
class _Ran:
    log: UpstreamLog
    feed: FeedLog
    stats: SenderStats | None = None
    exit_codes: list[int | None] = field(default_factory=list)
    usage: dict[str, float] | None = None
    errors: list[str] = field(default_factory=list)


def _kills(faults: Iterable[UpstreamFault], epoch_ns: int) -> list[tuple[int, int]]:
    return [(epoch_ns + round(f.at * 1e9), epoch_ns + round(f.end * 1e9)) for f in faults if f.kind == "kill"]


def _run_variant(
    variant: str | ForwardExternal,
    settings: ForwardSettings,
    messages: list[Message],
    *,
    seed: int,
    folder: Path,
    epoch_ns: int,
    where: str,
    scenario_dir: Path,
    tick: Callable[[int, int, int, _Target, UpstreamLog], None] | None = None,
) -> _Ran:
    folder.mkdir(parents=True, exist_ok=True)
    upstream = Upstream(seed=seed)
    upstream.late_after_s = settings.timeout * LATE_FRACTION
    upstream.start()
    feed = FeedLog()
    stop = threading.Event()
    timeline = threading.Thread(
        target=_play, args=(_timeline(upstream, settings.faults, epoch_ns), stop), name="upstream-faults", daemon=True
    )
    target: _Target
    pipeline: ForwardPipeline | None = None
    proc: ShapeProcess | None = None
    if isinstance(variant, str):
        pipeline = ForwardPipeline(
            ForwardConfig(
                upstream=upstream.url,
                db_path=folder / "outbox.sqlite",
                strategy="naive" if variant == "naive" else "retry" if variant == "retry" else "outbox",
                batch_size=settings.batch_size,
                max_rows=settings.max_rows,
                overflow=settings.overflow,
                timeout_s=settings.timeout,
                backoff_base_s=settings.backoff_base,
                backoff_cap_s=settings.backoff_cap,
                seed=seed,
            )
        )
        target = _InProcess(pipeline)
    else:
        proc = ShapeProcess(
            variant,
            where=where,
            scenario_dir=scenario_dir,
            folder=folder,
            values={"upstream_url": upstream.url, "seed": str(seed)},
        )
        target = _Process(proc)
    ran = _Ran(upstream.log, feed)
    step = None if tick is None else (lambda sent, now, lag: tick(sent, now, lag, target, upstream.log))
    try:
        if pipeline is not None:
            pipeline.start()
        if proc is not None:
            proc.start()
            assert isinstance(target, _Process)
            target.started()
        timeline.start()
        _feed(messages, target, feed, kills=_kills(settings.faults, epoch_ns), tick=step)
        # Every fault ends before the drain is judged: an outage past the stream's end is still an outage.
        timeline.join()
        if pipeline is not None:
            pipeline.close(settings.drain_timeout)
            ran.stats = pipeline.stats
        if proc is not None:
            code = proc.finish()
            ran.exit_codes, ran.usage = list(proc.exit_codes), proc.usage()
            if code is not None and code < 0:
                ran.errors.append(
                    f"it did not exit within stop_timeout ({proc.spec.stop_timeout:g} s) after its input closed "
                    f"(ended by signal {-code}); its last output ({proc.log_path}):\n{proc.tail()}"
                )
    finally:
        stop.set()
        if timeline.is_alive():
            timeline.join()
        if proc is not None and proc.alive():
            proc.finish()
        upstream.down()
    return ran


def _progress_tick(
    on_progress: Callable[[Progress], None], name: str, position: tuple[int, int], planned: int, epoch_ns: int
) -> Callable[[int, int, int, _Target, UpstreamLog], None]:
    def tick(sent: int, now: int, lag_ns: int, target: _Target, log: UpstreamLog) -> None:
        delivered = len({s.seq for s in log.stored})
        elapsed = (now - epoch_ns) / 1e9
        refused = target.refused
        on_progress(
            Progress(
                variant=name,
                variant_index=position[0],
                variants=position[1],
                elapsed_s=elapsed,
                planned=planned,
                sent=sent,
                received=delivered,
                persisted=delivered,
                rejected=refused,
                # The mean over the run so far; below a second it would mostly say how early the first send was.
                send_rate=sent / elapsed if elapsed >= 1 else 0.0,
                lag_s=max(0.0, lag_ns / 1e9),
                backlog=target.backlog(delivered + refused, sent),  # built-in: rows in the outbox
                phase="forward",
            )
        )

    return tick


def run_forward(
    loaded: LoadedScenario,
    options: RunOptions,
    run_dir: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    """``bench run`` for a scenario with a ``forward:`` section: one variant per strategy and per external
    pipeline, side by side, each on the same stream against its own upstream with the same faults."""
    from bench.harness.runner import RunOutcome, _failure  # the runner imports this module lazily

    sc = loaded.scenario
    settings = sc.forward
    assert settings is not None
    if len(loaded.variants) > 1:
        raise ScenarioError(f"{loaded.path}: matrix: not used with forward:, list forward.strategies instead")
    bad = sorted({a.kind for a in sc.anomalies} & _UNREADABLE)
    if bad:
        raise ScenarioError(
            f"{loaded.path}: anomalies: {', '.join(bad)} hide the seq, which forward: needs to reconcile; "
            "expected kinds whose payload keeps its seq (nan, inf, null, out_of_range, ...)"
        )
    spec = apply_overrides(sc.stream_spec(), options.messages, options.duration_s)
    run_file = ShapeRunFile.begin(loaded)
    variants: list[dict[str, Any]] = []
    ledgers: dict[str, Ledger] = {}
    errors: dict[str, list[str]] = {}
    failures: dict[str, str] = {}
    ts_epoch = time.time_ns()
    runs: list[str | ForwardExternal] = [*settings.strategies, *settings.external]
    planned = planned_count(spec)
    duration_s = total_duration_s(spec)
    for index, variant in enumerate(runs):
        name = variant if isinstance(variant, str) else variant.name
        epoch = time.monotonic_ns() + START_LEAD_NS
        messages = list(inject(stream(spec, epoch, ts_epoch), [a.spec() for a in sc.anomalies], seed=sc.seed))
        sent = [m for m in messages if not m.copy]
        folder = run_dir / name
        tick = None if on_progress is None else _progress_tick(on_progress, name, (index, len(runs)), planned, epoch)
        ext_index = index - len(settings.strategies)
        try:
            ran = _run_variant(
                variant,
                settings,
                messages,
                seed=sc.seed,
                folder=folder,
                epoch_ns=epoch,
                where=f"{loaded.path}: forward.external[{ext_index}]",
                scenario_dir=loaded.path.parent,
                tick=tick,
            )
        except ServiceError as exc:
            # An external pipeline that cannot start (or restart after a kill) must not take the others with it.
            failures[name] = _failure(exc, run_dir / f"{name}-failure.txt")
            continue
        part, ledger, latency = reconcile(
            name if isinstance(variant, str) else "external",
            sent=sent,
            log=ran.log,
            outbox_file=folder / "outbox.sqlite" if isinstance(variant, str) else None,
            faults=settings.faults,
            epoch_ns=epoch,
            stats=ran.stats,
            baseline=None if isinstance(variant, str) else variant.baseline,
            feed=ran.feed,
        )
        if not isinstance(variant, str):
            part |= {"exit_codes": ran.exit_codes, "usage": ran.usage}
        ledgers[name] = ledger
        errors[name] = _problems(part) + ran.errors
        last_ns = max((s.at_ns for s in ran.log.stored), default=epoch)
        pipeline_config: dict[str, Any] = (
            {"shape": "forward", "strategy": variant, **settings.model_dump(mode="json", exclude={"external"})}
            if isinstance(variant, str)
            else {
                "shape": "forward",
                "external": variant.model_dump(mode="json"),
                "timeout": settings.timeout,
                "faults": [f.model_dump(mode="json") for f in settings.faults],
            }
        )
        variants.append(
            {
                "name": name,
                "config": {
                    "pipeline": pipeline_config,
                    "stream": {
                        "planned": planned,
                        "duration_s": duration_s,
                        "arrival": spec.arrival,
                        "machines": len(spec.machines),
                        "overrides": {"messages": options.messages, "duration_s": options.duration_s},
                    },
                },
                "ledger": ledger.to_json(),
                "throughput": {
                    "offered_per_s": round(planned / duration_s, 3) if duration_s else None,
                    "sent_per_s": round(len(sent) / duration_s, 3) if duration_s else None,
                    "persisted_per_s": round(
                        len({s.seq for s in ran.log.stored}) / max((last_ns - epoch) / 1e9, 1e-9), 3
                    ),
                },
                "latency_ms": {"end_to_end": latency.summary(ladder=True), "send_lag": ran.feed.send_lag.summary()},
                "probes": {},
                "forward": part,
            }
        )
    written = run_file.write(loaded, run_dir, variants, failures)
    return RunOutcome(run_dir, written, ledgers, errors, failures)


def summary_lines(variants: Iterable[Any]) -> list[str]:
    """The store-and-forward ledger in words, one line per variant (the CLI prints it under the summary)."""
    lines = []
    for v in variants:
        f = v.forward
        if f is None:
            continue
        by_fault = ", ".join(f"{k} {n:,}" for k, n in f.lost_by_fault.items()) or "none"
        dup_fault = ", ".join(f"{k} {n:,}" for k, n in f.duplicates_by_fault.items())
        filtered = (
            f"filtered {f.filtered:,}, dropped {f.dropped:,}"
            if not f.external
            else f"should-refuse not delivered {f.filtered:,}, delivered anyway {f.passed_bad or 0:,}"
        )
        kill = (
            f"; kills {f.kills:,} (held by the bench {f.held_during_kill or 0:,}, re-sent unread "
            f"{f.resent_after_kill or 0:,})"
            if f.kills
            else ""
        )
        lines.append(
            f"{v.name}: delivered {f.delivered:,} of {f.sent:,} ({filtered}); "
            f"lost {f.lost:,} (by fault: {by_fault}; unexplained {f.unexplained:,})"
            + (" as this baseline is expected to" if f.expected_loss and f.lost else "")
            + f"; duplicates upstream {f.duplicates:,}"
            + (f" (by fault: {dup_fault}; unexplained {f.unexplained_duplicates or 0:,})" if dup_fault else "")
            + f" ({f.deduplicated:,} repeats recognised by key); "
            f"left in outbox {'-' if f.in_outbox is None else f'{f.in_outbox:,}'}; out of order {f.out_of_order:,}; "
            f"retries {'-' if f.retries is None else f'{f.retries:,}'}{kill}"
        )
    return lines
