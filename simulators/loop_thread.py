"""An asyncio event loop in its own thread, for asyncua servers and clients driven from sync code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from simulators.errors import SimulatorError

T = TypeVar("T")


class LoopThread:
    """Run ``setup`` on a fresh loop in a thread, then keep the loop serving until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, setup: Callable[[], Awaitable[None]], timeout_s: float) -> None:
        """Raises whatever ``setup`` raised, or TimeoutError."""
        ready: Future[None] = Future()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:  # reported to start()'s caller
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(None)
            loop.run_forever()
            # asyncua leaves session/subscription tasks behind; end them so the loop closes cleanly.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=serve, name=self.name, daemon=True)
        self._thread.start()
        ready.result(timeout_s)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        if self.loop is None:
            coro.close()
            raise SimulatorError(f"{self.name}: not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        loop, self.loop = self.loop, None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
