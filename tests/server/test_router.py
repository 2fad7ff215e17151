"""The replica router (server/router.py, backend_pool.py): the policies at work, backend health,
retries, status pass-through, cancellation, auth and metrics over light fake backends on
127.0.0.1; config and the `python -m server.router` entry point; and one run over two real
servers, checking that greedy text through the router is the text a backend gives directly."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from absl import flags
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from server.config import RouterConfig
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from server.router import Router, config_from_flags, define_flags
from server.routing_policy import PrefixAffinity, make_policy
from tests.server.conftest import greedy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVICE_NAME = "jaxserve.v1.JaxServe"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "router-token"


def text(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, params=greedy(4))


# ----- configuration and flags ------------------------------------------------------------------
def test_bad_config_is_refused_naming_the_field():
    for kwargs, message in [
            (dict(backends=()), "backends must list at least one"),
            (dict(backends=("127.0.0.1",)), "'127.0.0.1' is not host:port"),
            (dict(backends=("h:0",)), "port in [1, 65535]"),
            (dict(backends=("::1:50051",)), "IPv6 host goes in brackets"),
            (dict(backends=("h:1", "h:1")), "h:1 more than once"),
            (dict(backends=("h:1",), policy="random"), "policy must be one of"),
            (dict(backends=("h:1",), max_attempts=0), "max_attempts must be >= 1"),
            (dict(backends=("h:1",), auth_token=""), "auth_token must not be empty")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            RouterConfig(**kwargs)
    with pytest.raises(ValueError, match="max_imbalance must be >= 0"):
        PrefixAffinity(max_imbalance=-1)
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("fastest")
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["router", "--backends=127.0.0.1:1,[::1]:2", "--policy=least_outstanding",
                 "--prefix_chars=32"])
    config = config_from_flags(flag_values)
    assert config.backends == ("127.0.0.1:1", "[::1]:2") and config.policy == "least_outstanding"
    assert config.prefix_affinity.prefix_chars == 32 and config.host == "127.0.0.1"


# ----- fake backends and a router on an event loop of their own ---------------------------------
class LoopThread:
    """An asyncio event loop in a background thread; run() runs a coroutine there."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-router",
                                        daemon=True)
        self._thread.start()

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class FakeBackend(pb_grpc.JaxServeServicer):
    """A jaxserve.v1 server in miniature, with health: records each call (method, prompt,
    metadata, time left) and answers with messages that name it. A prompt starting "hold"
    streams one message, then waits for release() and records its own cancellation."""

    def __init__(self, name: str):
        self.name = name
        self.calls: list[tuple[str, str]] = []  # (method, prompt text)
        self.metadata: list[dict[str, str]] = []
        self.time_remaining: list[float | None] = []
        self.error: tuple | None = None  # (code, details, trailing metadata) for every call
        self.fail_after_first = False  # Generate: UNAVAILABLE after its first message
        self.cancelled = threading.Event()
        self.health = health.aio.HealthServicer()

    async def start(self) -> None:
        self._release = asyncio.Event()
        self.server = grpc.aio.server()
        pb_grpc.add_JaxServeServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        await self.health.set(SERVICE_NAME, SERVING if serving else NOT_SERVING)

    async def release(self) -> None:
        self._release.set()

    async def _record(self, method: str, prompt: str, context) -> None:
        self.calls.append((method, prompt))
        self.metadata.append(dict(context.invocation_metadata()))
        self.time_remaining.append(context.time_remaining())
        if self.error:
            await context.abort(*self.error)

    async def Generate(self, request, context):
        await self._record("Generate", request.text, context)
        yield pb.GenerateResponse(request_id=self.name,
                                  samples=[pb.SampleOutput(text=self.name, token_ids=[7])])
        if self.fail_after_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fell over mid-stream")
        if request.text.startswith("hold"):
            try:
                await self._release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        yield pb.GenerateResponse(request_id=self.name, finished=True, samples=[pb.SampleOutput(
            text="!", token_ids=[8], finish_reason=pb.FINISH_REASON_LENGTH)])

    async def Chat(self, request, context):
        await self._record("Chat", "|".join(m.content for m in request.messages), context)
        yield pb.GenerateResponse(request_id=self.name, finished=True,
                                  samples=[pb.SampleOutput(text=self.name)])

    async def Complete(self, request, context):
        await self._record("Complete", request.text, context)
        return pb.CompleteResponse(request_id=self.name, samples=[pb.SampleOutput(text=self.name)])

    async def Tokenize(self, request, context):
        await self._record("Tokenize", request.text, context)
        return pb.TokenizeResponse(token_ids=[len(request.text)])

    async def GetModelInfo(self, request, context):
        await self._record("GetModelInfo", "", context)
        return pb.ModelInfo(model_path=self.name)

    def prompts(self, method: str = "Complete") -> list[str]:
        return [p for m, p in self.calls if m == method]


