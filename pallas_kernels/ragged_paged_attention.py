"""Ragged paged attention: one call over a mixed batch of prefill chunks and decode tokens.

The query tokens of all sequences are packed into one flat array; sequence `s` owns
`q[cu_q_lens[s]:cu_q_lens[s + 1]]`. Its keys and values live in the paged cache, in the pages
listed by `block_tables[s]`, and there are `kv_lens[s]` of them after this step's writes (cached
context plus the new tokens). Query token `i` of a chunk of `q_len` tokens sits at position
`kv_lens[s] - q_len + i`, so a decode token and a prefill chunk take the same path.

The kernel runs over a static grid of query blocks (x KV heads on GPU). A query block holds
`tokens_per_block` consecutive tokens of one sequence times the query heads sharing one KV head,
so the pages it reads serve every head of the group. Which sequence and which tokens each block
holds is a small schedule computed in jnp before the call (`_schedule`); the queries are
gathered into that blocked layout and the outputs gathered back, so no block ever writes rows of
another sequence. A block walks only the pages up to its last token (causal) and from its first
token's window start (sliding window).

Layers: kernels (Triton, Mosaic TPU) -> schedule, grids and BlockSpecs -> public jitted
`ragged_paged_attention` (shape checks, dispatch) -> `ragged_paged_attention_reference`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend
from pallas_kernels.online_softmax import finalize
from pallas_kernels.page_walk import TpuPageBuffers, walk_pages_tpu, walk_pages_triton
from pallas_kernels.paged_kv import (check_int_array, check_paged_kv, check_query, check_static,
                                     kv_block_range)


@dataclasses.dataclass(frozen=True)
class RaggedBlockSizes:
    block_q: int  # query rows per program: tokens_per_block x padded group
    block_kv: int  # keys per compute block, a whole number of pages
    num_warps: int  # Triton only
    num_stages: int  # Triton only


# Tuned block sizes, keyed by (lowering, head_dim). The Triton head_dim 128 row was picked by
# `tools/benchmark_attention.py --autotune` on an H100 (docs/BENCHMARKS.md); the other head dims
# and the TPU row are starting points, checked for correctness, not timed. f32 inputs halve
# block_kv to fit shared memory (backend.fit_triton_block_kv).
TUNED_BLOCK_SIZES = {
    ("triton", 64): RaggedBlockSizes(block_q=128, block_kv=128, num_warps=8, num_stages=2),
    ("triton", 128): RaggedBlockSizes(block_q=128, block_kv=128, num_warps=8, num_stages=2),
    ("triton", 256): RaggedBlockSizes(block_q=64, block_kv=32, num_warps=8, num_stages=2),
    ("mosaic_tpu", None): RaggedBlockSizes(block_q=128, block_kv=128, num_warps=0, num_stages=0),
}


def tuned_block_sizes(lowering: str, head_dim: int) -> RaggedBlockSizes:
    key = (lowering, head_dim) if (lowering, head_dim) in TUNED_BLOCK_SIZES else (lowering, None)
    return TUNED_BLOCK_SIZES.get(key, TUNED_BLOCK_SIZES[("triton", 128)])


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

def _block_rows(q_first, q_len, kv_len, *, rows, group_rows, tokens_per_block, sliding_window):
    """Positions of a query block's rows, the keys [kv_lo, kv_hi) the block needs, and the keys
    [full_lo, full_hi) that every valid row sees.

    Row r holds token q_first + r // group_rows of the sequence. Returns (pos [rows, 1],
    row_valid [rows, 1], kv_lo, kv_hi, full_lo, full_hi)."""
    token = q_first + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group_rows
    row_valid = token < q_len
    pos = kv_len - q_len + token
    num_tokens = jnp.clip(q_len - q_first, 0, tokens_per_block)
    first_pos = kv_len - q_len + q_first
    kv_hi = jnp.where(num_tokens > 0, first_pos + num_tokens, 0)
    kv_lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    full_lo = 0 if sliding_window is None else kv_hi - sliding_window  # last row's window
    full_hi = first_pos + 1  # the first row's causal edge
    return pos, row_valid, kv_lo, jnp.maximum(kv_hi, 0), full_lo, full_hi


def _ragged_mask(pos, row_valid, sliding_window):
    def mask_fn(kv_pos):  # [1, keys] -> [rows, keys]
        mask = row_valid & (kv_pos <= pos)
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        return mask
    return mask_fn


def _ragged_kernel_triton(
    kv_lens_ref,  # [max_num_seqs] int32
    q_lens_ref,  # [max_num_seqs] int32 (0 for padding sequences)
    block_tables_ref,  # [max_num_seqs, max_blocks_per_seq] int32
    block_seq_ref,  # [num_q_blocks] int32: sequence of each query block
    block_q_first_ref,  # [num_q_blocks] int32: its first token, counted within the sequence
    q_ref,  # [rows, D] (query block, kv head)
    k_pages_ref,  # [num_blocks, block_size, D]: one kv head
    v_pages_ref,  # [num_blocks, block_size, D]
    *refs,  # k_scales_ref, v_scales_ref ([num_blocks] f32) when quantized; then o_ref [rows, D]
    sm_scale, soft_cap, sliding_window, group_rows, tokens_per_block, pages_per_block, num_q_blocks,
    quantized,
):
    k_scales_ref, v_scales_ref, o_ref = refs if quantized else (None, None, *refs)
    # Programs run in reverse block order: a sequence's last query blocks walk the most keys,
    # and starting the longest work first shortens the tail of the launch.
    block = num_q_blocks - 1 - pl.program_id(0)
    seq = block_seq_ref[block]
    q_first = block_q_first_ref[block]
    kv_len, q_len = kv_lens_ref[seq], q_lens_ref[seq]
    rows = q_ref.shape[0]
    pos, row_valid, kv_lo, kv_hi, full_lo, full_hi = _block_rows(
        q_first, q_len, kv_len, rows=rows, group_rows=group_rows,
        tokens_per_block=tokens_per_block, sliding_window=sliding_window)
    start, num_blocks = kv_block_range(kv_lo, kv_hi, block_size=k_pages_ref.shape[1],
                                       pages_per_block=pages_per_block)
    m, l, acc = walk_pages_triton(
        q_ref[...], _ragged_mask(pos, row_valid, sliding_window), seq=seq, kv_len=kv_len,
        start_entry=start, num_blocks=num_blocks, full_lo=full_lo, full_hi=full_hi,
        block_tables_ref=block_tables_ref,
        k_pages_ref=k_pages_ref, v_pages_ref=v_pages_ref, k_scales_ref=k_scales_ref,
        v_scales_ref=v_scales_ref, pages_per_block=pages_per_block, sm_scale=sm_scale,
        soft_cap=soft_cap)
    o_ref[...] = finalize(m, l, acc)[0].astype(o_ref.dtype)


def _ragged_kernel_tpu(
    kv_lens_ref,  # SMEM [max_num_seqs] int32 (scalar prefetch, as are the next four)
    q_lens_ref,  # SMEM [max_num_seqs] int32
    block_tables_ref,  # SMEM [max_num_seqs * max_blocks_per_seq] int32
    block_seq_ref,  # SMEM [num_q_blocks] int32
    block_q_first_ref,  # SMEM [num_q_blocks] int32
    q_ref,  # VMEM [num_kv_heads, rows, D] (query block)
    k_hbm_ref,  # HBM [num_blocks, block_size * num_kv_heads, D]
    v_hbm_ref,  # HBM [num_blocks, block_size * num_kv_heads, D]
    *refs,  # k/v scales in HBM [num_blocks, num_kv_heads] when quantized; then o_ref
    # [num_kv_heads, rows, D] (query block); then scratch
    sm_scale, soft_cap, sliding_window, group_rows, tokens_per_block, block_size, pages_per_block,
    table_width, quantized,
):
    if quantized:
        k_scales_ref, v_scales_ref, o_ref, *scratch = refs
    else:
        k_scales_ref = v_scales_ref = None
        o_ref, *scratch = refs
    block = pl.program_id(0)
    seq = block_seq_ref[block]
    q_first = block_q_first_ref[block]
    kv_len, q_len = kv_lens_ref[seq], q_lens_ref[seq]
    rows = q_ref.shape[1]
    pos, row_valid, kv_lo, kv_hi, _, _ = _block_rows(
        q_first, q_len, kv_len, rows=rows, group_rows=group_rows,
        tokens_per_block=tokens_per_block, sliding_window=sliding_window)
    start, num_blocks = kv_block_range(kv_lo, kv_hi, block_size=block_size,
                                       pages_per_block=pages_per_block)
    m_ref, l_ref, acc_ref = walk_pages_tpu(
        q_ref, _ragged_mask(pos, row_valid, sliding_window), seq=seq, kv_len=kv_len,
        start_entry=start, num_blocks=num_blocks, table_width=table_width,
        block_tables_ref=block_tables_ref, k_hbm_ref=k_hbm_ref, v_hbm_ref=v_hbm_ref,
        k_scales_hbm_ref=k_scales_ref, v_scales_hbm_ref=v_scales_ref, scratch=scratch,
        block_size=block_size, pages_per_block=pages_per_block, sm_scale=sm_scale,
        soft_cap=soft_cap)
    for h in range(q_ref.shape[0]):
        o_ref[h] = finalize(m_ref[h], l_ref[h], acc_ref[h])[0].astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Schedule, grids and BlockSpecs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _RaggedPlan:
    group_rows: int  # query heads per kv head, padded to a power of two
    tokens_per_block: int
    pages_per_block: int
    num_q_blocks: int  # static upper bound on the query blocks any batch of this shape needs

    @property
    def rows(self) -> int:
        return self.group_rows * self.tokens_per_block


def _plan(target: backend.KernelTarget, *, num_tokens: int, max_num_seqs: int, group: int,
          block_size: int, sizes: RaggedBlockSizes) -> _RaggedPlan:
    group_rows = pl.next_power_of_2(group)
    min_rows = 16 if target.lowering == "triton" else 8  # Triton dots need >= 16 rows
    rows = max(sizes.block_q, group_rows, min_rows)
    tokens_per_block = max(1, rows // group_rows)
    # Each sequence with tokens adds at most one partly filled block.
    num_q_blocks = pl.cdiv(num_tokens, tokens_per_block) + min(max_num_seqs, num_tokens)
    return _RaggedPlan(group_rows=group_rows, tokens_per_block=tokens_per_block,
                       pages_per_block=max(1, sizes.block_kv // block_size),
                       num_q_blocks=num_q_blocks)


@dataclasses.dataclass(frozen=True)
class _Schedule:
    q_lens: jax.Array  # [max_num_seqs] int32, 0 for padding sequences
    cu_blocks: jax.Array  # [max_num_seqs + 1] int32: first query block of each sequence
    block_seq: jax.Array  # [num_q_blocks] int32
    block_q_first: jax.Array  # [num_q_blocks] int32; past q_len for unused blocks


def _schedule(cu_q_lens, num_seqs, plan: _RaggedPlan) -> _Schedule:
    max_num_seqs = cu_q_lens.shape[0] - 1
    seq_ids = jnp.arange(max_num_seqs, dtype=jnp.int32)
    q_lens = jnp.where(seq_ids < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    blocks_per_seq = pl.cdiv(q_lens, plan.tokens_per_block)
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                 jnp.cumsum(blocks_per_seq, dtype=jnp.int32)])
    block = jnp.arange(plan.num_q_blocks, dtype=jnp.int32)
    block_seq = jnp.searchsorted(cu_blocks[1:], block, side="right").astype(jnp.int32)
    block_seq = jnp.minimum(block_seq, max_num_seqs - 1)
    block_q_first = (block - cu_blocks[block_seq]) * plan.tokens_per_block
    # Unused blocks start past their sequence's end: no valid rows, no pages walked.
    block_q_first = jnp.where(block < cu_blocks[-1], block_q_first, q_lens[block_seq])
    return _Schedule(q_lens, cu_blocks, block_seq, block_q_first)


def _to_blocks(q, cu_q_lens, sched: _Schedule, plan: _RaggedPlan, num_kv_heads: int):
    """[num_tokens, num_q_heads, D] -> [num_q_blocks, num_kv_heads, rows, D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    q = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, plan.group_rows - group), (0, 0)))
    t = jnp.arange(plan.tokens_per_block, dtype=jnp.int32)
    src = cu_q_lens[sched.block_seq][:, None] + sched.block_q_first[:, None] + t[None, :]
    blocks = q[jnp.clip(src, 0, num_tokens - 1)]  # [blocks, tokens, kv_heads, group_rows, D]
    blocks = blocks.transpose(0, 2, 1, 3, 4)
    return blocks.reshape(plan.num_q_blocks, num_kv_heads, plan.rows, head_dim)


