"""Walking one sequence's KV pages inside a kernel, block of pages by block of pages, with the
online softmax of `online_softmax.attend_block` — once per lowering.

Both kernels (decode and ragged) differ only in which query rows they hold, which keys each row
may see (`mask_fn`) and which range of pages they walk; the walk itself lives here.

Triton (GPU): the block table is an ordinary input; a block of pages is gathered with
integer-array indexing of the per-KV-head page ref (`k_pages_ref[pages]`), which the Triton
lowering turns into one pointer tensor. Triton's pipeliner overlaps the next block's loads.

Mosaic TPU: the block table sits in SMEM (scalar prefetch); whole pages `[block_size *
num_kv_heads, head_dim]` are copied HBM -> VMEM with one DMA each, two buffers deep (the next
block's copies start before this block's compute), and each KV head's keys are read back with a
strided VMEM load.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.online_softmax import attend_block, initial_state


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _unmasked_blocks(start_entry, num_blocks, full_lo, full_hi, *, block_size, pages_per_block):
    """Blocks [a, b) of a walk whose keys lie in [full_lo, full_hi): seen by every row, so they
    need no mask. Blocks before a (window edge) and from b on (causal diagonal, end of context)
    keep the mask."""
    block_k = pages_per_block * block_size
    first_key = start_entry * block_size
    a = lax.div(jnp.maximum(full_lo - first_key, 0) + block_k - 1, block_k)
    b = jnp.minimum(lax.div(jnp.maximum(full_hi - first_key, 0), block_k), num_blocks)
    return jnp.minimum(a, b), b


def walk_pages_triton(q, mask_fn, *, seq, kv_len, start_entry, num_blocks, full_lo, full_hi,
                      block_tables_ref, k_pages_ref, v_pages_ref, k_scales_ref, v_scales_ref,
                      pages_per_block: int, sm_scale: float, soft_cap: float | None):
    """Attends q [rows, D] to one KV head of sequence `seq`; returns (m, l, acc).

    block_tables_ref: [max_num_seqs, max_blocks_per_seq] int32 (entries past the end are
    clamped, then never followed); k_pages_ref, v_pages_ref: [num_blocks, block_size, D] (one
    KV head); k_scales_ref, v_scales_ref: [num_blocks] f32 or None. mask_fn(kv_pos [1, keys]
    int32) -> bool mask broadcastable to [rows, keys]; keys in [full_lo, full_hi) are visible
    to every row that matters, and blocks made only of such keys skip the mask.
    """
    rows, head_dim = q.shape
    block_size = k_pages_ref.shape[1]
    width = block_tables_ref.shape[1]
    block_k = pages_per_block * block_size

    def body(masked, i, carry):
        entry0 = start_entry + i * pages_per_block
        entries = entry0 + _iota((pages_per_block,), 0)
        pages = block_tables_ref[seq, jnp.minimum(entries, width - 1)]  # [pages_per_block]
        # Entries past the sequence's last page may be stale: never follow them.
        pages = jnp.where(entries * block_size < kv_len, pages, 0)
        k = k_pages_ref[pages].reshape(block_k, head_dim)  # gather: [pages, block_size, D]
        v = v_pages_ref[pages].reshape(block_k, head_dim)
        k_scale = v_scale = None
        if k_scales_ref is not None:
            def per_key(scales_ref):
                s = scales_ref[pages]  # [pages_per_block]
                s = jnp.broadcast_to(s[:, None], (pages_per_block, block_size))
                return s.reshape(1, block_k)
            k_scale, v_scale = per_key(k_scales_ref), per_key(v_scales_ref)
        mask = mask_fn(entry0 * block_size + _iota((1, block_k), 1)) if masked else None
        return attend_block(q, k, v, mask, *carry, sm_scale=sm_scale, soft_cap=soft_cap,
                            k_scale=k_scale, v_scale=v_scale)

    a, b = _unmasked_blocks(start_entry, num_blocks, full_lo, full_hi, block_size=block_size,
                            pages_per_block=pages_per_block)
    masked, unmasked = functools.partial(body, True), functools.partial(body, False)
    carry = lax.fori_loop(0, a, masked, initial_state(rows, head_dim))
    carry = lax.fori_loop(a, b, unmasked, carry)
    return lax.fori_loop(b, num_blocks, masked, carry)


class TpuPageBuffers:
    """Scratch for walk_pages_tpu, in the order `scratch_shapes` lists them."""

    @staticmethod
    def shapes(*, rows: int, num_kv_heads: int, block_size: int, head_dim: int,
               pages_per_block: int, kv_dtype, quantized: bool):
        page_rows = block_size * num_kv_heads
        shapes = [
            pltpu.VMEM((2, pages_per_block * page_rows, head_dim), kv_dtype),  # k buffers
            pltpu.VMEM((2, pages_per_block * page_rows, head_dim), kv_dtype),  # v buffers
        ]
        if quantized:
            shapes += [pltpu.SMEM((2, pages_per_block, num_kv_heads), jnp.float32)] * 2
        shapes += [
            pltpu.SemaphoreType.DMA((2, 4)),  # [buffer, k | v | k scales | v scales]
            pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),  # m
            pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),  # l
            pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32),  # acc
        ]
        return shapes


def walk_pages_tpu(q_ref, mask_fn, *, seq, kv_len, start_entry, num_blocks, table_width,
                   block_tables_ref, k_hbm_ref, v_hbm_ref, k_scales_hbm_ref, v_scales_hbm_ref,
                   scratch, block_size: int, pages_per_block: int, sm_scale: float,
                   soft_cap: float | None):
    """Attends q_ref [num_kv_heads, rows, D] to all KV heads of one sequence.

    block_tables_ref: flat SMEM [max_num_seqs * table_width] (entries past the end are clamped,
    then never followed). k_hbm_ref, v_hbm_ref: [num_blocks, block_size * num_kv_heads, D] in HBM;
    k_scales_hbm_ref, v_scales_hbm_ref: [num_blocks, num_kv_heads] f32 in HBM or None.
    scratch: the refs of TpuPageBuffers.shapes. Leaves (m, l, acc) in the last three scratch
    refs ([num_kv_heads, rows, 1|D]).
    """
    quantized = k_scales_hbm_ref is not None
    if quantized:
        k_buf, v_buf, k_sc, v_sc, sems, m_ref, l_ref, acc_ref = scratch
    else:
        k_buf, v_buf, sems, m_ref, l_ref, acc_ref = scratch
    num_kv_heads, rows, head_dim = q_ref.shape
    page_rows = block_size * num_kv_heads
    block_k = pages_per_block * block_size

    def copies(i, slot):
        entry0 = start_entry + i * pages_per_block
        out = []
        for p in range(pages_per_block):
            entry = entry0 + p
            page = block_tables_ref[seq * table_width + jnp.minimum(entry, table_width - 1)]
            page = jnp.where(entry * block_size < kv_len, page, 0)
            dst = pl.ds(p * page_rows, page_rows)
            out.append(pltpu.make_async_copy(k_hbm_ref.at[page], k_buf.at[slot, dst],
                                             sems.at[slot, 0]))
            out.append(pltpu.make_async_copy(v_hbm_ref.at[page], v_buf.at[slot, dst],
                                             sems.at[slot, 1]))
            if quantized:
                out.append(pltpu.make_async_copy(k_scales_hbm_ref.at[page], k_sc.at[slot, p],
                                                 sems.at[slot, 2]))
                out.append(pltpu.make_async_copy(v_scales_hbm_ref.at[page], v_sc.at[slot, p],
                                                 sems.at[slot, 3]))
        return out

    m0, l0, acc0 = initial_state(rows, head_dim)
    for h in range(num_kv_heads):
        m_ref[h], l_ref[h], acc_ref[h] = m0, l0, acc0

    @pl.when(num_blocks > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    def body(i, _):
        slot = lax.rem(i, 2)

        @pl.when(i + 1 < num_blocks)
        def _():
            for c in copies(i + 1, 1 - slot):
                c.start()

        for c in copies(i, slot):
            c.wait()
        entry0 = start_entry + i * pages_per_block
        kv_pos = entry0 * block_size + _iota((1, block_k), 1)
        mask = mask_fn(kv_pos)
        page_of_key = _iota((1, block_k), 1) // block_size
        for h in range(num_kv_heads):
            keys = pl.ds(h, block_k, stride=num_kv_heads)  # rows of head h, page after page
            k = k_buf[slot, keys, :]
            v = v_buf[slot, keys, :]
            k_scale = v_scale = None
            if quantized:
                k_scale = jnp.zeros((1, block_k), jnp.float32)
                v_scale = jnp.zeros((1, block_k), jnp.float32)
                for p in range(pages_per_block):
                    k_scale = jnp.where(page_of_key == p, k_sc[slot, p, h], k_scale)
                    v_scale = jnp.where(page_of_key == p, v_sc[slot, p, h], v_scale)
            m, l, acc = attend_block(q_ref[h], k, v, mask, m_ref[h], l_ref[h], acc_ref[h],
                                     sm_scale=sm_scale, soft_cap=soft_cap, k_scale=k_scale,
                                     v_scale=v_scale)
            m_ref[h], l_ref[h], acc_ref[h] = m, l, acc
        return ()

    lax.fori_loop(0, num_blocks, body, ())
    return m_ref, l_ref, acc_ref
