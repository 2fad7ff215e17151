"""GrpcServer: the gRPC server around one engine, from start-up through drain to stop.

    start()  bind the port and serve at once: health NOT_SERVING, every call UNAVAILABLE
    load()   build the Engine on a thread of its own, start the engine loop, health SERVING
    drain()  what SIGTERM calls: refuse new calls (UNAVAILABLE), health NOT_SERVING, let the
             running requests finish for up to grace_period_s, then abort the rest (UNAVAILABLE)
    stop()   close the port, end the engine loop, close the metrics endpoint

Beside jaxserve.v1.JaxServe it serves grpc.health.v1.Health (for the whole server, "", and for
"jaxserve.v1.JaxServe") and server reflection.
"""

import asyncio
import concurrent.futures
import logging
import threading
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.engine.engine import Engine
from jaxserve.model_io.generation_defaults import GenerationDefaults
from server.admission import Admission
from server.auth import BearerTokenInterceptor
from server.config import ServerConfig
from server.engine_loop import EngineLoop
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from server.metrics import ServerMetrics
from server.parse_errors import ParseErrorInterceptor
from server.watchdog import Watchdog
from server.servicer import JaxServeServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JaxServe"].full_name
_ABORT_WAIT_S = 10.0  # after the grace period: how long aborted streams get to end
_STOP_GRACE_S = 1.0


class GrpcServer:
    def __init__(self, engine_factory: Callable[[], Engine], config: ServerConfig = ServerConfig()):
        """engine_factory builds the Engine; it runs on a thread of its own, in load()."""
        self.config = config
        self._engine_factory = engine_factory
        self.admission = Admission(config.max_pending)
        self.engine_loop: EngineLoop | None = None
        self.metrics = ServerMetrics(
            stats=lambda: self.engine_loop.stats if self.engine_loop else None,
            in_flight=lambda: self.admission.in_flight)
        self.servicer = JaxServeServicer(self.admission, self.metrics, config)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.watchdog: Watchdog | None = None
        self._load_thread: threading.Thread | None = None
        self._stopped = False

    @property
    def engine(self) -> Engine | None:
        return self.engine_loop.engine if self.engine_loop else None

    def unfinished_threads(self) -> list[str]:
        """After stop(): the names of this server's threads still running (the model's load,
        which cannot be interrupted inside XLA, or an engine loop whose step never returned)."""
        load = self._load_thread
        busy = [load.name] if load is not None and load.is_alive() else []
        if self.engine_loop is not None and self.engine_loop.is_alive():
            busy.append("engine-loop")
        return busy

    def health_state(self) -> str:
        """SERVING, or why not: LOADING, DRAINING, STALLED (the watchdog). Any thread."""
        if self.admission.state != Admission.SERVING:
            return self.admission.state.upper()
        return "STALLED" if self.watchdog is not None and self.watchdog.stalled else "SERVING"

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _on_stall(self, stalled: bool) -> None:
        if self.admission.state == Admission.SERVING:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING if stalled
                                   else health_pb2.HealthCheckResponse.SERVING)

    async def start(self) -> None:
        """Binds and starts serving (health NOT_SERVING until load() is done)."""
        c = self.config
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        refused = self.metrics.unauthenticated.labels(endpoint="grpc")
        interceptors = [BearerTokenInterceptor(c.auth_token, refused.inc)] if c.auth_token else []
        interceptors.append(ParseErrorInterceptor())  # inside auth: no token is UNAUTHENTICATED
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silent second server
        ])
        pb_grpc.add_JaxServeServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = f"[{c.host}]:{c.port}" if ":" in c.host else f"{c.host}:{c.port}"
        if c.port is None:  # the HTTP API alone: the gRPC server runs with no port
            pass
        elif c.tls_cert:
            with open(c.tls_key, "rb") as f:
                key = f.read()
            with open(c.tls_cert, "rb") as f:
                cert = f.read()
            self.port = self._server.add_secure_port(
                address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self._server.add_insecure_port(address)
        await self._server.start()
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.serve(c.host, c.metrics_port, self.health_state,
                                                   c.auth_token)
            logger.info("metrics on http://%s:%d/metrics (and /health)", c.host,
                        self.metrics_port)
        if self.port is not None:
            logger.info("gRPC %s on %s:%d (%s); loading the model", SERVICE_NAME, c.host,
                        self.port, "TLS" if c.tls_cert else "plaintext")

    async def load(self) -> None:
        """Builds the engine off the event loop, starts its loop thread, then health SERVING."""
        built: concurrent.futures.Future = concurrent.futures.Future()

        def build():  # a daemon thread, so that a SIGTERM during a long load need not wait for it
            if not built.set_running_or_notify_cancel():
                return
            try:
                built.set_result(self._engine_factory())
            except BaseException as e:
                built.set_exception(e)

        self._load_thread = threading.Thread(target=build, name="engine-load", daemon=True)
        self._load_thread.start()
        engine = await asyncio.wrap_future(built)
        # (A GGUF file's metadata is cached by now; a folder's is one small json file.)
        defaults = await asyncio.to_thread(GenerationDefaults.from_model, engine.model_path)
        if self.admission.state == Admission.DRAINING:  # stopped while loading
            return
        self.engine_loop = EngineLoop(engine, asyncio.get_running_loop())
        self.engine_loop.start()
        self.servicer.generation_defaults = defaults
        self.servicer.engine_loop = self.engine_loop
        if self.config.watchdog_timeout_s:
            self.watchdog = Watchdog(self.engine_loop, self.config.watchdog_timeout_s,
                                     self.metrics, self._on_stall)
            self.watchdog.start()
        self.admission.state = Admission.SERVING
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %s", engine.model_path)

    async def drain(self) -> None:
        """Stops admission, then lets running requests finish within the grace period."""
        if self.admission.state == Admission.DRAINING:
            return
        self.admission.state = Admission.DRAINING
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_period_s
        logger.info("draining: %d requests in flight, %.1f s grace", self.admission.in_flight, grace)
        if await self.admission.wait_idle(grace):
            return
        logger.warning("grace period over; aborting %d requests", self.admission.in_flight)
        self.engine_loop.abort_all()
        if not await self.admission.wait_idle(_ABORT_WAIT_S):
            logger.error("%d requests did not end after being aborted", self.admission.in_flight)

    async def stop(self) -> None:
        """Closes the port (cancelling any call left), the engine loop and the metrics endpoint."""
        if self._stopped:
            return
        self._stopped = True
        if self.admission.state != Admission.DRAINING:
            self.admission.state = Admission.DRAINING
            await self.health.enter_graceful_shutdown()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._server is not None:
            await self._server.stop(_STOP_GRACE_S)
        if self.engine_loop is not None:
            await asyncio.to_thread(self.engine_loop.stop, _ABORT_WAIT_S)
        self.metrics.shutdown()
        self.servicer.close()
        logger.info("stopped")

