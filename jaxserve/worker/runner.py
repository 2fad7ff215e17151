"""Model runner: turns the scheduler's decision into device arrays and dispatches the compiled step.

All scheduled tokens of all sequences form one ragged batch, padded to one of a fixed set of
bucket shapes (tokens T x sequences S), so every step function is compiled once and reused. A
step is two compiled pure functions (jaxserve/worker/step_fn.py) dispatched back to back with no host
sync between them: the forward, bucketed by kind and (T, S), and the sampler, bucketed by S and
the `SamplerMode`; its tokens go into each row's slot of `last_tokens`. Decode-only steps take
T = S with fine S buckets (2, 4, 8, 16, ... as vLLM captures graphs); mixed steps coarse ones.
The caches, block tables and last tokens are donated and updated in place.

`execute` only dispatches: it returns a `StepHandle` whose results are copied to the host in the
background, and `collect` reads them, so the engine can prepare the next step meanwhile
(jaxserve/engine/engine.py). A token sampled by a step still in flight is the next step's input on the
device (`last_tokens[slot]`), never a host round trip. Arguments are flat lists of plain arrays
(the weights flattened once), so each call takes jit's C++ fast path.

Both run on a device mesh (sharding/; a mesh of one device by default) and are compiled with
explicit shardings: weights by the partition rules, KV caches over KV heads, everything else
replicated. With sequence_parallel > 1 a long prompt scheduled whole in one step is prefilled by
its own compiled function (`("ring", T, S)`) that uses ring attention over the sequence axis.
With several processes (multi-host) process 0 runs the scheduler and broadcasts every device
call it makes (`_call`); the others run `follow()` and make the same calls in lockstep.
"""

import collections
import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from jaxserve.worker.attention import resolve_backend
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.worker.input_batch import InputBatch
from jaxserve.sample.sampler import SamplerMode
from jaxserve.worker.step_results import SampledSeq, StepBatch, StepHandle
from jaxserve.core.scheduler import ScheduledSeq, SchedulerOutput
from jaxserve.worker.step_fn import copy_all, forward_fn, sample_fn, update_tables
from jaxserve.worker.step_inputs import build_sampling, build_step
from jaxserve.core.swap import HostKVStore
from sharding import distributed
from jaxserve.worker.buckets import (bucket_sizes, pick_bucket, pow2_between, pow2_bucket,
                                     pow2_upto, seq_bucket_sizes)
from sharding.mesh import TOKEN_AXES, MeshShape, axis_size, make_mesh, replicated, round_up
from sharding.partition_rules import kv_cache_spec, kv_heads_sharded, param_rules, param_shardings

logger = logging.getLogger(__name__)

_KINDS = ("forward", "ring", "decode")  # the compiled forward functions
# Device calls, by their code in a multi-host header: (op, a, b, c).
_OP_TABLE, _OP_COPY, _OP_FORWARD, _OP_SAMPLE = 1, 2, 3, 4
_HEADER_LEN = 4


def kv_block_bytes(model: ModelConfig, block_size: int, dtype) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * jnp.dtype(dtype).itemsize


