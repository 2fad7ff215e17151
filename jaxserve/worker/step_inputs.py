"""The host arrays of one step: the scheduled chunks of a ragged batch, packed into a few int32
and float32 arrays (one transfer each), built with numpy from the persistent batch.

Layouts (T padded tokens, S padded sequences, also the padded sampled rows, B banned ids):

    token_data [3, T] int32   0: token id, or -(slot + 1) for a token sampled by the step in
                                 flight, which the device reads from that slot's last token
                              1: position (-1 for padding: its K/V write is dropped)
                              2: the token's batch slot (its block-table row)
    seq_data [4, S + 1] int32 0: batch slot of each sequence (pad slot for padding); [0, S] is
                                 the number of real sequences
                              1: KV length after the step; 2: cu_q_lens; 3: logits index of
                                 each sampled row
    row_i32 [5 + B, S] int32  top_k, seed (uint32 bits), output index of the token sampled,
                              batch slot (the sampled token goes to it; the pad slot for a
                              speculating sequence's rows), the proposed token the row verifies
                              (-1: none), then the banned ids (-1 padded; EOS and stop ids while
                              below min_tokens)
    row_f32 [3, S] float32    temperature, top_p, min_p
    penalties (when some row uses them): pen_f32 [3, S] (repetition, presence, frequency),
                              history [S, max_model_len] int32 (the known tokens, -2 where the
                              last one is still on the device, -1 padding), prompt_lens [S]

A speculating sequence (ScheduledSeq.spec_tokens, k proposals) runs its last token and the k
proposals, and has k + 1 sampled rows, one at each: row j verifies proposal j + 1 (the last row,
none: its token follows all k). Row j samples output index num_output_tokens + j, with the
proposals before it in its penalty history.

Pure host code: reads Sequences and the InputBatch, returns numpy.
"""

import dataclasses

import numpy as np

from jaxserve.worker.input_batch import InputBatch
from jaxserve.request import Sequence
from jaxserve.sample.sampler import SamplerMode
from jaxserve.core.scheduler import ScheduledSeq


@dataclasses.dataclass
class StepArrays:
    token_data: np.ndarray
    seq_data: np.ndarray
    rows: list[Sequence]  # the sampled sequences, in row order (forks right after their parent)
    row_offsets: np.ndarray  # [len(rows)] int64: j of a speculating sequence's row j, else 0
    drafts: np.ndarray  # [len(rows)] int64: the proposal each row verifies, -1 for none


@dataclasses.dataclass
class SamplingArrays:
    mode: SamplerMode
    row_i32: np.ndarray
    row_f32: np.ndarray
    penalties: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # pen_f32, history, prompt_lens


