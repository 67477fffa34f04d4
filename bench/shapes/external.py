"""Start, feed and stop a user's pipeline of one of the other shapes (see ``external_settings``).

One :class:`ShapeProcess` per variant: it fills the placeholders, starts the command with a pipe on its standard
input and its output (stdout and stderr together) to ``system.log`` in the variant's folder, waits until it is
ready, and measures its process tree's CPU time and peak RSS from then on (``bench.harness.external_sut``'s
sampler: what it does before it is ready, an interpreter start or a compile, is not its cost per reading).

User mistakes (a program that is not there, a folder that is not) are :class:`ScenarioError`; a pipeline that
exits early or is never ready is a :class:`ServiceError` with the tail of its output.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from bench.errors import ScenarioError, ServiceError
from bench.harness.external_sut import _Resources
from bench.harness.sut import end_process
from bench.shapes.external_settings import ShapeExternal


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the pipeline binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ShapeProcess:
    """The user's command as one variant of a shape run (see the module's doc)."""

    SEND_TIMEOUT_S = 30.0

    def __init__(
        self,
        spec: ShapeExternal,
        *,
        where: str,
        scenario_dir: Path,
        folder: Path,
        values: Mapping[str, str] | None = None,
    ) -> None:
        """``where``: the setting's path for messages, e.g. ``scenarios/x.yaml: recompute.external[0]``;
        ``values``: placeholders this shape adds (forward: ``upstream_url``) or fixes (``seed``)."""
        self.spec, self.where, self.folder = spec, where, folder.resolve()
        self.cwd = (scenario_dir / spec.cwd).resolve() if spec.cwd else scenario_dir.resolve()
        port = free_port()
        self.values: dict[str, str] = {
            "dir": str(self.folder),
            "port": str(port),
            "url": f"http://127.0.0.1:{port}",
            "python": sys.executable,
            **(values or {}),
        }
        self.port = port
        self.url = self.values["url"]
        self.log_path = self.folder / "system.log"
        self.exit_codes: list[int | None] = []
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.resources = _Resources()
        self._usage: dict[str, float] | None = None
        self._log: IO[bytes] | None = None
        self._lines: list[str] = []
        self._ready_seen = threading.Event()
        self._reader: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------

    def check(self) -> None:
        """The user's mistakes, before anything runs: a program that is not there, a folder that is not, a
        placeholder this shape does not give (:class:`ScenarioError`, one line)."""
        if not self.cwd.is_dir():
            raise ScenarioError(f"{self.where}.cwd: {self.cwd} is not a folder")
        self._argv()
        self._env()
        if self.spec.ready is not None and self.spec.ready.file is not None:
            self._fill(self.spec.ready.file, "ready.file")

    def start(self) -> None:
        """Start it and wait until it is ready; raises with its last output when it is not (the first line of
        the :class:`ServiceError` says why in one line)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.check()
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by finish()
        argv, env = self._argv(), self._env()
        self._ready_seen.clear()
        self.proc = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,  # send() writes to the pipe itself, with a timeout
        )
        self.starts += 1
        self.resources.watch(self.proc.pid)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name="shape-output", daemon=True)
        self._reader.start()
        problem = self._wait_ready()
        if problem is not None:
            self._end(signal.SIGKILL, 5.0)
            raise ServiceError(
                f"{self.where}: the pipeline {problem}; its last output ({self.log_path}):\n{self.tail()}"
            )
        self.resources.ready()

    def restart(self) -> None:
        """Start it again after :meth:`kill` (same folder, same port, same placeholders)."""
        self.start()

    def send(self, line: bytes) -> bool:
        """Write one reading (a newline is added); False when its standard input is gone (it exited or was killed).

        Raises :class:`ServiceError` when it is alive but has not taken the line within ``SEND_TIMEOUT_S``: a
        pipeline that stops reading its input would otherwise hang the bench on a full pipe."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            return False
        data = memoryview(line + b"\n")
        with self._write_lock:
            try:
                fd = proc.stdin.fileno()
                deadline = time.monotonic() + self.SEND_TIMEOUT_S
                while data:
                    _, writable, _ = select.select([], [fd], [], max(0.0, deadline - time.monotonic()))
                    if not writable:
                        if proc.poll() is not None:
                            return False
                        raise ServiceError(
                            f"{self.where}: the pipeline has not read its standard input for "
                            f"{self.SEND_TIMEOUT_S:g} s (it is alive: stuck, or not reading stdin); its last output "
                            f"({self.log_path}):\n{self.tail()}"
                        )
                    data = data[os.write(fd, data) :]
            except (BrokenPipeError, ValueError, OSError):
                return False
        return True

    def kill(self) -> None:
        """SIGKILL, as a crash: what it had not made durable is its loss."""
        self._end(signal.SIGKILL, 5.0)

    def finish(self) -> int | None:
        """Close its standard input (end of stream), let it finish within ``stop_timeout``, then stop it.

        Returns its exit code (negative: the signal that ended it)."""
        proc = self.proc
        if proc is not None and proc.stdin is not None:
            # An OSError: it exited already, and its exit code says how.
            with self._write_lock, contextlib.suppress(OSError):
                proc.stdin.close()
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.spec.stop_timeout)
        self._end(signal.SIGTERM, 5.0)
        if self._usage is None:
            self._usage = self.resources.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.exit_codes[-1] if self.exit_codes else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def usage(self) -> dict[str, float]:
        """Its process tree's CPU seconds and peak RSS (MB) while it served (valid after :meth:`finish`)."""
        return self._usage if self._usage is not None else self.resources.stop()

    def tail(self) -> str:
        return "\n".join(f"    {line}" for line in self._lines[-15:]) or "    (no output)"

    # -- internals ------------------------------------------------------------------------------------------

    def _fill(self, text: str, where: str) -> str:
        try:
            return text.format(**self.values)
        except KeyError as exc:
            raise ScenarioError(
                f"{self.where}.{where}: placeholder {{{exc.args[0]}}} is not given to this shape's pipelines; "
                f"expected one of {', '.join('{' + k + '}' for k in self.values)}"
            ) from None
        except (IndexError, ValueError) as exc:
            raise ScenarioError(f"{self.where}.{where}: {exc}") from None

    def _argv(self) -> list[str]:
        argv = [self._fill(arg, "command") for arg in self.spec.argv()]
        program = argv[0]
        # Not resolved: a venv's python is a symlink, and resolving it would leave the venv.
        local = self.cwd / program
        found = (os.path.abspath(local) if "/" in program and local.exists() else None) or shutil.which(program)
        if found is None:
            raise ScenarioError(
                f"{self.where}.command: {program!r} not found (on PATH, or relative to {self.cwd}); "
                "expected an installed program or a path to one"
            )
        return [found, *argv[1:]]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # so a Python pipeline's ready line shows up when printed
        for key, value in self.spec.env.items():
            env[key] = self._fill(value, f"env.{key}")
        return env

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        pattern = re.compile(self.spec.ready.log) if self.spec.ready and self.spec.ready.log else None
        for raw in proc.stdout:
            if self._log is not None and not self._log.closed:
                self._log.write(raw)
                self._log.flush()
            line = raw.decode(errors="replace").rstrip()
            self._lines = [*self._lines[-29:], line]
            if pattern is not None and pattern.search(line):
                self._ready_seen.set()

    def _wait_ready(self) -> str | None:
        proc, ready = self.proc, self.spec.ready
        assert proc is not None
        if ready is None:
            time.sleep(0.05)  # long enough to catch a program that fails at once (a bad flag, a missing module)
            return f"exited with code {proc.returncode} as it started" if proc.poll() is not None else None
        file = self._fill(ready.file, "ready.file") if ready.file is not None else None
        deadline = time.monotonic() + ready.timeout
        while time.monotonic() < deadline:
            if ready.log is not None and self._ready_seen.is_set():
                return None
            if ready.http is not None and self._answers(ready.http):
                return None
            if file is not None and Path(file).exists():
                return None
            if proc.poll() is not None:
                return f"exited with code {proc.returncode} before it was ready"
            time.sleep(0.05)  # polling another process's signs of life
        what = next(k for k in ("log", "http", "file") if getattr(ready, k) is not None)
        return f"was not ready within {ready.timeout:g} s (ready: {what} {getattr(ready, what)!r})"

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # it answered, if not with a 2xx: it is up
        except (OSError, ValueError):
            return False

    def _end(self, how: signal.Signals, timeout_s: float) -> None:
        proc = self.proc
        if proc is None:
            return
        end_process(proc, how, timeout_s)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):  # the pipe broke with the process
                proc.stdin.close()
        if self._reader is not None:
            self._reader.join(5)
        if len(self.exit_codes) < self.starts:
            self.exit_codes.append(proc.returncode)
