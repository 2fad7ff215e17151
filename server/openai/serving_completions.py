"""POST /v1/completions: prompts in, OpenAI "text_completion" objects out, whole or streamed.

A prompt may be a string, a list of strings, token ids or a list of token-id lists; each prompt
is one engine request with `n` samples, and choice `index` is prompt_index * n + sample index,
as vLLM numbers them. max_tokens unset: the model's default, else 16 (OpenAI's).
"""

import time
import uuid

from jaxserve.outputs import RequestOutput
from server.openai import sse
from server.openai.engine_requests import RequestGroup, check_context, encode_prompt
from server.openai.errors import APIError, check_supported, from_value_error
from server.openai.logprobs import CompletionLogprobs, TokenTexts
from server.openai.protocol import CompletionRequest
from server.openai.sampling import sampling_params


class CompletionCall:
    """One /v1/completions call: open() admits it (raising APIError), then response() or
    stream(); close() in every case."""

    def __init__(self, core, request: CompletionRequest, model_name: str):
        self._core, self.request, self._model = core, request, model_name
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.group: RequestGroup | None = None
        self._texts = TokenTexts(core.engine_loop.engine.tokenizer)

    async def open(self) -> None:
        r = self.request
        check_supported(r)
        try:
            prompts = [await encode_prompt(self._core, p) for p in r.prompts()]
            params = sampling_params(r, self._core.servicer.generation_defaults,
                                     max_tokens=r.max_tokens, logprobs=r.logprobs)
        except ValueError as e:
            raise from_value_error(e) from e
        check_context(self._core, prompts, r.max_tokens, "max_tokens")
        self.group = RequestGroup(self._core, prompts, params, priority=r.priority,
                                  client_id=r.user or "", path="/v1/completions")
        await self.group.open()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()

    async def response(self) -> dict:
        finals: dict[int, RequestOutput] = {}
        async for i, output in self.group.outputs():
            if output.finished:
                finals[i] = output
        choices = []
        for i in sorted(finals):
            for c in sorted(finals[i].outputs, key=lambda c: c.index):
                logprobs = None
                if c.logprobs is not None:
                    logprobs = CompletionLogprobs(self._texts).format(c.logprobs)
                choices.append(self._choice(i, c.index, c.text, logprobs, c))
        return self._body(choices, usage=sse.usage([finals[i] for i in sorted(finals)]))

    async def stream(self):
        """Server-sent events: one chunk per choice with new tokens, the usage chunk if asked,
        then [DONE]. A failure after the first chunk is sent as an error event."""
        include_usage = bool(self.request.stream_options and self.request.stream_options.include_usage)
        deltas, logprobs, finals = sse.ChoiceDeltas(), {}, []
        try:
            async for i, output in self.group.outputs():
                if output.finished:
                    finals.append(output)
                for c in output.outputs:
                    new = deltas.new(i, output, c)
                    if new is None:
                        continue
                    text, _, entries, finishes = new
                    formatted = None
                    if entries is not None:
                        key = (i, c.index)
                        formatted = logprobs.setdefault(
                            key, CompletionLogprobs(self._texts)).format(entries)
                    chunk = self._body([self._choice(i, c.index, text, formatted,
                                                     c if finishes else None)])
                    if include_usage:
                        chunk["usage"] = None
                    yield sse.event(chunk)
            if include_usage:
                yield sse.event(self._body([], usage=sse.usage(finals)))
        except APIError as e:
            yield sse.event(e.body())
        yield sse.DONE

    def _choice(self, prompt_index: int, sample_index: int, text: str, logprobs: dict | None,
                finished) -> dict:
        return {"index": prompt_index * self.group.params.n + sample_index, "text": text,
                "logprobs": logprobs,
                "finish_reason": finished.finish_reason if finished is not None else None,
                "stop_reason": finished.stop_reason if finished is not None else None}

    def _body(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self._model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body
