"""Model runner: turns the scheduler's decision into flat device arrays and runs the compiled step.

All scheduled tokens of all sequences form one ragged batch, padded to one of a small fixed set
of bucket shapes (tokens T x sequences S), so every step function is compiled once, at start-up,
and never again while serving. A step is two compiled pure functions dispatched back to back
with no host sync between them: `forward_fn` (params, KV caches, inputs -> caches, hidden states
at the sampled rows), bucketed by (T, S), and `sample_fn` (params, hidden, sampling -> tokens),
bucketed by (S, penalties on/off). Splitting them keeps the compile count at |T x S| + 2|S|
instead of 2|T x S|. The caches are donated and updated in place; only sampled ids and logprobs
come back to the host.
"""

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxserve.attention import AttentionMetadata, copy_blocks, resolve_backend
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.request import Sequence
from jaxserve.sampler import PenaltyMetadata, SamplerOutput, SamplingMetadata, sample
from jaxserve.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["input_ids", "positions", "attn", "logits_indices", "copy_src",
                                "copy_dst"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StepInputs:
    input_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    attn: AttentionMetadata
    logits_indices: jax.Array  # [S] int32: batch index of each sampled row's last token
    copy_src: jax.Array  # [S] int32: copy-on-write source blocks
    copy_dst: jax.Array  # [S] int32: their destinations (out of range = no copy)


@dataclasses.dataclass
class SampledRow:
    seq: Sequence
    token: int
    logprob: float
    top: list[tuple[int, float]]


def bucket_sizes(lo: int, hi: int, coarse_below: int = 256) -> list[int]:
    """lo, 4 lo, 16 lo, ... up to coarse_below, then doubling, then hi itself."""
    sizes, size = [], min(lo, hi)
    while size < hi:
        sizes.append(size)
        size *= 4 if size < coarse_below else 2
    return sizes + [hi]


def _bucket(sizes: list[int], n: int) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"batch of {n} exceeds the largest bucket {sizes[-1]}")


def forward_fn(graphdef, params, kv_caches, inputs: StepInputs, *, backend: str):
    """Copy-on-write copies, then the model: -> (caches, hidden [S, D] at the sampled rows)."""
    model = nnx.merge(graphdef, params)
    kv_caches = [copy_blocks(c, inputs.copy_src, inputs.copy_dst) for c in kv_caches]
    hidden, kv_caches = model(inputs.input_ids, inputs.positions, kv_caches, inputs.attn, backend)
    return kv_caches, hidden[inputs.logits_indices]


def sample_fn(graphdef, params, hidden, sampling: SamplingMetadata, *, max_logprobs: int):
    """Logits only at the sampled rows, then sampling: -> SamplerOutput."""
    model = nnx.merge(graphdef, params)
    return sample(model.compute_logits(hidden), sampling, max_logprobs)


def kv_block_bytes(model: ModelConfig, block_size: int, dtype) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * jnp.dtype(dtype).itemsize


