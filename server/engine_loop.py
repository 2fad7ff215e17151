"""The engine loop: one thread that owns the Engine, bridged to the asyncio event loop of gRPC.

The Engine is not thread-safe, and `Engine.step()` blocks for as long as the compiled step
runs, so it lives on a thread of its own and nothing else touches it. The two sides meet here:

    event loop (gRPC handlers)                    engine thread
    --------------------------                    -------------
    add_request(): make an asyncio.Queue and
      a future, post an _Add command   ───────►   take the commands under the condition;
                                                  engine.add_request() (may raise ValueError)
    the future resolves to the request id  ◄───   call_soon_threadsafe(resolve the future)
    abort(): post an _Abort command    ───────►   engine.abort(), frees the request's KV blocks
                                                  engine.step() while requests are unfinished
    each RequestOutput lands on its queue  ◄───   one call_soon_threadsafe per step delivers
                                                  every output of that step
                                                  nothing to do: wait on the condition

The event loop never waits on the engine: posting a command takes a lock held only to append to
a deque. The engine thread never waits on the event loop: call_soon_threadsafe only schedules.
When there is nothing to run the thread sleeps on the condition, woken by the next command.

A request's queue holds at most one item: a RequestOutput, or, if the engine itself fails, an
EngineFault. An output that arrives before the last one is read is merged into it
(`merge_outputs`: deltas appended, a whole final output replacing them), so a slow reader costs
one output, not a backlog.

For the watchdog (server/watchdog.py) the thread counts its rounds (`rounds`, one per pass
through commands and a step) and says whether it holds work (`has_work`); a compile in progress
on the thread shows in its stack (`is_compiling`).
"""

import asyncio
import collections
import dataclasses
import logging
import sys
import threading

from jaxserve.engine.engine import Engine, EngineStats
from jaxserve.outputs import RequestOutput, merge_outputs
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# jax's and the runner's compile entry points (jax/_src/stages.py, compiler.py; jaxserve/worker/runner.py)
_COMPILE_FUNCTIONS = frozenset({"compile", "compile_or_get_cached", "backend_compile_and_load",
                                "_compiled", "compile_all"})


class EngineFault(Exception):
    """Engine.step() raised: the requests in the engine at the time were ended."""


@dataclasses.dataclass
class _Add:
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    client_id: str
    queue: asyncio.Queue
    future: asyncio.Future


@dataclasses.dataclass
class _Abort:
    request_id: str


class _AbortAll:
    pass


