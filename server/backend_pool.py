"""The router's backends: a channel to each, whether it is SERVING, its load, and picking one.

Each backend's health is polled with grpc.health.v1 Check (service jaxserve.v1.JaxServe) every
health_check_interval_s; a backend takes calls only while its last answer was SERVING. A call
that fails with UNAVAILABLE marks its backend down at once (`mark_down`), so the calls after it
skip that backend until a check says SERVING again. `choose` hands the routing policy the
SERVING backends that this call has not tried yet, with their load at the router.

Runs on the router's event loop only (no locks). The pool is also a Prometheus collector: its
counters are read at scrape time.
"""

import asyncio
import contextlib
import dataclasses
import logging
from typing import Awaitable, Callable, Sequence

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from server.routing_policy import Candidate, RoutingPolicy

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JaxServe"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
# A failure is the backend's fault, or the router could not reach it; the other codes are the
# caller's (INVALID_ARGUMENT, CANCELLED, ...) or the backend's normal answers (RESOURCE_EXHAUSTED).
_FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


class NoBackendError(Exception):
    """No SERVING backend is left for a call; the message names every backend and its state."""


@dataclasses.dataclass
class BackendStats:
    """One backend's counters at the router: calls sent to it, calls not ended yet, and calls
    that ended with a failure (UNAVAILABLE, INTERNAL, UNKNOWN or DATA_LOSS)."""

    routed: int = 0
    in_flight: int = 0
    failures: int = 0


class Backend:
    """One jaxserve server behind the router: its channel and stubs, health state and counters."""

    def __init__(self, index: int, address: str, channel_options: Sequence[tuple[str, int]]):
        self.index, self.address = index, address
        self.channel = grpc.aio.insecure_channel(address, options=channel_options)
        self.stub = pb_grpc.JaxServeStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.stats = BackendStats()
        self.serving = False
        self.state = "not checked yet"  # the last health answer or error, for logs and errors

    def __repr__(self) -> str:
        return f"{self.address} ({self.state})"


class BackendPool:
    def __init__(self, addresses: Sequence[str], policy: RoutingPolicy, *,
                 health_check_interval_s: float, health_check_timeout_s: float,
                 health_auth_token: str | None, max_message_bytes: int,
                 on_health_change: Callable[[bool], Awaitable[None]]):
        """on_health_change(any_serving) is awaited whenever a backend turns SERVING or stops."""
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   # a restarted backend is found within seconds, not gRPC's default 2 minutes
                   ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        self.backends = [Backend(i, a, options) for i, a in enumerate(addresses)]
        self._policy = policy
        self._interval_s, self._timeout_s = health_check_interval_s, health_check_timeout_s
        self._health_metadata = ((("authorization", f"Bearer {health_auth_token}"),)
                                 if health_auth_token else ())
        self._on_health_change = on_health_change
        self._tasks: list[asyncio.Task] = []

    @property
    def any_serving(self) -> bool:
        return any(b.serving for b in self.backends)

    async def start(self) -> None:
        """Starts polling each backend's health (the first check at once)."""
        self._tasks = [asyncio.create_task(self._poll_health(b), name=f"health {b.address}")
                       for b in self.backends]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(b.channel.close() for b in self.backends))

    def choose(self, request: Message, tried: Sequence[Backend]) -> Backend:
        """The policy's pick among the SERVING backends not in `tried`; NoBackendError if none."""
        usable = [b for b in self.backends if b.serving and b not in tried]
        if not usable:
            states = ", ".join(map(repr, self.backends))
            raise NoBackendError(f"no SERVING backend {'left ' if tried else ''}to route to "
                                 f"(of {len(self.backends)}: {states})")
        chosen = self._policy.choose(
            [Candidate(index=b.index, address=b.address, in_flight=b.stats.in_flight,
                       routed=b.stats.routed) for b in usable], request)
        return self.backends[chosen.index]

    @contextlib.contextmanager
    def track(self, backend: Backend):
        """Counts one call to `backend` for its duration; a grpc error with a failure code
        raised inside counts as a failure."""
        backend.stats.routed += 1
        backend.stats.in_flight += 1
        try:
            yield
        except grpc.aio.AioRpcError as e:
            if e.code() in _FAILURE_CODES:
                backend.stats.failures += 1
            raise
        finally:
            backend.stats.in_flight -= 1

    async def mark_down(self, backend: Backend, error: grpc.aio.AioRpcError) -> None:
        """A call found `backend` UNAVAILABLE: skip it until a health check says SERVING."""
        await self._set_state(backend, False, f"{error.code().name}: {error.details()}")

    def stats(self) -> dict[str, BackendStats]:
        """A copy of every backend's counters, by address."""
        return {b.address: dataclasses.replace(b.stats) for b in self.backends}

    async def _poll_health(self, backend: Backend) -> None:
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while True:
            try:
                response = await backend.health.Check(request, timeout=self._timeout_s,
                                                      metadata=self._health_metadata)
                serving = response.status == SERVING
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.aio.AioRpcError as e:
                serving, state = False, f"{e.code().name}: {e.details()}"
                if e.code() == grpc.StatusCode.UNAUTHENTICATED and backend.state != state:
                    logger.error("backend %s refuses the router's health checks: set "
                                 "--backend_auth_token (or the router's --auth_token)",
                                 backend.address)
            await self._set_state(backend, serving, state)
            await asyncio.sleep(self._interval_s)

    async def _set_state(self, backend: Backend, serving: bool, state: str) -> None:
        was_serving, before = backend.serving, backend.state
        backend.serving, backend.state = serving, state
        if state.split(":")[0] != before.split(":")[0]:  # log changes, not every failed poll
            (logger.info if serving else logger.warning)("backend %s: %s", backend.address, state)
        if serving != was_serving:
            await self._on_health_change(self.any_serving)

    def collect(self):
        """Prometheus: per-backend counters and whether each backend is SERVING."""
        families = (
            (CounterMetricFamily, "jaxserve_router_requests_routed",
             "Calls the router sent to each backend", lambda b: b.stats.routed),
            (GaugeMetricFamily, "jaxserve_router_requests_in_flight",
             "Calls at each backend that have not ended", lambda b: b.stats.in_flight),
            (CounterMetricFamily, "jaxserve_router_backend_failures",
             "Calls each backend ended with UNAVAILABLE, INTERNAL, UNKNOWN or DATA_LOSS",
             lambda b: b.stats.failures),
            (GaugeMetricFamily, "jaxserve_router_backend_serving",
             "1 while the backend's last health check said SERVING", lambda b: int(b.serving)))
        for family_type, name, doc, value in families:
            family = family_type(name, doc, labels=["backend"])
            for backend in self.backends:
                family.add_metric([backend.address], value(backend))
            yield family
