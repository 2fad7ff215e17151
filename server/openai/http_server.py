"""HttpServer: uvicorn serving the OpenAI-compatible app on the gRPC server's own event loop.

    start()  bind --host:--http_port (0: a free one) and serve at once; before the model has
             loaded, /health says LOADING and the API answers 503
    stop()   after the gRPC server's drain (SIGTERM): close the port and the idle connections,
             wait briefly for the rest, then stop

uvicorn runs as tasks of the running asyncio loop, beside grpc.aio, not as a process or thread
of its own; its signal handling is left out, so SIGTERM reaches the one handler in
server/__main__.py, which drains both fronts together. The socket is bound here, so that a port
in use is an OSError from start(), not uvicorn's sys.exit.
"""

import asyncio
import contextlib
import logging
import socket

import uvicorn

from server.openai.app import build_app

logger = logging.getLogger(__name__)
_STOP_GRACE_S = 5.0  # connections still open after the drain get this long


class HttpServer:
    def __init__(self, core):
        """core: the GrpcServer whose engine loop, admission and metrics the API shares; its
        config's http_port, host, TLS files and auth token apply."""
        self._core = core
        self.port: int | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._serving: asyncio.Task | None = None

    async def start(self) -> None:
        c = self._core.config
        family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
        try:
            self._socket = socket.create_server((c.host, c.http_port), family=family)
        except OSError as e:
            raise OSError(e.errno, f"http_port {c.http_port} on {c.host}: {e.strerror}") from None
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(build_app(self._core, c), lifespan="off", log_config=None,
                                access_log=c.access_log,  # uvicorn's line per call
                                timeout_graceful_shutdown=_STOP_GRACE_S,
                                ssl_certfile=c.tls_cert, ssl_keyfile=c.tls_key)
        self._uvicorn = _Uvicorn(config)
        self._serving = asyncio.create_task(self._uvicorn.serve(sockets=[self._socket]),
                                            name="uvicorn")
        while not self._uvicorn.started:  # a few loop turns
            if self._serving.done():
                self._serving.result()  # its error
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        scheme = "https" if c.tls_cert else "http"
        logger.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", scheme, c.host, self.port)

    async def stop(self) -> None:
        if self._uvicorn is None:
            return
        server, self._uvicorn = self._uvicorn, None
        server.should_exit = True
        await self._serving  # closes the port and the idle connections, waits for the rest
        logger.info("HTTP API stopped")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """None: server/__main__.py's handlers drain gRPC and HTTP together."""
        yield