class ModelRunner:
    def __init__(self, model: nnx.Module, config: EngineConfig, num_kv_blocks: int | None = None,
                 precompile: bool = True, progress: bool = True):
        self.model_config: ModelConfig = model.config
        self.config = config
        self.graphdef, self.params = nnx.split(model)
        self.dtype = jnp.dtype(config.dtype)
        self.backend = resolve_backend(config.attention_backend)
        self.num_kv_blocks = num_kv_blocks or self._num_kv_blocks()
        m = self.model_config
        shape = (2, self.num_kv_blocks, config.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [jnp.zeros(shape, self.dtype) for _ in range(m.num_layers)]
        self.token_buckets = bucket_sizes(16, config.max_num_batched_tokens)
        self.seq_buckets = bucket_sizes(8, config.max_num_seqs)
        self.num_banned = config.max_stop_token_ids + len(m.eos_token_ids)
        self._forward = jax.jit(functools.partial(forward_fn, self.graphdef, backend=self.backend),
                                donate_argnums=(1,))
        self._sample = jax.jit(functools.partial(sample_fn, self.graphdef,
                                                 max_logprobs=config.max_logprobs))
        self.compiled: dict[tuple, object] = {}  # ("forward", T, S) / ("sample", S, penalties)
        if precompile:
            self.compile_all(progress)

    def _num_kv_blocks(self) -> int:
        c = self.config
        per_block = kv_block_bytes(self.model_config, c.block_size, self.dtype)
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            blocks = int(free * c.kv_cache_memory_fraction) // per_block
        else:  # CPU: enough for every sequence at full length, within 2 GiB
            blocks = min(c.max_num_seqs * c.max_blocks_per_seq, (2 << 30) // per_block)
        if blocks * c.block_size < c.max_model_len:
            raise ValueError(f"KV cache: {blocks} blocks of {c.block_size} tokens do not hold one "
                             f"sequence of max_model_len {c.max_model_len}; lower max_model_len "
                             "or raise kv_cache_memory_fraction")
        return blocks

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [(t, s) for t in self.token_buckets for s in self.seq_buckets if s <= t]

    def compile_all(self, progress: bool = True) -> None:
        """Compiles every bucket (sampling with and without penalties) before serving starts."""
        keys = [("forward", t, s) for t, s in self.buckets]
        keys += [("sample", s, p) for s in self.seq_buckets for p in (False, True)]
        for key in tqdm(keys, desc="compiling step buckets", disable=not progress):
            self._compiled(key)

    def _compiled(self, key: tuple):
        if key not in self.compiled:
            # float32 means float32: no TF32 shortcuts in the matmuls on GPU.
            precision = "highest" if self.dtype == jnp.float32 else None
            with jax.default_matmul_precision(precision):
                self.compiled[key] = self._lower(key).compile()
        return self.compiled[key]

    def _lower(self, key: tuple):
        if key[0] == "forward":
            _, T, S = key
            return self._forward.lower(self.params, self.kv_caches, self._dummy_inputs(T, S))
        _, S, penalties = key
        hidden = jax.ShapeDtypeStruct((S, self.model_config.hidden_size), self.dtype)
        return self._sample.lower(self.params, hidden, self._dummy_sampling(S, penalties))

    def _dummy_inputs(self, T, S) -> StepInputs:
        zi = lambda *shape: np.zeros(shape, np.int32)
        attn = AttentionMetadata(zi(T), zi(S, self.config.max_blocks_per_seq), zi(S), zi(S + 1),
                                 np.int32(0))
        return StepInputs(zi(T), zi(T), attn, zi(S), zi(S), zi(S))

    def _dummy_sampling(self, S, penalties) -> SamplingMetadata:
        c = self.config
        zi = lambda *shape: np.zeros(shape, np.int32)
        pen = None
        if penalties:
            pen = PenaltyMetadata(np.ones(S, np.float32), np.zeros(S, np.float32),
                                  np.zeros(S, np.float32), zi(S, c.max_model_len), zi(S))
        sampling = SamplingMetadata(np.zeros(S, np.float32), zi(S), np.ones(S, np.float32),
                                    np.zeros(S, np.float32), np.zeros(S, np.uint32), zi(S),
                                    zi(S, self.num_banned), pen)
        return sampling

    def execute(self, out: SchedulerOutput) -> list[SampledRow]:
        """Runs one step; returns one row per sampled sequence (forks included)."""
        c = self.config
        rows = [seq for item in out.scheduled if item.sample for seq in (item.seq, *item.forks)]
        num_tokens = out.num_batched_tokens
        S = _bucket(self.seq_buckets, max(len(out.scheduled), len(rows), len(out.block_copies), 1))
        T = _bucket(self.token_buckets, max(num_tokens, S))
        penalties = any(seq.params.uses_penalties for seq in rows)

        input_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        num_slots = self.num_kv_blocks * c.block_size
        slot_mapping = np.full(T, num_slots, np.int32)
        block_tables = np.zeros((S, c.max_blocks_per_seq), np.int32)
        kv_lens = np.zeros(S, np.int32)
        cu_q_lens = np.zeros(S + 1, np.int32)
        logits_indices = np.zeros(S, np.int32)
        offset = 0
        row = 0
        for i, item in enumerate(out.scheduled):
            seq, n, start = item.seq, item.num_tokens, item.start
            end = start + n
            input_ids[offset:offset + n] = seq.token_ids[start:end]
            pos = np.arange(start, end)
            positions[offset:offset + n] = pos
            table = np.asarray(seq.block_table, np.int32)
            slot_mapping[offset:offset + n] = table[pos // c.block_size] * c.block_size + pos % c.block_size
            block_tables[i, :len(table)] = table
            kv_lens[i] = end
            offset += n
            cu_q_lens[i + 1] = offset
            if item.sample:
                for _ in (item.seq, *item.forks):
                    logits_indices[row] = offset - 1
                    row += 1
        cu_q_lens[len(out.scheduled) + 1:] = offset
        copy_src = np.zeros(S, np.int32)
        copy_dst = np.full(S, self.num_kv_blocks, np.int32)
        for i, (src, dst) in enumerate(out.block_copies):
            copy_src[i], copy_dst[i] = src, dst

        attn = AttentionMetadata(slot_mapping, block_tables, kv_lens, cu_q_lens,
                                 np.int32(len(out.scheduled)))
        inputs = StepInputs(input_ids, positions, attn, logits_indices, copy_src, copy_dst)
        sampling = self._sampling_metadata(rows, S, penalties)
        self.kv_caches, hidden = self._compiled(("forward", T, S))(self.params, self.kv_caches, inputs)
        result = self._compiled(("sample", S, penalties))(self.params, hidden, sampling)
        return self._rows(rows, jax.device_get(result))

    def _sampling_metadata(self, rows: list[Sequence], S: int, penalties: bool) -> SamplingMetadata:
        c = self.config
        temperature = np.zeros(S, np.float32)
        top_k = np.zeros(S, np.int32)
        top_p = np.ones(S, np.float32)
        min_p = np.zeros(S, np.float32)
        seeds = np.zeros(S, np.uint32)
        steps = np.zeros(S, np.int32)
        banned = np.full((S, self.num_banned), -1, np.int32)
        for r, seq in enumerate(rows):
            p = seq.params
            temperature[r], top_k[r], top_p[r], min_p[r] = p.temperature, p.top_k, p.top_p, p.min_p
            seeds[r] = seq.seed
            steps[r] = len(seq.output_token_ids)
            if len(seq.output_token_ids) < p.min_tokens:
                ids = list(self.model_config.eos_token_ids) + list(p.stop_token_ids)
                banned[r, :len(ids)] = ids
        pen = None
        if penalties:
            rep = np.ones(S, np.float32)
            pres = np.zeros(S, np.float32)
            freq = np.zeros(S, np.float32)
            history = np.full((S, c.max_model_len), -1, np.int32)
            prompt_lens = np.zeros(S, np.int32)
            for r, seq in enumerate(rows):
                p = seq.params
                if not p.uses_penalties:
                    continue
                rep[r], pres[r], freq[r] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
                ids = seq.token_ids
                history[r, :len(ids)] = ids
                prompt_lens[r] = seq.num_prompt_tokens
            pen = PenaltyMetadata(rep, pres, freq, history, prompt_lens)
        return SamplingMetadata(temperature, top_k, top_p, min_p, seeds, steps, banned, pen)

    def _rows(self, rows: list[Sequence], result: SamplerOutput) -> list[SampledRow]:
        out = []
        for r, seq in enumerate(rows):
            n = seq.params.logprobs
            top = []
            if n:
                top = list(zip(result.top_ids[r, :n].tolist(), result.top_logprobs[r, :n].tolist()))
            out.append(SampledRow(seq, int(result.tokens[r]), float(result.logprobs[r]), top))
        return out
