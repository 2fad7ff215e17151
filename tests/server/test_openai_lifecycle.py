"""The HTTP API through loading, serving and draining: /health and 503s; a client that goes
away mid-request aborts it and frees its KV blocks; SIGTERM lets HTTP streams finish, then the
process exits 0."""

import concurrent.futures
import json
import logging
import os
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import tiny_engine
from tests.server.openai_server import HttpServerThread, get, post
from tests.server.test_lifecycle import start_server_process

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG = 240  # tokens: with 5 ms steps, over a second; the tests act well within it


def slow_tiny_engine(step_s: float = 0.005):
    engine = tiny_engine()
    step = engine.step
    engine.step = lambda: (time.sleep(step_s), step())[1]
    return engine


def stream_completion(base_url: str, max_tokens: int, prompt: str = "stream") -> dict:
    """Streams one completion to its end: {"text", "finish_reason", "done", "error"}."""
    result = {"text": "", "finish_reason": None, "done": False, "error": None}
    with httpx.stream("POST", base_url + "/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            return dict(result, error=response.json()["error"])
        for line in response.iter_lines():
            if line == "data: [DONE]":
                result["done"] = True
            elif line.startswith("data: "):
                body = json.loads(line[6:])
                if "error" in body:
                    result["error"] = body["error"]
                    continue
                for choice in body["choices"]:
                    result["text"] += choice["text"]
                    result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
    return result


def test_health_follows_loading_serving_and_draining():
    gate = threading.Event()

    def gated_engine():
        assert gate.wait(30)
        return slow_tiny_engine()

    server = HttpServerThread(gated_engine, load=False, grace_period_s=60)
    try:
        health = lambda: get(server.base_url + "/health")
        assert (health().status_code, health().text.strip()) == (503, "LOADING")
        refused = post(server.base_url + "/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 503 and "loading" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"] == "1"
        assert get(server.base_url + "/v1/models").status_code == 503
        loaded = server.grpc.submit(server.grpc.server.load())
        gate.set()
        loaded.result(60)
        assert (health().status_code, health().text.strip()) == (200, "SERVING")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(stream_completion, server.base_url, 64, f"drain {i}")
                       for i in range(2)]
            assert server.wait_for(lambda: server.grpc.server.admission.in_flight == 2)
            drained = server.grpc.submit(server.grpc.server.drain())
            assert server.wait_for(lambda: health().status_code == 503)
            assert health().text.strip() == "DRAINING"
            late = post(server.base_url + "/v1/completions", json={"prompt": "late"})
            assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
            for future in streams:  # running streams finish whole
                result = future.result(60)
                assert (result["finish_reason"], result["done"], result["error"]) == (
                    "length", True, None)
        drained.result(30)
    finally:
        server.close()


@pytest.fixture(scope="module")
def slow_server():
    server = HttpServerThread(slow_tiny_engine, access_log=True)
    yield server
    server.close()


def test_disconnect_mid_stream_aborts_and_frees_kv_blocks(slow_server, caplog):
    caplog.set_level(logging.INFO, logger="jaxserve.access")
    engine = slow_server.engine
    before = engine.num_generated_tokens
    with httpx.stream("POST", slow_server.base_url + "/v1/completions", timeout=60, json={
            "prompt": "x", "max_tokens": LONG, "ignore_eos": True, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines), next(lines), next(lines)
        assert engine.kv_cache.num_free_blocks < engine.kv_cache.num_blocks
    start = time.monotonic()  # the client has closed the connection
    assert slow_server.wait_idle()
    assert time.monotonic() - start < 0.5
    assert engine.num_generated_tokens - before < LONG // 2  # aborted, not finished
    assert any("status=499 prompt_tokens=- " in r.getMessage() for r in caplog.records
               if r.name == "jaxserve.access")


def test_disconnect_during_a_unary_call_aborts_it(slow_server):
    engine = slow_server.engine
    before = engine.num_generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        post(slow_server.base_url + "/v1/completions", timeout=0.3, json={
            "prompt": "x", "max_tokens": LONG, "ignore_eos": True})
    assert slow_server.wait_idle()
    assert engine.num_generated_tokens - before < LONG  # aborted, not finished


def test_sigterm_lets_http_streams_finish_then_exits():
    process, log, port = start_server_process(["--nogrpc", "--http_port=0"],
                                              r"HTTP API on http://127\.0\.0\.1:(\d+)")
    try:
        base_url = f"http://127.0.0.1:{port.result(60)}"
        deadline = time.monotonic() + 60
        while get(base_url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "".join(log)
            time.sleep(0.1)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream_completion, base_url, 200, f"s{i}") for i in range(4)]
            deadline = time.monotonic() + 30  # all four admitted, then the signal
            while "jaxserve_requests_in_flight 4.0" not in get(base_url + "/metrics").text:
                assert time.monotonic() < deadline, "".join(log)
            process.send_signal(signal.SIGTERM)
            results = [f.result(60) for f in streams]
        assert [(r["finish_reason"], r["done"], r["error"]) for r in results] == [
            ("length", True, None)] * 4
        assert process.wait(30) == 0, "".join(log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert any("draining: 4 requests in flight" in line for line in log), "".join(log)
