"""What a prefill engine hands a decode engine: a request whose prompt has run and whose first
token is sampled, with the K/V of its computed tokens (jaxserve/engine/disaggregation.py).

Plain data (numpy arrays, lists, numbers, SamplingParams), so it can cross a process or a
network as well as a thread. `Engine.export_request` makes one; `Engine.import_request` takes it.
"""

import dataclasses

import numpy as np

from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What two engines must agree on for K/V blocks to move between them."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    vocab_size: int


@dataclasses.dataclass
class SeqHandoff:
    """One sample (of n) of the request, at the point of hand-over.

    kv holds the K/V of its first num_computed_tokens tokens (all but the last sampled one):
    [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
    """

    index: int
    seed: int
    output_token_ids: list[int]
    output_logprobs: list[dict[int, float]]
    num_computed_tokens: int
    kv: np.ndarray
    first_scheduled_time: float | None
    first_token_time: float | None
    num_cached_prompt_tokens: int
    text: str  # emitted so far
    held: str  # withheld: it may begin a stop string
    stop_reason: str | int | None
    finish_reason: str | None  # a sample already finished (n > 1): no kv
    finished_time: float | None


@dataclasses.dataclass
class KVHandoff:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int
    client_id: str
    layout: KVLayout
    seqs: list[SeqHandoff]

    @property
    def num_blocks(self) -> int:
        return sum(s.kv.shape[0] for s in self.seqs)
