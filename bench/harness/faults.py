"""Timed faults of a scenario, chosen by kind from :data:`FAULTS`, each waiting for its moment on the run's clock.

``slow_sink`` is not here: it is a setting of the system under test (see ``Scenario.sink_delay_s``). Every
fault that happens is recorded as a :class:`FaultEvent` on the run's clock: the accounting names the losses in
its window, and the results say how long the system took to come back.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.errors import ScenarioError
from bench.harness.session import Endpoints
from bench.scenario import (
    BrokerPartitionFault,
    BrokerRestartFault,
    DbOutageFault,
    DiskFullFault,
    Fault,
    ProcessKillFault,
    ProcessRestartFault,
    ServerRestartFault,
    SinkErrorFault,
)
from pipeline.clock import Clock

RECOVERY_TIMEOUT_S = 60.0
"""After a fault ends, how long the bench watches for the system to be back before it says it never was."""


@dataclass
class FaultEvent:
    """One occurrence of a fault: when it struck and when the system was back (ns on the run's clock)."""

    kind: str
    struck_ns: int
    recovered_ns: int | None = None
    error: str | None = None
    healed_ns: int | None = None
    """When the fault itself ended (the broker back, the partition healed, space freed); None for a kill,
    whose end is the restart (``recovered_ns``)."""
    detail: str | None = None
    fault: Fault | None = None
    """The scenario entry that caused it (what it promised depends on its settings, e.g. persistence)."""


class Restartable(Protocol):
    """A broker the bench started and can restart on the same port."""

    def halt(self, *, persistence: bool = True) -> None: ...
    def resume(self) -> None: ...


class Proxy(Protocol):
    """The TCP proxy the bench puts between the system under test and a service (bench.harness.proxy)."""

    def drop(self) -> None: ...
    def half_open(self) -> None: ...
    def delay(self, seconds: float) -> None: ...
    def throttle(self, bytes_per_s: int) -> None: ...
    def heal(self) -> None: ...


class Volume(Protocol):
    """A size-limited output location the bench can fill and free (bench.harness.volume)."""

    def fill(self) -> None: ...
    def free(self) -> None: ...


@dataclass
class FaultContext:
    """What a fault acts on, and where it records what happened."""

    endpoints: Endpoints
    sut: Any
    epoch_ns: int
    clock: Clock
    stop: threading.Event
    events: list[FaultEvent] = field(default_factory=list)
    seed: int = 0
    """The scenario's seed: random fault moments (jitter) are the same in every run of it."""
    broker: Restartable | None = None
    mqtt_proxy: Proxy | None = None
    db_proxy: Proxy | None = None
    volume: Volume | None = None
    injection_file: Path | None = None
    """Where the pipeline reads injected sink errors from (pipeline.fault_injection), for sink_error."""

    sending_done: Callable[[], bool] = lambda: False
    """True once every message was sent: a system that is back but has nothing left to receive is back."""

    def wait_until(self, at_s: float) -> bool:
        """Wait for ``at_s`` seconds after the first send; False when the run stopped first."""
        return not self.stop.wait(max(0.0, (self.epoch_ns + at_s * 1e9 - self.clock.now_ns()) / 1e9))


FaultAction = Callable[[Fault, FaultContext], Callable[[], None]]


def _server_restart(fault: Fault, ctx: FaultContext) -> Callable[[], None]:
    assert isinstance(fault, ServerRestartFault)
    server = ctx.endpoints.plant
    if server is None:
        raise ScenarioError("faults: server_restart needs the embedded OPC UA server (transport opcua or both)")

    def restart() -> None:
        if not ctx.wait_until(fault.at):
            return
        event = FaultEvent(fault.kind, ctx.clock.now_ns())
        ctx.events.append(event)
        server.stopped_at_ns.append(event.struck_ns)
        server.stop_server()
        ctx.stop.wait(fault.down_for)  # the fault's own duration, not a guess
        server.restart_server()
        event.recovered_ns = event.healed_ns = ctx.clock.now_ns()

    return restart


def _process_fault(fault: Fault, ctx: FaultContext) -> Callable[[], None]:
    """Kill (SIGKILL) or stop (SIGTERM) the system under test at each moment, then start it again."""
    assert isinstance(fault, ProcessKillFault | ProcessRestartFault)
    sut = ctx.sut
    if not hasattr(sut, "restart"):
        raise ScenarioError(f"faults: {fault.kind} needs system.kind: process")

    def strike() -> None:
        for at_s in fault.moments(ctx.seed):
            if not ctx.wait_until(at_s):
                return
            event = FaultEvent(fault.kind, ctx.clock.now_ns(), fault=fault)
            ctx.events.append(event)
            if isinstance(fault, ProcessKillFault):
                sut.kill()
            else:
                sut.stop()
            if ctx.stop.wait(fault.restart_after):
                return
            try:
                sut.restart()  # returns once subscribed again
            except Exception as exc:  # reported in the results; the run goes on to its ledger
                event.error = str(exc)
                return
            event.recovered_ns = event.healed_ns = ctx.clock.now_ns()

    return strike


def _back_after(ctx: FaultContext, event: FaultEvent, *, stall_matters: bool) -> None:
    """Once a fault has ended: when is the system back? It is when it receives again (its counter moves) and,
    for a fault of its storage, when it no longer says it is stalled (if it can tell). Polled: the system may
    be another process."""
    received = getattr(ctx.sut, "received", None)
    stalled = getattr(ctx.sut, "stalled", None) if stall_matters else None
    start = received() if received is not None else None
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline and not ctx.stop.is_set():
        moved = start is None or received is None or received() != start or ctx.sending_done()
        if moved and (stalled is None or stalled() is False):
            event.recovered_ns = ctx.clock.now_ns()
            return
        time.sleep(0.02)  # polling another process's counters
    if event.recovered_ns is None and not ctx.stop.is_set():
        event.error = f"not back within {RECOVERY_TIMEOUT_S:g} s after the fault ended"


def _window_fault(fault: Fault, ctx: FaultContext) -> Callable[[], None]:
    """A fault with a duration: begin it at each moment, end it ``duration`` later, then watch for recovery."""
    begin, end, detail, stall_matters = _window_actions(fault, ctx)
    assert hasattr(fault, "moments") and hasattr(fault, "duration")

    def strike() -> None:
        for at_s in fault.moments(ctx.seed):
            if not ctx.wait_until(at_s):
                return
            event = FaultEvent(fault.kind, ctx.clock.now_ns(), detail=detail, fault=fault)
            ctx.events.append(event)
            try:
                begin()
                ctx.stop.wait(fault.duration)
            except Exception as exc:  # reported in the results; the run goes on to its ledger
                event.error = f"{type(exc).__name__}: {exc}"
            finally:
                try:
                    end()
                except Exception as exc:
                    event.error = f"ending the fault failed: {type(exc).__name__}: {exc}"
                event.healed_ns = ctx.clock.now_ns()
            if event.error is None:
                _back_after(ctx, event, stall_matters=stall_matters)

    return strike


def _window_actions(fault: Fault, ctx: FaultContext) -> tuple[Callable[[], None], Callable[[], None], str, bool]:
    """(begin, end, a description, whether recovery means the system's storage is writing again)."""
    if isinstance(fault, BrokerRestartFault):
        broker = ctx.broker
        if broker is None:
            raise ScenarioError("faults: broker_restart needs a broker the bench started (embedded or mosquitto)")
        return (
            lambda: broker.halt(persistence=fault.persistence),
            broker.resume,
            f"persistence {'on' if fault.persistence else 'off'}",
            False,
        )
    if isinstance(fault, BrokerPartitionFault):
        proxy = ctx.mqtt_proxy
        if proxy is None:
            raise ScenarioError("faults: broker_partition needs the bench's proxy in front of the broker")
        actions: dict[str, Callable[[], None]] = {
            "drop": proxy.drop,
            "half_open": proxy.half_open,
            "delay": lambda: proxy.delay(fault.delay),
            "throttle": lambda: proxy.throttle(fault.rate),
        }
        detail = {"delay": f"mode delay {fault.delay:g} s", "throttle": f"mode throttle {fault.rate} B/s"}
        return actions[fault.mode], proxy.heal, detail.get(fault.mode, f"mode {fault.mode}"), False
    if isinstance(fault, DbOutageFault):
        db = ctx.db_proxy
        if db is None:
            raise ScenarioError("faults: db_outage needs the bench's proxy in front of the database")
        if fault.mode == "down":
            return db.drop, db.heal, "mode down", True
        flapping = threading.Event()

        def flap() -> None:
            # Cut every connection, accept new ones: backends killed under a running writer, again and again.
            while not flapping.wait(fault.reset_every):
                db.drop()
                db.heal()

        def start_flap() -> None:
            flapping.clear()
            db.drop()
            db.heal()
            threading.Thread(target=flap, name="fault-db-flap", daemon=True).start()

        return start_flap, flapping.set, f"mode flap every {fault.reset_every:g} s", True
    if isinstance(fault, DiskFullFault):
        volume = ctx.volume
        if volume is None:
            raise ScenarioError("faults: disk_full needs the bench's size-limited volume over the data folder")
        return volume.fill, volume.free, f"{fault.volume_mb:g} MB tmpfs", True
    if isinstance(fault, SinkErrorFault):
        path = ctx.injection_file
        if path is None:
            raise ScenarioError("faults: sink_error needs pipeline.fault_injection (the bench sets it)")

        def inject() -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"sink_error": fault.fraction, "seed": ctx.seed}), encoding="utf-8")
            os.replace(tmp, path)  # the pipeline never reads half a file

        return inject, lambda: path.unlink(missing_ok=True), f"{fault.fraction:.0%} of writes fail", True
    raise ScenarioError(f"faults: {fault.kind} has no timed action")


