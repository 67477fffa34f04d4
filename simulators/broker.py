"""An embedded MQTT broker (amqtt) in its own process, on an ephemeral loopback port.

Own process rather than a thread: amqtt is pure Python, and sharing one GIL
with the publisher and the pipeline made it the bottleneck (about 2,000 QoS 1
msg/s in-process against about 5,000 in a child process on a 2-core machine).
It is also what a real broker is: a separate process that can be killed.

``python -m simulators.broker`` prints ``PORT <n>`` once listening, then serves
until stdin closes (so it never outlives its parent) or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

from simulators.errors import BrokerStartError

SUBSCRIBE_LOG_TOPIC = "$SYS/broker/log/M/subscribe"
"""Where a broker reports each SUBSCRIBE as it happens: Mosquitto's topic with ``log_dest topic`` and
``log_type subscribe`` (payload ``<epoch s>: <client id> <qos> <filter>``), and the embedded broker's too."""


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Anonymous auth and the subscribe log: amqtt's default plugin set also publishes $SYS statistics and
        # logs every packet, which costs throughput and tells us nothing.
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            "simulators.broker_plugins.SubscribeLog": {},
        },
    }
    broker = Broker(config)
    await broker.start()
    server = broker._servers["default"].instance  # amqtt has no public accessor for the bound port
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Parent gone -> stdin reaches EOF -> we stop: no orphaned brokers after a crash.
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.broker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default) picks a free port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    asyncio.run(_serve(args.host, args.port))
    return 0


class EmbeddedBroker:
    """Start the broker process and learn its port; close it on exit.

    >>> with EmbeddedBroker() as broker:      # doctest: +SKIP
    ...     print(broker.url)
    mqtt://127.0.0.1:41873
    """

    def __init__(self, host: str = "127.0.0.1", log_path: Path | None = None, start_timeout_s: float = 20.0) -> None:
        self.host = host
        self._log_path = log_path
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self.port = 0
        """0 until the first start picks a free port; a restart binds the same one (clients reconnect there)."""

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (for measuring its CPU)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> EmbeddedBroker:
        # Appended on a restart: the log of every start of the broker is kept.
        log = open(self._log_path, "a") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.broker", "--host", self.host, "--port", str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        line: list[str] = []
        stdout = self._proc.stdout
        assert stdout is not None
        # readline() has no timeout; a helper thread lets us give up on a broker that hangs.
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(self._timeout)
        first = line[0] if line else ""
        if not first.startswith("PORT "):
            self.close()
            where = f" (see {self._log_path})" if self._log_path else ""
            raise BrokerStartError(f"embedded MQTT broker did not start within {self._timeout:g} s{where}")
        self.port = int(first.split()[1])
        return self

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def halt(self, *, persistence: bool = True) -> None:
        """Stop the broker for a restart; :meth:`resume` starts it on the same port (a broker restart fault).

        amqtt keeps sessions in memory only: whatever ``persistence`` says, a restart forgets every session and
        every queued message."""
        del persistence
        self.close()

    def resume(self) -> None:
        self.start()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
