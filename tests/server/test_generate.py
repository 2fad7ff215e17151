"""Generate and Complete against the Python API, and many streams at once."""

import concurrent.futures

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.model_io.default_model import BUILTIN_MODEL
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from tests.server.conftest import ENGINE_LIMITS, greedy

PROMPTS = ["Hello", "The quick brown fox jumps over", "jaxserve ✓ 服务"]
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@pytest.fixture(scope="module")
def llm():
    return LLM(BUILTIN_MODEL, precompile=False, progress=False, **ENGINE_LIMITS)


def _stream(stub, request):
    """(token ids, text, last response) of sample 0 of a Generate stream."""
    tokens, text, last = [], "", None
    for response in stub.Generate(request, timeout=60):
        for sample in response.samples:
            assert sample.index == 0
            tokens += sample.token_ids
            text += sample.text
        last = response
    return tokens, text, last


def test_streamed_greedy_text_equals_python_api(shared_server, llm):
    stub = shared_server.stub()
    for prompt in PROMPTS:  # one at a time: both sides then run the same steps
        expected = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24),
                                use_tqdm=False)[0]
        request = pb.GenerateRequest(text=prompt, params=pb.SamplingParams(temperature=0.0,
                                                                          max_tokens=24))
        tokens, text, last = _stream(stub, request)
        assert tokens == expected.outputs[0].token_ids
        assert text == expected.outputs[0].text
        assert last.finished
        assert last.samples[-1].finish_reason == FINISH[expected.outputs[0].finish_reason]
        assert last.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert last.usage.output_tokens == len(tokens)

        complete = stub.Complete(request, timeout=60)
        assert list(complete.samples[0].token_ids) == tokens and complete.samples[0].text == text

        by_ids = stub.Complete(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=expected.prompt_token_ids), params=request.params), timeout=60)
        assert list(by_ids.samples[0].token_ids) == tokens


def test_n_logprobs_and_stop_token(shared_server, llm):
    stub = shared_server.stub()
    expected = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=6, logprobs=2),
                            use_tqdm=False)[0].outputs[0]
    stop_token = expected.token_ids[3]
    response = stub.Complete(pb.GenerateRequest(text="Hello", params=greedy(
        6, n=2, logprobs=2, stop_token_ids=[stop_token])), timeout=60)
    assert [s.index for s in response.samples] == [0, 1]
    for sample in response.samples:
        cut = expected.token_ids.index(stop_token) + 1  # the stop token is kept in the ids
        assert list(sample.token_ids) == expected.token_ids[:cut]
        assert sample.finish_reason == pb.FINISH_REASON_STOP
        assert sample.stop_token_id == stop_token
        assert len(sample.logprobs) == cut
        first = sample.logprobs[0]
        assert first.token_id == sample.token_ids[0] and first.logprob < 0
        assert first.logprob == pytest.approx(expected.logprobs[0][first.token_id], abs=1e-4)
        assert len(first.top) <= 2
    assert response.usage.output_tokens == 2 * cut


def test_64_concurrent_streams_all_complete(shared_server):
    stub = shared_server.stub()

    def run(i):
        tokens, text, last = _stream(stub, pb.GenerateRequest(text=f"stream {i}", params=greedy(8)))
        return len(tokens), last.finished, last.usage.output_tokens

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, range(64)))
    assert results == [(8, True, 8)] * 64
    assert shared_server.wait_idle()
