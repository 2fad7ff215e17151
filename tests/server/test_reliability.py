"""Issue 14, server side: no request stalls the others, unparsable bytes and oversize replies get
clear statuses, the watchdog, the metrics port's paths and auth, and SIGTERM in every state."""

import concurrent.futures
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2

from server import reply_size
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from tests.server.conftest import ENGINE_LIMITS, greedy
from tests.server.test_lifecycle import NOT_SERVING, REPO, SERVING, health_status

METHODS = {"Generate": "stream", "Chat": "stream", "Complete": "unary", "Tokenize": "unary",
           "Detokenize": "unary", "GetModelInfo": "unary"}
UNPARSABLE = [b"\xff\xff\xff\xff", b"\x0a\x05ab",  # garbage; a string field cut short
              b"\x0a\x02\xc3\x28"]  # field 1 (text, role, ...) with invalid UTF-8


def raw_call(channel, method: str, data: bytes, timeout: float = 10):
    """Sends bytes as they are to /jaxserve.v1.JaxServe/<method>; returns the raw reply."""
    path = f"/jaxserve.v1.JaxServe/{method}"
    if METHODS[method] == "stream":
        return list(channel.unary_stream(path)(data, timeout=timeout))
    return channel.unary_unary(path)(data, timeout=timeout)


@pytest.mark.parametrize("method", METHODS)
def test_unparsable_bytes_get_invalid_argument(shared_server, method):
    channel = shared_server.channel()
    for data in UNPARSABLE:
        try:
            raw_call(channel, method, data)
        except grpc.RpcError as e:
            # Detokenize's field 1 is packed ids, GetModelInfo has no field 1: some parse.
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, e.details())
            if "parse" in e.details():
                assert method in e.details()
        else:
            assert method in ("Detokenize", "GetModelInfo") and data != UNPARSABLE[0]
    with pytest.raises(grpc.RpcError) as error:
        raw_call(channel, method, UNPARSABLE[0])
    assert "do not parse" in error.value.details()


def timed_complete(stub, text: str, max_tokens: int = 8) -> float:
    start = time.monotonic()
    reply = stub.Complete(pb.GenerateRequest(text=text, params=greedy(max_tokens)), timeout=60)
    assert reply.usage.output_tokens == max_tokens
    return time.monotonic() - start


def test_huge_prompts_are_refused_while_others_keep_answering(shared_server):
    stub, channel = shared_server.stub(), shared_server.channel()
    timed_complete(stub, "warm up")
    alone = min(timed_complete(stub, "victim") for _ in range(3))
    max_model_len = ENGINE_LIMITS["max_model_len"]
    huge = "x" * (15 << 20)  # 15 MiB: under max_message_bytes (16 MiB), far over the prompt limit
    at_limit = "y" * (max_model_len * 256)  # tokenized (on a worker), then too many tokens
    attacks = [(lambda: stub.Complete(pb.GenerateRequest(text=huge, params=greedy(3)),
                                      timeout=60), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
               (lambda: stub.Tokenize(pb.TokenizeRequest(text=huge), timeout=60),
                grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
               (lambda: list(stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(
                   role="user", content=huge)]), timeout=60)), grpc.StatusCode.INVALID_ARGUMENT,
                "messages: at least"),
               (lambda: stub.Complete(pb.GenerateRequest(text=at_limit, params=greedy(3)),
                                      timeout=60), grpc.StatusCode.OUT_OF_RANGE, "tokens")]
    with concurrent.futures.ThreadPoolExecutor(len(attacks) * 2) as pool:
        futures = [(pool.submit(call), code, named) for call, code, named in attacks * 2]
        beside = [timed_complete(stub, "victim") for _ in range(3)]
        health_s = []
        for _ in range(5):
            start = time.monotonic()
            assert health_status(channel) == SERVING
            health_s.append(time.monotonic() - start)
        for future, code, named in futures:
            with pytest.raises(grpc.RpcError) as error:
                future.result(60)
            assert error.value.code() == code and named in error.value.details()
    assert max(health_s) < 1.0, health_s
    assert max(beside) < max(5 * alone, 1.5), (alone, beside)
    assert shared_server.wait_idle()


