"""Flash-attention arithmetic shared by every kernel in this package: the online-softmax update
over one block of keys, the final normalisation, and the log-sum-exp merge of partial results.

The in-kernel functions use only jnp/lax operations that both the Triton and the Mosaic TPU
lowerings accept: 2-D dots, elementwise math, and row reductions kept as [rows, 1].
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Finite, so that exp(MASK_VALUE - MASK_VALUE) stays 1 instead of NaN in a fully masked block.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Scores are kept in base 2 inside the kernels: exp2 is one fast instruction on GPUs, exp is not.
LOG2E = float(np.log2(np.e))

_NT = (((1,), (1,)), ((), ()))  # a [m, k] x b [n, k] -> [m, n]
_NN = (((1,), (0,)), ((), ()))  # a [m, k] x b [k, n] -> [m, n]


def initial_state(rows: int, head_dim: int):
    """(m, l, acc): running max [rows, 1] (base-2 score units), running sum [rows, 1],
    unnormalised output [rows, D]."""
    return (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def attend_block(q, k, v, mask, m_prev, l_prev, acc_prev, *, sm_scale: float,
                 soft_cap: float | None, k_scale=None, v_scale=None):
    """One online-softmax step of rows of q against a block of keys.

    q: [rows, D] in the compute dtype (the query's dtype); k, v: [keys, D] in any dtype (cast
    to the compute dtype; int8 and fp8 values are exact in bf16 and f32); mask: bool,
    broadcastable to [rows, keys], or None where every row sees every key; k_scale, v_scale:
    [1, keys] float32 dequantization scales or None; m_prev, l_prev: [rows, 1] f32 (m in
    base-2 units); acc_prev: [rows, D] f32. Returns (m, l, acc).
    """
    k = k.astype(q.dtype)
    v = v.astype(q.dtype)
    # f32 inputs get true f32 dots: the default on GPUs is TF32 (relative error ~3e-4).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = lax.dot_general(q, k, _NT, precision=precision,
                        preferred_element_type=jnp.float32)  # [rows, keys]
    if k_scale is not None:
        s = s * k_scale  # a per-key scale commutes with the dot over head_dim
    if soft_cap is None:
        s = s * (sm_scale * LOG2E)
    else:
        s = (soft_cap * LOG2E) * jnp.tanh(s * (sm_scale / soft_cap))
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m_prev - m_next)
    # Zero masked keys explicitly: in a block where a row sees no key, m_next is MASK_VALUE and
    # exp2(s - m_next) would be 1 for every masked key.
    p = jnp.exp2(s - m_next)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    if v_scale is not None:
        p = p * v_scale
    pv = lax.dot_general(p.astype(v.dtype), v, _NN, precision=precision,
                         preferred_element_type=jnp.float32)
    return m_next, l_next, alpha * acc_prev + pv


def finalize(m, l, acc):
    """Normalised output [rows, D] f32 and natural log-sum-exp of the scores [rows, 1]; rows
    that saw no key give 0 and MASK_VALUE."""
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    out = jnp.where(seen, acc / safe_l, 0.0)
    lse = jnp.where(seen, m * (1.0 / LOG2E) + jnp.log(safe_l), MASK_VALUE)
    return out, lse


def combine_splits(out: jax.Array, lse: jax.Array) -> jax.Array:
    """Merges partial attention over disjoint key sets.

    out: [splits, ..., D] normalised partial outputs; lse: [splits, ..., 1] their log-sum-exps
    (MASK_VALUE where a split saw no key). Returns [..., D] f32; zeros where no split saw a key.
    """
    seen = lse > 0.5 * MASK_VALUE
    lse_max = jnp.max(lse, axis=0, keepdims=True)
    w = jnp.where(seen, jnp.exp(lse - lse_max), 0.0)
    denom = jnp.sum(w, axis=0)
    num = jnp.sum(w * out.astype(jnp.float32), axis=0)
    return jnp.where(denom > 0.0, num / jnp.where(denom > 0.0, denom, 1.0), 0.0)
