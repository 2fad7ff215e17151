"""Model runner: turns the scheduler's decision into flat device arrays and runs the compiled step.

All scheduled tokens of all sequences form one ragged batch, padded to one of a small fixed set
of bucket shapes (tokens T x sequences S), so every step function is compiled once, at start-up,
and never again while serving. A step is two compiled pure functions dispatched back to back
with no host sync between them: `forward_fn` (params, KV caches, inputs -> caches, hidden states
at the sampled rows), bucketed by (T, S), and `sample_fn` (params, hidden, sampling -> tokens),
bucketed by (S, penalties on/off). Splitting them keeps the compile count at |T x S| + 2|S|
instead of 2|T x S|. The caches are donated and updated in place; only sampled ids and logprobs
come back to the host.

Both run on a device mesh (sharding/; a mesh of one device by default) and are compiled with
explicit shardings: weights by the partition rules, KV caches over KV heads, inputs and outputs
replicated. With sequence_parallel > 1 a long prompt scheduled whole in one step is prefilled by
its own compiled function (`("ring", T, S)`) that uses ring attention over the sequence axis.
With several processes (multi-host) process 0 runs the scheduler and broadcasts each step's
inputs; the others run `follow()` and execute the same compiled functions in lockstep.
"""

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxserve.attention import AttentionMetadata, copy_blocks, resolve_backend
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.request import Sequence
from jaxserve.sampler import PenaltyMetadata, SamplerOutput, SamplingMetadata, sample
from jaxserve.scheduler import ScheduledSeq, SchedulerOutput
from jaxserve.swap import HostKVStore
from sharding import distributed
from sharding.mesh import (TOKEN_AXES, MeshShape, axis_size, constrain, make_mesh, replicated,
                           round_up)
from sharding.moe_dispatch import expert_load
from sharding.partition_rules import (kv_cache_spec, kv_heads_sharded, param_rules,
                                      param_shardings, vocab_sharded)

logger = logging.getLogger(__name__)

_KINDS = ("forward", "ring", "decode")  # the compiled forward functions, by their code in a step header


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


def forward_fn(graphdef, params, kv_caches, inputs: StepInputs, *, backend: str,
               mesh: Mesh | None = None, ring_prefill: bool = False):
    """Copy-on-write copies, then the model: -> (caches, hidden [S, D] at the sampled rows,
    tokens routed to each expert [num_layers, num_experts] int32, or None for a dense model)."""
    model = nnx.merge(graphdef, params)
    kv_caches = [copy_blocks(c, inputs.copy_src, inputs.copy_dst) for c in kv_caches]
    routing = []  # each MoE layer's expert ids [T, k]
    hidden, kv_caches = model(inputs.input_ids, inputs.positions, kv_caches, inputs.attn, backend,
                              mesh=mesh, ring_prefill=ring_prefill, routing=routing)
    load = None
    if routing:
        attn = inputs.attn
        valid = jnp.arange(inputs.input_ids.shape[0]) < attn.cu_q_lens[attn.num_seqs]
        load = jnp.stack([expert_load(ids, model.config.num_experts, valid) for ids in routing])
    return kv_caches, hidden[inputs.logits_indices], load


def sample_fn(graphdef, params, hidden, sampling: SamplingMetadata, *, max_logprobs: int,
              mesh: Mesh | None = None):
    """Logits only at the sampled rows, then sampling: -> SamplerOutput."""
    model = nnx.merge(graphdef, params)
    logits = model.compute_logits(hidden)
    if mesh is not None and vocab_sharded(model.config.vocab_size, mesh.shape["tensor"]):
        # Logits come out split over the vocabulary (as the lm_head is) and are gathered once,
        # here: sorting, top-k and argmax need them whole. Pinning both layouts keeps GSPMD from
        # gathering the [D, V] lm_head instead, which it otherwise prefers.
        logits = constrain(logits, mesh, PartitionSpec(None, "tensor"))
    logits = constrain(logits, mesh, PartitionSpec())
    return sample(logits, sampling, max_logprobs)


def kv_block_bytes(model: ModelConfig, block_size: int, dtype) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * jnp.dtype(dtype).itemsize