class Cluster:
    """Fake backends and routers on one LoopThread."""

    def __init__(self):
        self.thread = LoopThread()
        self.backends: list[FakeBackend] = []
        self.routers: list[Router] = []

    def backend(self, name: str) -> FakeBackend:
        backend = FakeBackend(name)
        self.thread.run(backend.start())
        self.backends.append(backend)
        return backend

    def router(self, backends, wait_serving: bool = True, **config) -> Router:
        config = RouterConfig(**{"backends": tuple(b.address for b in backends), "port": 0,
                                 "health_check_interval_s": 0.05, "grace_period_s": 0, **config})

        async def start():
            router = Router(config)
            await router.start()
            return router

        router = self.thread.run(start())
        self.routers.append(router)
        if wait_serving:
            wait_for(lambda: all(b.serving for b in router.pool.backends))
        return router

    def run(self, coroutine):
        return self.thread.run(coroutine)

    def close(self) -> None:
        for router in self.routers:
            self.thread.run(router.stop())
        for backend in self.backends:
            self.thread.run(backend.server.stop(0))
        self.thread.close()


@pytest.fixture
def cluster():
    cluster = Cluster()
    yield cluster
    cluster.close()


def wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def stub(router: Router) -> pb_grpc.JaxServeStub:
    return pb_grpc.JaxServeStub(grpc.insecure_channel(f"127.0.0.1:{router.port}"))


def health_status(router: Router, metadata=()) -> int:
    channel = grpc.insecure_channel(f"127.0.0.1:{router.port}")
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5, metadata=metadata).status


def generate_text(stub, prompt: str, **kwargs) -> str:
    return "".join(s.text for r in stub.Generate(text(prompt), timeout=10, **kwargs)
                   for s in r.samples)


# ----- routing over fake backends ---------------------------------------------------------------
def test_round_robin_alternates(cluster):
    a, b = cluster.backend("a"), cluster.backend("b")
    router = cluster.router([a, b], policy="round_robin")
    client = stub(router)
    assert [generate_text(client, f"p{i}") for i in range(4)] == ["a!", "b!", "a!", "b!"]
    assert a.prompts("Generate") == ["p0", "p2"] and b.prompts("Generate") == ["p1", "p3"]
    assert {k: (s.routed, s.in_flight) for k, s in router.stats().items()} == {
        a.address: (2, 0), b.address: (2, 0)}


def test_least_outstanding_picks_the_idle_backend(cluster):
    a, b = cluster.backend("a"), cluster.backend("b")
    router = cluster.router([a, b], policy="least_outstanding")
    client = stub(router)
    held = client.Generate(text("hold on"), timeout=10)
    assert next(held).samples[0].text == "a"  # a tie at 0 in flight: the first backend
    assert router.stats()[a.address].in_flight == 1
    assert [client.Complete(text(f"c{i}"), timeout=10).request_id for i in range(3)] == ["b"] * 3
    cluster.run(a.release())
    assert [s.text for r in held for s in r.samples] == ["!"]
    assert client.Complete(text("after"), timeout=10).request_id == "a"  # fewer routed


def test_prefix_affinity_keeps_a_prefix_on_one_backend_and_falls_back(cluster):
    a, b, c = (cluster.backend(n) for n in "abc")
    router = cluster.router([a, b, c], policy="prefix_affinity",
                            prefix_affinity=PrefixAffinity(prefix_chars=12, max_imbalance=1))
    client = stub(router)
    owners = {client.Complete(text(f"You are kind. Question {i}"), timeout=10).request_id
              for i in range(6)}
    assert len(owners) == 1
    spread = {client.Complete(text(f"{i:02d} another prefix"), timeout=10).request_id
              for i in range(48)}  # each backend gets none with p = 3 * (2/3)**48 ~ 1e-8
    assert spread == {"a", "b", "c"}
    # Two held streams with one prefix stay on its backend; the third is past max_imbalance.
    held, first = [], []
    for i in range(3):  # one after the other: each is in flight before the next is routed
        held.append(client.Generate(text(f"hold: shared prefix {i}"), timeout=10))
        first.append(next(held[-1]).samples[0].text)
    assert first[0] == first[1] and first[2] != first[0]
    for backend in (a, b, c):
        cluster.run(backend.release())
    for h in held:
        list(h)


def test_chat_is_streamed_and_a_conversation_stays_on_its_backend(cluster):
    a, b, c = (cluster.backend(n) for n in "abc")
    router = cluster.router([a, b, c], policy="prefix_affinity",
                            prefix_affinity=PrefixAffinity(prefix_chars=24))
    client = stub(router)

    def chat(*contents: str) -> str:
        messages = [pb.ChatMessage(role="user", content=x) for x in contents]
        return "".join(s.text for r in client.Chat(pb.ChatRequest(messages=messages), timeout=10)
                       for s in r.samples)

    owners = {chat("You are kind and brief.", f"Turn {i}") for i in range(6)}
    assert len(owners) == 1  # a growing conversation keeps its backend's prefix cache
    assert {chat(f"{i:02d} another start") for i in range(48)} == {"a", "b", "c"}
    assert sum(len(backend.prompts("Chat")) for backend in (a, b, c)) == 54


