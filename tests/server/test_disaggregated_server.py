"""The server over a DisaggregatedEngine (prefill and decode engines on two simulated devices):
the same streamed greedy text as one engine's Python API, and a cancelled stream frees the
blocks of both engines and the decode engine's host slots."""

import grpc
import pytest

from jaxserve import LLM, DisaggregatedEngine, EngineConfig, SamplingParams
from jaxserve.model_io.default_model import BUILTIN_MODEL
from server.config import ServerConfig
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from tests.server.conftest import ENGINE_LIMITS, ServerThread, greedy

PROMPTS = ["Hello", "The quick brown fox jumps over", "jaxserve ✓ 服务"]


def disaggregated_engine() -> DisaggregatedEngine:
    return DisaggregatedEngine(BUILTIN_MODEL, EngineConfig(**ENGINE_LIMITS, swap_space_gib=0.01),
                               precompile=False, progress=False)


@pytest.fixture(scope="module")
def server():
    thread = ServerThread(ServerConfig(port=0, metrics_port=0), disaggregated_engine)
    yield thread
    thread.close()


def _stream(call):
    tokens, text = [], ""
    for response in call:
        for sample in response.samples:
            tokens += sample.token_ids
            text += sample.text
    return tokens, text


def test_streamed_greedy_text_equals_one_engine(server):
    llm = LLM(BUILTIN_MODEL, precompile=False, progress=False, **ENGINE_LIMITS)
    stub = server.stub()
    params = SamplingParams(temperature=0.0, max_tokens=20)
    for prompt in PROMPTS:
        expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        request = pb.GenerateRequest(text=prompt, params=pb.SamplingParams(temperature=0.0,
                                                                          max_tokens=20))
        assert _stream(stub.Generate(request, timeout=60)) == (expected.token_ids, expected.text)
    assert server.server.engine.num_handoffs >= len(PROMPTS) - 1  # unless one stopped at once
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.limits.max_num_seqs == ENGINE_LIMITS["max_num_seqs"]


def test_cancelled_stream_frees_both_engines(server):
    engine = server.server.engine
    call = server.stub().Generate(pb.GenerateRequest(text="cancel me", params=greedy(200)),
                                  timeout=60)
    next(call), next(call), next(call)  # decoding in the decode engine by now
    assert engine.decode.kv_cache.num_free_blocks < engine.decode.kv_cache.num_blocks
    call.cancel()
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert server.wait_idle()
    for half in (engine.prefill, engine.decode):
        assert half.kv_cache.num_free_blocks == half.kv_cache.num_blocks
    assert engine.decode.scheduler.num_free_swap_slots == engine.decode.scheduler.swap.num_slots
