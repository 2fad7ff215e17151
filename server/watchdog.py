"""The watchdog: health turns NOT_SERVING while the engine loop makes no progress with work queued.

An asyncio task on the server's event loop looks at the engine loop every `period` seconds. The
loop is stalled when it holds work (commands waiting or unfinished requests) and its round
counter has not moved for `timeout_s`, or when its thread has died. Time spent inside an XLA
compile (the first use of a step shape, which can take minutes on a large model) is not a stall:
the clock restarts while the engine thread's stack is in a compile. On a stall, one error log
line, jaxserve_engine_stalled = 1, jaxserve_engine_stalls += 1 and `on_change(True)`; when the
rounds move again, one info line, the gauge back to 0 and `on_change(False)`.
"""

import asyncio
import logging
import time
from typing import Awaitable, Callable

from server.engine_loop import EngineLoop
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, engine_loop: EngineLoop, timeout_s: float, metrics: ServerMetrics,
                 on_change: Callable[[bool], Awaitable[None]]):
        """on_change(stalled) is awaited on each change (the server sets health with it)."""
        self._engine_loop = engine_loop
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._on_change = on_change
        self.period_s = min(1.0, timeout_s / 4)
        self.stalled = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="watchdog")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        rounds, since = self._engine_loop.rounds, time.monotonic()
        while True:
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            loop = self._engine_loop
            if loop.rounds != rounds or not loop.has_work() or (
                    loop.is_alive() and loop.is_compiling()):
                rounds, since = loop.rounds, now
                if self.stalled:
                    await self._change(False, now - since)
                continue
            if not self.stalled and now - since >= self.timeout_s:
                await self._change(True, now - since)

    async def _change(self, stalled: bool, idle_s: float) -> None:
        self.stalled = stalled
        self._metrics.engine_stalled.set(int(stalled))
        if stalled:
            self._metrics.engine_stalls.inc()
            alive = "" if self._engine_loop.is_alive() else " (its thread has died)"
            logger.error("watchdog: the engine loop made no progress for %.1f s with work queued"
                         "%s; health NOT_SERVING", idle_s, alive)
        else:
            logger.info("watchdog: the engine loop made progress again; health SERVING")
        await self._on_change(stalled)
