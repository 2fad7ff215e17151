"""What the engine returns: RequestOutput with one CompletionOutput per sample, and timings."""

import dataclasses


@dataclasses.dataclass
class RequestMetrics:
    """Per-request timings in seconds (monotonic clock)."""

    arrival_time: float
    queue_time: float | None = None  # arrival -> first scheduled
    time_to_first_token: float | None = None  # arrival -> first sampled token
    time_per_output_token: float | None = None  # mean gap between later tokens
    e2e_latency: float | None = None  # arrival -> finished

    @classmethod
    def started(cls, arrival_time: float, first_scheduled_time: float | None,
                first_token_time: float | None) -> "RequestMetrics":
        """Queue time and time to first token, where the request got that far."""
        m = cls(arrival_time=arrival_time)
        if first_scheduled_time is not None:
            m.queue_time = first_scheduled_time - arrival_time
        if first_token_time is not None:
            m.time_to_first_token = first_token_time - arrival_time
        return m


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}, sampled first
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
