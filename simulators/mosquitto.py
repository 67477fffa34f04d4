"""A Mosquitto broker the bench starts and owns: on a free loopback port, with its own config and folder.

For faults and crash safety the broker's limits matter as much as the pipeline's: Mosquitto's defaults keep
at most 1,000 queued messages per client (``max_queued_messages``) and drop the rest, silently to the client
("Outgoing messages are being dropped" in its log), so a persistent session survives a pipeline restart only
if its queue can hold what arrives while the pipeline is down. A bench-owned broker sets the limits the
scenario needs, can be restarted by the bench (a fault), and never touches the machine's own Mosquitto.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from simulators.errors import BrokerStartError

START_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the broker binds it right after; a clash is reported, not hidden)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ManagedMosquitto:
    """``mosquitto -c <folder>/mosquitto.conf`` on ``host:<free port>``, persistence in ``folder``."""

    def __init__(self, folder: Path, *, host: str = "127.0.0.1", max_queued: int = 1_000_000) -> None:
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
        )
        if binary is None:
            raise BrokerStartError("mosquitto is not installed (apt-get install mosquitto); use broker: embedded")
        self.binary = binary
        self.folder = folder
        self.host = host
        self.port = free_port(host)
        self.max_queued = max_queued
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            # Started as root, mosquitto would switch to user mosquitto and could not write this folder.
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {self.folder}/\n"
            f"log_dest file {self.folder / 'mosquitto.log'}\n"
            # Each SUBSCRIBE also on $SYS/broker/log/M/subscribe, as it happens: how the bench sees a system
            # under test subscribe (ready: subscribed). Naming one log_type replaces the defaults: all listed.
            "log_dest topic\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type subscribe\n"
            # What a pipeline that is down must find waiting when it comes back: no silent drops.
            f"max_queued_messages {self.max_queued}\n"
            "max_queued_bytes 0\n",
            encoding="utf-8",
        )
        return conf

    def start(self) -> ManagedMosquitto:
        conf = self._config()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerStartError(f"mosquitto exited with {self.proc.returncode}: {err.strip()[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)  # polling a port another process opens
        self.close()
        raise BrokerStartError(f"mosquitto did not listen on {self.host}:{self.port} within {START_TIMEOUT_S:g} s")

    def halt(self, *, persistence: bool = True) -> None:
        """Stop the broker for a restart (SIGTERM: it saves its persistence file); :meth:`resume` starts it on
        the same port. Without ``persistence`` the file is deleted while it is down: sessions and queued
        messages are forgotten, as by a broker configured without persistence."""
        self.close()
        if not persistence:
            (self.folder / "mosquitto.db").unlink(missing_ok=True)

    def resume(self) -> None:
        self.start()

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
