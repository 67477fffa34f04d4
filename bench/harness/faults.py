"""Timed faults of a scenario, chosen by kind from :data:`FAULTS`, each waiting for its moment on the run's clock.

``slow_sink`` is not here: it is a setting of the system under test (see ``Scenario.sink_delay_s``). Every
fault that happens is recorded as a :class:`FaultEvent` on the run's clock: the accounting names the losses in
its window, and the results say how long the system took to come back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.errors import ScenarioError
from bench.harness.session import Endpoints
from bench.scenario import Fault, ProcessKillFault, ProcessRestartFault, ServerRestartFault
from pipeline.clock import Clock


@dataclass
class FaultEvent:
    """One occurrence of a fault: when it struck and when the system was back (ns on the run's clock)."""

    kind: str
    struck_ns: int
    recovered_ns: int | None = None
    error: str | None = None


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
        event.recovered_ns = ctx.clock.now_ns()

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
            event = FaultEvent(fault.kind, ctx.clock.now_ns())
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
            event.recovered_ns = ctx.clock.now_ns()

    return strike


FAULTS: dict[str, FaultAction] = {
    "server_restart": _server_restart,
    "process_kill": _process_fault,
    "process_restart": _process_fault,
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


def fault_events_json(events: Sequence[FaultEvent], epoch_ns: int) -> list[dict[str, Any]]:
    """The faults that happened, in seconds after the first send, with the time each took to recover."""
    out = []
    for e in sorted(events, key=lambda e: e.struck_ns):
        out.append(
            {
                "kind": e.kind,
                "at_s": round((e.struck_ns - epoch_ns) / 1e9, 3),
                "recovered_s": None if e.recovered_ns is None else round((e.recovered_ns - e.struck_ns) / 1e9, 3),
                "error": e.error,
            }
        )
    return out