def _host(tree):
    """Device -> numpy for outputs replicated over the mesh: each process reads its own copy."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


class ModelRunner:
    def __init__(self, model: nnx.Module, config: EngineConfig, num_kv_blocks: int | None = None,
                 precompile: bool = True, progress: bool = True, mesh: Mesh | None = None):
        """mesh: the device mesh, built from config's *_parallel fields when None. The model's
        weights may already lie on it (checkpoint.load_model(mesh=...)); otherwise they are
        moved there here."""
        self.model_config: ModelConfig = model.config
        self.config = config
        m = self.model_config
        self.mesh = mesh if mesh is not None else make_mesh(MeshShape.of(config))
        self.graphdef, params = nnx.split(model)
        rules = param_rules(num_kv_heads=m.num_kv_heads, vocab_size=m.vocab_size,
                            tensor_parallel=self.mesh.shape["tensor"])
        self.param_shardings = param_shardings(params, rules, self.mesh)
        self.params = jax.device_put(params, self.param_shardings)  # a no-op when already there
        self.kv_sharding = NamedSharding(self.mesh, kv_cache_spec(
            num_kv_heads=m.num_kv_heads, tensor_parallel=self.mesh.shape["tensor"]))
        self.dtype = jnp.dtype(config.dtype)
        self.backend = resolve_backend(config.attention_backend)
        self.num_kv_blocks = num_kv_blocks or self._num_kv_blocks()
        shape = (self.num_kv_blocks, config.block_size, m.num_kv_heads, m.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=self.kv_sharding)
        self.kv_caches = [(zeros(), zeros()) for _ in range(m.num_layers)]  # (keys, values)
        self.host_kv = self._host_kv_store()  # None unless swapping or disaggregated
        # Every token bucket splits evenly over the token shards (data x sequence).
        token_shards = axis_size(self.mesh, TOKEN_AXES)
        self.token_buckets = sorted({round_up(t, token_shards)
                                     for t in bucket_sizes(16, config.max_num_batched_tokens)})
        self.seq_buckets = bucket_sizes(8, config.max_num_seqs)
        self.ring_buckets = self._ring_buckets()
        # Decode-only steps take the paged decode kernel: T = S, one compilation per seq bucket.
        # Only without token sharding, where every device holds all the step's rows.
        self.decode_buckets = (self.seq_buckets if self.backend == "pallas" and token_shards == 1
                               else [])
        self.num_banned = config.max_stop_token_ids + len(m.eos_token_ids)
        cache_shardings = [(self.kv_sharding, self.kv_sharding)] * m.num_layers
        repl = replicated(self.mesh)
        forward = functools.partial(forward_fn, self.graphdef, backend=self.backend, mesh=self.mesh)
        jit_forward = functools.partial(
            jax.jit, in_shardings=(self.param_shardings, cache_shardings, repl),
            out_shardings=(cache_shardings, repl, repl), donate_argnums=(1,))
        self._forward = jit_forward(forward)
        self._ring_forward = jit_forward(functools.partial(forward, ring_prefill=True))
        self._sample = jax.jit(functools.partial(sample_fn, self.graphdef, mesh=self.mesh,
                                                 max_logprobs=config.max_logprobs),
                               in_shardings=(self.param_shardings, repl, repl), out_shardings=repl)
        # ("forward" | "ring" | "decode", T, S) / ("sample", S, penalties)
        self.compiled: dict[tuple, object] = {}
        # Tokens routed to each expert [num_layers, num_experts]: the last step's and the total.
        self.last_expert_load: np.ndarray | None = None
        self.total_expert_load: np.ndarray | None = None
        if precompile:
            self.compile_all(progress)

    def _host_kv_store(self) -> HostKVStore | None:
        """Host memory for KV blocks: swapped-out ones (preemption_mode "swap"), ones received
        from a prefill engine (role "decode"); a prefill engine's store has no slots and only
        reads blocks out."""
        c = self.config
        role = c.disaggregation_role
        if c.preemption_mode != "swap" and role == "none":
            return None
        if jax.process_count() > 1:
            raise ValueError("EngineConfig.preemption_mode 'swap' and disaggregation run in one "
                             "process only; use 'recompute' for multi-host runs")
        num_slots = 0
        if c.preemption_mode == "swap" or role == "decode":
            per_block = kv_block_bytes(self.model_config, c.block_size, self.dtype)
            num_slots = int(c.swap_space_gib * (1 << 30)) // per_block
        if role == "decode" and num_slots < c.max_blocks_per_seq:
            raise ValueError(
                f"EngineConfig.swap_space_gib ({c.swap_space_gib}) holds {num_slots} KV blocks; a "
                f"decode engine needs at least max_blocks_per_seq ({c.max_blocks_per_seq}) to "
                "receive one full-length sequence")
        if num_slots == 0 and role != "prefill":
            return None
        return HostKVStore(num_slots, self.kv_caches, self.kv_sharding, c.max_blocks_per_seq)

    @property
    def num_swap_slots(self) -> int:
        return 0 if self.host_kv is None else self.host_kv.data.shape[0]

    def _ring_buckets(self) -> list[int]:
        """Prompt lengths (padded) that the ring-attention prefill is compiled for; none when
        sequence_parallel is 1 or the threshold exceeds the step's token budget."""
        c, sp = self.config, self.mesh.shape["sequence"]
        if sp == 1 or c.sequence_parallel_threshold > c.max_num_batched_tokens:
            return []
        multiple = math.lcm(2 * sp, axis_size(self.mesh, TOKEN_AXES))
        sizes = bucket_sizes(c.sequence_parallel_threshold, c.max_num_batched_tokens)
        return sorted({round_up(t, multiple) for t in sizes})

    def _ring_eligible(self, item: ScheduledSeq) -> bool:
        """A whole sequence from position 0 (no cached prefix), long enough, in one step."""
        n, window = item.num_tokens, self.model_config.sliding_window
        return (bool(self.ring_buckets) and item.start == 0 and n == item.seq.num_tokens
                and self.config.sequence_parallel_threshold <= n <= self.ring_buckets[-1]
                and (window is None or n <= window))

    def _num_kv_blocks(self) -> int:
        c = self.config
        per_block = kv_block_bytes(self.model_config, c.block_size, self.dtype)
        tp = self.mesh.shape["tensor"]
        # Each device holds its own KV heads only (all of them when they are replicated).
        per_device = per_block
        if kv_heads_sharded(self.model_config.num_kv_heads, tp):
            per_device //= tp
        # The mesh's own devices (another engine may fill others: disaggregation).
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        stats = [d.memory_stats() or {} for d in local]
        if all("bytes_limit" in st for st in stats):
            free = min(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)
            blocks = int(free * c.kv_cache_memory_fraction) // per_device
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
        keys += [("ring", t, self.seq_buckets[0]) for t in self.ring_buckets]
        keys += [("decode", s, s) for s in self.decode_buckets]
        keys += [("sample", s, p) for s in self.seq_buckets for p in (False, True)]
        for key in tqdm(keys, desc="compiling step buckets", disable=not progress):
            self._compiled(key)
        if self.host_kv is not None:
            self.host_kv.compile_all(self.kv_caches)

    def _compiled(self, key: tuple):
        if key not in self.compiled:
            # float32 means float32: no TF32 shortcuts in the matmuls on GPU.
            precision = "highest" if self.dtype == jnp.float32 else None
            with jax.default_matmul_precision(precision):
                self.compiled[key] = self._lower(key).compile()
        return self.compiled[key]

    def _lower(self, key: tuple):
        if key[0] in _KINDS:
            kind, T, S = key
            fn = self._ring_forward if kind == "ring" else self._forward
            return fn.lower(self.params, self.kv_caches,
                            self._dummy_inputs(T, S, decode_only=kind == "decode"))
        _, S, penalties = key
        hidden = jax.ShapeDtypeStruct((S, self.model_config.hidden_size), self.dtype)
        return self._sample.lower(self.params, hidden, self._dummy_sampling(S, penalties))

    def _dummy_inputs(self, T, S, decode_only: bool = False) -> StepInputs:
        zi = lambda *shape: np.zeros(shape, np.int32)
        attn = AttentionMetadata(zi(T), zi(S, self.config.max_blocks_per_seq), zi(S), zi(S + 1),
                                 np.int32(0), decode_only)
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
        """Runs one step; returns one row per sampled sequence (forks included). Swap copies
        (preemption_mode "swap") come first: out, then in.

        Whole long prompts (see `_ring_eligible`) run each as its own ring-attention prefill,
        after the rest of the step (which carries the copy-on-write copies) as one ragged batch.
        """
        if out.swap_out:  # before anything reuses the freed blocks
            self.host_kv.swap_out(self.kv_caches, out.swap_out)
        # Swap-ins fill only blocks just allocated to their sequences, never a copy-on-write
        # source (read by the step): such a block is still held by another sequence.
        if out.swap_in:
            for self.kv_caches in self.host_kv.swap_in(self.kv_caches, out.swap_in):
                pass
        ring = [item for item in out.scheduled if self._ring_eligible(item)]
        rest = [item for item in out.scheduled if not self._ring_eligible(item)]
        pending = []
        if rest or out.block_copies:
            pending.append(self._run(rest, out.block_copies, ring=False))
        pending += [self._run([item], [], ring=True) for item in ring]
        outputs = _host([(result, load) for _, result, load in pending])
        rows = []
        for (seqs, _, _), (result, _) in zip(pending, outputs):
            rows += self._rows(seqs, result)
        loads = [np.asarray(load, np.int64) for _, load in outputs if load is not None]
        if loads:
            self.last_expert_load = sum(loads)
            self.total_expert_load = self.last_expert_load + (
                0 if self.total_expert_load is None else self.total_expert_load)
        return rows

    def _run(self, items: list[ScheduledSeq], copies: list[tuple[int, int]], ring: bool):
        """Dispatches one batch (no host sync): -> (sampled sequences, SamplerOutput, load)."""
        seqs = [seq for item in items if item.sample for seq in (item.seq, *item.forks)]
        S = _bucket(self.seq_buckets, max(len(items), len(seqs), len(copies), 1))
        num_tokens = sum(item.num_tokens for item in items)
        decode = (not ring and bool(self.decode_buckets) and bool(items)
                  and all(item.num_tokens == 1 for item in items))
        if decode:
            kind, T = "decode", S
        else:
            kind = "ring" if ring else "forward"
            T = _bucket(self.ring_buckets if ring else self.token_buckets, max(num_tokens, S))
        penalties = any(seq.params.uses_penalties for seq in seqs)
        inputs = self._step_inputs(items, copies, T, S, decode_only=decode)
        sampling = self._sampling_metadata(seqs, S, penalties)
        if jax.process_count() > 1:  # the followers run the same step (see `follow`)
            distributed.send_step((_KINDS.index(kind), T, S, int(penalties)), (inputs, sampling))
        result, load = self._dispatch((kind, T, S), penalties, inputs, sampling)
        return seqs, result, load

    def _dispatch(self, key: tuple, penalties: bool, inputs: StepInputs,
                  sampling: SamplingMetadata):
        self.kv_caches, hidden, load = self._compiled(key)(self.params, self.kv_caches, inputs)
        result = self._compiled(("sample", key[2], penalties))(self.params, hidden, sampling)
        return result, load

    def follow(self) -> None:
        """On processes other than 0: run every step process 0 broadcasts, until it calls
        `release_followers`. The compiled functions' collectives keep the processes in step."""
        while (header := distributed.receive_step_header(4)) is not None:
            kind, T, S, penalties = _KINDS[header[0]], header[1], header[2], bool(header[3])
            inputs, sampling = distributed.receive_step(
                (self._dummy_inputs(T, S, decode_only=kind == "decode"),
                 self._dummy_sampling(S, penalties)))
            self._dispatch((kind, T, S), penalties, inputs, sampling)

    def release_followers(self) -> None:
        """On process 0 when serving ends: lets the other processes' `follow` return."""
        if jax.process_count() > 1:
            distributed.send_stop(4)

    def _step_inputs(self, items: list[ScheduledSeq], copies: list[tuple[int, int]], T: int,
                     S: int, decode_only: bool = False) -> StepInputs:
        c = self.config
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
        for i, item in enumerate(items):
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
        cu_q_lens[len(items) + 1:] = offset
        copy_src = np.zeros(S, np.int32)
        copy_dst = np.full(S, self.num_kv_blocks, np.int32)
        for i, (src, dst) in enumerate(copies):
            copy_src[i], copy_dst[i] = src, dst
        attn = AttentionMetadata(slot_mapping, block_tables, kv_lens, cu_q_lens,
                                 np.int32(len(items)), decode_only)
        return StepInputs(input_ids, positions, attn, logits_indices, copy_src, copy_dst)

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