class EngineLoop:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self._loop = loop
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._queues: dict[str, asyncio.Queue] = {}  # engine thread only
        self.stats: EngineStats = engine.stats()  # the latest snapshot; replaced, never mutated
        self.rounds = 0  # written by the engine thread only: its progress, for the watchdog
        self._holds_requests = False  # engine.has_unfinished_requests after the latest round
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Aborts what is left, then ends the thread (blocks up to timeout)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ----- the event-loop side ---------------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams, *,
                          priority: int = 0, client_id: str = "") -> tuple[str, asyncio.Queue]:
        """Queues a request in the engine; returns its id and the queue its outputs arrive on.

        Raises ValueError (naming the bad field) when the engine refuses the request.
        """
        queue: asyncio.Queue = asyncio.Queue()
        future = self._loop.create_future()
        if not self._post(_Add(prompt, params, priority, client_id, queue, future)):
            raise EngineFault("the engine loop has stopped")
        return await future, queue

    def has_work(self) -> bool:
        """Whether commands wait or the engine holds unfinished requests (any thread)."""
        with self._cond:
            return bool(self._commands) or self._holds_requests

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def is_compiling(self) -> bool:
        """Whether the engine thread is inside an XLA compile now (any thread; a stack walk).
        A compile on first use of a step shape can take minutes: it is not a stall."""
        frame = sys._current_frames().get(self._thread.ident)
        while frame is not None:
            code = frame.f_code
            if code.co_name in _COMPILE_FUNCTIONS and "jax" in code.co_filename:
                return True
            frame = frame.f_back
        return False

    def abort(self, request_id: str) -> None:
        """Ends a request at once and frees its blocks; its queue gets a finish_reason 'abort'."""
        self._post(_Abort(request_id))

    def abort_all(self) -> None:
        self._post(_AbortAll())

    def _post(self, command) -> bool:
        """Hands a command to the engine thread; False once the loop is stopping."""
        with self._cond:
            if self._stopping:
                return False
            self._commands.append(command)
            self._cond.notify()
            return True

    # ----- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._commands or self._stopping or self.engine.has_unfinished_requests):
                    self._cond.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            deliveries = [d for command in commands for d in self._apply(command)]
            self._holds_requests = self.engine.has_unfinished_requests  # before a long step
            if stopping:
                deliveries += self._abort_all()
                self._deliver(deliveries)
                return
            if self.engine.has_unfinished_requests:
                deliveries += self._step()
            self.stats = self.engine.stats()
            self._holds_requests = self.engine.has_unfinished_requests
            self.rounds += 1
            self._deliver(deliveries)

    def _apply(self, command) -> list[tuple[asyncio.Queue, object]]:
        if isinstance(command, _Add):
            try:
                request_id = self.engine.add_request(
                    command.prompt, command.params, priority=command.priority,
                    client_id=command.client_id)
            except Exception as e:  # ValueError: bad input; anything else: a fault, this request only
                if not isinstance(e, ValueError):
                    logger.exception("add_request failed")
                self._loop.call_soon_threadsafe(_settle, command.future, None, e, self)
                return []
            self._queues[request_id] = command.queue
            self._loop.call_soon_threadsafe(_settle, command.future, request_id, None, self)
            return []
        if isinstance(command, _Abort):
            return self._abort(command.request_id)
        return self._abort_all()

    def _abort(self, request_id: str) -> list[tuple[asyncio.Queue, object]]:
        queue = self._queues.pop(request_id, None)
        try:
            output = self.engine.abort(request_id)
        except Exception:  # the thread must live on: every other request depends on it
            logger.exception("aborting request %s failed", request_id)
            output = EngineFault("aborting the request failed; see the server log")
        return [(queue, output)] if queue is not None and output is not None else []

    def _abort_all(self) -> list[tuple[asyncio.Queue, object]]:
        return [d for request_id in list(self._queues) for d in self._abort(request_id)]

    def _step(self) -> list[tuple[asyncio.Queue, object]]:
        try:
            outputs = self.engine.step()
        except Exception:  # the engine catches request faults itself; this is one it did not
            logger.exception("Engine.step failed; ending the %d requests in it", len(self._queues))
            fault = EngineFault("the engine step failed; see the server log")
            deliveries = [(queue, fault) for queue in self._queues.values()]
            self._abort_all()  # frees their blocks; the fault is what their callers see
            return deliveries
        deliveries = []
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is None:  # aborted in this round of commands
                continue
            deliveries.append((queue, output))
            if output.finished:
                del self._queues[output.request_id]
        return deliveries

    def _deliver(self, deliveries: list[tuple[asyncio.Queue, object]]) -> None:
        if deliveries:
            self._loop.call_soon_threadsafe(_put_all, deliveries)


def _put_all(deliveries: list[tuple[asyncio.Queue, RequestOutput | EngineFault]]) -> None:
    for queue, item in deliveries:
        older = None
        while not queue.empty():  # unread: the new item takes it in
            older = queue.get_nowait()
        if isinstance(item, RequestOutput) and isinstance(older, RequestOutput):
            item = merge_outputs(older, item)
        queue.put_nowait(item)


def _settle(future: asyncio.Future, request_id: str | None, error: Exception | None,
            engine_loop: EngineLoop) -> None:
    if future.cancelled():  # the caller went away while the request was being added
        if request_id is not None:
            engine_loop.abort(request_id)
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(request_id)
