"""POST /v1/chat/completions: a conversation rendered by the model's chat template (as the Chat
RPC and LLM.chat render it, jaxserve/model_io/chat_template.py), then one engine request with `n`
samples; "chat.completion" objects out, whole or streamed as "chat.completion.chunk"s.

max_completion_tokens (or the older max_tokens) unset: the model's default, else up to the end
of the context, as vLLM and OpenAI do for chat. logprobs: true, top_logprobs: N.
"""

import time
import uuid

from jaxserve.model_io.chat_template import NoChatTemplateError
from server.openai import sse
from server.openai.engine_requests import RequestGroup, check_context, encode_messages
from server.openai.errors import APIError, check_supported, from_value_error
from server.openai.logprobs import TokenTexts, chat_logprobs
from server.openai.protocol import ChatCompletionRequest
from server.openai.sampling import sampling_params

# The engine's names for the request's fields, as the request names them.
_RENAMES = {"prompt": "messages"}


class ChatCall:
    """One /v1/chat/completions call: open() admits it (raising APIError), then response() or
    stream(); close() in every case."""

    def __init__(self, core, request: ChatCompletionRequest, model_name: str):
        self._core, self.request, self._model = core, request, model_name
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.group: RequestGroup | None = None
        self._texts = TokenTexts(core.engine_loop.engine.tokenizer)
        self._renames = dict(_RENAMES, max_tokens=("max_completion_tokens"
                                                   if request.max_completion_tokens is not None
                                                   else "max_tokens"),
                             logprobs="top_logprobs")

    async def open(self) -> None:
        r = self.request
        check_supported(r)
        if r.top_logprobs is not None and not r.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        max_tokens = (r.max_completion_tokens if r.max_completion_tokens is not None
                      else r.max_tokens)
        try:
            prompt = await encode_messages(self._core, [m.for_template() for m in r.messages],
                                           r.add_generation_prompt)
            params = sampling_params(r, self._core.servicer.generation_defaults,
                                     max_tokens=max_tokens,
                                     logprobs=(r.top_logprobs or 0) if r.logprobs else None,
                                     fallback={"max_tokens": None})
        except NoChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from e
        except ValueError as e:
            raise from_value_error(e, self._renames) from e
        check_context(self._core, [prompt], max_tokens, "max_completion_tokens"
                      if r.max_completion_tokens is not None else "max_tokens")
        self.group = RequestGroup(self._core, [prompt], params, priority=r.priority,
                                  client_id=r.user or "", renames=self._renames,
                                  path="/v1/chat/completions")
        await self.group.open()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()

    async def response(self) -> dict:
        final = None
        async for _, output in self.group.outputs():
            final = output
        choices = [{"index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(c.logprobs),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for c in sorted(final.outputs, key=lambda c: c.index)]
        return self._body("chat.completion", choices, usage=sse.usage([final]))

    async def stream(self):
        """Server-sent events: each choice's role first, then content deltas (the last with its
        finish_reason), the usage chunk if asked, then [DONE]."""
        include_usage = bool(self.request.stream_options and self.request.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        for index in range(self.group.params.n):
            yield sse.event(self._chunk(index, {"role": "assistant", "content": ""}, None, None,
                                        extra))
        deltas, final = sse.ChoiceDeltas(), None
        try:
            async for _, output in self.group.outputs():
                final = output if output.finished else final
                for c in output.outputs:
                    new = deltas.new(0, output, c)
                    if new is None:
                        continue
                    text, _, entries, finishes = new
                    yield sse.event(self._chunk(c.index, {"content": text},
                                                self._logprobs(entries), c if finishes else None,
                                                extra))
            if include_usage:
                yield sse.event(self._body("chat.completion.chunk", [], usage=sse.usage([final])))
        except APIError as e:
            yield sse.event(e.body())
        yield sse.DONE

    def _logprobs(self, entries: list[dict] | None) -> dict | None:
        if entries is None:
            return None
        return chat_logprobs(self._texts, entries, self.group.params.logprobs or 0)

    def _chunk(self, index: int, delta: dict, logprobs: dict | None, finished, extra: dict
               ) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finished.finish_reason if finished is not None else None,
                  "stop_reason": finished.stop_reason if finished is not None else None}
        return self._body("chat.completion.chunk", [choice]) | extra

    def _body(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self._model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body
