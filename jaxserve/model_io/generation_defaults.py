"""What a model's own files say about generating with it: default sampling settings and EOS ids.

Sampling defaults follow vLLM's `generation_config="auto"`: the fields temperature, top_p, top_k,
min_p, repetition_penalty and max_new_tokens (as max_tokens) of a folder's
generation_config.json, or the `general.sampling.*` keys that llama.cpp's converter writes into a
GGUF file from the same json. They apply only where a request leaves a field unset: `LLM.generate`
with no SamplingParams, a gRPC SamplingParams field not present on the wire, a CLI sampling flag
not given. Like vLLM, `do_sample` is not read: a generation_config that sets a temperature samples.

The stop tokens of a folder are the union of the EOS ids of config.json, generation_config.json
and tokenizer_config.json's eos_token: an instruct model's end-of-turn token is often named in
only one of them, and generation must stop there too.
"""

import dataclasses
import os

from jaxserve.model_io import gguf_checkpoint
from jaxserve.config import read_json_object
from jaxserve.sampling_params import SamplingParams

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# generation_config.json key -> SamplingParams field.
_HF_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
              "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
GGUF_SOURCE = "GGUF general.sampling.*"
# GGUF metadata key -> SamplingParams field (gguf.Keys.General.SAMPLING_*).
_GGUF_FIELDS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                "general.sampling.penalty_repeat": "repetition_penalty"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """A model's default sampling settings; None: the model says nothing (SamplingParams' own
    default, or the front's, applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        SamplingParams(**self.as_dict())  # a bad value fails here, named by SamplingParams

    @classmethod
    def from_model(cls, model_path: str) -> "GenerationDefaults":
        """From a resolved model path (jaxserve.model_io.default_model.resolve_model_path): a GGUF file's
        metadata, or a folder's generation_config.json; none set if neither has any."""
        if gguf_checkpoint.is_gguf(model_path):
            reader = gguf_checkpoint.open_gguf(model_path)
            return cls._of(GGUF_SOURCE, {field: gguf_checkpoint.metadata(reader, key)
                                         for key, field in _GGUF_FIELDS.items()})
        path = os.path.join(model_path, GENERATION_CONFIG)
        if not os.path.isfile(path):
            return cls()
        gen = read_json_object(path)
        return cls._of(path, {field: gen.get(key) for key, field in _HF_FIELDS.items()})

    @classmethod
    def _of(cls, source: str, values: dict) -> "GenerationDefaults":
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: bad sampling default ({e})") from None

    def as_dict(self) -> dict:
        """The fields the model sets, as SamplingParams keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def sampling_params(self, fallback: dict | None = None, /, **explicit) -> SamplingParams:
        """SamplingParams from `explicit` (what the request set), the model's defaults where it
        set nothing, then `fallback` (a front's own defaults, e.g. the CLI's greedy), then
        SamplingParams' own defaults."""
        return SamplingParams(**{**(fallback or {}), **self.as_dict(), **explicit})


def eos_token_ids(model_dir: str, config: dict) -> tuple[int, ...]:
    """The union, in order of first appearance, of the EOS ids of config.json (`config`, already
    read), generation_config.json and tokenizer_config.json's eos_token in `model_dir`."""
    ids: list[int] = []

    def add(value):
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id not in ids:
                ids.append(token_id)

    add(config.get("eos_token_id"))
    gen_path = os.path.join(model_dir, GENERATION_CONFIG)
    if os.path.isfile(gen_path):
        add(read_json_object(gen_path).get("eos_token_id"))
    tok_path = os.path.join(model_dir, TOKENIZER_CONFIG)
    if os.path.isfile(tok_path):
        add(_tokenizer_config_eos_id(model_dir, read_json_object(tok_path)))
    return tuple(ids)


def _tokenizer_config_eos_id(model_dir: str, tok_config: dict) -> int | None:
    """The id of tokenizer_config.json's eos_token (a string, or an AddedToken dict), looked up in
    its added_tokens_decoder, else in tokenizer.json's added tokens; None if neither has it."""
    eos = tok_config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        return None
    for token_id, token in (tok_config.get("added_tokens_decoder") or {}).items():
        if isinstance(token, dict) and token.get("content") == eos and str(token_id).isdigit():
            return int(token_id)
    tokenizer_json = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        for token in read_json_object(tokenizer_json).get("added_tokens") or []:
            if isinstance(token, dict) and token.get("content") == eos:
                return token.get("id")
    return None
