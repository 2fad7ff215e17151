"""The replica router: one jaxserve.v1 endpoint in front of several jaxserve servers.

    python -m server.router --backends=127.0.0.1:50051,127.0.0.1:50052 --policy=prefix_affinity

Each call goes, as it came, to one backend that the routing policy (routing_policy.py) picks
among those whose health check says SERVING (backend_pool.py), with the client's deadline and
its `authorization` metadata. How a call ends:

    the backend answers                        its messages, then its status: code, details and
                                               trailing metadata unchanged (INVALID_ARGUMENT,
                                               RESOURCE_EXHAUSTED with retry-after-ms, ...)
    UNAVAILABLE before any message went out    tried again on another SERVING backend, up to
                                               max_attempts backends; the failed one is skipped
                                               until its health check says SERVING again
    UNAVAILABLE after messages went out        passed through: the client has a partial answer
    no SERVING backend (or none left to try)   UNAVAILABLE, naming each backend and its state
    the client cancels, or its deadline passes the backend call is cancelled

Beside jaxserve.v1.JaxServe the router serves grpc.health.v1 (SERVING while any backend is) and
reflection; with metrics_port, per-backend Prometheus counters. SIGTERM stops it: new calls are
refused, running ones get grace_period_s.
"""

import asyncio
import dataclasses
import logging
import os
import signal

import grpc
from absl import app, flags
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter

from jaxserve.cli import cli_app
from server.auth import BearerTokenInterceptor
from server.backend_pool import SERVICE_NAME, BackendPool, BackendStats, NoBackendError
from server.config import RouterConfig
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from server.metrics_http import MetricsHttpServer
from server.parse_errors import ParseErrorInterceptor
from server.routing_policy import POLICIES, PrefixAffinity, make_policy

logger = logging.getLogger(__name__)

_FORWARDED_METADATA = ("authorization",)
_STREAMING = ("Generate", "Chat")


class RouterServicer(pb_grpc.JaxServeServicer):
    """jaxserve.v1.JaxServe, each call forwarded to a backend of the pool."""

    def __init__(self, pool: BackendPool, max_attempts: int):
        self._pool, self._max_attempts = pool, max_attempts

    async def Generate(self, request, context: grpc.aio.ServicerContext) -> None:
        await self._forward("Generate", request, context)  # messages go out by context.write

    async def Chat(self, request, context: grpc.aio.ServicerContext) -> None:
        await self._forward("Chat", request, context)

    async def Complete(self, request, context: grpc.aio.ServicerContext):
        return await self._forward("Complete", request, context)

    async def Tokenize(self, request, context: grpc.aio.ServicerContext):
        return await self._forward("Tokenize", request, context)

    async def Detokenize(self, request, context: grpc.aio.ServicerContext):
        return await self._forward("Detokenize", request, context)

    async def GetModelInfo(self, request, context: grpc.aio.ServicerContext):
        return await self._forward("GetModelInfo", request, context)

    async def _forward(self, method: str, request, context: grpc.aio.ServicerContext):
        """Calls `method` on backends until one answers; returns its reply (a stream's messages
        are written to `context` as they come). Ends the call with the backend's status."""
        metadata = tuple((k, v) for k, v in context.invocation_metadata() or ()
                         if k in _FORWARDED_METADATA)
        tried, last_error = [], None
        while True:
            try:
                backend = self._pool.choose(request, tried)
            except NoBackendError as e:
                details = str(e) if last_error is None else f"{e}; last error: {last_error}"
                await context.abort(grpc.StatusCode.UNAVAILABLE, details)
            tried.append(backend)
            call = getattr(backend.stub, method)(request, timeout=context.time_remaining(),
                                                 metadata=metadata)
            sent = False
            try:
                with self._pool.track(backend):
                    if method not in _STREAMING:
                        return await call
                    async for response in call:
                        sent = True
                        await context.write(response)
                    return None
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or sent:
                    await context.abort(e.code(), e.details(), tuple(e.trailing_metadata() or ()))
                await self._pool.mark_down(backend, e)
                last_error = f"{backend.address}: {e.details()}"
                if len(tried) >= self._max_attempts:
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"{len(tried)} backends were UNAVAILABLE; last error: "
                                        f"{last_error}")
                logger.info("%s on %s: UNAVAILABLE (%s); trying another backend", method,
                            backend.address, e.details())
            finally:
                call.cancel()  # a no-op once the call ended; otherwise the client went away


