"""Flash attention for one (query block, key block) pair, returning the log-sum-exp for merging.

`flash_attention(q, k, v)` attends `q [Lq, Hq, D]` to `k, v [Lk, Hkv, D]` and returns the output and
the per-row log-sum-exp `lse [Hq, Lq]` (float32), so that partial results over disjoint key sets
can be merged exactly (ring attention does this, one visiting key block per step). Causal masking
uses global positions: query row `i` sits at `q_offset + i`, key `j` at `k_offset + j`, and `i`
sees `j` iff `k_offset + j <= q_offset + i`. A row that sees no key returns 0 with lse -inf.

Layers, as in JAX's own Pallas ops: the kernel (one query block of one head, walking key blocks
with an online softmax), the grid and BlockSpecs, the public validating function, and the pure-jnp
reference `flash_attention_reference` with the same signature.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backend import (
    KernelTarget,
    kernel_target,
    tpu_compiler_params,
    triton_compiler_params,
)

_NT_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: q @ k.T
_TPU_LANES = 128


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
def _flash_kernel(
    shift_ref,  # [1] int32: q_offset - k_offset, the causal diagonal's offset
    q_ref,  # [block_q, head_dim]
    k_ref,  # [kv_len_padded, head_dim]
    v_ref,  # [kv_len_padded, head_dim]
    o_ref,  # [block_q, head_dim]
    lse_ref,  # [block_q] float32; on TPU [block_q, 128], the value repeated across lanes
    *,
    sm_scale: float,
    causal: bool,
    soft_cap: float | None,
    block_q: int,
    block_k: int,
    kv_len: int,  # real keys; rows past it in k_ref/v_ref are padding
    num_q_blocks: int,
):
    # Heavy (late) query blocks first, so the causal tail is not one long block at the end.
    q_block = num_q_blocks - 1 - pl.program_id(1)
    q = q_ref[...]
    # Key index (relative to key 0 of this call) of the diagonal for this block's first row.
    q_first = q_block * block_q + shift_ref[0]
    if causal:
        # Key blocks [0, num_full) are visible to every row; [num_full, num_visible) need a mask.
        num_full = lax.div(jnp.clip(q_first + 1, 0, kv_len), block_k)
        visible_keys = jnp.clip(q_first + block_q, 0, kv_len)
        num_visible = lax.div(visible_keys + block_k - 1, block_k)
    else:
        num_full = kv_len // block_k
        num_visible = pl.cdiv(kv_len, block_k)

    # Row statistics are kept as [block_q, 1] columns, which Mosaic lays out without relayouts.
    def step(j, carry, *, masked: bool):
        acc, m_prev, l_prev = carry  # [block_q, head_dim], [block_q, 1], [block_q, 1] float32
        keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        # float32 inputs get full-precision dots (Triton would take TF32 otherwise).
        precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        s = lax.dot_general(q, k, _NT_DIMS, precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        if masked:
            k_idx = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            visible = k_idx < kv_len
            if causal:
                visible = visible & (k_idx <= q_first + lax.broadcasted_iota(jnp.int32, s.shape, 0))
            s = jnp.where(visible, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # A row with nothing visible yet keeps m = -inf; subtract 0 there so exp gives 0, not NaN.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
        return alpha * acc + pv, m_next, l_next

    carry = (
        jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32),
        jnp.full((block_q, 1), -jnp.inf, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
    )
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(num_full, num_visible, functools.partial(step, masked=True), carry)

    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)  # [block_q, 1]
    if lse_ref.ndim == 2:
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)
    else:
        lse_ref[...] = lse[:, 0]


# ---------------------------------------------------------------------------------------------
# Grid and BlockSpecs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
    """Tile sizes; `num_warps`/`num_stages` only matter for the Triton lowering."""

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Starting points (Triton row from KERNELS.md's prefill figures; re-tune on hardware). Interpret
# mode runs the grid as a scan, so there fewer, larger tiles are faster.
_DEFAULT_BLOCK_SIZES = {
    "triton": FlashBlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3),
    "mosaic_tpu": FlashBlockSizes(block_q=128, block_k=128),
    "interpret": FlashBlockSizes(block_q=32, block_k=32),
}


def _compiler_params(target: KernelTarget, sizes: FlashBlockSizes):
    if target.lowering == "mosaic_tpu":
        return tpu_compiler_params(("parallel", "parallel"))
    return triton_compiler_params(sizes.num_warps, sizes.num_stages)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _flash_call(q, k, v, shift, *, sm_scale, causal, soft_cap, kv_len, sizes, target):
    """q [Lq_pad, Hq, D], k/v [Lk_pad, Hkv, D] (padded to the blocks) -> (out, lse [Hq, Lq_pad]).

    `kv_len` is the number of real keys; the rest of k/v is padding the kernel masks out.
    """
    q_len, num_q_heads, head_dim = q.shape
    kv_len_padded, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    num_q_blocks = q_len // sizes.block_q
    # A fresh partial per call (KERNELS.md: a reused kernel function can keep a stale grid).
    kernel = functools.partial(
        _flash_kernel,
        sm_scale=sm_scale,
        causal=causal,
        soft_cap=soft_cap,
        block_q=sizes.block_q,
        block_k=sizes.block_k,
        kv_len=kv_len,
        num_q_blocks=num_q_blocks,
    )

    def q_block(i):
        return num_q_blocks - 1 - i

    # Grid (head, query block): consecutive programs share a K/V head.
    mosaic = target.lowering == "mosaic_tpu"
    if mosaic:
        # Mosaic wants the two minor block dims tiled, so heads go first: [H, L, D].
        q, k, v = (jnp.swapaxes(x, 0, 1) for x in (q, k, v))
        q_spec = pl.BlockSpec((None, sizes.block_q, head_dim), lambda h, i: (h, q_block(i), 0))
        kv_spec = pl.BlockSpec((None, kv_len_padded, head_dim), lambda h, i: (h // group, 0, 0))
        shift_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
        # Per-row values repeated over 128 lanes, as Mosaic tiles want.
        lse_shape = (num_q_heads, q_len, _TPU_LANES)
        lse_spec = pl.BlockSpec((None, sizes.block_q, _TPU_LANES), lambda h, i: (h, q_block(i), 0))
    else:
        # Triton (and interpret mode) read the natural [L, H, D] layout with strided loads.
        q_spec = pl.BlockSpec((sizes.block_q, None, head_dim), lambda h, i: (q_block(i), h, 0))
        kv_spec = pl.BlockSpec((kv_len_padded, None, head_dim), lambda h, i: (0, h // group, 0))
        shift_spec = pl.BlockSpec((1,), lambda h, i: (0,))
        lse_shape = (num_q_heads, q_len)
        lse_spec = pl.BlockSpec((None, sizes.block_q), lambda h, i: (h, q_block(i)))
    # Inside a shard_map (check_vma) the outputs vary over the same mesh axes as q.
    mat = jax.typeof(q).mat

    out, lse = pl.pallas_call(
        kernel,
        grid=(num_q_heads, num_q_blocks),
        in_specs=[shift_spec, q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype, manual_axis_type=mat),
            jax.ShapeDtypeStruct(lse_shape, jnp.float32, manual_axis_type=mat),
        ],
        compiler_params=_compiler_params(target, sizes),
        interpret=target.interpret,
        name="flash_attention",
    )(shift, q, k, v)
    if mosaic:
        out, lse = jnp.swapaxes(out, 0, 1), lse[:, :, 0]
    return out, lse


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def check_attention_inputs(q, k, v, soft_cap=None):
    """Raises ValueError, naming the argument, unless q [Lq, Hq, D], k = v [Lk, Hkv, D] fit."""
    if q.ndim != 3:
        raise ValueError(f"q must be [Lq, Hq, D], got shape {q.shape}")
    if k.ndim != 3:
        raise ValueError(f"k must be [Lk, Hkv, D], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    if q.shape[0] == 0 or k.shape[0] == 0:
        raise ValueError(f"q and k need at least one token, got Lq={q.shape[0]}, Lk={k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} != k head_dim {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive or None, got {soft_cap}")


def _offset_array(q_offset, k_offset):
    for name, x in (("q_offset", q_offset), ("k_offset", k_offset)):
        if jnp.ndim(x) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(x)}")
    shift = jnp.asarray(q_offset, jnp.int32) - jnp.asarray(k_offset, jnp.int32)
    return shift.reshape(1)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "causal", "soft_cap", "block_sizes", "lowering", "interpret"),
)
def flash_attention(
    q: jax.Array,  # [Lq, Hq, D]
    k: jax.Array,  # [Lk, Hkv, D]
    v: jax.Array,  # [Lk, Hkv, D]
    *,
    sm_scale: float,
    causal: bool,
    q_offset: int | jax.Array = 0,
    k_offset: int | jax.Array = 0,
    soft_cap: float | None = None,
    block_sizes: FlashBlockSizes | None = None,
    lowering: str | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> tuple[jax.Array, jax.Array]:  # out [Lq, Hq, D] in q.dtype, lse [Hq, Lq] float32
    """Attention of q to (k, v) in one Pallas kernel, returning the output and log-sum-exp.

    `q_offset`/`k_offset` are the global positions of q[0] and k[0] (Python ints or traced int
    scalars) and only matter when `causal`. Query heads map to K/V heads in groups of Hq // Hkv.
    `lowering`/`interpret` default to this platform's (`backend.kernel_target`): Triton on GPU,
    Mosaic on TPU, the Triton variant interpreted on CPU; tests override them.
    """
    check_attention_inputs(q, k, v, soft_cap)
    shift = _offset_array(q_offset, k_offset)
    target = kernel_target(lowering, interpret)
    q_len, _, head_dim = q.shape
    kv_len = k.shape[0]
    table_key = "interpret" if target.interpret else target.lowering
    sizes = block_sizes or _DEFAULT_BLOCK_SIZES[table_key]
    # Tiles are powers of two of at least 16: Triton dots need every dim >= 16 and Mosaic wants
    # sublane multiples (16 for packed bf16). Short inputs get one smaller tile.
    for name in ("block_q", "block_k"):
        size = getattr(sizes, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"block_sizes.{name} must be a power of two >= 16, got {size}")
    block_q = min(sizes.block_q, max(_pow2_at_least(q_len), 16))
    block_k = min(sizes.block_k, max(_pow2_at_least(kv_len), 16))
    sizes = dataclasses.replace(sizes, block_q=block_q, block_k=block_k)

    # Pad tokens to whole tiles (padded keys are masked in the kernel, padded rows dropped) and,
    # for Triton, head_dim to a power of two (zero columns change neither q.k nor the kept output).
    triton = target.lowering == "triton"
    head_dim_padded = max(_pow2_at_least(head_dim), 16) if triton else head_dim
    q_len_padded, kv_len_padded = _round_up(q_len, block_q), _round_up(kv_len, block_k)

    def pad(x, length):
        return jnp.pad(x, ((0, length - x.shape[0]), (0, 0), (0, head_dim_padded - head_dim)))

    if (q_len_padded, kv_len_padded, head_dim_padded) != (q_len, kv_len, head_dim):
        q, k, v = pad(q, q_len_padded), pad(k, kv_len_padded), pad(v, kv_len_padded)
    out, lse = _flash_call(
        q, k, v, shift, sm_scale=sm_scale, causal=causal, soft_cap=soft_cap, kv_len=kv_len,
        sizes=sizes, target=target,
    )
    return out[:q_len, :, :head_dim], lse[:, :q_len]


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def flash_attention_reference(
    q: jax.Array,  # [Lq, Hq, D]
    k: jax.Array,  # [Lk, Hkv, D]
    v: jax.Array,  # [Lk, Hkv, D]
    *,
    sm_scale: float,
    causal: bool,
    q_offset: int | jax.Array = 0,
    k_offset: int | jax.Array = 0,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:  # out [Lq, Hq, D] in q.dtype, lse [Hq, Lq] float32
    """Pure-jnp attention in float32 with the same contract as `flash_attention`."""
    check_attention_inputs(q, k, v, soft_cap)
    shift = _offset_array(q_offset, k_offset)[0]
    q_len, num_q_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    highest = lax.Precision.HIGHEST
    q_g = q.astype(jnp.float32).reshape(q_len, num_kv_heads, group, head_dim)
    s = jnp.einsum("qhgd,khd->hgqk", q_g, k.astype(jnp.float32), precision=highest) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    if causal:
        q_pos = shift + jnp.arange(q_len, dtype=jnp.int32)  # relative to key 0
        k_pos = jnp.arange(kv_len, dtype=jnp.int32)
        s = jnp.where(k_pos[None, :] <= q_pos[:, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [Hkv, group, Lq]; -inf where nothing is visible
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    out = jnp.einsum("hgqk,khd->qhgd", p, v.astype(jnp.float32), precision=highest)
    out = out.reshape(q_len, num_q_heads, head_dim).astype(q.dtype)
    return out, lse.reshape(num_q_heads, q_len)

