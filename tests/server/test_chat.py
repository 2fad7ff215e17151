"""The Chat RPC: the same stream as Generate over the prompt the model's chat template makes,
equal to LLM.chat; its statuses for a model without a template and for bad messages."""

import grpc
import pytest

from jaxserve import LLM, Engine, EngineConfig, SamplingParams
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from tests.jaxserve.test_llm_chat import CONVERSATION, builtin_with_chat_template
from tests.server.conftest import ENGINE_LIMITS, greedy


@pytest.fixture(scope="module")
def templated_model(tmp_path_factory) -> str:
    return builtin_with_chat_template(str(tmp_path_factory.mktemp("templated")))


@pytest.fixture
def chat_server(make_server, templated_model):
    return make_server(lambda: Engine(templated_model, EngineConfig(**ENGINE_LIMITS),
                                      precompile=False, progress=False))


def chat_request(messages, max_tokens: int = 12, **kwargs) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.ChatMessage(**m) for m in messages],
                          params=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens),
                          **kwargs)


def _stream(stub, request):
    tokens, text, last = [], "", None
    for response in stub.Chat(request, timeout=60):
        for sample in response.samples:
            tokens += sample.token_ids
            text += sample.text
        last = response
    return tokens, text, last


def test_chat_streams_what_llm_chat_gives(chat_server, templated_model):
    llm = LLM(templated_model, precompile=False, progress=False, **ENGINE_LIMITS)
    stub = chat_server.stub()
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).has_chat_template
    for add_generation_prompt in (True, False):
        (expected,) = llm.chat(CONVERSATION, SamplingParams(temperature=0.0, max_tokens=12),
                               use_tqdm=False, add_generation_prompt=add_generation_prompt)
        tokens, text, last = _stream(stub, chat_request(
            CONVERSATION, add_generation_prompt=add_generation_prompt))
        assert tokens == expected.outputs[0].token_ids
        assert text == expected.outputs[0].text
        assert last.finished and last.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert chat_server.wait_idle()


def test_chat_statuses_for_bad_messages(chat_server):
    stub = chat_server.stub()
    for request, named in [
            (chat_request([]), "messages: a conversation is a non-empty list"),
            (chat_request([{"role": "", "content": "x"}]), "messages[0].role must be"),
            (chat_request([{"role": "tool", "content": "x"}]),
             "messages: the chat template refused them: no tools here"),
            (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                            params=pb.SamplingParams(temperature=-1)), "params.temperature")]:
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Chat(request, timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert named in error.value.details(), error.value.details()
    assert _stream(stub, chat_request(CONVERSATION, max_tokens=2))[2].finished


def test_chat_without_a_template_is_failed_precondition(shared_server):
    stub = shared_server.stub()
    assert not stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).has_chat_template
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Chat(chat_request(CONVERSATION), timeout=30))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "this model has none" in error.value.details()
    assert stub.Complete(pb.GenerateRequest(text="ok", params=greedy(2)),
                         timeout=30).usage.output_tokens == 2