def test_tokenizing_runs_on_worker_threads_only(shared_server, monkeypatch):
    """Not the event loop, not the engine thread (which gets token ids; its incremental
    detokenizer decodes a few tokens per step there, which is bounded)."""
    tokenizer = shared_server.server.engine.tokenizer
    calls = []

    def recording(name):
        function = getattr(tokenizer, name)

        def call(*args, **kwargs):
            calls.append((name, len(args[0]), threading.current_thread().name))
            return function(*args, **kwargs)
        monkeypatch.setattr(tokenizer, name, call)

    recording("encode")
    recording("decode")
    stub = shared_server.stub()
    stub.Complete(pb.GenerateRequest(text="which thread", params=greedy(2)), timeout=30)
    list(stub.Generate(pb.GenerateRequest(text="and here", params=greedy(2)), timeout=30))
    stub.Tokenize(pb.TokenizeRequest(text="tokenize"), timeout=30)
    stub.Detokenize(pb.DetokenizeRequest(token_ids=list(range(70, 90))), timeout=30)
    encodes = [thread for name, _, thread in calls if name == "encode"]
    assert len(encodes) == 3 and all(t.startswith("request-work") for t in encodes), calls
    whole = [thread for name, size, thread in calls if name == "decode" and size == 20]
    assert whole and all(t.startswith("request-work") for t in whole), calls