def _from_blocks(out, cu_q_lens, num_seqs, sched: _Schedule, plan: _RaggedPlan,
                 num_tokens: int, num_q_heads: int):
    """[num_q_blocks, num_kv_heads, rows, D] -> [num_tokens, num_q_heads, D]; padding tokens 0."""
    num_q_blocks, num_kv_heads, _, head_dim = out.shape
    max_num_seqs = cu_q_lens.shape[0] - 1
    out = out.reshape(num_q_blocks, num_kv_heads, plan.tokens_per_block, plan.group_rows, head_dim)
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), max_num_seqs - 1)
    within = token - cu_q_lens[seq]
    block = jnp.clip(sched.cu_blocks[seq] + within // plan.tokens_per_block, 0, num_q_blocks - 1)
    out = out[block, :, within % plan.tokens_per_block]  # [tokens, kv_heads, group_rows, D]
    group = num_q_heads // num_kv_heads
    out = out[:, :, :group].reshape(num_tokens, num_q_heads, head_dim)
    valid = token < cu_q_lens[num_seqs]
    return jnp.where(valid[:, None, None], out, 0)


def _ragged_triton(q_blocks, k_pages, v_pages, kv_lens, block_tables, sched, k_scales, v_scales,
                   *, plan, sizes, sm_scale, soft_cap, sliding_window, interpret):
    num_q_blocks, num_kv_heads, rows, head_dim = q_blocks.shape
    num_blocks, block_size, _, _ = k_pages.shape
    quantized = k_scales is not None
    kernel = functools.partial(  # a fresh partial per grid: see KERNELS.md on num_programs
        _ragged_kernel_triton, sm_scale=sm_scale, soft_cap=soft_cap,
        sliding_window=sliding_window, group_rows=plan.group_rows,
        tokens_per_block=plan.tokens_per_block, pages_per_block=plan.pages_per_block,
        num_q_blocks=num_q_blocks, quantized=quantized)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    page_spec = pl.BlockSpec((num_blocks, block_size, None, head_dim), lambda i, h: (0, 0, h, 0))
    block_spec = pl.BlockSpec((None, None, rows, head_dim),
                              lambda i, h: (num_q_blocks - 1 - i, h, 0, 0))
    small = [kv_lens, sched.q_lens, block_tables, sched.block_seq, sched.block_q_first]
    in_specs = [whole(x.shape) for x in small] + [block_spec, page_spec, page_spec]
    args = small + [q_blocks, k_pages, v_pages]
    if quantized:
        scale_spec = pl.BlockSpec((num_blocks, None), lambda i, h: (0, h))
        in_specs += [scale_spec, scale_spec]
        args += [k_scales, v_scales]
    return pl.pallas_call(
        kernel,
        grid=(num_q_blocks, num_kv_heads),
        in_specs=in_specs,
        out_specs=block_spec,
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q_blocks.dtype),
        compiler_params=backend.triton_compiler_params(sizes.num_warps, sizes.num_stages),
        interpret=interpret,
        name="ragged_paged_attention_triton",
    )(*args)


