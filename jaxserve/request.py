"""Host-side state of a request and its sequences (one per sample of n). Never touches a device array."""

import dataclasses
import enum
import time

from jaxserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated sample: its tokens, how far the KV cache holds them, and its blocks.

    `num_computed_tokens` counts the tokens whose K/V are in the cache. The tokens still to run
    are `token_ids[num_computed_tokens:]`: the rest of the prompt during prefill, the last
    sampled token during decode, everything again after a recompute preemption (a swap preemption
    keeps `num_computed_tokens`: its blocks come back from host memory).
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival_time: float
    priority: int = 0
    client_id: str = ""
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    block_table: list[int] = dataclasses.field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    # While swapped out (preemption_mode "swap"): the host slots holding the K/V of its first
    # num_computed_tokens tokens, block by block.
    swap_slots: list[int] = dataclasses.field(default_factory=list)
    # When n > 1: the other samples, forked from this sequence when its prompt is done.
    fork_children: list["Sequence"] = dataclasses.field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # Log-probabilities, filled when params.logprobs is not None.
    output_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finished_time = time.monotonic()
