"""Replay a stream into an OPC UA server that is not ours, as a client writing values.

For plants or test servers reachable by URL: the server must expose
``Objects/<plant>/<machine>/{LoadRate, Mileage, Status, Seq}`` with writable
variables (the embedded :class:`~simulators.opcua_server.PlantServer` does).
Each reading is one Write request of the four values, sharing the reading's
SourceTimestamp; the server stamps its own ServerTimestamp.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.ua.uaerrors import UaError

from pipeline.clock import Clock
from simulators.errors import SimulatorError
from simulators.loop_thread import LoopThread
from simulators.opcua_server import NodeNames, reading_values
from simulators.publisher import apace
from simulators.stream import Message


class RemotePlant:
    """Write messages into a server at ``url``; the same ``run`` as the embedded plant."""

    def __init__(
        self, url: str, *, names: NodeNames | None = None, username: str | None = None, password: str | None = None
    ) -> None:
        self.url = url
        self.names = names or NodeNames()
        self._username = username
        self._password = password
        self._runner = LoopThread("opcua-writer")
        self._client: Client | None = None
        self._nodes: dict[str, list[Node]] = {}
        self.written = 0
        self.unsent: list[int] = []
        self.stopped_at_ns: list[int] = []

    def start(self, timeout_s: float = 30.0) -> RemotePlant:
        try:
            self._runner.start(self._connect, timeout_s)
        except Exception as exc:
            raise SimulatorError(f"cannot write to OPC UA server {self.url}: {exc.__class__.__name__}: {exc}") from None
        return self

    async def _connect(self) -> None:
        client = Client(self.url)
        if self._username is not None:
            client.set_user(self._username)
        if self._password is not None:
            client.set_password(self._password)
        await client.connect()
        self._client = client
        plant = None
        for child in await client.nodes.objects.get_children():
            if (await child.read_browse_name()).Name == self.names.plant:
                plant = child
        if plant is None:
            raise SimulatorError(f"{self.url}: no Objects/{self.names.plant} folder to write into")
        order = [self.names.load_rate, self.names.mileage, self.names.status, self.names.seq]
        for machine_node in await plant.get_children():
            machine = (await machine_node.read_browse_name()).Name
            by_name: dict[str, Node] = {
                str((await v.read_browse_name()).Name): v for v in await machine_node.get_children()
            }
            if all(n in by_name for n in order):
                self._nodes[machine] = [by_name[n] for n in order]

    async def _write(self, message: Message) -> bool:
        assert self._client is not None
        nodes = self._nodes.get(message.machine)
        if nodes is None:
            self.unsent.append(message.seq)
            return False
        values = reading_values(message.payload)
        try:
            await self._client.write_values(nodes, values)
        except (TimeoutError, OSError, UaError):
            self.unsent.append(message.seq)
            return False
        self.written += 1
        return True

    async def _replay(
        self,
        messages: Iterable[Message],
        clock: Clock,
        stop: threading.Event | None,
        on_sent: Callable[[Message, int], None] | None,
    ) -> int:
        return await apace(messages, clock, self._write, stop=stop, on_sent=on_sent)

    def run(
        self,
        messages: Iterable[Message],
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        on_sent: Callable[[Message, int], None] | None = None,
    ) -> int:
        return self._runner.call(self._replay(messages, clock, stop, on_sent), None)

    def close(self) -> None:
        if self._runner.loop is None:
            return
        if self._client is not None:
            self._runner.call(self._client.disconnect(), 30)
        self._runner.stop()
