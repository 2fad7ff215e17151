"""The attention backend interface: the per-step attention metadata, the KV cache write, and
the choice between the pure-JAX reference and the Pallas kernels.

The KV cache of one layer is a pair of arrays (keys, values), each `[num_blocks, block_size,
num_kv_heads, head_dim]`. Slot `b * block_size + i` is token `i` of block `b`. Two arrays rather
than one stacked array: a slice `cache[0]` of a stacked array handed to a Pallas kernel (or read
inside a loop) is materialized by XLA, a copy of the layer's whole cache every step.
"""

import dataclasses
import functools
from typing import TypeAlias

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_implementation
from pallas_kernels.paged_decode_attention import paged_decode_attention
from pallas_kernels.ragged_paged_attention import (ragged_paged_attention,
                                                   ragged_paged_attention_reference)


KVCache: TypeAlias = tuple[jax.Array, jax.Array]  # (keys, values) of one layer


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["slot_mapping", "block_tables", "kv_lens", "cu_q_lens", "num_seqs"],
                   meta_fields=["decode_only"])
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of the flat ragged batch reads and writes the paged cache.

    slot_mapping: [num_tokens] int32, cache slot each token's K/V goes to; padding tokens
      write into a scratch block that no sequence holds (the runner's cache has one block more
      than its KV cache manager hands out); an out-of-range slot is dropped.
    block_tables: [num_seqs_padded, max_blocks_per_seq] int32.
    kv_lens: [num_seqs_padded] int32, cached tokens of each sequence after this step.
    cu_q_lens: [num_seqs_padded + 1] int32, start of each sequence's tokens in the batch.
    num_seqs: [] int32, real sequences; the rest are padding.
    decode_only: static; every sequence has exactly one token in the step and the batch has one
      row per sequence slot (num_tokens == num_seqs_padded), so the Pallas backend can take the
      paged decode kernel, which streams each sequence's pages once for all its query heads.
    """

    slot_mapping: jax.Array
    block_tables: jax.Array
    kv_lens: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    decode_only: bool = False


def write_kv(kv_cache: KVCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> KVCache:
    """Scatters this step's keys and values ([num_tokens, num_kv_heads, head_dim]) into the cache."""
    def write(pages, new):
        num_blocks, block_size, num_kv_heads, head_dim = pages.shape
        flat = pages.reshape(num_blocks * block_size, num_kv_heads, head_dim)
        flat = flat.at[slot_mapping].set(new.astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)
    return write(kv_cache[0], k), write(kv_cache[1], v)


def copy_blocks(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Copies whole blocks src[i] -> dst[i] ([num_copies] int32; out-of-range dst is skipped)."""
    def copy(pages):
        return pages.at[dst].set(pages[jnp.clip(src, 0, pages.shape[0] - 1)], mode="drop")
    return copy(kv_cache[0]), copy(kv_cache[1])


def resolve_backend(name: str) -> str:
    """"auto" is the Pallas kernel on GPU and TPU and the reference on CPU."""
    return resolve_implementation(name)


def paged_attention(q: jax.Array, kv_cache: KVCache, md: AttentionMetadata, *, sm_scale: float,
                    sliding_window: int | None, backend: str) -> jax.Array:
    """Ragged paged attention of q [num_tokens, num_q_heads, head_dim] over the layer's cache."""
    if backend == "pallas" and md.decode_only:
        if q.shape[0] != md.kv_lens.shape[0]:
            raise ValueError(f"decode_only: {q.shape[0]} tokens for {md.kv_lens.shape[0]} "
                             "sequence slots; they must be equal")
        return paged_decode_attention(q, kv_cache[0], kv_cache[1], md.kv_lens, md.block_tables,
                                      sm_scale=sm_scale, sliding_window=sliding_window)
    if backend == "pallas":
        fn = ragged_paged_attention
    elif backend == "reference":
        fn = ragged_paged_attention_reference
    else:
        raise ValueError(f"attention backend must be 'pallas' or 'reference', got {backend!r}")
    return fn(q, kv_cache[0], kv_cache[1], md.kv_lens, md.block_tables, md.cu_q_lens, md.num_seqs,
              sm_scale=sm_scale, sliding_window=sliding_window)
