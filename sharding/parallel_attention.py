"""Paged attention on the mesh: query heads split over `tensor`, tokens over data x sequence.

Attention over the paged cache is not a matmul GSPMD can split, and the Pallas kernels cannot be
split by GSPMD at all, so it runs under `shard_map` with every collective written out:

- each device gets its tokens' queries for its heads, q [T / token shards, Hq / tp, Dh];
- K/V of the step are all-gathered over the token axes (one all-gather per layer, only when
  those are > 1), because every device's cache shard holds all tokens of its KV heads; each
  device then writes them, with the (replicated) slot mapping, into its own cache shard
  (keys and values, each [num_blocks, block_size, Hkv / tp (or Hkv), Dh]);
- the attention metadata is rebased to the device's slice of tokens (see `_rebase`), and the
  attention function runs unchanged on local shapes.

When the KV heads are replicated over tensor (fewer KV heads than tensor devices, or a count that
does not divide) each device picks the KV heads its query heads read. With tp a multiple of the
KV heads that is one head, a slice of the cache; XLA may copy that slice per step, a cost paid
only in that configuration (a kernel taking a KV-head offset would remove it).

The functions take plain arrays and duck-typed metadata (anything with slot_mapping, kv_lens,
cu_q_lens, num_seqs, block_tables), and the write and attention functions as callables.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from sharding.mesh import TOKEN_AXES, axis_size
from sharding.partition_rules import kv_cache_spec, kv_heads_sharded

WriteFn = Callable  # (cache (k, v), k [T, Hkv, Dh], v, slot_mapping [T]) -> cache
AttendFn = Callable  # (q [T, Hq, Dh], cache, metadata) -> [T, Hq, Dh]


def _rebase(md, offset, num_local_tokens: int):
    """Metadata for the tokens [offset, offset + num_local_tokens) of the batch.

    cu_q_lens are shifted and clipped to the slice. A query's position is
    kv_len - q_len + index = kv_len - cu_q_lens[s + 1] + token, so kv_lens shrink by as many
    tokens as the clip cut from the end of each sequence: positions stay exact and a sequence
    cut by the slice sees exactly the keys up to its last local token.
    """
    cu = md.cu_q_lens
    local_cu = jnp.clip(cu - offset, 0, num_local_tokens)
    cut = (cu[1:] - offset) - local_cu[1:]  # tokens of each sequence after this slice
    kv_lens = jnp.maximum(md.kv_lens - cut, 0)
    return dataclasses.replace(md, cu_q_lens=local_cu, kv_lens=kv_lens)


def _local_kv_heads(cache, *, num_q_heads: int, num_kv_heads: int, tp: int):
    """The cache heads this device's query heads read, when the cache is replicated over tensor.

    Returns the cache with either one KV head (tp a multiple of the KV heads: the device's query
    heads share one) or one KV head per local query head (the general case, group size 1).
    """
    q_per_device = num_q_heads // tp
    group = num_q_heads // num_kv_heads
    first_q = lax.axis_index("tensor") * q_per_device
    if tp % num_kv_heads == 0:
        return tuple(lax.dynamic_slice_in_dim(pages, first_q // group, 1, axis=2)
                     for pages in cache)
    heads = (first_q + jnp.arange(q_per_device)) // group
    return tuple(jnp.take(pages, heads, axis=2) for pages in cache)


def parallel_paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: tuple, md,
                             *, mesh: Mesh, write_kv: WriteFn, attend: AttendFn | None):
    """Writes this step's K/V into the cache and attends, split over the mesh.

    q [T, Hq, Dh], k/v [T, Hkv, Dh] (T divisible by the token shards), kv_cache (keys, values),
    each [num_blocks, block_size, Hkv, Dh] laid out by `kv_cache_spec`. Returns (out [T, Hq, Dh]
    with tokens over data x sequence and heads over tensor, new cache); with attend=None only
    the write happens and out is None (the ring-attention prefill attends by itself).
    """
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    tp = mesh.shape["tensor"]
    token_shards = axis_size(mesh, TOKEN_AXES)
    if q.shape[0] % token_shards:
        raise ValueError(f"{q.shape[0]} tokens do not split over {token_shards} token shards "
                         f"(data x sequence)")
    sharded_kv = kv_heads_sharded(num_kv_heads, tp)
    spec = kv_cache_spec(num_kv_heads=num_kv_heads, tensor_parallel=tp)
    cache_spec = (spec, spec)
    kv_spec = P(TOKEN_AXES, "tensor" if sharded_kv else None, None)
    md_spec = jax.tree.map(lambda _: P(), md)  # metadata, slot mapping included, is replicated

    def body(q, k, v, cache, md):
        if token_shards > 1:
            k, v = lax.all_gather(jnp.stack([k, v]), TOKEN_AXES, axis=1, tiled=True)
        cache = write_kv(cache, k, v, md.slot_mapping)
        if attend is None:
            return cache
        if token_shards > 1:
            md = _rebase(md, lax.axis_index(TOKEN_AXES) * q.shape[0], q.shape[0])
        local = cache if sharded_kv else _local_kv_heads(
            cache, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, tp=tp)
        return attend(q, local, md), cache

    out_specs = cache_spec if attend is None else (P(TOKEN_AXES, "tensor", None), cache_spec)
    result = jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(TOKEN_AXES, "tensor", None), kv_spec, kv_spec, cache_spec, md_spec),
        out_specs=out_specs,
        # The outputs are replicated where the specs say (every token shard writes the same
        # gathered K/V); the check cannot see through Pallas kernels in interpret mode.
        check_vma=False,
    )(q, k, v, kv_cache, md)
    return (None, result) if attend is None else result
