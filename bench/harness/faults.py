"""Timed faults of a scenario, chosen by kind from :data:`FAULTS`, each waiting for its moment on the run's clock.

``slow_sink`` is not here: it is a setting of the system under test (see ``Scenario.sink_delay_s``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from bench.errors import ScenarioError
from bench.harness.session import Endpoints
from bench.scenario import Fault, ServerRestartFault
from pipeline.clock import Clock

FaultStarter = Callable[[Fault, Endpoints, int, Clock, threading.Event], Callable[[], None]]


def _server_restart(
    fault: Fault, endpoints: Endpoints, epoch_ns: int, clock: Clock, stop: threading.Event
) -> Callable[[], None]:
    assert isinstance(fault, ServerRestartFault)
    server = endpoints.plant
    if server is None:
        raise ScenarioError("faults: server_restart needs the embedded OPC UA server (transport opcua or both)")

    def restart() -> None:
        if stop.wait(max(0.0, (epoch_ns + fault.at * 1e9 - clock.now_ns()) / 1e9)):
            return
        server.stopped_at_ns.append(clock.now_ns())
        server.stop_server()
        stop.wait(fault.down_for)  # the fault's own duration, not a guess
        server.restart_server()

    return restart


FAULTS: dict[str, FaultStarter] = {"server_restart": _server_restart}


def schedule(
    faults: Sequence[Fault], endpoints: Endpoints, epoch_ns: int, clock: Clock, stop: threading.Event
) -> list[threading.Thread]:
    """Start a thread per timed fault; kinds without a timed action (slow_sink) are skipped."""
    timers = []
    for fault in faults:
        starter = FAULTS.get(fault.kind)
        if starter is None:
            continue
        timer = threading.Thread(
            target=starter(fault, endpoints, epoch_ns, clock, stop), name=f"fault-{fault.kind}", daemon=True
        )
        timer.start()
        timers.append(timer)
    return timers
