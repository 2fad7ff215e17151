"""Ragged paged attention: one call over a mixed batch of prefill chunks and decode tokens.

The query tokens of all sequences are packed into one flat array; sequence `s` owns
`q[cu_q_lens[s]:cu_q_lens[s + 1]]`. Its keys and values live in the paged cache, in the pages
listed by `block_tables[s]`, and there are `kv_lens[s]` of them after this step's writes (cached
context plus the new tokens). Query token `i` of a chunk of `q_len` tokens sits at position
`kv_lens[s] - q_len + i`, so a decode token and a prefill chunk take the same path.
"""

import jax
import jax.numpy as jnp


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
