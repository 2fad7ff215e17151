"""The jaxserve.v1.JaxServe service on grpc.aio: calls in, engine-loop requests, statuses out.

Generate, Complete and Chat share one path (`_outputs`): take an admission slot, turn the proto
into a prompt and SamplingParams, add the request through the engine loop, then read its outputs
until the last. Chat differs only in its prompt: the messages rendered by the model's chat
template (jaxserve/model_io/chat_template.py).

Work that grows with the request (tokenizing, templating, checking token ids, detokenizing) runs
on a small pool of worker threads, never on the event loop or the engine thread: health checks
and every other call keep answering beside a huge prompt, and the engine thread gets token ids
already checked. Sizes are checked first, before any of that work (jaxserve/request_limits.py;
the gRPC receive limit, max_message_bytes, bounds the whole message before it is parsed).
Every way a call can end maps to one status:

    bad params (the engine's ValueError)     INVALID_ARGUMENT, the field first
    bad messages, or the template refuses    INVALID_ARGUMENT, "messages: ..."
    Chat to a model without a chat template  FAILED_PRECONDITION
    prompt longer than the context           OUT_OF_RANGE, with the limit
    prompt text over its byte limit          INVALID_ARGUMENT, with the limit
    a Complete reply that could exceed       INVALID_ARGUMENT, with max_message_bytes, before
      max_message_bytes                        generating (server/reply_size.py); OUT_OF_RANGE
                                               if the finished reply still exceeds it
    max_pending requests already in flight   RESOURCE_EXHAUSTED, `retry-after-ms` trailer
    loading or draining                      UNAVAILABLE
    finish_reason "error", an engine fault   INTERNAL (that call only; the server keeps serving)
    aborted by the drain deadline            UNAVAILABLE
    client cancelled, deadline passed        the handler is cancelled: the request is aborted
                                             at once, which frees its KV blocks
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import time

import grpc

from jaxserve.model_io.chat_template import NoChatTemplateError, encode_chat
from jaxserve.model_io.generation_defaults import GenerationDefaults
from jaxserve.outputs import RequestOutput
from jaxserve.request_limits import prompt_byte_limit, utf8_size
from server import proto_convert, reply_size
from server.access_log import AccessLog
from server.admission import Admission
from server.config import ServerConfig
from server.engine_loop import EngineFault, EngineLoop
from server.errors import StatusError, status_for_value_error
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
_WORKERS = 2  # threads for tokenizing and other per-request work that grows with its size


class JaxServeServicer(pb_grpc.JaxServeServicer):
    def __init__(self, admission: Admission, metrics: ServerMetrics, config: ServerConfig):
        self.admission = admission
        self.metrics = metrics
        self.config = config
        self.engine_loop: EngineLoop | None = None  # set once the model is loaded
        # The model's sampling defaults for fields a request leaves unset; set with engine_loop.
        self.generation_defaults = GenerationDefaults()
        self._workers = concurrent.futures.ThreadPoolExecutor(_WORKERS, "request-work")
        self._text_bytes_per_token: int | None = None  # reply_size's, from the tokenizer
        self.access_log = AccessLog(config.access_log)

    def close(self) -> None:
        """Ends the worker threads (work not started is dropped)."""
        self._workers.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, function, *args):
        """function(*args) on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, function, *args)

    # ----- generation ------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest | pb.ChatRequest,
                       context: grpc.aio.ServicerContext):
        encoder = proto_convert.StreamEncoder()
        async with contextlib.aclosing(self._outputs(request, context)) as outputs:
            async for output in outputs:
                response = encoder.encode(output)
                if response is not None:
                    for message in reply_size.split_stream_response(
                            response, self.config.max_message_bytes):
                        yield message

    Chat = Generate  # the same stream; only the prompt is made differently (`_prompt`)

    async def Complete(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> pb.CompleteResponse:
        last = None
        async with contextlib.aclosing(self._outputs(request, context, unary=True)) as outputs:
            async for output in outputs:
                last = output
        response = proto_convert.complete_response(last)
        size, limit = response.ByteSize(), self.config.max_message_bytes
        if size > limit:  # the bound let it through (rare): a clear status, not the transport's
            self.metrics.replies_refused.labels(when="after").inc()
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                reply_size.too_big_after(size, limit, reply_size.COMPLETE_HINT))
        return response

    async def _outputs(self, request: pb.GenerateRequest | pb.ChatRequest,
                       context: grpc.aio.ServicerContext, unary: bool = False):
        """Yields the request's RequestOutputs, the last one finished; aborts the call otherwise.
        unary: the whole reply is one message (Complete), so its size is bounded first."""
        code = grpc.StatusCode.OK
        started, request_id, last = time.monotonic(), None, None  # for the access log
        try:
            with self.admission.slot():
                request_id, queue = await self._add(request, unary)
                finished = False
                try:
                    while not finished:
                        output = await queue.get()
                        self._check(output, request_id)
                        finished = output.finished
                        if finished:
                            self._record(output)
                            last = output
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
            rpc = "Complete" if unary else type(request).__name__.removesuffix("Request")
            self.access_log.request_done(f"grpc {rpc}", request_id, code.name, last, started)

    async def _add(self, request: pb.GenerateRequest | pb.ChatRequest, unary: bool
                   ) -> tuple[str, asyncio.Queue]:
        try:
            params = proto_convert.sampling_params_from_proto(request.params,
                                                              self.generation_defaults)
            prompt = await self._prompt(request)
            # Sizes first, then tokenizing and every check of the ids, all on a worker thread.
            prompt_ids = await self._off_loop(self.engine_loop.engine.check_request, prompt, params)
            if unary:
                if self._text_bytes_per_token is None:  # once: a walk over the vocabulary
                    self._text_bytes_per_token = await self._off_loop(
                        reply_size.text_bytes_per_token, self.engine_loop.engine.tokenizer)
                self._check_reply_size(len(prompt_ids), params)
            return await self.engine_loop.add_request(
                prompt_ids, params, priority=request.priority, client_id=request.client_id)
        except StatusError:
            raise
        except NoChatTemplateError as e:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        except ValueError as e:
            raise StatusError(*status_for_value_error(e)) from e
        except Exception as e:  # a fault on this request alone
            if not isinstance(e, EngineFault):  # (the engine loop logs its own)
                logger.exception("adding a request failed")
            raise StatusError(grpc.StatusCode.INTERNAL,
                              "adding the request failed; see the server log") from e

    async def _prompt(self, request: pb.GenerateRequest | pb.ChatRequest) -> str | list[int]:
        """A Generate request's text or token ids; a Chat request's messages rendered and
        tokenized (on a worker thread, after a size check)."""
        if isinstance(request, pb.GenerateRequest):
            return proto_convert.prompt_from_request(request)
        engine = self.engine_loop.engine
        if engine.tokenizer is None:
            raise NoChatTemplateError("chat_template: this model has no tokenizer, so no chat "
                                      "template; send Generate with token ids")
        messages, add_generation_prompt = proto_convert.chat_from_request(request)
        limit = prompt_byte_limit(engine.config.max_model_len)
        chars = sum(len(m["content"]) + len(m["role"]) for m in messages)  # >= 1 byte each
        size = chars if chars > limit else sum(utf8_size(m["content"]) + utf8_size(m["role"])
                                               for m in messages)
        if size > limit:
            raise ValueError(f"messages: {'at least ' * (chars > limit)}{size} bytes of roles and "
                             f"content; the limit before "
                             f"templating is {limit} bytes (max_model_len "
                             f"{engine.config.max_model_len})")
        _, ids = await self._off_loop(encode_chat, engine.tokenizer, messages,
                                      add_generation_prompt)
        return ids

    def _check_reply_size(self, num_prompt_tokens: int, params) -> None:
        """Raises StatusError (INVALID_ARGUMENT) when a Complete reply could exceed the limit."""
        engine = self.engine_loop.engine
        bound = reply_size.complete_reply_bound(
            params, engine.config.max_model_len - num_prompt_tokens, self._text_bytes_per_token)
        if bound > self.config.max_message_bytes:
            self.metrics.replies_refused.labels(when="before").inc()
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT,
                              reply_size.too_big_before(bound, self.config.max_message_bytes,
                                                        params))

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
        max_model_len = self.engine_loop.engine.config.max_model_len
        limit = prompt_byte_limit(max_model_len)
        if len(request.text) > limit or utf8_size(request.text) > limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"text: more than {limit} bytes, the prompt limit before "
                                f"tokenization (max_model_len {max_model_len})")
        ids = await self._off_loop(tokenizer.encode, request.text, add_special)
        response = pb.TokenizeResponse(token_ids=ids)
        if response.ByteSize() > self.config.max_message_bytes:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, reply_size.too_big_after(
                response.ByteSize(), self.config.max_message_bytes))
        return response

    async def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
                         ) -> pb.DetokenizeResponse:
        tokenizer = await self._tokenizer(context)
        vocab = self.engine_loop.engine.model_config.vocab_size
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True

        def detokenize() -> tuple[list[int], str | None]:  # (bad ids, text)
            ids = list(request.token_ids)
            bad = [t for t in ids if not 0 <= t < vocab]
            return (bad, None) if bad else ([], tokenizer.decode(ids, skip))

        bad, text = await self._off_loop(detokenize)
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids: {bad[:5]} outside the vocabulary [0, {vocab})")
        response = pb.DetokenizeResponse(text=text)
        if response.ByteSize() > self.config.max_message_bytes:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, reply_size.too_big_after(
                response.ByteSize(), self.config.max_message_bytes))
        return response

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

