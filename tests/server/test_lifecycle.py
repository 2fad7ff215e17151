"""Health through loading, serving and draining; drain (what SIGTERM calls) and SIGTERM itself."""

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from server.grpc_server import SERVICE_NAME
from tests.server.conftest import ENGINE_LIMITS, greedy, tiny_engine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(channel, service="") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def start_streams(stub, count: int, max_tokens: int) -> list[concurrent.futures.Future]:
    """Starts `count` Generate streams; returns once each has sent its first message. Each
    future gives (tokens received, finished) or the grpc.RpcError that ended the stream."""
    started = threading.Barrier(count + 1)

    def run(i):
        tokens, finished = 0, False
        try:
            for n, response in enumerate(stub.Generate(pb.GenerateRequest(
                    text=f"stream {i}", params=greedy(max_tokens)), timeout=60)):
                if n == 0:
                    started.wait(30)
                tokens += sum(len(s.token_ids) for s in response.samples)
                finished = response.finished
        except grpc.RpcError as e:
            return e
        return tokens, finished

    pool = concurrent.futures.ThreadPoolExecutor(count)
    futures = [pool.submit(run, i) for i in range(count)]
    pool.shutdown(wait=False)
    started.wait(30)
    return futures


def test_health_not_serving_while_loading_then_serving(make_server):
    gate = threading.Event()

    def slow_engine():
        assert gate.wait(30)
        return tiny_engine()

    server = make_server(engine_factory=slow_engine, load=False)
    loaded = server.submit(server.server.load())
    channel = server.channel()
    assert health_status(channel) == NOT_SERVING
    assert health_status(channel, SERVICE_NAME) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        pb_grpc.JaxServeStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    gate.set()
    loaded.result(60)
    assert health_status(channel) == SERVING
    assert health_status(channel, SERVICE_NAME) == SERVING


def test_drain_lets_running_streams_finish(make_server):
    server = make_server(grace_period_s=60)
    channel = server.channel()
    streams = start_streams(pb_grpc.JaxServeStub(channel), 8, max_tokens=48)
    drained = server.submit(server.server.drain())
    deadline = time.monotonic() + 10
    while health_status(channel) != NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health_status(channel) == NOT_SERVING
    assert health_status(channel, SERVICE_NAME) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        server.stub().Complete(pb.GenerateRequest(text="late", params=greedy(4)), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [f.result(60) for f in streams] == [(48, True)] * 8
    drained.result(30)


def test_drain_aborts_what_outlives_the_grace_period(make_server):
    # 240 tokens take ~0.25 s on a CPU (the overlapped loop): a grace period well below it.
    server = make_server(grace_period_s=0.05)
    streams = start_streams(server.stub(), 2, max_tokens=240)
    server.run(server.server.drain())
    for future in streams:
        error = future.result(30)
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
    assert server.wait_idle()


def start_server_process(args: list[str], port_pattern: str):
    """`python -m server` on the built-in model with the test limits and `args`, as a child
    process: (process, its log lines as they come, a future of the port `port_pattern`'s
    group 1 finds in the log)."""
    limits = [f"--{k}={v}" for k, v in ENGINE_LIMITS.items()]
    cache = os.environ.get("JAXSERVE_TEST_JAX_CACHE", "/tmp/jaxserve-test-jax-cache")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--model=builtin:tiny-llama", *args, "--noprecompile",
         "--grace_period_s=60", f"--compilation_cache_dir={cache}", *limits],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True)
    log, port = [], concurrent.futures.Future()

    def read_log():
        for line in process.stderr:
            log.append(line)
            found = re.search(port_pattern, line)
            if found and not port.done():
                port.set_result(int(found.group(1)))

    threading.Thread(target=read_log, daemon=True).start()
    return process, log, port


def test_sigterm_lets_running_streams_finish_then_exits():
    process, log, port = start_server_process(["--port=0"], r"JaxServe on 127\.0\.0\.1:(\d+)")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port.result(60)}")
        deadline = time.monotonic() + 60
        while health_status(channel) != SERVING:
            assert time.monotonic() < deadline, "".join(log)
            time.sleep(0.1)
        streams = start_streams(pb_grpc.JaxServeStub(channel), 8, max_tokens=96)
        process.send_signal(signal.SIGTERM)
        assert [f.result(60) for f in streams] == [(96, True)] * 8
        assert process.wait(30) == 0, "".join(log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert any("draining: 8 requests in flight" in line for line in log), "".join(log)