class Router:
    """The router's gRPC server, backend pool and metrics endpoint, from start to stop."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.health = health.aio.HealthServicer()
        self.pool = BackendPool(
            config.backends, make_policy(config.policy, config.prefix_affinity),
            health_check_interval_s=config.health_check_interval_s,
            health_check_timeout_s=config.health_check_timeout_s,
            health_auth_token=config.backend_auth_token or config.auth_token,
            max_message_bytes=config.max_message_bytes, on_health_change=self._set_health)
        self.registry = CollectorRegistry()
        self.registry.register(self.pool)
        self._server: grpc.aio.Server | None = None
        self.unauthenticated = Counter(
            "jaxserve_unauthenticated_calls", "Calls refused for a missing or wrong bearer token",
            ["endpoint"], registry=self.registry)  # endpoint: grpc or metrics
        self._metrics_http: MetricsHttpServer | None = None
        self._health_state = "LOADING"  # for the metrics port's /health: SERVING or why not
        self.port: int | None = None
        self.metrics_port: int | None = None

    def stats(self) -> dict[str, BackendStats]:
        """Each backend's counters (routed, in flight, failures), by address."""
        return self.pool.stats()

    async def start(self) -> None:
        """Binds, serves (health NOT_SERVING until a backend is SERVING), starts health checks."""
        c = self.config
        await self._set_health(False)
        refused = self.unauthenticated.labels(endpoint="grpc")
        interceptors = [BearerTokenInterceptor(c.auth_token, refused.inc)] if c.auth_token else []
        interceptors.append(ParseErrorInterceptor())  # inside auth: no token is UNAUTHENTICATED
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silent second server
        ])
        pb_grpc.add_JaxServeServicer_to_server(RouterServicer(self.pool, c.max_attempts),
                                               self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = f"[{c.host}]:{c.port}" if ":" in c.host else f"{c.host}:{c.port}"
        self.port = self._server.add_insecure_port(address)
        await self._server.start()
        await self.pool.start()
        if c.metrics_port is not None:
            self._metrics_http = MetricsHttpServer(self.registry, lambda: self._health_state,
                                                   self.unauthenticated, c.auth_token)
            self.metrics_port = self._metrics_http.start(c.host, c.metrics_port)
            logger.info("metrics on http://%s:%d/metrics (and /health)", c.host,
                        self.metrics_port)
        logger.info("router on %s:%d: %s over %s", c.host, self.port, c.policy,
                    ", ".join(c.backends))

    async def stop(self) -> None:
        """Refuses new calls, lets running ones finish within grace_period_s, closes channels."""
        self._health_state = "DRAINING"
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.grace_period_s)
        await self.pool.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        logger.info("router stopped")

    async def _set_health(self, any_serving: bool) -> None:
        if self._health_state != "DRAINING":
            self._health_state = "SERVING" if any_serving else "NO_BACKEND_SERVING"
        status = (health_pb2.HealthCheckResponse.SERVING if any_serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


# ----- python -m server.router ---------------------------------------------------------------
def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the router's flags (here, not at import: `python -m server` has --port too)."""
    d = {field.name: field.default for field in dataclasses.fields(RouterConfig)}
    a = d["prefix_affinity"]
    fv = dict(flag_values=flag_values)
    flags.DEFINE_list("backends", [], "The jaxserve servers, host:port,host:port.", **fv)
    flags.DEFINE_string("policy", d["policy"],
                        f"How a call picks its backend: {', '.join(POLICIES)}.", **fv)
    flags.DEFINE_integer("prefix_chars", a.prefix_chars, "prefix_affinity: characters of a text "
                         "prompt that pick its backend (about one KV block of tokens).", **fv)
    flags.DEFINE_integer("prefix_tokens", a.prefix_tokens, "prefix_affinity: the same for a "
                         "prompt of token ids (one KV block at --block_size=16).", **fv)
    flags.DEFINE_integer("max_imbalance", a.max_imbalance, "prefix_affinity: calls in flight "
                         "beyond the least loaded backend past which the least loaded one is "
                         "taken instead.", **fv)
    flags.DEFINE_integer("max_attempts", d["max_attempts"], "Backends a call may try when they "
                         "answer UNAVAILABLE before any message.", **fv)
    flags.DEFINE_float("health_check_interval_s", d["health_check_interval_s"],
                       "Seconds between health checks of each backend.", **fv)
    flags.DEFINE_float("health_check_timeout_s", d["health_check_timeout_s"],
                       "A health check that takes longer counts the backend as down.", **fv)
    flags.DEFINE_string("host", d["host"], "Address to listen on; 0.0.0.0 exposes the router.",
                        **fv)
    flags.DEFINE_integer("port", d["port"], "gRPC port; 0 picks a free one (logged).", **fv)
    flags.DEFINE_string("auth_token", "", "When set, every call must carry 'authorization: Bearer "
                        "<token>' (JAXSERVE_AUTH_TOKEN is read when this is empty).", **fv)
    flags.DEFINE_string("backend_auth_token", "", "Token for the router's health checks of the "
                        "backends (JAXSERVE_BACKEND_AUTH_TOKEN; default: the router's token).",
                        **fv)
    flags.DEFINE_integer("metrics_port", 0, "Prometheus /metrics port on --host; 0: off.", **fv)
    flags.DEFINE_integer("max_message_bytes", d["max_message_bytes"],
                         "Largest gRPC message sent or received.", **fv)
    flags.DEFINE_float("grace_period_s", d["grace_period_s"],
                       "On SIGTERM, how long running calls may take to finish.", **fv)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> RouterConfig:
    """The RouterConfig the flags describe; ValueError names the bad flag."""
    f = flag_values
    return RouterConfig(
        backends=tuple(f.backends), policy=f.policy,
        prefix_affinity=PrefixAffinity(prefix_chars=f.prefix_chars, prefix_tokens=f.prefix_tokens,
                                       max_imbalance=f.max_imbalance),
        max_attempts=f.max_attempts, health_check_interval_s=f.health_check_interval_s,
        health_check_timeout_s=f.health_check_timeout_s, host=f.host, port=f.port,
        auth_token=f.auth_token or os.environ.get("JAXSERVE_AUTH_TOKEN") or None,
        backend_auth_token=(f.backend_auth_token or os.environ.get("JAXSERVE_BACKEND_AUTH_TOKEN")
                            or None),
        metrics_port=f.metrics_port or None, max_message_bytes=f.max_message_bytes,
        grace_period_s=f.grace_period_s)


async def serve(config: RouterConfig) -> None:
    """Routes until SIGTERM/SIGINT, then stops."""
    router = Router(config)
    await router.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stop requested")
    await router.stop()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    asyncio.run(serve(config))


def cli(argv: list[str] | None = None) -> None:
    """`jaxserve router` (and python -m server.router): its flags defined, then main() under
    jaxserve/cli/cli_app.py's flag parsing and error handling."""
    define_flags()
    cli_app.run(main, "router", argv)


if __name__ == "__main__":
    cli()
