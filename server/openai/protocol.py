"""The OpenAI-compatible request bodies, as pydantic models: what a field may hold, and its name.

Field names, types and defaults are OpenAI's (`/v1/completions`, `/v1/chat/completions`), plus
vLLM's sampling extras (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens, priority) and vLLM's /tokenize and /detokenize bodies.
Only shapes are checked here; values (temperature in [0, 100], ...) are checked once, by
jaxserve.SamplingParams, whose errors name the field (server/openai/errors.py).

A field the server does not know is refused (400, named), as OpenAI refuses it; an OpenAI field
it does not implement (logit_bias, tools, ...) is accepted only at its neutral value. Response
bodies are built as plain dicts where they are made (serving_*.py): JSON out needs no model.
"""

from typing import Annotated, Literal

import pydantic
from pydantic import Field, StrictInt

_FORBID = pydantic.ConfigDict(extra="forbid")
TokenIds = list[StrictInt]


class StreamOptions(pydantic.BaseModel):
    model_config = _FORBID
    include_usage: bool | None = False  # null: false (as OpenAI and vLLM take it)


class _SamplingFields(pydantic.BaseModel):
    """The fields both endpoints share. None (or absent): the model's default, then SamplingParams'."""

    model_config = _FORBID
    model: str | None = None  # None: the one model served (as vLLM)
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False  # null: false
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool | None = None
    priority: int = 0
    # OpenAI fields not implemented: refused unless neutral (unsupported_fields).
    logit_bias: dict[str, float] | None = None

    def unsupported_fields(self) -> list[str]:
        """The fields set to something this server does not do."""
        return [name for name in ("logit_bias",) if getattr(self, name)]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = None  # None: the model's default, else 16 (OpenAI's)
    logprobs: int | None = None  # the top N besides the sampled token
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of text or token-id prompts (ValueError when empty)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt: an empty list; give a string, token ids, or a list of them")
        if isinstance(p[0], int):
            return [list(p)]
        return [list(x) if isinstance(x, list) else x for x in p]

    def unsupported_fields(self) -> list[str]:
        extra = [n for n in ("echo", "suffix") if getattr(self, n)]
        if self.best_of is not None and self.best_of != (self.n or 1):
            extra.append("best_of")
        return super().unsupported_fields() + extra


class TextPart(pydantic.BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(pydantic.BaseModel):
    """One message. Fields beyond role and content (name, tool_call_id, ...) reach the template
    as they are, as they would through transformers' apply_chat_template."""

    model_config = pydantic.ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        """The message as the chat template takes it: text parts joined by newlines, as vLLM."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # deprecated by OpenAI for max_completion_tokens; either works
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM's
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None

    def unsupported_fields(self) -> list[str]:
        extra = [n for n in ("tools", "response_format") if getattr(self, n)]
        if self.tool_choice not in (None, "none", "auto"):
            extra.append("tool_choice")
        return super().unsupported_fields() + extra


class TokenizeCompletionRequest(pydantic.BaseModel):
    model_config = _FORBID
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(pydantic.BaseModel):
    model_config = _FORBID
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    return_token_strs: bool = False


TokenizeRequest = Annotated[TokenizeCompletionRequest | TokenizeChatRequest,
                            Field(union_mode="left_to_right")]


class DetokenizeRequest(pydantic.BaseModel):
    model_config = _FORBID
    model: str | None = None
    tokens: TokenIds
