"""A hypothesis fuzz of the jaxserve.v1 proto: random bytes and random valid-ish messages for every
RPC. Every answer is OK or a status the docs define for bad input, never UNKNOWN or INTERNAL,
and the server still gives the same greedy text afterwards."""

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from tests.server.conftest import greedy
from tests.server.test_lifecycle import SERVING, health_status
from tests.server.test_reliability import METHODS, raw_call

# What bad input may get (docs/SERVER.md); DEADLINE_EXCEEDED: a long generation past the timeout.
DEFINED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED}
REFERENCE = pb.GenerateRequest(text="the fuzz reference", params=greedy(12))
TIMEOUT_S = 10
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

int32 = st.integers(-2**31, 2**31 - 1)
small_int = st.one_of(st.integers(-3, 40), int32)
real = st.one_of(st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True))
text = st.one_of(st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=400))


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    fields = {}
    for name, values in (("n", st.integers(-1, 10)), ("temperature", real), ("top_k", small_int),
                         ("top_p", real), ("min_p", real), ("repetition_penalty", real),
                         ("presence_penalty", real), ("frequency_penalty", real),
                         ("seed", st.integers(-2**63, 2**63 - 1)),
                         ("max_tokens", st.one_of(st.integers(-2, 24), int32)),
                         ("min_tokens", st.one_of(st.integers(-2, 24), int32)),
                         ("ignore_eos", st.booleans()), ("logprobs", st.integers(-2, 24)),
                         ("skip_special_tokens", st.booleans())):
        if draw(st.booleans()):
            fields[name] = draw(values)
    params = pb.SamplingParams(**fields)
    params.stop.extend(draw(st.lists(text, max_size=4)))
    params.stop_token_ids.extend(draw(st.lists(small_int, max_size=20)))
    return params


@st.composite
def generate_request(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest(params=draw(sampling_params()), priority=draw(int32),
                                 client_id=draw(st.text(max_size=10)))
    which = draw(st.sampled_from(["text", "token_ids", "none"]))
    if which == "text":
        request.text = draw(text)
    elif which == "token_ids":
        request.token_ids.ids.extend(draw(st.lists(st.one_of(st.integers(0, 300), int32),
                                                   max_size=300)))
    return request


@st.composite
def chat_request(draw) -> pb.ChatRequest:
    messages = draw(st.lists(st.builds(pb.ChatMessage, role=st.one_of(
        st.sampled_from(["system", "user", "assistant"]), text), content=text), max_size=4))
    request = pb.ChatRequest(messages=messages, params=draw(sampling_params()))
    if draw(st.booleans()):
        request.add_generation_prompt = draw(st.booleans())
    return request


def messages():
    return st.one_of(
        st.tuples(st.just("Generate"), generate_request()),
        st.tuples(st.just("Complete"), generate_request()),
        st.tuples(st.just("Chat"), chat_request()),
        st.tuples(st.just("Tokenize"), st.builds(pb.TokenizeRequest, text=text)),
        st.tuples(st.just("Detokenize"), st.builds(
            pb.DetokenizeRequest, token_ids=st.lists(st.one_of(st.integers(0, 300), int32),
                                                     max_size=50))),
        st.tuples(st.just("GetModelInfo"), st.just(pb.GetModelInfoRequest())))


def check_answer(call) -> None:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in DEFINED, (e.code(), e.details())
        assert e.details(), e.code()


@pytest.fixture(scope="module")
def reference_text(shared_server) -> str:
    return shared_server.stub().Complete(REFERENCE, timeout=30).samples[0].text


@pytest.fixture(scope="module")
def channel(shared_server):
    with shared_server.channel() as channel:
        yield channel


@FUZZ
@given(method=st.sampled_from(list(METHODS)), data=st.binary(max_size=64))
def test_random_bytes_get_defined_statuses(channel, reference_text, method, data):
    check_answer(lambda: raw_call(channel, method, data, TIMEOUT_S))


@FUZZ
@given(message=messages())
def test_random_messages_get_defined_statuses(channel, reference_text, message):
    method, request = message
    check_answer(lambda: raw_call(channel, method, request.SerializeToString(), TIMEOUT_S))


def test_the_server_is_unchanged_after_the_fuzz(shared_server, reference_text):
    """Runs after the two above (file order): health, the same greedy text, nothing leaked."""
    assert health_status(shared_server.channel()) == SERVING
    assert shared_server.stub().Complete(REFERENCE, timeout=30).samples[0].text == reference_text
    assert shared_server.wait_idle()
