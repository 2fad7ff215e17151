"""SamplingParams: how one request is sampled and when it stops. Validated where it is made."""

import dataclasses
import math

from jaxserve.request_limits import check_stop_strings


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling settings; the names and meanings follow vLLM's.

    Attributes:
      n: samples per prompt (they share the prompt's KV blocks).
      temperature: 0 is greedy; higher flattens the distribution.
      top_k: sample among the k most likely tokens; 0 (or -1) is off.
      top_p: sample among the most likely tokens whose probabilities sum to top_p; 1 is off.
      min_p: drop tokens less likely than min_p x the most likely one's probability; 0 is off.
      repetition_penalty: > 1 discourages tokens already in the prompt or output; 1 is off.
      presence_penalty: subtracted from the logit of each token already in the output; 0 is off.
      frequency_penalty: subtracted once per occurrence of a token in the output; 0 is off.
      seed: per-request seed: the sampled text depends only on it and the prompt, not on the
        batch; unset: one drawn from the engine's seed.
      max_tokens: most tokens to generate per sample.
      min_tokens: tokens to generate before EOS or a stop may end a sample.
      stop: strings that end a sample (not included in its text).
      stop_token_ids: token ids that end a sample, besides the model's EOS.
      ignore_eos: keep generating past EOS (benchmarks).
      logprobs: log probabilities returned: unset none; 0 the sampled token's; N also the top N.
      skip_special_tokens: leave special tokens out of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; N: also the top N
    skip_special_tokens: bool = True

    def __post_init__(self):
        # Lists are accepted for convenience and kept as tuples so params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self):
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")
            return value

        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        if not 0.0 <= number("temperature") <= 100.0:
            raise ValueError(f"SamplingParams.temperature must be in [0, 100], got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be 0/-1 (off) or a positive integer, got {self.top_k!r}")
        if not 0.0 < number("top_p") <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < number("repetition_penalty") <= 10.0:
            raise ValueError(f"SamplingParams.repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            raise ValueError(f"SamplingParams.seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"SamplingParams.min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check_stop_strings(self.stop)
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("SamplingParams.stop_token_ids must hold non-negative integers")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"SamplingParams.logprobs must be None or an integer >= 0, got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
