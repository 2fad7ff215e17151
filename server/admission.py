"""Admission control: whether a call may start, how many requests are in flight, when to retry.

Runs on the event loop only (no locks). A request holds a slot from admission until its stream
ends, so in-flight = the engine's waiting + running requests as the server sees them. Past
max_pending a call gets RESOURCE_EXHAUSTED with a `retry-after-ms` hint in its trailing
metadata: the expected wait for one slot, the mean request latency over the requests in flight.
"""

import asyncio
import contextlib

import grpc

from server.errors import StatusError

RETRY_AFTER_KEY = "retry-after-ms"
_DEFAULT_RETRY_MS = 1000
_RETRY_MS_RANGE = (10, 10_000)
_LATENCY_SMOOTHING = 0.1  # weight of the newest latency in the running mean


class Admission:
    LOADING, SERVING, DRAINING = "loading", "serving", "draining"

    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self.state = self.LOADING
        self.in_flight = 0
        self._mean_latency_s: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def check_open(self) -> None:
        """Raises StatusError (UNAVAILABLE) while the model loads or the server drains."""
        if self.state == self.LOADING:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the server is loading the model; retry soon")
        if self.state == self.DRAINING:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    @contextlib.contextmanager
    def slot(self):
        """Holds one in-flight slot for the duration; raises StatusError when none is free."""
        self.check_open()
        if self.in_flight >= self.max_pending:
            retry_ms = self.retry_after_ms()
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"max_pending ({self.max_pending}) requests are in flight; "
                          f"retry in about {retry_ms} ms", ((RETRY_AFTER_KEY, str(retry_ms)),))
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    def record_latency(self, seconds: float) -> None:
        if self._mean_latency_s is None:
            self._mean_latency_s = seconds
        else:
            self._mean_latency_s += _LATENCY_SMOOTHING * (seconds - self._mean_latency_s)

    def retry_after_ms(self) -> int:
        if self._mean_latency_s is None:
            return _DEFAULT_RETRY_MS
        ms = 1000 * self._mean_latency_s / max(1, self.in_flight)
        return int(min(max(ms, _RETRY_MS_RANGE[0]), _RETRY_MS_RANGE[1]))

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight; False when the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