def _ragged_tpu(q_blocks, k_pages, v_pages, kv_lens, block_tables, sched, k_scales, v_scales,
                *, plan, sizes, sm_scale, soft_cap, sliding_window, interpret):
    del sizes
    num_q_blocks, num_kv_heads, rows, head_dim = q_blocks.shape
    num_blocks, block_size, _, _ = k_pages.shape
    quantized = k_scales is not None
    kernel = functools.partial(
        _ragged_kernel_tpu, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        group_rows=plan.group_rows, tokens_per_block=plan.tokens_per_block,
        block_size=block_size, pages_per_block=plan.pages_per_block,
        table_width=block_tables.shape[1], quantized=quantized)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    block_spec = pl.BlockSpec((None, num_kv_heads, rows, head_dim), lambda i, *_: (i, 0, 0, 0))
    # A page [block_size, kv_heads, D] is one contiguous DMA as [block_size * kv_heads, D].
    page_rows = block_size * num_kv_heads
    args = [q_blocks, k_pages.reshape(num_blocks, page_rows, head_dim),
            v_pages.reshape(num_blocks, page_rows, head_dim)]
    if quantized:
        args += [k_scales, v_scales]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(num_q_blocks,),
        in_specs=[block_spec, hbm, hbm] + [hbm, hbm] * quantized,
        out_specs=block_spec,
        scratch_shapes=TpuPageBuffers.shapes(
            rows=rows, num_kv_heads=num_kv_heads, block_size=block_size, head_dim=head_dim,
            pages_per_block=plan.pages_per_block, kv_dtype=k_pages.dtype, quantized=quantized),
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q_blocks.dtype),
        compiler_params=backend.tpu_compiler_params(("parallel",)),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(kv_lens, sched.q_lens, block_tables.reshape(-1), sched.block_seq, sched.block_q_first,
      *args)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _check_ragged_args(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                       k_scales, v_scales, sm_scale, sliding_window, soft_cap):
    kv = check_paged_kv(k_pages, v_pages, k_scales, v_scales)
    check_query("q", q, kv, leading="num_tokens")
    if kv_lens.ndim != 1 or kv_lens.shape[0] < 1:
        raise ValueError(f"kv_lens must have shape [max_num_seqs], got {tuple(kv_lens.shape)}")
    max_num_seqs = kv_lens.shape[0]
    if block_tables.ndim != 2 or block_tables.shape[0] != max_num_seqs:
        raise ValueError(f"block_tables must have shape [max_num_seqs={max_num_seqs}, "
                         f"max_blocks_per_seq], got {tuple(block_tables.shape)}")
    check_int_array("kv_lens", kv_lens, (max_num_seqs,), f"[max_num_seqs={max_num_seqs}]")
    check_int_array("block_tables", block_tables, tuple(block_tables.shape), "")
    check_int_array("cu_q_lens", cu_q_lens, (max_num_seqs + 1,),
                    f"[max_num_seqs + 1 = {max_num_seqs + 1}]")
    check_int_array("num_seqs", jnp.asarray(num_seqs), (), "[] (a scalar)")
    check_static("sm_scale", sm_scale)
    check_static("sliding_window", sliding_window)
    check_static("soft_cap", soft_cap)
    return kv


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "implementation", "block_q", "block_kv",
    "num_warps", "num_stages", "lowering", "interpret"))
