"""Real servers on 127.0.0.1 (free ports) over the built-in tiny model, each in a thread of its own
with its own event loop; tests call them with real (synchronous) gRPC clients."""

import asyncio
import faulthandler
import threading
import time

import grpc
import pytest

from jaxserve import Engine, EngineConfig
from jaxserve.model_io.default_model import BUILTIN_MODEL
from server.config import ServerConfig
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from server.grpc_server import GrpcServer

# Small limits: 3 step shapes, compiled on first use (and cached on disk by tests/conftest.py).
ENGINE_LIMITS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
                     num_kv_blocks=64, dtype="float32")
TEST_TIMEOUT_S = 120  # a hung test dumps every thread's stack and ends the run


def tiny_engine() -> Engine:
    return Engine(BUILTIN_MODEL, EngineConfig(**ENGINE_LIMITS), precompile=False, progress=False)


class ServerThread:
    """A GrpcServer running on an event loop in a background thread."""

    def __init__(self, config: ServerConfig, engine_factory=tiny_engine, load: bool = True):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.server: GrpcServer = self.run(_make_server(engine_factory, config))
        self.run(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"
        if load:
            self.run(self.server.load())

    def run(self, coroutine, timeout: float = 60):
        """Runs a coroutine on the server's loop; returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def submit(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def channel(self, **kwargs) -> grpc.Channel:
        return grpc.insecure_channel(self.target, **kwargs)

    def stub(self) -> pb_grpc.JaxServeStub:
        return pb_grpc.JaxServeStub(self.channel())

    def wait_idle(self, timeout: float = 10) -> bool:
        """Polls until no call is in flight, the engine holds no request and every KV block is free."""
        engine = self.server.engine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.server.admission.in_flight == 0 and not engine.has_unfinished_requests
                    and engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def _make_server(engine_factory, config: ServerConfig) -> GrpcServer:
    return GrpcServer(engine_factory, config)


def greedy(max_tokens: int, **kwargs) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@pytest.fixture(autouse=True)
def _bounded_in_time():
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="package")
def shared_server():
    """One server for the tests that leave it as they found it."""
    server = ServerThread(ServerConfig(port=0, metrics_port=0))
    yield server
    server.close()


@pytest.fixture
def make_server():
    """Builds servers with their own config; closes them after the test."""
    servers = []

    def make(engine_factory=tiny_engine, load=True, **config) -> ServerThread:
        server = ServerThread(ServerConfig(port=0, **config), engine_factory, load)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()