def build_step(items: list[ScheduledSeq], batch: InputBatch, T: int, S: int) -> StepArrays:
    """Token and sequence arrays of one ragged batch; every sequence already holds a slot."""
    n = len(items)
    token_data = np.zeros((3, T), np.int32)
    token_data[1] = -1
    token_data[2] = batch.pad_slot
    seq_data = np.zeros((4, S + 1), np.int32)
    seq_data[0, :S] = batch.pad_slot
    seq_data[0, S] = n
    if not n:
        return StepArrays(token_data, seq_data, [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    starts = np.fromiter((it.start for it in items), np.int64, n)
    counts = np.fromiter((it.num_tokens for it in items), np.int64, n)
    slots = np.fromiter((it.seq.slot for it in items), np.int64, n)
    cu = np.zeros(S + 1, np.int64)
    np.cumsum(counts, out=cu[1:n + 1])
    cu[n + 1:] = cu[n]
    total = int(cu[n])
    token_data[1, :total] = np.arange(total) - np.repeat(cu[:n] - starts, counts)
    token_data[2, :total] = np.repeat(slots, counts)
    seq_data[0, :n] = slots
    seq_data[1, :n] = starts + counts
    seq_data[2] = cu
    tokens = token_data[0]
    rows: list[Sequence] = []
    logits_index: list[int] = []
    row_offsets: list[int] = []
    drafts: list[int] = []
    for i, item in enumerate(items):
        seq, start, offset = item.seq, item.start, int(cu[i])
        spec = item.spec_tokens
        end = start + item.num_tokens - len(spec)
        known_end = min(end, seq.num_known_tokens)
        if known_end > start:
            tokens[offset:offset + known_end - start] = seq.known_tokens(start, known_end)
        if known_end < end:  # only the last token can be pending: it was just sampled
            tokens[offset + end - 1 - start] = -(seq.slot + 1)
        last = offset + item.num_tokens - 1
        if spec:
            tokens[last - len(spec) + 1:last + 1] = spec
            k = len(spec)
            rows.extend([seq] * (k + 1))
            logits_index.extend(range(last - k, last + 1))
            row_offsets.extend(range(k + 1))
            drafts.extend(spec + [-1])
        elif item.sample:
            num = 1 + len(item.forks)
            rows.append(seq)
            rows.extend(item.forks)
            logits_index.extend([last] * num)
            row_offsets.extend([0] * num)
            drafts.extend([-1] * num)
    seq_data[3, :len(rows)] = logits_index
    return StepArrays(token_data, seq_data, rows, np.asarray(row_offsets, np.int64),
                      np.asarray(drafts, np.int64))


def build_sampling(rows: list[Sequence], batch: InputBatch, S: int, max_model_len: int,
                   row_offsets: np.ndarray | None = None,
                   drafts: np.ndarray | None = None) -> SamplingArrays:
    """Sampling arrays for the rows (sampled before their pending count is raised);
    row_offsets and drafts as StepArrays has them (None: no speculating row)."""
    r = len(rows)
    if row_offsets is None:
        row_offsets, drafts = np.zeros(r, np.int64), np.full(r, -1, np.int64)
    speculating = (row_offsets > 0) | (drafts >= 0)
    slots = np.fromiter((s.slot for s in rows), np.int64, r)
    steps = np.fromiter((s.num_output_tokens for s in rows), np.int64, r) + row_offsets
    num_banned = batch.banned.shape[1]
    row_i32 = np.zeros((5 + num_banned, S), np.int32)
    row_i32[3] = batch.pad_slot
    row_i32[4:] = -1
    row_i32[0, :r] = batch.top_k[slots]
    row_i32[1, :r] = batch.seeds[slots].view(np.int32)
    row_i32[2, :r] = steps
    # A speculating sequence's next input comes from the host: its rows write no slot.
    row_i32[3, :r] = np.where(speculating, batch.pad_slot, slots)
    row_i32[4, :r] = drafts
    below = steps < batch.min_tokens[slots]
    row_i32[5:, :r] = np.where(below[:, None], batch.banned[slots], -1).T
    row_f32 = np.zeros((3, S), np.float32)
    row_f32[1] = 1.0
    temperature = batch.temperature[slots]
    row_f32[0, :r] = temperature
    row_f32[1, :r] = batch.top_p[slots]
    row_f32[2, :r] = batch.min_p[slots]
    penalized = [i for i, s in enumerate(rows) if s.params.uses_penalties]
    mode = SamplerMode(random=bool((temperature > 0).any()),
                       logprobs=any(s.params.logprobs is not None for s in rows),
                       penalties=bool(penalized),
                       spec=bool(((temperature > 0) & (drafts >= 0)).any()))
    penalties = None
    if penalized:
        pen_f32 = np.zeros((3, S), np.float32)
        pen_f32[0] = 1.0
        pen_f32[0, :r] = batch.repetition[slots]
        pen_f32[1, :r] = batch.presence[slots]
        pen_f32[2, :r] = batch.frequency[slots]
        history = np.full((S, max_model_len), -1, np.int32)
        prompt_lens = np.zeros(S, np.int32)
        for i in penalized:
            seq = rows[i]
            known = seq.num_known_tokens
            history[i, :known] = seq.token_ids
            if seq.num_pending:
                history[i, known] = -2
            j = int(row_offsets[i])  # a speculating row: the proposals before it
            history[i, known:known + j] = drafts[i - j:i]
            prompt_lens[i] = seq.num_prompt_tokens
        penalties = (pen_f32, history, prompt_lens)
    return SamplingArrays(mode, row_i32, row_f32, penalties)
