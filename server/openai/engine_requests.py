"""The engine requests of one HTTP call, through the server's one Admission and EngineLoop.

A completion with k prompts is k engine requests (each with its n samples); a chat completion is
one. `RequestGroup.open()` takes one admission slot per request and adds each through the
engine loop, so that a refusal (429, 503, a bad value) comes before any response is sent;
`outputs()` yields (prompt index, RequestOutput) as they arrive, merged over the requests;
`close()` aborts whatever has not finished (the client went away, or an error) and gives the
slots back. close() runs however the call ends: a finally in the unary path, the end of the
streaming response in the streamed one (app.py), so no slot or KV block outlives its call.

The same bookkeeping as the gRPC servicer: the latency histograms and admission's mean latency
from each finished request, and with --access_log one line per engine request when the call ends
(status 200 when it finished, else the error's status, or 499 for a client that went away).
"""

import asyncio
import contextlib
import time

from jaxserve.model_io.chat_template import NoChatTemplateError, encode_chat
from jaxserve.outputs import RequestOutput
from jaxserve.request_limits import check_prompt_size, prompt_byte_limit, utf8_size
from jaxserve.sampling_params import SamplingParams
from server.admission import Admission
from server.engine_loop import EngineFault
from server.errors import StatusError
from server.openai.errors import APIError, from_status_error, from_value_error


async def encode_prompt(core, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids, tokenized on a worker thread (not the event loop, not the engine
    thread). ValueError (named) for a text prompt too large or a model without a tokenizer."""
    if not isinstance(prompt, str):
        return prompt
    engine = core.engine_loop.engine
    check_prompt_size(prompt, engine.config.max_model_len)
    if engine.tokenizer is None:
        raise ValueError("prompt: this model has no tokenizer; give token ids")
    if not prompt:
        raise ValueError("prompt is empty")
    return await asyncio.to_thread(engine.tokenizer.encode, prompt)


async def encode_messages(core, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """A conversation rendered by the model's chat template and tokenized, on a worker thread,
    after the size check the Chat RPC makes (roles and contents within the prompt byte limit)."""
    engine = core.engine_loop.engine
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise NoChatTemplateError("messages: this model has no tokenizer, so no chat template; "
                                  "use /v1/completions with token ids")
    limit = prompt_byte_limit(engine.config.max_model_len)
    size = sum(utf8_size(m.get("content") or "") + utf8_size(m["role"]) for m in messages)
    if size > limit:
        raise ValueError(f"messages: {size} bytes of roles and content; the limit before "
                         f"templating is {limit} bytes (max_model_len "
                         f"{engine.config.max_model_len})")
    _, ids = await asyncio.to_thread(encode_chat, tokenizer, messages, add_generation_prompt)
    return ids


def check_context(core, prompts: list[list[int]], max_tokens: int | None, param: str) -> None:
    """An explicit max_tokens that does not fit beside its prompt is refused (400), as vLLM's
    OpenAI server does, instead of quietly ending at the context's end. max_tokens None (the
    request gave none) keeps the engine's behaviour: generate until max_model_len."""
    limit = core.engine_loop.engine.config.max_model_len
    if max_tokens is None:
        return
    for prompt in prompts:
        if len(prompt) + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, "
                                f"you requested {len(prompt) + max_tokens} tokens ({len(prompt)} "
                                f"in the prompt, {max_tokens} in the completion). Reduce the "
                                f"length of the prompt or {param}.", param=param,
                           code="context_length_exceeded")


class RequestGroup:
    def __init__(self, core, prompts: list[list[int]], params: SamplingParams, *,
                 priority: int = 0, client_id: str = "", renames: dict[str, str] | None = None,
                 path: str = ""):
        """core: the GrpcServer whose admission, engine loop and metrics are shared.
        renames: request field names for the engine's (errors.from_value_error).
        path: the endpoint, for the access log."""
        self._core, self._prompts, self.params = core, prompts, params
        self._priority, self._client_id, self._renames = priority, client_id, renames
        self._path, self._started = path, time.monotonic()
        self._slots = contextlib.ExitStack()
        self._queues: list[tuple[str, asyncio.Queue]] = []
        self._finals: dict[int, RequestOutput] = {}
        self._error_status: int | None = None
        self._closed = False

    async def open(self) -> None:
        """Admits and adds every request; raises APIError (after closing) when one is refused."""
        try:
            for prompt in self._prompts:
                self._slots.enter_context(self._core.admission.slot())
                self._queues.append(await self._core.engine_loop.add_request(
                    prompt, self.params, priority=self._priority, client_id=self._client_id))
        except BaseException as e:
            if isinstance(e, StatusError):
                error = from_status_error(e)
            elif isinstance(e, ValueError):
                error = from_value_error(e, self._renames)
            elif isinstance(e, Exception):  # an engine fault on this request (logged there)
                error = APIError(500, "adding the request failed; see the server log")
            else:
                self.close()
                raise
            self._error_status = error.status
            self.close()
            raise error from e

    async def outputs(self):
        """Yields (prompt index, RequestOutput) until every request has finished. Outputs before
        a request's last are deltas; its last is whole. Raises APIError for a failed request."""
        if len(self._queues) == 1:  # the common case: its queue alone, no task per output
            queue = self._queues[0][1]
            while 0 not in self._finals:
                yield 0, self._take(0, await queue.get())
            return
        gets = {}
        try:
            for i, (_, queue) in enumerate(self._queues):
                gets[asyncio.ensure_future(queue.get())] = i
            while gets:
                done, _ = await asyncio.wait(gets, return_when=asyncio.FIRST_COMPLETED)
                for get in sorted(done, key=gets.get):
                    i = gets.pop(get)
                    output = self._take(i, get.result())
                    if not output.finished:
                        gets[asyncio.ensure_future(self._queues[i][1].get())] = i
                    yield i, output
        finally:
            for get in gets:
                get.cancel()

    def _take(self, i: int, item: RequestOutput | EngineFault) -> RequestOutput:
        """Request i's next output, checked (APIError for a failure) and recorded if final."""
        try:
            output = self._check(item, self._queues[i][0])
        except APIError as e:
            self._error_status = e.status
            raise
        if output.finished:
            self._finals[i] = output
            self._record(output)
        return output

    def close(self) -> None:
        """Aborts the unfinished requests (freeing their KV blocks) and gives the slots back."""
        if self._closed:
            return
        self._closed = True
        for i, (request_id, _) in enumerate(self._queues):
            if i not in self._finals:
                self._core.engine_loop.abort(request_id)
        self._slots.close()
        finished = len(self._finals) == len(self._prompts)
        status = "200" if finished else str(self._error_status or 499)
        for i, (request_id, _) in enumerate(self._queues or [(None, None)]):
            self._core.servicer.access_log.request_done(
                f"http {self._path}", request_id, status, self._finals.get(i), self._started)

    def _check(self, output: RequestOutput | EngineFault, request_id: str) -> RequestOutput:
        if isinstance(output, EngineFault):
            raise APIError(500, f"request {request_id}: {output}")
        reasons = {c.finish_reason for c in output.outputs}
        if "error" in reasons:
            raise APIError(500, f"request {request_id} failed in the engine; see the server log")
        if "abort" in reasons:
            if self._core.admission.state == Admission.DRAINING:
                raise APIError(503, "the server shut down before the request finished")
            raise APIError(503, f"request {request_id} was aborted")
        return output

    def _record(self, output: RequestOutput) -> None:
        self._core.metrics.observe_finished(output)
        if output.metrics.e2e_latency is not None:
            self._core.admission.record_latency(output.metrics.e2e_latency)
