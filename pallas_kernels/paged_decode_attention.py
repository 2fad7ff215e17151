"""Paged decode attention: one query token per sequence against its paged KV cache.

The context is split (split-K) across programs so that a batch of one long sequence still
fills the GPU; each split returns its normalised partial output and log-sum-exp, merged outside
the kernel by `online_softmax.combine_splits`. The query heads that share a KV head are the
rows of one dot (padded to at least 16 rows for Triton), so each page is read once per KV head.

Layers: kernels (Triton, Mosaic TPU) -> pallas_call builders (grid, BlockSpecs) -> public
jitted `paged_decode_attention` (shape checks, dispatch) -> `paged_decode_attention_reference`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend
from pallas_kernels.online_softmax import MASK_VALUE, combine_splits, finalize
from pallas_kernels.page_walk import TpuPageBuffers, walk_pages_tpu, walk_pages_triton
from pallas_kernels.paged_kv import (check_int_array, check_paged_kv, check_query, check_static,
                                     gather_pages, kv_block_range)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    block_kv: int  # keys per compute block, a whole number of pages
    num_warps: int  # Triton only
    num_stages: int  # Triton only
    target_programs: int  # splits are added until sequences x programs per split reaches this


# Tuned block sizes, keyed by (lowering, head_dim). The Triton head_dim 128 row was picked by
# `tools/benchmark_attention.py --autotune` on an H100 (docs/BENCHMARKS.md); the other head dims
# and the TPU row are starting points, checked for correctness, not timed. f32 inputs halve
# block_kv to fit shared memory (backend.fit_triton_block_kv).
TUNED_BLOCK_SIZES = {
    ("triton", 64): DecodeBlockSizes(block_kv=64, num_warps=4, num_stages=3, target_programs=264),
    ("triton", 128): DecodeBlockSizes(block_kv=64, num_warps=4, num_stages=3, target_programs=264),
    ("triton", 256): DecodeBlockSizes(block_kv=64, num_warps=8, num_stages=2, target_programs=264),
    ("mosaic_tpu", None): DecodeBlockSizes(block_kv=128, num_warps=0, num_stages=0,
                                           target_programs=8),
}


def tuned_block_sizes(lowering: str, head_dim: int) -> DecodeBlockSizes:
    key = (lowering, head_dim) if (lowering, head_dim) in TUNED_BLOCK_SIZES else (lowering, None)
    return TUNED_BLOCK_SIZES.get(key, TUNED_BLOCK_SIZES[("triton", 128)])


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

def _visible_keys(kv_len, sliding_window):
    """The keys [lo, hi) the decode token at position kv_len - 1 attends to."""
    lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
    return lo, kv_len


def _decode_mask(kv_len, sliding_window):
    def mask_fn(kv_pos):  # [1, keys]
        mask = kv_pos < kv_len
        if sliding_window is not None:
            mask &= kv_pos >= kv_len - sliding_window
        return mask
    return mask_fn


def _decode_kernel_triton(
    kv_lens_ref,  # [max_num_seqs] int32
    block_tables_ref,  # [max_num_seqs, max_blocks_per_seq] int32
    q_ref,  # [rows, D]: the query heads of (sequence, kv head), padded to `rows`
    k_pages_ref,  # [num_blocks, block_size, D]: one kv head
    v_pages_ref,  # [num_blocks, block_size, D]
    *refs,  # k_scales_ref, v_scales_ref ([num_blocks] f32) when quantized; then outputs:
    # o_ref [rows, D] (split, sequence, kv head); lse_ref [rows, 1]
    sm_scale, soft_cap, sliding_window, pages_per_block, pages_per_split, quantized,
):
    k_scales_ref, v_scales_ref, o_ref, lse_ref = refs if quantized else (None, None, *refs)
    seq, split = pl.program_id(0), pl.program_id(2)
    kv_len = kv_lens_ref[seq]
    lo, hi = _visible_keys(kv_len, sliding_window)
    first = split * pages_per_split
    start, num_blocks = kv_block_range(lo, hi, block_size=k_pages_ref.shape[1],
                                       pages_per_block=pages_per_block, first_page=first,
                                       end_page=first + pages_per_split)
    m, l, acc = walk_pages_triton(
        q_ref[...], _decode_mask(kv_len, sliding_window), seq=seq, kv_len=kv_len,
        start_entry=start, num_blocks=num_blocks, full_lo=lo, full_hi=hi,
        block_tables_ref=block_tables_ref,
        k_pages_ref=k_pages_ref, v_pages_ref=v_pages_ref, k_scales_ref=k_scales_ref,
        v_scales_ref=v_scales_ref, pages_per_block=pages_per_block, sm_scale=sm_scale,
        soft_cap=soft_cap)
    out, lse = finalize(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _decode_kernel_tpu(
    kv_lens_ref,  # SMEM [max_num_seqs] int32 (scalar prefetch)
    block_tables_ref,  # SMEM [max_num_seqs * max_blocks_per_seq] int32
    q_ref,  # VMEM [num_kv_heads, rows, D] (sequence)
    k_hbm_ref,  # HBM [num_blocks, block_size * num_kv_heads, D]
    v_hbm_ref,  # HBM [num_blocks, block_size * num_kv_heads, D]
    *refs,  # k/v scales in HBM [num_blocks, num_kv_heads] when quantized; then outputs:
    # o_ref [num_kv_heads, rows, D] (split, sequence); lse_ref [num_kv_heads, rows, 1]; scratch
    sm_scale, soft_cap, sliding_window, block_size, pages_per_block, pages_per_split, table_width,
    quantized,
):
    if quantized:
        k_scales_ref, v_scales_ref, o_ref, lse_ref, *scratch = refs
    else:
        k_scales_ref = v_scales_ref = None
        o_ref, lse_ref, *scratch = refs
    seq, split = pl.program_id(0), pl.program_id(1)
    kv_len = kv_lens_ref[seq]
    lo, hi = _visible_keys(kv_len, sliding_window)
    first = split * pages_per_split
    start, num_blocks = kv_block_range(lo, hi, block_size=block_size,
                                       pages_per_block=pages_per_block, first_page=first,
                                       end_page=first + pages_per_split)
    m_ref, l_ref, acc_ref = walk_pages_tpu(
        q_ref, _decode_mask(kv_len, sliding_window), seq=seq, kv_len=kv_len,
        start_entry=start, num_blocks=num_blocks, table_width=table_width,
        block_tables_ref=block_tables_ref, k_hbm_ref=k_hbm_ref, v_hbm_ref=v_hbm_ref,
        k_scales_hbm_ref=k_scales_ref, v_scales_hbm_ref=v_scales_ref, scratch=scratch,
        block_size=block_size, pages_per_block=pages_per_block, sm_scale=sm_scale,
        soft_cap=soft_cap)
    for h in range(q_ref.shape[0]):
        out, lse = finalize(m_ref[h], l_ref[h], acc_ref[h])
        o_ref[h] = out.astype(o_ref.dtype)
        lse_ref[h] = lse


# ---------------------------------------------------------------------------------------------
# Grids and BlockSpecs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _DecodePlan:
    rows: int  # query heads per kv head, padded
    pages_per_block: int
    pages_per_split: int
    num_splits: int


def _plan(target: backend.KernelTarget, *, num_seqs: int, num_kv_heads: int, group: int,
          block_size: int, entries: int, sizes: DecodeBlockSizes, num_splits: int | None):
    if target.lowering == "triton":
        # Triton dots need every dimension >= 16 and power-of-two blocks.
        rows = max(16, pl.next_power_of_2(group))
        pages_per_block = max(1, sizes.block_kv // block_size)
        programs_per_split = num_seqs * num_kv_heads
    else:
        rows = max(8, pl.next_power_of_2(group))
        pages_per_block = max(1, sizes.block_kv // block_size)
        programs_per_split = num_seqs
    max_splits = pl.cdiv(entries, pages_per_block)
    if num_splits is None:
        num_splits = pl.cdiv(sizes.target_programs, programs_per_split)
    num_splits = max(1, min(num_splits, max_splits))
    pages_per_split = pl.cdiv(pl.cdiv(entries, num_splits), pages_per_block) * pages_per_block
    return _DecodePlan(rows, pages_per_block, pages_per_split, num_splits)


def _decode_triton(q4, k_pages, v_pages, kv_lens, block_tables, k_scales, v_scales, *, plan,
                   sizes, sm_scale, soft_cap, sliding_window, interpret):
    num_seqs, num_kv_heads, rows, head_dim = q4.shape
    num_blocks, block_size, _, _ = k_pages.shape
    quantized = k_scales is not None
    splits = plan.num_splits
    kernel = functools.partial(  # a fresh partial per grid: see KERNELS.md on num_programs
        _decode_kernel_triton, sm_scale=sm_scale, soft_cap=soft_cap,
        sliding_window=sliding_window, pages_per_block=plan.pages_per_block,
        pages_per_split=plan.pages_per_split, quantized=quantized)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    page_spec = pl.BlockSpec((num_blocks, block_size, None, head_dim), lambda s, h, p: (0, 0, h, 0))
    in_specs = [
        whole(kv_lens.shape),
        whole(block_tables.shape),
        pl.BlockSpec((None, None, rows, head_dim), lambda s, h, p: (s, h, 0, 0)),
        page_spec,
        page_spec,
    ]
    args = [kv_lens, block_tables, q4, k_pages, v_pages]
    if quantized:
        scale_spec = pl.BlockSpec((num_blocks, None), lambda s, h, p: (0, h))
        in_specs += [scale_spec, scale_spec]
        args += [k_scales, v_scales]
    out_dtype = q4.dtype if splits == 1 else jnp.float32
    return pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda s, h, p: (p, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows, 1), lambda s, h, p: (p, s, h, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, rows, head_dim), out_dtype),
            jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, rows, 1), jnp.float32),
        ],
        compiler_params=backend.triton_compiler_params(sizes.num_warps, sizes.num_stages),
        interpret=interpret,
        name="paged_decode_attention_triton",
    )(*args)


def _decode_tpu(q4, k_pages, v_pages, kv_lens, block_tables, k_scales, v_scales, *, plan,
                sizes, sm_scale, soft_cap, sliding_window, interpret):
    del sizes
    num_seqs, num_kv_heads, rows, head_dim = q4.shape
    num_blocks, block_size, _, _ = k_pages.shape
    quantized = k_scales is not None
    splits = plan.num_splits
    kernel = functools.partial(
        _decode_kernel_tpu, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        block_size=block_size, pages_per_block=plan.pages_per_block,
        pages_per_split=plan.pages_per_split, table_width=block_tables.shape[1],
        quantized=quantized)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [pl.BlockSpec((None, num_kv_heads, rows, head_dim), lambda s, p, *_: (s, 0, 0, 0)),
                hbm, hbm] + [hbm, hbm] * quantized
    # A page [block_size, kv_heads, D] is one contiguous DMA as [block_size * kv_heads, D].
    page_rows = block_size * num_kv_heads
    args = [q4, k_pages.reshape(num_blocks, page_rows, head_dim),
            v_pages.reshape(num_blocks, page_rows, head_dim)]
    if quantized:
        args += [k_scales, v_scales]
    out_block = lambda last: pl.BlockSpec((None, None, num_kv_heads, rows, last),
                                          lambda s, p, *_: (p, s, 0, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(num_seqs, splits),
        in_specs=in_specs,
        out_specs=[out_block(head_dim), out_block(1)],
        scratch_shapes=TpuPageBuffers.shapes(
            rows=rows, num_kv_heads=num_kv_heads, block_size=block_size, head_dim=head_dim,
            pages_per_block=plan.pages_per_block, kv_dtype=k_pages.dtype, quantized=quantized),
    )
    out_dtype = q4.dtype if splits == 1 else jnp.float32
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, rows, head_dim), out_dtype),
            jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, rows, 1), jnp.float32),
        ],
        compiler_params=backend.tpu_compiler_params(("parallel", "parallel")),
        interpret=interpret,
        name="paged_decode_attention_tpu",
    )(kv_lens, block_tables.reshape(-1), *args)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _check_decode_args(q, k_pages, v_pages, kv_lens, block_tables, k_scales, v_scales,
                       sm_scale, sliding_window, soft_cap):
    kv = check_paged_kv(k_pages, v_pages, k_scales, v_scales)
    check_query("q", q, kv, leading="num_seqs")
    num_seqs = q.shape[0]
    check_int_array("kv_lens", kv_lens, (num_seqs,), f"[num_seqs={num_seqs}]")
    if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have shape [num_seqs={num_seqs}, "
                         f"max_blocks_per_seq], got {tuple(block_tables.shape)}")
    check_int_array("block_tables", block_tables, tuple(block_tables.shape), "")
    check_static("sm_scale", sm_scale)
    check_static("sliding_window", sliding_window)
    check_static("soft_cap", soft_cap)
    return kv


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "num_splits", "implementation", "block_kv",
    "num_warps", "num_stages", "lowering", "interpret"))
def paged_decode_attention(
    q: jax.Array,  # [num_seqs, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # [num_seqs] int32, keys of each sequence, the new token's included
    block_tables: jax.Array,  # [num_seqs, max_blocks_per_seq] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,  # [num_blocks, num_kv_heads] f32 for int8 / fp8 pages
    v_scales: jax.Array | None = None,
    num_splits: int | None = None,
    implementation: str = "auto",
    block_kv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    lowering: str | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> jax.Array:  # [num_seqs, num_q_heads, head_dim], q's dtype
    """Attention of each sequence's one query token (at position kv_lens[s] - 1) to its cache.

    A sequence with kv_len 0 returns zeros. num_splits: context splits per sequence (None:
    enough to give the tuned number of programs). implementation: "auto" (Pallas on GPU/TPU,
    reference on CPU), "pallas" or "reference". block_kv, num_warps, num_stages override the
    tuned block sizes; lowering ("triton" | "mosaic_tpu") and interpret override the platform's
    choice (tests use them).
    """
    kv = _check_decode_args(q, k_pages, v_pages, kv_lens, block_tables, k_scales, v_scales,
                            sm_scale, sliding_window, soft_cap)
    if backend.resolve_implementation(implementation) == "reference":
        return paged_decode_attention_reference(
            q, k_pages, v_pages, kv_lens, block_tables, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, k_scales=k_scales,
            v_scales=v_scales, num_splits=num_splits)
    target = backend.kernel_target(lowering, interpret)
    if target.lowering == "triton" and kv.block_size & (kv.block_size - 1):
        raise ValueError(f"k_pages block_size must be a power of two for the Triton kernel, "
                         f"got {kv.block_size}")
    sizes = tuned_block_sizes(target.lowering, kv.head_dim)
    sizes = dataclasses.replace(sizes, num_warps=num_warps or sizes.num_warps,
                                num_stages=num_stages or sizes.num_stages)
    num_seqs, num_q_heads, head_dim = q.shape
    group = num_q_heads // kv.num_kv_heads
    if block_kv is None and target.lowering == "triton":
        block_kv = backend.fit_triton_block_kv(
            sizes.block_kv, rows=max(16, pl.next_power_of_2(group)), head_dim=head_dim,
            itemsize=q.dtype.itemsize, num_stages=sizes.num_stages)
    sizes = dataclasses.replace(sizes, block_kv=block_kv or sizes.block_kv)
    plan = _plan(target, num_seqs=num_seqs, num_kv_heads=kv.num_kv_heads, group=group,
                 block_size=kv.block_size, entries=block_tables.shape[1], sizes=sizes,
                 num_splits=num_splits)

    q4 = q.reshape(num_seqs, kv.num_kv_heads, group, head_dim)
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, plan.rows - group), (0, 0)))
    tables = block_tables.astype(jnp.int32)
    build = _decode_triton if target.lowering == "triton" else _decode_tpu
    out, lse = build(q4, k_pages, v_pages, kv_lens.astype(jnp.int32), tables, k_scales, v_scales,
                     plan=plan, sizes=sizes, sm_scale=sm_scale, soft_cap=soft_cap,
                     sliding_window=sliding_window, interpret=target.interpret)
    out = out[0] if plan.num_splits == 1 else combine_splits(out, lse)
    out = out[:, :, :group, :].reshape(num_seqs, num_q_heads, head_dim)
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

def paged_decode_attention_reference(
    q: jax.Array,  # [num_seqs, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_pages: jax.Array,
    kv_lens: jax.Array,  # [num_seqs] int32
    block_tables: jax.Array,  # [num_seqs, max_blocks_per_seq] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    num_splits: int | None = None,
) -> jax.Array:  # [num_seqs, num_q_heads, head_dim]
    """Pure-JAX decode attention in float32: gather every sequence's pages, then attend.

    num_splits is accepted for signature compatibility and ignored.
    """
    del num_splits
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pages.shape
    max_kv_len = block_tables.shape[1] * block_size
    group = num_q_heads // num_kv_heads
    k = gather_pages(k_pages, k_scales, block_tables).reshape(num_seqs, max_kv_len,
                                                              num_kv_heads, head_dim)
    v = gather_pages(v_pages, v_scales, block_tables).reshape(num_seqs, max_kv_len,
                                                              num_kv_heads, head_dim)
    q_g = q.astype(jnp.float32).reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = jnp.einsum("skgd,slkd->skgl", q_g, k) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    kv_pos = jnp.arange(max_kv_len)[None, :]
    kv_lens = kv_lens[:, None]
    mask = kv_pos < kv_lens
    if sliding_window is not None:
        mask &= kv_pos >= kv_lens - sliding_window
    mask = mask[:, None, None, :]
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum("skgl,slkd->skgd", probs, v)
    return out.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)