def ragged_paged_attention(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # [max_num_seqs] int32
    block_tables: jax.Array,  # [max_num_seqs, max_blocks_per_seq] int32
    cu_q_lens: jax.Array,  # [max_num_seqs + 1] int32
    num_seqs: jax.Array,  # [] int32: sequences at and after this index are padding
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,  # [num_blocks, num_kv_heads] f32 when pages are quantized
    v_scales: jax.Array | None = None,
    implementation: str = "auto",
    block_q: int | None = None,
    block_kv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    lowering: str | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim], q's dtype
    """Ragged paged attention with the semantics of `ragged_paged_attention_reference`.

    implementation: "auto" (Pallas on GPU/TPU, the reference on CPU), "pallas" or "reference".
    block_q (query rows per program: tokens x padded GQA group), block_kv (keys per compute
    block), num_warps and num_stages override the tuned block sizes; lowering ("triton" |
    "mosaic_tpu") and interpret override the platform's choice (tests use them).
    """
    kv = _check_ragged_args(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                            k_scales, v_scales, sm_scale, sliding_window, soft_cap)
    if backend.resolve_implementation(implementation) == "reference":
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, k_scales=k_scales,
            v_scales=v_scales)
    target = backend.kernel_target(lowering, interpret)
    if target.lowering == "triton" and kv.block_size & (kv.block_size - 1):
        raise ValueError(f"k_pages block_size must be a power of two for the Triton kernel, "
                         f"got {kv.block_size}")
    sizes = tuned_block_sizes(target.lowering, kv.head_dim)
    sizes = dataclasses.replace(
        sizes, block_q=block_q or sizes.block_q, num_warps=num_warps or sizes.num_warps,
        num_stages=num_stages or sizes.num_stages)
    num_tokens, num_q_heads, head_dim = q.shape
    if block_kv is None and target.lowering == "triton":
        block_kv = backend.fit_triton_block_kv(
            sizes.block_kv, rows=sizes.block_q, head_dim=head_dim, itemsize=q.dtype.itemsize,
            num_stages=sizes.num_stages)
    sizes = dataclasses.replace(sizes, block_kv=block_kv or sizes.block_kv)
    max_num_seqs = kv_lens.shape[0]
    if num_tokens == 0:
        return q
    plan = _plan(target, num_tokens=num_tokens, max_num_seqs=max_num_seqs,
                 group=num_q_heads // kv.num_kv_heads, block_size=kv.block_size, sizes=sizes)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_seqs = jnp.asarray(num_seqs, jnp.int32)
    sched = _schedule(cu_q_lens, num_seqs, plan)
    tables = block_tables.astype(jnp.int32)
    q_blocks = _to_blocks(q, cu_q_lens, sched, plan, kv.num_kv_heads)
    build = _ragged_triton if target.lowering == "triton" else _ragged_tpu
    out = build(q_blocks, k_pages, v_pages, kv_lens.astype(jnp.int32), tables, sched, k_scales,
                v_scales, plan=plan, sizes=sizes, sm_scale=sm_scale, soft_cap=soft_cap,
                sliding_window=sliding_window, interpret=target.interpret)
    return _from_blocks(out, cu_q_lens, num_seqs, sched, plan, num_tokens, num_q_heads)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

def ragged_paged_attention_reference(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # [max_num_seqs] int32
    block_tables: jax.Array,  # [max_num_seqs, max_blocks_per_seq] int32
    cu_q_lens: jax.Array,  # [max_num_seqs + 1] int32
    num_seqs: jax.Array,  # [] int32: sequences at and after this index are padding
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,  # [num_blocks, num_kv_heads] f32 when pages are quantized
    v_scales: jax.Array | None = None,
    token_batch: int = 16,
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim]
    """Pure-JAX ragged paged attention; padding tokens (past cu_q_lens[num_seqs]) return zeros.

    Each query token gathers its own sequence's pages, `token_batch` tokens at a time, so memory
    stays at token_batch x max_kv_len x heads instead of num_tokens x max_kv_len x heads.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pages.shape
    max_num_seqs, max_blocks = block_tables.shape
    group = num_q_heads // num_kv_heads
    max_kv_len = max_blocks * block_size

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], token, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, max_num_seqs - 1)
    valid = token < cu_q_lens[num_seqs]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (token - cu_q_lens[seq])

    def pages_of(pages, scales, s):  # -> [max_kv_len, num_kv_heads, head_dim] f32
        blocks = block_tables[s]
        x = pages[blocks].astype(jnp.float32)
        if scales is not None:
            x = x * scales[blocks][:, None, :, None]
        return x.reshape(max_kv_len, num_kv_heads, head_dim)

    def attend_one(args):
        q_t, s, pos, ok = args  # q_t: [num_q_heads, head_dim]
        k = pages_of(k_pages, k_scales, s)
        v = pages_of(v_pages, v_scales, s)
        q_g = q_t.astype(jnp.float32).reshape(num_kv_heads, group, head_dim)
        scores = jnp.einsum("kgd,lkd->kgl", q_g, k) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        kv_pos = jnp.arange(max_kv_len)
        mask = (kv_pos <= pos) & (kv_pos < kv_lens[s])
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        scores = jnp.where(mask[None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = jnp.where(mask[None, None, :], probs, 0.0)
        out = jnp.einsum("kgl,lkd->kgd", probs, v).reshape(num_q_heads, head_dim)
        return jnp.where(ok, out, 0.0).astype(q.dtype)

    return jax.lax.map(attend_one, (q, seq, q_pos, valid), batch_size=token_batch)
