"""A cancelled call or a passed deadline aborts its request at once and frees its KV blocks."""

import time

import grpc
import pytest

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from tests.server.conftest import greedy

LONG = 240  # tokens: seconds of decoding on a CPU, far longer than the tests wait


def test_cancelled_stream_frees_its_blocks(shared_server):
    engine = shared_server.server.engine
    generated_before = engine.num_generated_tokens
    call = shared_server.stub().Generate(pb.GenerateRequest(text="cancel me", params=greedy(LONG)),
                                         timeout=60)
    next(call), next(call)
    assert engine.kv_cache.num_free_blocks < engine.kv_cache.num_blocks
    call.cancel()
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert shared_server.wait_idle()
    assert engine.num_generated_tokens - generated_before < LONG // 2  # aborted, not finished


def test_deadline_aborts_the_request(shared_server):
    engine = shared_server.server.engine
    generated_before = engine.num_generated_tokens
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        # 240 greedy tokens take ~0.3 s on a CPU: a deadline well below that passes mid-run.
        shared_server.stub().Complete(pb.GenerateRequest(text="too slow", params=greedy(LONG)),
                                      timeout=0.05)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert shared_server.wait_idle()
    assert time.monotonic() - start < 5
    assert engine.num_generated_tokens - generated_before < LONG  # aborted, not finished