def _to_host(tree):
    """Device -> numpy for outputs replicated over the mesh: each process reads its own copy."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _start_copy(tree) -> None:
    for leaf in jax.tree.leaves(tree):
        leaf.copy_to_host_async()


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
        shardings = param_shardings(params, rules, self.mesh)
        params = jax.device_put(params, shardings)  # a no-op when already there
        # Flattened once: every call then passes a flat list (jit's fast path), not nnx state.
        self.param_leaves, self.param_treedef = jax.tree.flatten(params)
        self.param_shardings = jax.tree.leaves(shardings)
        self.tied = m.tie_word_embeddings
        head = params["embed_tokens"]["embedding"] if self.tied else params["lm_head"]["kernel"]
        self.head = head[...]
        self.head_sharding = self.head.sharding
        self.kv_sharding = NamedSharding(self.mesh, kv_cache_spec(
            num_kv_heads=m.num_kv_heads, tensor_parallel=self.mesh.shape["tensor"]))
        self.dtype = jnp.dtype(config.dtype)
        self.backend = resolve_backend(config.attention_backend)
        self.num_kv_blocks = num_kv_blocks or self._num_kv_blocks()
        # One block more than the scheduler hands out: the scratch block that padding tokens
        # write into. An in-range target lets XLA update the cache in place even when a lone
        # token's scatter becomes a dynamic-update-slice (an out-of-range one made it copy).
        shape = (self.num_kv_blocks + 1, config.block_size, m.num_kv_heads, m.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=self.kv_sharding)
        self.kv_caches = [(zeros(), zeros()) for _ in range(m.num_layers)]  # (keys, values)
        self.host_kv = self._host_kv_store()  # None unless swapping or disaggregated
        repl = replicated(self.mesh)
        # The persistent batch: a slot per running sequence (jaxserve/worker/input_batch.py).
        self.num_banned = config.max_stop_token_ids + len(m.eos_token_ids)
        self.batch = InputBatch(config.max_num_seqs, config.max_blocks_per_seq, m.eos_token_ids,
                                self.num_banned)
        n = config.max_num_seqs + 1
        self.block_tables = jax.device_put(np.zeros((n, config.max_blocks_per_seq), np.int32), repl)
        self.last_tokens = jax.device_put(np.zeros(n, np.int32), repl)
        # Every token bucket splits evenly over the token shards (data x sequence).
        token_shards = axis_size(self.mesh, TOKEN_AXES)
        speculative = config.speculative_method != "none"
        token_sizes = set(bucket_sizes(16, config.max_num_batched_tokens))
        if speculative:  # verification steps of k + 1 tokens a sequence: every power of two
            token_sizes |= set(pow2_between(8, config.max_num_batched_tokens))
        self.token_buckets = sorted({round_up(t, token_shards) for t in token_sizes})
        # Speculating sequences sample k + 1 rows each: never more rows than tokens (and the
        # buckets do not depend on k).
        max_rows = config.max_num_batched_tokens if speculative else config.max_num_seqs
        self.seq_buckets = bucket_sizes(8, max_rows)
        if speculative:  # padding rows cost a row of logits each: finer
            self.seq_buckets = sorted(set(self.seq_buckets) | set(pow2_between(8, max_rows)))
        self.ring_buckets = self._ring_buckets()
        # Decode-only steps run T = S over fine buckets (the paged decode kernel under Pallas).
        # Only without token sharding, where every device holds all the step's rows.
        self.decode_buckets = seq_bucket_sizes(config.max_num_seqs) if token_shards == 1 else []
        cache_shardings = [(self.kv_sharding, self.kv_sharding)] * m.num_layers
        forward = functools.partial(forward_fn, self.graphdef, self.param_treedef,
                                    backend=self.backend, block_size=config.block_size,
                                    mesh=self.mesh)
        jit_forward = functools.partial(
            jax.jit, in_shardings=(self.param_shardings, cache_shardings, repl, repl, repl, repl),
            out_shardings=(cache_shardings, repl, repl, repl), donate_argnums=(1,))
        self._forward = {kind: jit_forward(functools.partial(
            forward, ring_prefill=kind == "ring", decode_only=kind == "decode" and self.backend == "pallas"))
            for kind in _KINDS}
        self._sample = {}  # SamplerMode -> jitted sample_fn
        self._sample_jit = functools.partial(
            jax.jit, in_shardings=(self.head_sharding, repl, repl, repl, repl, repl, repl),
            out_shardings=(repl, repl), donate_argnums=(3,))
        self._update = jax.jit(update_tables, in_shardings=(repl, repl, repl),
                               out_shardings=repl, donate_argnums=(0,))
        self._copy = jax.jit(copy_all, in_shardings=(cache_shardings, repl, repl),
                             out_shardings=cache_shardings, donate_argnums=(0,))
        self._forward_out = None  # (hidden, last_input, load) between a forward and its sample
        self.kind_counts: collections.Counter = collections.Counter()  # batches run, by kind
        self.record: list | None = None  # when a list: each device call is appended (benchmarks)
        # ("forward" | "ring" | "decode", T, S) / ("sample", S, mode) / ("table" | "copy", n)
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

    @property
    def sample_buckets(self) -> list[int]:
        return sorted(set(self.seq_buckets) | set(self.decode_buckets))

    def compile_all(self, progress: bool = True) -> None:
        """Compiles every step bucket, sampler variant and copy size before serving starts."""
        keys = [("forward", t, s) for t, s in self.buckets]
        keys += [("ring", t, self.seq_buckets[0]) for t in self.ring_buckets]
        keys += [("decode", s, s) for s in self.decode_buckets]
        num_modes = 16 if self.config.speculative_method != "none" else 8
        keys += [("sample", s, _mode_of(bits)) for s in self.sample_buckets
                 for bits in range(num_modes) if _mode_of(bits).random or not bits & 8]
        keys += [("table", n) for n in pow2_upto(self.block_tables.size)]
        keys += [("copy", n) for n in pow2_upto(self.config.max_num_seqs)]
        for key in tqdm(keys, desc="compiling step buckets", disable=not progress):
            self._compiled(key)
        if self.host_kv is not None:
            self.host_kv.compile_all(self.kv_caches)

    def _compiled(self, key: tuple):
        if key not in self.compiled:
            # float32 means float32: no TF32 shortcuts in the matmuls on GPU.
            precision = "highest" if self.dtype == jnp.float32 else None
            t0 = time.perf_counter()
            with jax.default_matmul_precision(precision):
                self.compiled[key] = self._lower(key).compile()
            logger.debug("compiled %s in %.2f s", key, time.perf_counter() - t0)
        return self.compiled[key]

    def _lower(self, key: tuple):
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
        f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        if key[0] in _KINDS:
            kind, T, S = key
            return self._forward[kind].lower(self.param_leaves, self.kv_caches, self.block_tables,
                                             self.last_tokens, i32(3, T), i32(4, S + 1))
        if key[0] == "sample":
            _, S, mode = key
            if mode not in self._sample:
                self._sample[mode] = self._sample_jit(functools.partial(
                    sample_fn, mode=mode, max_logprobs=self.config.max_logprobs, tied=self.tied,
                    mesh=self.mesh))
            pen = (f32(3, S), i32(S, self.config.max_model_len), i32(S)) if mode.penalties else None
            hidden = jax.ShapeDtypeStruct((S, self.model_config.hidden_size), self.dtype)
            return self._sample[mode].lower(self.head, hidden, i32(S), self.last_tokens,
                                            i32(5 + self.num_banned, S), f32(3, S), pen)
        kind, n = key
        if kind == "table":
            return self._update.lower(self.block_tables, i32(n), i32(n))
        return self._copy.lower(self.kv_caches, i32(n), i32(n))

    # ----- one step ----------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> StepHandle:
        """Dispatches one step and returns without waiting for it. Swap copies (preemption_mode
        "swap") come first: out, then in.

        Whole long prompts (see `_ring_eligible`) run each as its own ring-attention prefill,
        after the rest of the step as one ragged batch.
        """
        t0 = time.perf_counter()
        if out.swap_out:  # before anything reuses the freed blocks
            self.host_kv.swap_out(self.kv_caches, out.swap_out)
        # Swap-ins fill only blocks just allocated to their sequences, never a copy-on-write
        # source (read by the step): such a block is still held by another sequence.
        if out.swap_in:
            for self.kv_caches in self.host_kv.swap_in(self.kv_caches, out.swap_in):
                pass
        # The engine has released the slots of out.preempted (also when a step ends up empty).
        for item in out.scheduled:
            for seq in (item.seq, *item.forks):
                self.batch.assign(seq)
                self.batch.sync_block_table(seq)
        idx, vals = self.batch.take_table_updates()
        if len(idx):
            self._table_updates(idx, vals)
        if out.block_copies:
            src, dst = np.array(out.block_copies, np.int32).T
            self._block_copies(src, dst)
        ring = [item for item in out.scheduled if self._ring_eligible(item)]
        rest = [item for item in out.scheduled if not self._ring_eligible(item)]
        # Forks add rows beside speculating sequences' k + 1: split so no batch outgrows S.
        batches = [self._run(group, ring=False) for group in _by_rows(rest, self.seq_buckets[-1])]
        batches += [self._run([item], ring=True) for item in ring]
        for batch in batches:
            _start_copy((batch.result, batch.load))
        return StepHandle(batches, time.perf_counter() - t0)

    def collect(self, handle: StepHandle) -> list[SampledSeq]:
        """Waits for a dispatched step; one entry per sampled sequence (forks included), a
        speculating one's cut at its first rejected proposal (jaxserve/speculative/spec_decode.py)."""
        out, loads = [], []
        for batch in handle.batches:
            out += batch.read(_to_host(batch.result))
            if batch.load is not None:
                loads.append(np.asarray(_to_host(batch.load), np.int64))
        if loads:
            self.last_expert_load = sum(loads)
            self.total_expert_load = self.last_expert_load + (
                0 if self.total_expert_load is None else self.total_expert_load)
        return out

    def _run(self, items: list[ScheduledSeq], ring: bool) -> StepBatch:
        """Dispatches one batch; its results stay on the device."""
        num_rows = sum(map(_num_rows, items))
        num_tokens = sum(item.num_tokens for item in items)
        decode = (not ring and bool(self.decode_buckets)
                  and all(item.num_tokens == 1 for item in items))
        if decode:
            S = pick_bucket(self.decode_buckets, max(len(items), num_rows))
            kind, T = "decode", S
        else:
            S = pick_bucket(self.seq_buckets, max(len(items), num_rows, 1))
            kind = "ring" if ring else "forward"
            T = pick_bucket(self.ring_buckets if ring else self.token_buckets, max(num_tokens, S))
        self.kind_counts[kind] += 1
        step = build_step(items, self.batch, T, S)
        sampling = build_sampling(step.rows, self.batch, S, self.config.max_model_len,
                                  step.row_offsets, step.drafts)
        self._call((_OP_FORWARD, _KINDS.index(kind), T, S), (step.token_data, step.seq_data))
        result, load = self._call((_OP_SAMPLE, S, _mode_bits(sampling.mode), 0),
                                  (sampling.row_i32, sampling.row_f32, sampling.penalties))
        return StepBatch(step.rows, step.drafts.tolist(), (step.row_offsets == 0).tolist(),
                         result, load)

    def _table_updates(self, idx: np.ndarray, vals: np.ndarray) -> None:
        n = pow2_bucket(len(idx))
        pad_idx = np.full(n, self.block_tables.size, np.int32)  # out of range: dropped
        pad_idx[:len(idx)] = idx
        pad_vals = np.zeros(n, np.int32)
        pad_vals[:len(vals)] = vals
        self._call((_OP_TABLE, n, 0, 0), (pad_idx, pad_vals))

    def _block_copies(self, src: np.ndarray, dst: np.ndarray) -> None:
        n = pow2_bucket(len(src))
        pad_src = np.zeros(n, np.int32)
        pad_src[:len(src)] = src
        pad_dst = np.full(n, self.num_kv_blocks, np.int32)  # out of range: no copy
        pad_dst[:len(dst)] = dst
        self._call((_OP_COPY, n, 0, 0), (pad_src, pad_dst))

    # ----- device calls, mirrored on the followers of a multi-host run --------------------------
    def _call(self, header: tuple[int, ...], arrays):
        """Runs one device call; process 0 of a multi-host run first sends it to the others."""
        if jax.process_count() > 1:
            distributed.send_step(header, arrays)
        if self.record is not None:
            self.record.append((header, arrays))
        return self._apply(header, arrays)

    def replay(self, calls: list, n: int) -> float:
        """Seconds per replay of recorded device calls (`record`), n times back to back with
        nothing else on the host: the device-only time of the step they made. Benchmarks only:
        it rewrites the cache slots the step wrote."""
        for header, arrays in calls:
            self._apply(header, arrays)
        jax.block_until_ready((self.last_tokens, self.kv_caches))
        t0 = time.perf_counter()
        for _ in range(n):
            for header, arrays in calls:
                self._apply(header, arrays)
        jax.block_until_ready((self.last_tokens, self.kv_caches))
        return (time.perf_counter() - t0) / n

    def _apply(self, header: tuple[int, ...], arrays):
        op, a, b, c = header
        if op == _OP_TABLE:
            self.block_tables = self._compiled(("table", a))(self.block_tables, *arrays)
        elif op == _OP_COPY:
            self.kv_caches = self._compiled(("copy", a))(self.kv_caches, *arrays)
        elif op == _OP_FORWARD:
            key = (_KINDS[a], b, c)
            self.kv_caches, hidden, last_input, load = self._compiled(key)(
                self.param_leaves, self.kv_caches, self.block_tables, self.last_tokens, *arrays)
            self._forward_out = (hidden, last_input, load)
        else:
            hidden, last_input, load = self._forward_out
            result, self.last_tokens = self._compiled(("sample", a, _mode_of(b)))(
                self.head, hidden, last_input, self.last_tokens, *arrays)
            return result, load
        return None

    def _template(self, header: tuple[int, ...]):
        """Zeros shaped like the arrays of a device call (what a follower receives)."""
        op, a, b, c = header
        zi = lambda *shape: np.zeros(shape, np.int32)
        if op in (_OP_TABLE, _OP_COPY):
            return zi(a), zi(a)
        if op == _OP_FORWARD:
            return zi(3, b), zi(4, c + 1)
        S, mode = a, _mode_of(b)
        pen = None
        if mode.penalties:
            pen = (np.zeros((3, S), np.float32), zi(S, self.config.max_model_len), zi(S))
        return zi(5 + self.num_banned, S), np.zeros((3, S), np.float32), pen

    def follow(self) -> None:
        """On processes other than 0: make every device call process 0 broadcasts, until it
        calls `release_followers`. The compiled functions' collectives keep them in step."""
        while (header := distributed.receive_step_header(_HEADER_LEN)) is not None:
            self._apply(header, distributed.receive_step(self._template(header)))

    def release_followers(self) -> None:
        """On process 0 when serving ends: lets the other processes' `follow` return."""
        if jax.process_count() > 1:
            distributed.send_stop(_HEADER_LEN)


def _num_rows(item: ScheduledSeq) -> int:
    return len(item.spec_tokens) + 1 + len(item.forks) if item.sample else 0


def _by_rows(items: list[ScheduledSeq], max_rows: int) -> list[list[ScheduledSeq]]:
    """Consecutive groups of items, each sampling at most max_rows rows."""
    groups, rows = [], 0
    for item in items:
        if not groups or rows + _num_rows(item) > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(item)
        rows += _num_rows(item)
    return groups


def _mode_bits(mode: SamplerMode) -> int:
    return (int(mode.random) | int(mode.logprobs) << 1 | int(mode.penalties) << 2
            | int(mode.spec) << 3)


def _mode_of(bits: int) -> SamplerMode:
    return SamplerMode(random=bool(bits & 1), logprobs=bool(bits & 2), penalties=bool(bits & 4),
                       spec=bool(bits & 8))
