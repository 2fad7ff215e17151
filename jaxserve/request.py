"""Host-side state of a request and its sequences (one per sample of n). Never touches a device array."""

import dataclasses
import enum
import time
from typing import TYPE_CHECKING

from jaxserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from jaxserve.speculative.spec_decode import SpecState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated sample: its tokens, how far the KV cache holds them, and its blocks.

    `num_computed_tokens` counts the tokens whose K/V are in the cache (or are written by a step
    already dispatched). The tokens still to run are positions `num_computed_tokens` to
    `num_tokens`: the rest of the prompt during prefill, the last sampled token during decode,
    everything again after a recompute preemption (a swap preemption keeps
    `num_computed_tokens`: its blocks come back from host memory).

    `num_pending` counts tokens sampled by a dispatched step whose value the host has not read
    yet (the overlapped loop, jaxserve/engine/engine.py): they count in `num_tokens` (the scheduler
    runs them) but not in `token_ids`; the runner feeds them from the device's copy.
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
    num_pending: int = 0
    slot: int = -1  # its row in the runner's persistent batch while running (jaxserve/worker/input_batch.py)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # Log-probabilities, filled when params.logprobs is not None.
    output_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    # Speculative decoding (jaxserve/speculative/spec_decode.py): None when the engine does not speculate.
    spec: "SpecState | None" = None

    @property
    def token_ids(self) -> list[int]:
        """The tokens the host knows: the prompt, then the outputs read back so far."""
        return self.prompt_token_ids + self.output_token_ids

    def known_tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without copying the whole sequence."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Positions of the sequence: known tokens plus pending ones."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, pending ones included."""
        return len(self.output_token_ids) + self.num_pending

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
