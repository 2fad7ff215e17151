"""Each bad request gets its status and the server keeps serving; admission is bounded."""

import grpc
import pytest

from server.admission import RETRY_AFTER_KEY
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from tests.server.conftest import greedy

OK_REQUEST = pb.GenerateRequest(text="still serving", params=greedy(4))
BAD_REQUESTS = [  # (request, code, what the details must name)
    (pb.GenerateRequest(params=greedy(4)), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 300])), grpc.StatusCode.INVALID_ARGUMENT,
     "token_ids"),
    (pb.GenerateRequest(text="x" * 300), grpc.StatusCode.OUT_OF_RANGE, "255"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "params.temperature"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(top_p=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "params.top_p"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(max_tokens=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "params.max_tokens"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(seed=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "params.seed"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(n=9)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_num_seqs (8)"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(logprobs=21)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_logprobs (20)"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(stop_token_ids=list(range(17)))),
     grpc.StatusCode.INVALID_ARGUMENT, "params.stop_token_ids"),
]


@pytest.mark.parametrize("rpc", ["Generate", "Complete"])
def test_bad_requests_get_their_status_and_the_next_good_one_succeeds(shared_server, rpc):
    stub = shared_server.stub()
    call = (lambda r: list(stub.Generate(r, timeout=30))) if rpc == "Generate" else (
        lambda r: stub.Complete(r, timeout=30))
    for request, code, named in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as error:
            call(request)
        assert error.value.code() == code, request
        assert named in error.value.details(), (request, error.value.details())
        assert stub.Complete(OK_REQUEST, timeout=30).usage.output_tokens == 4


def test_finish_reason_error_is_internal_for_that_request_only(shared_server, monkeypatch):
    runner = shared_server.server.engine.runner
    execute = runner.execute
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected device fault")
        return execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", failing_once)
    stub = shared_server.stub()
    with pytest.raises(grpc.RpcError) as error:
        stub.Complete(pb.GenerateRequest(text="unlucky", params=greedy(4)), timeout=30)
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert stub.Complete(OK_REQUEST, timeout=30).usage.output_tokens == 4
    assert shared_server.wait_idle()


def test_engine_step_fault_is_internal_and_the_server_goes_on(shared_server, monkeypatch):
    engine = shared_server.server.engine
    step = engine.step
    calls = []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected engine bug")
        return step()

    monkeypatch.setattr(engine, "step", failing_once)
    stub = shared_server.stub()
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(pb.GenerateRequest(text="unlucky", params=greedy(4)), timeout=30))
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "injected" not in error.value.details()  # internals stay in the server log
    assert stub.Complete(OK_REQUEST, timeout=30).usage.output_tokens == 4
    assert shared_server.wait_idle()


def test_resource_exhausted_past_the_admission_bound(make_server):
    server = make_server(max_pending=2)
    stub = server.stub()
    running = [stub.Generate(pb.GenerateRequest(text=f"hold {i}", params=greedy(240)), timeout=60)
               for i in range(2)]
    for call in running:
        next(call)  # both admitted and generating
    with pytest.raises(grpc.RpcError) as error:
        stub.Complete(OK_REQUEST, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_pending (2)" in error.value.details()
    retry_ms = dict(error.value.trailing_metadata())[RETRY_AFTER_KEY]
    assert int(retry_ms) > 0
    for call in running:
        call.cancel()
    assert server.wait_idle()
    assert stub.Complete(OK_REQUEST, timeout=30).usage.output_tokens == 4
