"""A real server with the OpenAI-compatible HTTP API on loopback, for tests: tests/server's
ServerThread (gRPC, its engine loop on a thread) with server/openai's HttpServer on the same
event loop, as `python -m server --http_port` runs them."""

import time

import httpx

from jaxserve import Engine, EngineConfig
from server.config import ServerConfig
from server.openai.http_server import HttpServer
from tests.server.conftest import ENGINE_LIMITS, ServerThread


def templated_engine_factory(model_dir: str):
    return lambda: Engine(model_dir, EngineConfig(**ENGINE_LIMITS), precompile=False,
                          progress=False)


class HttpServerThread:
    def __init__(self, engine_factory, load: bool = True, **config):
        self.grpc = ServerThread(ServerConfig(port=0, http_port=0, **config), engine_factory,
                                 load=False)
        self.http = HttpServer(self.grpc.server)
        self.grpc.run(self.http.start())
        self.base_url = f"http://127.0.0.1:{self.http.port}"
        if load:
            self.grpc.run(self.grpc.server.load())

    @property
    def engine(self) -> Engine:
        return self.grpc.server.engine

    def wait_idle(self, timeout: float = 10) -> bool:
        return self.grpc.wait_idle(timeout)

    def wait_for(self, predicate, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self.grpc.run(self.http.stop())
        self.grpc.close()


def post(url: str, **kwargs) -> httpx.Response:
    """httpx.post with a timeout for a call that may compile a step shape on a busy CPU."""
    return httpx.post(url, timeout=kwargs.pop("timeout", 60), **kwargs)


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, timeout=kwargs.pop("timeout", 60), **kwargs)