def test_unhealthy_and_stopped_backends_are_skipped(cluster):
    a, b = cluster.backend("a"), cluster.backend("b")
    router = cluster.router([a, b], policy="round_robin")
    client = stub(router)
    cluster.run(b.set_serving(False))
    wait_for(lambda: not router.pool.backends[1].serving)
    assert [client.Complete(text(f"p{i}"), timeout=10).request_id for i in range(3)] == ["a"] * 3
    cluster.run(b.set_serving(True))
    cluster.run(a.server.stop(0))
    wait_for(lambda: not router.pool.backends[0].serving and router.pool.backends[1].serving)
    assert [client.Complete(text(f"q{i}"), timeout=10).request_id for i in range(3)] == ["b"] * 3
    assert health_status(router) == SERVING


def test_no_serving_backend_is_unavailable_and_router_health_follows(cluster):
    a, b = cluster.backend("a"), cluster.backend("b")
    for backend in (a, b):
        cluster.run(backend.set_serving(False))
    router = cluster.router([a, b], wait_serving=False)
    wait_for(lambda: all(bk.state == "NOT_SERVING" for bk in router.pool.backends))
    assert health_status(router) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        stub(router).Complete(text("anyone?"), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    details = error.value.details()
    assert "no SERVING backend" in details and a.address in details and b.address in details
    cluster.run(b.set_serving(True))
    wait_for(lambda: health_status(router) == SERVING)
    assert stub(router).Complete(text("now"), timeout=10).request_id == "b"


def test_unavailable_before_the_first_message_is_retried_elsewhere(cluster):
    a, b = cluster.backend("a"), cluster.backend("b")
    a.error = (grpc.StatusCode.UNAVAILABLE, "draining")
    router = cluster.router([a, b], policy="round_robin", health_check_interval_s=30)
    client = stub(router)
    assert generate_text(client, "retry me") == "b!"
    assert a.prompts("Generate") == ["retry me"] and b.prompts("Generate") == ["retry me"]
    assert router.stats()[a.address].failures == 1
    assert not router.pool.backends[0].serving  # skipped until a health check says SERVING
    assert client.Complete(text("next"), timeout=10).request_id == "b"
    assert a.prompts() == []


def test_unavailable_after_a_message_is_passed_through(cluster):
    a, b = cluster.backend("a"), cluster.backend("b")
    a.fail_after_first = True
    router = cluster.router([a, b], policy="round_robin")
    call = stub(router).Generate(text("partial"), timeout=10)
    assert next(call).samples[0].text == "a"
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error.value.details() == "fell over mid-stream"
    assert b.calls == []


def test_all_attempts_unavailable(cluster):
    backends = [cluster.backend(n) for n in "abc"]
    for backend in backends:
        backend.error = (grpc.StatusCode.UNAVAILABLE, f"{backend.name} is down")
    router = cluster.router(backends, max_attempts=2, health_check_interval_s=30)
    with pytest.raises(grpc.RpcError) as error:
        stub(router).Complete(text("x"), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "2 backends were UNAVAILABLE" in error.value.details()
    assert sum(len(b.calls) for b in backends) == 2


@pytest.mark.parametrize("code, details, trailer", [
    (grpc.StatusCode.INVALID_ARGUMENT, "params.top_p: SamplingParams.top_p must be in (0, 1]", ()),
    (grpc.StatusCode.OUT_OF_RANGE, "prompt: prompt has 300 tokens; the limit is 256", ()),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "max_pending (1) requests are in flight",
     (("retry-after-ms", "250"),))])
def test_backend_status_passes_through_unchanged(cluster, code, details, trailer):
    a, b = cluster.backend("a"), cluster.backend("b")
    a.error = b.error = (code, details, trailer)
    router = cluster.router([a, b])
    client = stub(router)
    for call in (lambda: client.Complete(text("bad"), timeout=10),
                 lambda: list(client.Generate(text("bad"), timeout=10))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert (error.value.code(), error.value.details()) == (code, details)
        assert tuple(error.value.trailing_metadata()) == trailer
    assert len(a.calls) + len(b.calls) == 2  # not retried
    assert sum(s.failures for s in router.stats().values()) == 0


def test_cancelled_client_call_cancels_the_backend_call(cluster):
    a = cluster.backend("a")
    router = cluster.router([a])
    call = stub(router).Generate(text("hold me"), timeout=10)
    next(call)
    call.cancel()
    assert a.cancelled.wait(5)
    wait_for(lambda: router.stats()[a.address].in_flight == 0)


def test_deadline_and_token_are_forwarded_and_a_passed_deadline_cancels(cluster):
    a = cluster.backend("a")
    router = cluster.router([a], auth_token=TOKEN)
    client = stub(router)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with pytest.raises(grpc.RpcError) as error:
        client.Complete(text("no token"), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and a.calls == []
    client.Complete(text("x"), timeout=10, metadata=auth + (("x-other", "kept here"),))
    assert a.metadata[0]["authorization"] == f"Bearer {TOKEN}" and "x-other" not in a.metadata[0]
    assert 5 < a.time_remaining[0] < 11  # gRPC rounds the timeout on the wire
    client.Complete(text("no deadline"), metadata=auth)
    assert a.time_remaining[1] is None
    with pytest.raises(grpc.RpcError) as error:
        list(client.Generate(text("hold: too slow"), timeout=0.5, metadata=auth))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert a.cancelled.wait(5)
    assert health_status(router, auth) == SERVING


def test_other_methods_reflection_and_metrics(cluster):
    a = cluster.backend("a")
    router = cluster.router([a], metrics_port=0)
    client = stub(router)
    assert client.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_path == "a"
    assert list(client.Tokenize(pb.TokenizeRequest(text="four"), timeout=10).token_ids) == [4]
    with pytest.raises(grpc.RpcError) as error:  # the fake does not implement it
        client.Detokenize(pb.DetokenizeRequest(token_ids=[1]), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    services = ProtoReflectionDescriptorDatabase(
        grpc.insecure_channel(f"127.0.0.1:{router.port}")).get_services()
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)
    url = f"http://127.0.0.1:{router.metrics_port}/metrics"
    metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    label = f'{{backend="{a.address}"}}'
    for line in (f"jaxserve_router_requests_routed_total{label} 3.0",
                 f"jaxserve_router_requests_in_flight{label} 0.0",
                 f"jaxserve_router_backend_failures_total{label} 0.0",
                 f"jaxserve_router_backend_serving{label} 1.0"):
        assert line in metrics, metrics
    health_url = f"http://127.0.0.1:{router.metrics_port}/health"
    assert urllib.request.urlopen(health_url, timeout=10).read() == b"SERVING\n"
    with pytest.raises(urllib.error.HTTPError) as http_error:  # /metrics and /health only
        urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}/nope", timeout=10)
    assert http_error.value.code == 404
    garbage = grpc.insecure_channel(f"127.0.0.1:{router.port}").unary_unary(
        f"/{SERVICE_NAME}/Complete")
    with pytest.raises(grpc.RpcError) as error:  # bytes that do not parse: not UNKNOWN
        garbage(b"\xff\xff\xff", timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_entry_point_routes_then_stops_on_sigterm(cluster):
    a = cluster.backend("a")
    bad = subprocess.run([sys.executable, "-m", "server.router", "--backends=localhost"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.startswith("jaxserve router: error: ")  # one line
    assert "'localhost' is not host:port" in bad.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "server.router", f"--backends={a.address}", "--port=0",
         "--health_check_interval_s=0.05"],
        cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        port = None
        for line in process.stderr:
            found = re.search(r"router on 127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the router did not log its port"
        client = pb_grpc.JaxServeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.Complete(text("via main"), timeout=5).request_id == "a"
                break
            except grpc.RpcError as e:  # UNAVAILABLE until the first health check
                assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ----- end to end over two real servers ---------------------------------------------------------
def test_router_over_two_real_servers_streams_the_direct_greedy_text(shared_server, make_server):
    second = make_server()
    thread = LoopThread()
    config = RouterConfig(backends=(shared_server.target, second.target), policy="round_robin",
                          port=0, health_check_interval_s=0.05, grace_period_s=0)

    async def start():
        router = Router(config)
        await router.start()
        return router

    router = thread.run(start())
    try:
        wait_for(lambda: all(b.serving for b in router.pool.backends))
        client, direct = stub(router), shared_server.stub()
        prompts = ["The router sends", "each prompt to one", "of two replicas", "and back"]
        for prompt in prompts:
            request = pb.GenerateRequest(text=prompt, params=greedy(12))
            routed = list(client.Generate(request, timeout=60))
            expected = direct.Complete(request, timeout=60).samples[0]
            assert "".join(s.text for r in routed for s in r.samples) == expected.text
            assert [t for r in routed for s in r.samples for t in s.token_ids] == list(
                expected.token_ids)
            assert routed[-1].finished and routed[-1].usage.output_tokens == 12
        assert [s.routed for s in router.stats().values()] == [2, 2]
        info = client.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info == direct.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    finally:
        thread.run(router.stop())
        thread.close()
    assert shared_server.wait_idle() and second.wait_idle()
