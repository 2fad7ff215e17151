"""An OpenAI request's sampling fields -> jaxserve.SamplingParams, as the gRPC server does it:
the fields a request sets win, the model's generation defaults fill the rest
(jaxserve/model_io/generation_defaults.py), then the endpoint's fallback, then SamplingParams' own."""

from jaxserve.model_io.generation_defaults import GenerationDefaults
from jaxserve.sampling_params import SamplingParams

# Same names in the request and in SamplingParams.
_FIELDS = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k",
           "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens")


def sampling_params(request, defaults: GenerationDefaults, *, max_tokens: int | None,
                    logprobs: int | None, fallback: dict | None = None) -> SamplingParams:
    """request: a protocol.CompletionRequest or ChatCompletionRequest; max_tokens and logprobs
    as the endpoint reads them from its own fields (None: not set). ValueError (from
    SamplingParams, naming its field) for a bad value."""
    explicit = {name: getattr(request, name) for name in _FIELDS
                if getattr(request, name) is not None}
    if request.stop:
        explicit["stop"] = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
    if request.stop_token_ids:
        explicit["stop_token_ids"] = tuple(request.stop_token_ids)
    if max_tokens is not None:
        explicit["max_tokens"] = max_tokens
    if logprobs is not None:
        explicit["logprobs"] = logprobs
    return defaults.sampling_params(fallback, **explicit)
