"""The jaxserve.v1.JaxServe service on grpc.aio: calls in, engine-loop requests, statuses out.

Generate, Complete and Chat share one path (`_outputs`): take an admission slot, turn the proto
into a prompt and SamplingParams, add the request through the engine loop, then read its outputs
until the last. Chat differs only in its prompt: the messages rendered by the model's chat
template and tokenized (jaxserve/chat_template.py), on a worker thread, not the event loop.
Every way a call can end maps to one status:

    bad params (the engine's ValueError)     INVALID_ARGUMENT, the field first
    bad messages, or the template refuses    INVALID_ARGUMENT, "messages: ..."
    Chat to a model without a chat template  FAILED_PRECONDITION
    prompt longer than the context           OUT_OF_RANGE, with the limit
    max_pending requests already in flight   RESOURCE_EXHAUSTED, `retry-after-ms` trailer
    loading or draining                      UNAVAILABLE
    finish_reason "error", an engine fault   INTERNAL (that call only; the server keeps serving)
    aborted by the drain deadline            UNAVAILABLE
    client cancelled, deadline passed        the handler is cancelled: the request is aborted
                                             at once, which frees its KV blocks
"""

import asyncio
import contextlib

import grpc

from jaxserve.chat_template import NoChatTemplateError, encode_chat
from jaxserve.generation_defaults import GenerationDefaults
from jaxserve.outputs import RequestOutput
from server import proto_convert
from server.admission import Admission
from server.config import ServerConfig
from server.engine_loop import EngineFault, EngineLoop
from server.errors import StatusError, status_for_value_error
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from server.metrics import ServerMetrics


class JaxServeServicer(pb_grpc.JaxServeServicer):
    def __init__(self, admission: Admission, metrics: ServerMetrics, config: ServerConfig):
        self.admission = admission
        self.metrics = metrics
        self.config = config
        self.engine_loop: EngineLoop | None = None  # set once the model is loaded
        # The model's sampling defaults for fields a request leaves unset; set with engine_loop.
        self.generation_defaults = GenerationDefaults()

    # ----- generation ------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest | pb.ChatRequest,
                       context: grpc.aio.ServicerContext):
        encoder = proto_convert.StreamEncoder()
        async with contextlib.aclosing(self._outputs(request, context)) as outputs:
            async for output in outputs:
                response = encoder.encode(output)
                if response is not None:
                    yield response

    Chat = Generate  # the same stream; only the prompt is made differently (`_prompt`)

    async def Complete(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> pb.CompleteResponse:
        last = None
        async with contextlib.aclosing(self._outputs(request, context)) as outputs:
            async for output in outputs:
                last = output
        return proto_convert.complete_response(last)

    async def _outputs(self, request: pb.GenerateRequest | pb.ChatRequest,
                       context: grpc.aio.ServicerContext):
        """Yields the request's RequestOutputs, the last one finished; aborts the call otherwise."""
        code = grpc.StatusCode.OK
        try:
            with self.admission.slot():
                request_id, queue = await self._add(request)
                finished = False
                try:
                    while not finished:
                        output = await queue.get()
                        self._check(output, request_id)
                        finished = output.finished
                        if finished:
                            self._record(output)
                        yield output
                finally:
                    if not finished:  # cancelled, past its deadline, or failed: free it now
                        self.engine_loop.abort(request_id)
        except StatusError as e:
            code = e.code
            await context.abort(e.code, e.details, e.trailing_metadata)
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.requests.labels(code=code.name).inc()

    async def _add(self, request: pb.GenerateRequest | pb.ChatRequest
                   ) -> tuple[str, asyncio.Queue]:
        try:
            prompt = await self._prompt(request)
            params = proto_convert.sampling_params_from_proto(request.params,
                                                              self.generation_defaults)
            return await self.engine_loop.add_request(
                prompt, params, priority=request.priority, client_id=request.client_id)
        except NoChatTemplateError as e:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        except ValueError as e:
            raise StatusError(*status_for_value_error(e)) from e
        except Exception as e:  # an engine fault on this request alone (logged by the engine loop)
            raise StatusError(grpc.StatusCode.INTERNAL,
                              "adding the request failed; see the server log") from e

    async def _prompt(self, request: pb.GenerateRequest | pb.ChatRequest) -> str | list[int]:
        """A Generate request's text or token ids; a Chat request's messages rendered and
        tokenized, on a worker thread (a long conversation is milliseconds of Python)."""
        if isinstance(request, pb.GenerateRequest):
            return proto_convert.prompt_from_request(request)
        tokenizer = self.engine_loop.engine.tokenizer
        if tokenizer is None:
            raise NoChatTemplateError("chat_template: this model has no tokenizer, so no chat "
                                      "template; send Generate with token ids")
        messages, add_generation_prompt = proto_convert.chat_from_request(request)
        _, ids = await asyncio.to_thread(encode_chat, tokenizer, messages, add_generation_prompt)
        return ids

    def _check(self, output: RequestOutput | EngineFault, request_id: str) -> None:
        """Raises StatusError for an output that ends the call with an error."""
        if isinstance(output, EngineFault):
            raise StatusError(grpc.StatusCode.INTERNAL, f"request {request_id}: {output}")
        reasons = {c.finish_reason for c in output.outputs}
        if "error" in reasons:
            raise StatusError(grpc.StatusCode.INTERNAL,
                              f"request {request_id} failed in the engine; see the server log")
        if "abort" in reasons:
            if self.admission.state == Admission.DRAINING:
                raise StatusError(grpc.StatusCode.UNAVAILABLE,
                                  "the server shut down before the request finished")
            raise StatusError(grpc.StatusCode.ABORTED, f"request {request_id} was aborted")

    def _record(self, output: RequestOutput) -> None:
        self.metrics.observe_finished(output)
        if output.metrics.e2e_latency is not None:
            self.admission.record_latency(output.metrics.e2e_latency)

    # ----- tokenizer and model -----------------------------------------------------------------
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
                       ) -> pb.TokenizeResponse:
        tokenizer = await self._tokenizer(context)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return pb.TokenizeResponse(token_ids=tokenizer.encode(request.text, add_special))

    async def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
                         ) -> pb.DetokenizeResponse:
        tokenizer = await self._tokenizer(context)
        vocab = self.engine_loop.engine.model_config.vocab_size
        bad = [t for t in request.token_ids if not 0 <= t < vocab]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids: {bad[:5]} outside the vocabulary [0, {vocab})")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=tokenizer.decode(list(request.token_ids), skip))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await self._check_open(context)
        return proto_convert.model_info(self.engine_loop.engine, self.config)

    async def _tokenizer(self, context: grpc.aio.ServicerContext):
        await self._check_open(context)
        tokenizer = self.engine_loop.engine.tokenizer
        if tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this model has no tokenizer (no tokenizer.json)")
        return tokenizer

    async def _check_open(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self.admission.check_open()
        except StatusError as e:
            await context.abort(e.code, e.details, e.trailing_metadata)

