"""A fake plant OPC UA server (asyncua) that replays a deterministic stream.

Address space (names configurable)::

    Objects/Plant/<machine>/LoadRate   Double
    Objects/Plant/<machine>/Mileage    Double
    Objects/Plant/<machine>/Status     String  ("Good", or the injected status)
    Objects/Plant/<machine>/Seq        Int64   (the message's sequence id)

Each message is written as DataValues sharing one SourceTimestamp (the
reading's time from the stream), a ServerTimestamp (the write time) and a
StatusCode; Seq is written last, so a client that sees Seq has been offered
the whole reading. The server runs on its own event loop in a thread, on an
ephemeral loopback port; the replay runs on that loop too, so pacing does not
cross threads per message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.status_codes import StatusCodes

from pipeline.clock import Clock
from simulators.errors import BrokerStartError, SimulatorError
from simulators.loop_thread import LoopThread
from simulators.opcua_security import Mode, make_certificate
from simulators.publisher import apace
from simulators.stream import Message

NAMESPACE = "urn:iiot-bench:plant"
APP_URI = "urn:iiot-bench:plant-server"
STOP_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 120.0  # a hang becomes an error, never a stuck run


class _PasswordUsers(UserManager):
    """Username/password check for the plant server (credentials come from the environment)."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


@dataclass(frozen=True)
class NodeNames:
    """Browse names of the plant folder and of each machine's variables."""

    plant: str = "Plant"
    load_rate: str = "LoadRate"
    mileage: str = "Mileage"
    status: str = "Status"
    seq: str = "Seq"


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // 1000 / 1e6, tz=UTC).replace(microsecond=(ns // 1000) % 1_000_000)


