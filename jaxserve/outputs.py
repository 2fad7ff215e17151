"""What the engine returns: RequestOutput with one CompletionOutput per sample, and timings.

A RequestOutput before the last is a delta (`delta` True): its samples' text, token_ids and
logprobs are what is new since the request's previous output. The last one (`finished`) is
whole. `merge_outputs` joins two consecutive outputs of a request into one.
"""

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
    delta: bool = False  # text, token_ids and logprobs are only what is new (not finished)


def merge_outputs(older: RequestOutput | None, newer: RequestOutput) -> RequestOutput:
    """One output saying what two consecutive outputs of a request said: a whole newer one as
    it is, a delta appended to the older one (delta or whole)."""
    if older is None or not newer.delta:
        return newer
    by_index = {c.index: c for c in older.outputs}
    samples = []
    for c in newer.outputs:
        old = by_index.get(c.index)
        if old is None:
            samples.append(c)
            continue
        logprobs = None
        if c.logprobs is not None or old.logprobs is not None:
            logprobs = (old.logprobs or []) + (c.logprobs or [])
        samples.append(dataclasses.replace(c, text=old.text + c.text,
                                           token_ids=old.token_ids + c.token_ids,
                                           logprobs=logprobs))
    return dataclasses.replace(newer, outputs=samples, delta=older.delta)