FAULTS: dict[str, FaultAction] = {
    "server_restart": _server_restart,
    "process_kill": _process_fault,
    "process_restart": _process_fault,
    "broker_restart": _window_fault,
    "broker_partition": _window_fault,
    "db_outage": _window_fault,
    "disk_full": _window_fault,
    "sink_error": _window_fault,
}


def schedule(faults: Sequence[Fault], ctx: FaultContext) -> list[threading.Thread]:
    """Start a thread per timed fault; kinds without a timed action (slow_sink) are skipped."""
    timers = []
    for fault in faults:
        action = FAULTS.get(fault.kind)
        if action is None:
            continue
        timer = threading.Thread(target=action(fault, ctx), name=f"fault-{fault.kind}", daemon=True)
        timer.start()
        timers.append(timer)
    return timers


def fault_events_json(
    events: Sequence[FaultEvent], epoch_ns: int, costs: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The faults that happened, in seconds after the first send, with the time each took to recover and, when
    given (in the same order), what each cost (bench.harness.fault_ledger.per_fault)."""
    out = []
    for i, e in enumerate(sorted(events, key=lambda e: e.struck_ns)):
        out.append(
            {
                "kind": e.kind,
                "at_s": round((e.struck_ns - epoch_ns) / 1e9, 3),
                "recovered_s": None if e.recovered_ns is None else round((e.recovered_ns - e.struck_ns) / 1e9, 3),
                "error": e.error,
                "duration_s": None if e.healed_ns is None else round((e.healed_ns - e.struck_ns) / 1e9, 3),
                "detail": e.detail,
                **(costs[i] if i < len(costs) else {}),
            }
        )
    return out
