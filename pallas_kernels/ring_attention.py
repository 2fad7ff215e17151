"""Ring attention: causal attention over a sequence sharded along one mesh axis.

Each of the N devices on `axis_name` keeps its queries and passes its K/V block around the ring
(`ppermute` to the next device), so after N steps every query has met every key while each device
only ever holds two K/V blocks. Per step a device attends its queries to the visiting block with
`flash_attention` (or its jnp reference), which returns (out, log-sum-exp); partial results are
merged with a log-sum-exp combine in float32.

Causal balance (layout "zigzag"): the sequence is cut into 2N chunks and device r holds chunks r
and 2N-1-r, one early and one late. At step 0 a device attends to its own block, which is plain
causal attention in local order. At a later step the visiting block comes from device
src = (r - step) mod N, and exactly half of the (2 x 2 chunk) pairs are visible:
  src < r: both local query chunks see the visiting block's early chunk in full, the late one not;
  src > r: only the local late query chunk sees the visiting block, both chunks in full.
Every device does the same work per step and whole chunks above the diagonal are never computed.
Layout "contiguous" (device r holds chunk r of N) is kept for comparison: there device r skips
blocks from src > r entirely and the last device does N times the work of the first.

The public function takes and returns global arrays in natural token order and reorders them
around the `shard_map` itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pallas_kernels.backend import pallas_is_default
from pallas_kernels.flash_attention import (
    check_attention_inputs,
    flash_attention,
    flash_attention_reference,
)

_LAYOUTS = ("zigzag", "contiguous")


def _chunk_order(num_devices: int, layout: str) -> np.ndarray:
    """Natural-order chunk indices in the order they are laid out across the devices."""
    if layout == "contiguous":
        return np.arange(num_devices)
    n = num_devices
    return np.array([c for r in range(n) for c in (r, 2 * n - 1 - r)])


def _reorder_chunks(x: jax.Array, order: np.ndarray, sharding) -> jax.Array:
    """x [L, ...] cut into len(order) chunks, returned as chunks order[0], order[1], ...

    `sharding` (for Explicit mesh axes, else None) is the result's sharding over the chunks.
    """
    chunks = x.reshape(len(order), x.shape[0] // len(order), *x.shape[1:])
    chunks = chunks[order] if sharding is None else chunks.at[order].get(out_sharding=sharding)
    return chunks.reshape(x.shape)


def _merge(out, lse, block_out, block_lse):
    """Log-sum-exp combine of two partial attentions over disjoint keys.

    out [L, Hq, D] float32, lse [Hq, L] float32 (-inf for rows that have seen no key yet).
    """
    new_lse = jnp.logaddexp(lse, block_lse)
    safe = jnp.where(jnp.isfinite(new_lse), new_lse, 0.0)  # -inf - -inf would be NaN

    def weight(x):  # [Hq, L] -> [L, Hq, 1]
        return jnp.exp(x - safe).T[:, :, None]

    return out * weight(lse) + block_out.astype(jnp.float32) * weight(block_lse), new_lse


def _ring_shard(q, k, v, *, axis_name, num_devices, sm_scale, causal, layout, attend):
    """Per-device body. q [Lc, Hq, D], k/v [Lc, Hkv, D], Lc = L / N -> out [Lc, Hq, D]."""
    n = num_devices
    half = q.shape[0] // 2  # zigzag: the early chunk, then the late one
    me = lax.axis_index(axis_name)
    attend = functools.partial(attend, sm_scale=sm_scale)

    def visit(acc, kv, step):
        """Merge the attention of the local queries to the K/V block of device (me - step) % n."""
        out, lse = acc
        k_blk, v_blk = kv[0], kv[1]
        if not causal:
            return _merge(out, lse, *attend(q, k_blk, v_blk, causal=False))
        src = (me - step) % n
        if layout == "contiguous":
            def earlier(acc):
                return _merge(*acc, *attend(q, k_blk, v_blk, causal=False))

            return lax.cond(src < me, earlier, lambda acc: acc, (out, lse))

        def early_keys(acc):  # src < me: all local queries x the visiting early chunk
            return _merge(*acc, *attend(q, k_blk[:half], v_blk[:half], causal=False))

        def late_queries(acc):  # src > me: the local late chunk x the whole visiting block
            out, lse = acc
            late_out, late_lse = _merge(
                out[half:], lse[:, half:], *attend(q[half:], k_blk, v_blk, causal=False)
            )
            return (
                jnp.concatenate([out[:half], late_out]),
                jnp.concatenate([lse[:, :half], late_lse], axis=1),
            )

        return lax.cond(src < me, early_keys, late_queries, (out, lse))

    # Step 0: the local block. In local order its causal structure is plain causal attention
    # (zigzag: the late chunk sees all of the early chunk, the early chunk none of the late one).
    out, lse = attend(q, k, v, causal=causal)
    acc = (out.astype(jnp.float32), lse)
    if n == 1:
        return out
    kv = jnp.stack([k, v])  # one ppermute per step for K and V together
    ring = [(i, (i + 1) % n) for i in range(n)]
    # Started before the step-0 compute; each later step also sends before it computes.
    kv = lax.ppermute(kv, axis_name, ring)

    def body(carry, step):
        kv, acc = carry
        kv_next = lax.ppermute(kv, axis_name, ring)
        return (kv_next, visit(acc, kv, step)), None

    if n > 2:
        (kv, acc), _ = lax.scan(body, (kv, acc), jnp.arange(1, n - 1))
    out, _ = visit(acc, kv, n - 1)  # the last block needs no onward send
    return out.astype(q.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "axis_name", "sm_scale", "causal", "layout", "use_pallas"),
)
def ring_attention(
    q: jax.Array,  # [L, Hq, D], natural token order
    k: jax.Array,  # [L, Hkv, D]
    v: jax.Array,  # [L, Hkv, D]
    *,
    mesh: Mesh,
    axis_name: str = "sequence",
    sm_scale: float,
    causal: bool = True,
    layout: str = "zigzag",
    use_pallas: bool | None = None,
) -> jax.Array:  # [L, Hq, D] in q.dtype, natural token order
    """Attention of q to (k, v) with the sequence split over `mesh`'s `axis_name` (N devices).

    L must be divisible by 2N for "zigzag" (N for "contiguous"). Positions are 0..L-1 for both
    queries and keys. `use_pallas=None` uses the Pallas block kernel on GPU and TPU and the jnp
    reference block on CPU, where it is much faster than interpret mode.
    """
    check_attention_inputs(q, k, v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k length {k.shape[0]} must equal q length L={q.shape[0]}")
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name {axis_name!r} is not a mesh axis: {tuple(mesh.shape)}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    n = mesh.shape[axis_name]
    num_chunks = 2 * n if layout == "zigzag" else n
    seq_len = q.shape[0]
    if seq_len % num_chunks:
        raise ValueError(
            f"L={seq_len} must be divisible by {num_chunks} ({layout} layout over N={n} devices)"
        )
    if use_pallas is None:
        use_pallas = pallas_is_default()
    attend = flash_attention if use_pallas else flash_attention_reference

    order = _chunk_order(n, layout)
    spec = PartitionSpec(axis_name)
    sharded = jax.shard_map(
        functools.partial(
            _ring_shard, axis_name=axis_name, num_devices=n, sm_scale=sm_scale, causal=causal,
            layout=layout, attend=attend,
        ),
        mesh=mesh,
        in_specs=(spec, spec, spec),
        out_specs=spec,
        # Interpret-mode Pallas fails the vma check on its own in-kernel loops (JAX 0.11.2).
        check_vma=False,
    )
    # On an Explicit axis (jax.make_mesh's default) shard_map checks the sharding instead of
    # moving data, so the reorders say where their results live.
    explicit = mesh.axis_types[mesh.axis_names.index(axis_name)] == AxisType.Explicit
    sharding = NamedSharding(mesh, spec) if explicit else None
    out = sharded(*(_reorder_chunks(x, order, sharding) for x in (q, k, v)))
    return _reorder_chunks(out, np.argsort(order), sharding)


def ring_attention_reference(
    q: jax.Array,  # [L, Hq, D]
    k: jax.Array,  # [L, Hkv, D]
    v: jax.Array,  # [L, Hkv, D]
    *,
    sm_scale: float,
    causal: bool = True,
) -> jax.Array:  # [L, Hq, D] in q.dtype
    """Plain full attention in jnp on one device, what `ring_attention` must equal."""
    out, _ = flash_attention_reference(q, k, v, sm_scale=sm_scale, causal=causal)
    return out