def _iso_to_dt(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def reading_values(payload: bytes, server_ns: int | None = None) -> list[ua.DataValue]:
    """The DataValues of one reading, in the order LoadRate, Mileage, Status, Seq.

    Each carries the reading's SourceTimestamp (and ``server_ns`` as the
    ServerTimestamp when given). The status belongs to the measurements; the
    gateway's own Status and Seq variables stay Good, since a Bad DataValue
    carries no value and the reading's seq must survive.
    """
    body = json.loads(payload)
    source = cast(ua.DateTime, _iso_to_dt(body["ts"]))
    written = cast(ua.DateTime, _dt(server_ns)) if server_ns is not None else None
    status = body.get("status", "Good")
    code = ua.StatusCode(cast(ua.UInt32, getattr(StatusCodes, status, StatusCodes.Good)))
    good = ua.StatusCode(cast(ua.UInt32, StatusCodes.Good))

    def value(v: Any, kind: ua.VariantType, code: ua.StatusCode) -> ua.DataValue:
        return ua.DataValue(ua.Variant(v, kind), StatusCode=code, SourceTimestamp=source, ServerTimestamp=written)

    return [
        value(float(body["load_rate"]), ua.VariantType.Double, code),
        value(float(body["mileage"]), ua.VariantType.Double, code),
        value(status, ua.VariantType.String, good),
        value(int(body["seq"]), ua.VariantType.Int64, good),
    ]


class PlantServer:
    """Start an asyncua server in a thread; replay messages into it.

    >>> with PlantServer(["press-0"]) as plant:   # doctest: +SKIP
    ...     print(plant.url)
    opc.tcp://127.0.0.1:40123/iiot-bench/
    """

    def __init__(
        self,
        machines: Iterable[str],
        *,
        names: NodeNames = NodeNames(),
        host: str = "127.0.0.1",
        port: int = 0,
        security_mode: Mode | None = None,
        cert_dir: Path | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        if security_mode is not None and cert_dir is None:
            raise SimulatorError("a secured OPC UA server needs a folder for its certificate")
        self.security_mode = security_mode
        self.cert_dir = cert_dir
        self.users = users
        self.server_cert: Path | None = None
        self.machines = list(machines)
        self.names = names
        self.host = host
        self.port = port
        self._runner = LoopThread("opcua-plant")
        self._server: Server | None = None
        self._nodes: dict[str, dict[str, ua.NodeId]] = {}
        self.written = 0
        self.unsent: list[int] = []
        """Seq ids the replay could not write because the server was down (a fault)."""
        self.stopped_at_ns: list[int] = []

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/iiot-bench/"

    def node_ids(self) -> dict[str, dict[str, str]]:
        """machine -> field -> node id string ("ns=2;i=7"), e.g. for a source configured by node ids."""
        return {m: {f: n.to_string() for f, n in fields.items()} for m, fields in self._nodes.items()}

    # -- lifecycle (thread-safe wrappers around the server's loop) ----------------

    def start(self, timeout_s: float = 30.0) -> PlantServer:
        for name in ("asyncua", "asyncua.server", "asyncua.client"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            self._runner.start(self._start, timeout_s)
        except Exception as exc:
            raise BrokerStartError(f"OPC UA plant server did not start: {exc}") from None
        return self

    def _call(self, coro: Any, timeout_s: float | None = CALL_TIMEOUT_S) -> Any:
        return self._runner.call(coro, timeout_s)

    def stop_server(self) -> None:
        """Take the server off the network (a fault); :meth:`restart_server` brings it back on the same port."""
        self._call(self._stop())

    def restart_server(self) -> None:
        self._call(self._start())

    def reset_values(self) -> None:
        """Every variable back to "no reading yet", as at start: a client that subscribes next gets placeholders
        first, not the last replay's values as if they were a reading (the OPC UA reference replays twice on
        one server)."""

        async def reset() -> None:
            assert self._server is not None, "the server is not running"
            await _no_reading_yet(self._server, (n for nodes in self._nodes.values() for n in nodes.values()))

        self._call(reset())

    def close(self) -> None:
        if self._runner.loop is None:
            return
        try:
            self._call(self._stop(), 30)
        finally:
            self._runner.stop()

    def __enter__(self) -> PlantServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- on the server's loop -------------------------------------------------------

    async def _start(self) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://{self.host}:{self.port}/iiot-bench/")
        server.set_server_name("iiot-bench plant")
        await server.set_application_uri(APP_URI)
        if self.security_mode is not None:
            assert self.cert_dir is not None
            pair = await make_certificate(self.cert_dir, "plant-server", APP_URI, server=True)
            await server.load_certificate(str(pair.cert))
            await server.load_private_key(str(pair.key))
            self.server_cert = pair.cert
            # Only the requested policy: a client cannot fall back to no security.
            server.set_security_policy([getattr(ua.SecurityPolicyType, f"Basic256Sha256_{self.security_mode}")])
        if self.users is not None:
            server.iserver.user_manager = _PasswordUsers(self.users)
            server.set_identity_tokens([ua.UserNameIdentityToken])
        idx = await server.register_namespace(NAMESPACE)
        plant = await server.nodes.objects.add_object(idx, self.names.plant)
        self._nodes = {}
        for machine in self.machines:
            obj = await plant.add_object(idx, machine)
            n = self.names
            variables = {
                "load_rate": await obj.add_variable(idx, n.load_rate, 0.0),
                "mileage": await obj.add_variable(idx, n.mileage, 0.0),
                "status": await obj.add_variable(idx, n.status, ""),
                "seq": await obj.add_variable(idx, n.seq, ua.Variant(-1, ua.VariantType.Int64)),
            }
            for variable in variables.values():
                # Writable, so a remote replay (simulators.opcua_writer) can use this server too.
                await variable.set_writable()
            nodes = {key: variable.nodeid for key, variable in variables.items()}
            await _no_reading_yet(server, nodes.values())
            self._nodes[machine] = nodes
        await server.start()
        assert server.bserver is not None
        # Port 0 picks a free port; keep it so a restart comes back on the same one.
        self.port = server.bserver.port
        self._server = server

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # Stop listening first, as a dying server process does. asyncua's own stop
        # closes the client connections before the listener, so a client that
        # reconnects at once gets back in mid-stop, re-activates its session on the
        # dying server and loses its subscription when the stop then cuts it.
        listener = getattr(server.bserver, "_server", None)
        if listener is not None:
            listener.close()
        try:
            await asyncio.wait_for(server.stop(), STOP_TIMEOUT_S)
        except TimeoutError:
            # asyncua's stop waits for every connection to close; cut any still open.
            for transport in list(server.iserver.asyncio_transports):
                transport.abort()

    async def _write(self, message: Message, now_ns: int) -> bool:
        server = self._server
        if server is None:
            # Down (a fault): the plant produced it, nobody could read it. Counted, never hidden.
            self.unsent.append(message.seq)
            return False
        nodes = self._nodes.get(message.machine)
        if nodes is None:
            return False
        values = reading_values(message.payload, now_ns)
        for key, value in zip(("load_rate", "mileage", "status", "seq"), values, strict=True):
            await server.write_attribute_value(nodes[key], value)
        self.written += 1
        return True

    async def _replay(
        self,
        messages: Iterable[Message],
        clock: Clock,
        stop: threading.Event | None,
        on_sent: Callable[[Message, int], None] | None,
    ) -> int:
        return await apace(messages, clock, lambda m: self._write(m, clock.now_ns()), stop=stop, on_sent=on_sent)

    def run(
        self,
        messages: Iterable[Message],
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        on_sent: Callable[[Message, int], None] | None = None,
    ) -> int:
        """Replay ``messages`` at their intended times (open model); returns how many were written."""
        result: int = self._call(self._replay(messages, clock, stop, on_sent), None)
        return result


async def _no_reading_yet(server: Server, node_ids: Iterable[ua.NodeId]) -> None:
    """No reading yet: say so the OPC UA way (BadWaitingForInitialData), so no client mistakes the placeholder
    for data."""
    waiting = ua.DataValue(StatusCode=ua.StatusCode(cast(ua.UInt32, StatusCodes.BadWaitingForInitialData)))
    for node_id in node_ids:
        await server.write_attribute_value(node_id, waiting)