def test_a_request_over_max_message_bytes_is_refused_on_receive(shared_server):
    stub = shared_server.stub()
    with pytest.raises(grpc.RpcError) as error:
        stub.Tokenize(pb.TokenizeRequest(text="z" * (17 << 20)), timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(16 << 20) in error.value.details()
    assert stub.Tokenize(pb.TokenizeRequest(text="ok"), timeout=10).token_ids


def test_oversize_reply_is_refused_before_generating(make_server, monkeypatch):
    server = make_server(max_message_bytes=4096)
    stub = server.stub()
    big = pb.GenerateRequest(text="big", params=greedy(64, n=4, logprobs=20))
    generated = server.server.engine.stats().num_generated_tokens
    with pytest.raises(grpc.RpcError) as error:
        stub.Complete(big, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_message_bytes (4096)" in error.value.details()
    assert server.server.engine_loop.stats.num_generated_tokens == generated  # nothing ran
    assert stub.Complete(pb.GenerateRequest(text="small", params=greedy(8)), timeout=30)
    # The same request streamed is fine: each message stays under the limit (split if need be).
    assert sum(len(s.token_ids) for r in stub.Generate(big, timeout=30) for s in r.samples) == 256
    # Should a reply pass the bound and still be too big: OUT_OF_RANGE, not RESOURCE_EXHAUSTED.
    monkeypatch.setattr(reply_size, "complete_reply_bound", lambda *args: 0)
    with pytest.raises(grpc.RpcError) as error:
        stub.Complete(big, timeout=30)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "4096" in error.value.details()
    assert server.wait_idle()


def test_a_stream_message_over_the_limit_is_split_in_order():
    samples = [pb.SampleOutput(
        index=i, token_ids=list(range(100)), text="é" * 700, finish_reason=pb.FINISH_REASON_STOP,
        stop_string="end", logprobs=[pb.TokenLogprob(token_id=t, logprob=-1.5, top=[
            pb.TopLogprob(token_id=u, logprob=-2.0) for u in range(20)]) for t in range(100)])
        for i in range(3)]
    response = pb.GenerateResponse(request_id="r", samples=samples, finished=True,
                                   usage=pb.Usage(output_tokens=300))
    assert response.ByteSize() > 40_000
    messages = reply_size.split_stream_response(response, 4096)
    assert all(m.ByteSize() <= 4096 for m in messages)
    assert [m.finished for m in messages] == [False] * (len(messages) - 1) + [True]
    assert messages[-1].usage.output_tokens == 300 and not messages[0].HasField("usage")
    for sample in samples:
        pieces = [p for m in messages for p in m.samples if p.index == sample.index]
        assert [t for p in pieces for t in p.token_ids] == list(sample.token_ids)
        assert "".join(p.text for p in pieces) == sample.text
        assert [lp for p in pieces for lp in p.logprobs] == list(sample.logprobs)
        assert [p.stop_string for p in pieces] == [""] * (len(pieces) - 1) + ["end"]
        assert pieces[-1].finish_reason == pb.FINISH_REASON_STOP
    assert reply_size.split_stream_response(messages[0], 4096) == [messages[0]]


def http_get(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_port_serves_metrics_and_health_only(shared_server):
    port = shared_server.server.metrics_port
    assert http_get(port, "/health") == (200, "SERVING\n")
    status, body = http_get(port, "/metrics")
    assert status == 200 and "jaxserve_requests_in_flight" in body
    for path in ("/", "/nope", "/metrics/x", "/healthz"):
        assert http_get(port, path)[0] == 404, path


def test_metrics_port_health_follows_loading_and_needs_the_token(make_server):
    server = make_server(load=False, metrics_port=0, auth_token="sesame")
    port = server.server.metrics_port
    assert http_get(port, "/health", "sesame") == (503, "LOADING\n")
    assert http_get(port, "/metrics")[0] == 401
    assert http_get(port, "/health", "wrong")[0] == 401
    server.run(server.server.load())
    assert http_get(port, "/health", "sesame") == (200, "SERVING\n")
    with pytest.raises(grpc.RpcError) as error:  # a gRPC call without the token, counted too
        server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status, body = http_get(port, "/metrics", "sesame")
    assert status == 200
    assert 'jaxserve_unauthenticated_calls_total{endpoint="metrics"} 2.0' in body
    assert 'jaxserve_unauthenticated_calls_total{endpoint="grpc"} 1.0' in body
    server.run(server.server.drain())
    assert http_get(port, "/health", "sesame") == (503, "DRAINING\n")


def test_watchdog_turns_health_not_serving_while_the_engine_stalls(make_server):
    server = make_server(watchdog_timeout_s=0.4, metrics_port=0)
    stub, channel = server.stub(), server.channel()
    timed_complete(stub, "compiled first")
    engine, release = server.server.engine, threading.Event()
    step = engine.step

    def stuck_step():
        release.wait(30)
        return step()

    engine.step = stuck_step
    try:
        stalled = stub.Complete.future(pb.GenerateRequest(text="stalls", params=greedy(4)),
                                       timeout=60)
        deadline = time.monotonic() + 10
        while health_status(channel) != NOT_SERVING:
            assert time.monotonic() < deadline, "health stayed SERVING"
            time.sleep(0.05)
        assert server.server.health_state() == "STALLED"
        body = http_get(server.server.metrics_port, "/metrics")[1]
        assert "jaxserve_engine_stalled 1.0" in body and "jaxserve_engine_stalls_total 1.0" in body
    finally:
        release.set()
        engine.step = step
    assert stalled.result(30).usage.output_tokens == 4
    deadline = time.monotonic() + 10
    while health_status(channel) != SERVING:
        assert time.monotonic() < deadline, "health did not recover"
        time.sleep(0.05)
    assert "jaxserve_engine_stalled 0.0" in http_get(server.server.metrics_port, "/metrics")[1]


def test_watchdog_does_not_count_a_compile_as_a_stall(make_server):
    import jax
    import jax.numpy as jnp

    server = make_server(watchdog_timeout_s=0.1)
    stub = server.stub()
    timed_complete(stub, "compiled first")
    engine, registry = server.server.engine, server.server.metrics.registry
    step = engine.step
    stalls = lambda: registry.get_sample_value("jaxserve_engine_stalls_total")

    nonce = random.random()  # a constant of this run: the persistent compilation cache can't hit

    def slow(x):  # a long chain of ops: its XLA compile takes about a second
        for i in range(1000):
            x = jnp.sin(x) * (1.0 + i * 1e-7) + nonce
        return x

    lowered = jax.jit(slow).lower(jnp.ones(3))  # traced here: only the XLA compile is on the loop
    seen = {}

    def compiling_step():  # the engine thread's next step compiles first, as a lazy shape does
        engine.step = step
        seen["stalls_before"] = stalls()
        start = time.monotonic()
        lowered.compile()
        seen["compile_s"] = time.monotonic() - start
        seen["stalls_after"] = stalls()
        return step()

    engine.step = compiling_step
    reply = stub.Complete(pb.GenerateRequest(text="compiles", params=greedy(4)), timeout=60)
    assert reply.usage.output_tokens == 4
    assert seen["compile_s"] > 3 * server.server.watchdog.timeout_s, seen  # it would have tripped
    assert seen["stalls_after"] == seen["stalls_before"] == 0, seen


def read_until(process: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """Reads the child's stderr (progress bars end without a newline) until marker appears."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
        if select.select([process.stderr], [], [], 1)[0]:
            chunk = os.read(process.stderr.fileno(), 1 << 16)
            assert chunk, seen.decode(errors="replace")[-2000:]  # it exited
            seen += chunk
    return seen


@pytest.mark.parametrize("phase, marker, sig", [
    ("loading", b"loading the model", signal.SIGTERM),
    ("compiling", b"compiling step buckets", signal.SIGINT)])
def test_a_stop_signal_while_loading_or_compiling_exits_0(phase, marker, sig):
    limits = [f"--{k}={v}" for k, v in ENGINE_LIMITS.items()]
    process = subprocess.Popen(  # --precompile (the default): it compiles every shape at load
        [sys.executable, "-m", "server", "--model=builtin:tiny-llama", "--port=0", *limits],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL)
    try:
        read_until(process, marker, 60)
        process.send_signal(sig)
        code = process.wait(30)
        log = process.stderr.read().decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, log[-3000:]
    assert "stop requested" in log and "Fatal Python error" not in log
