"""flash_attention (Pallas, interpret mode on CPU) against flash_attention_reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import (
    FlashBlockSizes,
    flash_attention,
    flash_attention_reference,
)

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def random_qkv(seed, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, dtype):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (q_len, num_q_heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (kv_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (kv_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def assert_matches_reference(out, lse, ref_out, ref_lse, dtype):
    out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    # Interpret mode fills outputs with NaN before the kernel runs: NaN means an unwritten element.
    assert not np.isnan(out).any(), "kernel left output elements unwritten (NaN)"
    assert not np.isnan(lse).any(), "kernel left lse elements unwritten (NaN)"
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    rel_err = np.abs(out - ref_out).max() / max(np.abs(ref_out).max(), 1e-30)
    assert rel_err < TOLERANCE[dtype], f"out rel err {rel_err}"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)


# (q_len, kv_len, num_q_heads, num_kv_heads, head_dim, causal, q_offset, k_offset, soft_cap)
CASES = [
    pytest.param(64, 64, 4, 4, 32, True, 0, 0, None, id="causal-mha"),
    pytest.param(64, 64, 4, 1, 32, False, 0, 0, None, id="full-mqa"),
    pytest.param(40, 72, 6, 2, 16, True, 40, 0, None, id="causal-gqa3-q-after-k-ragged"),
    pytest.param(48, 80, 8, 2, 16, True, 17, 31, None, id="causal-gqa4-offsets-partly-empty"),
    pytest.param(33, 50, 3, 3, 24, False, 0, 0, 5.0, id="full-softcap-ragged-d24"),
    pytest.param(32, 96, 4, 2, 16, True, 64, 0, 3.0, id="causal-softcap-chunk-at-end"),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "q_len,kv_len,num_q_heads,num_kv_heads,head_dim,causal,q_offset,k_offset,soft_cap", CASES
)
def test_matches_reference(
    dtype, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, causal, q_offset, k_offset, soft_cap
):
    q, k, v = random_qkv(q_len + kv_len, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, dtype)
    args = dict(sm_scale=head_dim**-0.5, causal=causal, q_offset=q_offset, k_offset=k_offset,
                soft_cap=soft_cap)
    out, lse = flash_attention(q, k, v, **args)
    ref_out, ref_lse = flash_attention_reference(q, k, v, **args)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_matches_reference(out, lse, ref_out, ref_lse, dtype)


def test_small_tiles_walk_full_and_masked_key_blocks():
    # 16x16 tiles over 40 queries / 88 keys: fully visible, diagonal, padded and skipped blocks.
    q, k, v = random_qkv(7, 40, 88, 4, 2, 16, jnp.float32)
    args = dict(sm_scale=0.25, causal=True, q_offset=36, k_offset=3)
    out, lse = flash_attention(q, k, v, **args, block_sizes=FlashBlockSizes(block_q=16, block_k=16))
    assert_matches_reference(out, lse, *flash_attention_reference(q, k, v, **args), jnp.float32)


@pytest.mark.parametrize(
    "dtype,head_dim,interpret",
    [
        (jnp.float32, 16, True),
        (jnp.bfloat16, 24, True),
        (jnp.float32, 16, pltpu.InterpretParams(detect_races=True)),
    ],
    ids=["f32", "bf16-d24", "f32-tpu-interpreter"],
)
def test_mosaic_tpu_variant(dtype, head_dim, interpret):
    # The TPU variant (head-major layout, SMEM offset, lane-replicated lse) in interpret mode;
    # InterpretParams also simulates TPU memory spaces and checks for races.
    q, k, v = random_qkv(5, 48, 80, 4, 2, head_dim, dtype)
    args = dict(sm_scale=0.3, causal=True, q_offset=30, k_offset=0, soft_cap=4.0)
    out, lse = flash_attention(q, k, v, **args, lowering="mosaic_tpu", interpret=interpret)
    assert_matches_reference(out, lse, *flash_attention_reference(q, k, v, **args), dtype)


def test_traced_offsets():
    q, k, v = random_qkv(3, 32, 64, 4, 2, 16, jnp.float32)

    @jax.jit
    def both(q_offset, k_offset):
        args = dict(sm_scale=0.25, causal=True, q_offset=q_offset, k_offset=k_offset)
        return flash_attention(q, k, v, **args), flash_attention_reference(q, k, v, **args)

    for q_offset, k_offset in [(0, 0), (32, 0), (5, 40), (100, 0)]:
        (out, lse), (ref_out, ref_lse) = both(jnp.int32(q_offset), jnp.int32(k_offset))
        assert_matches_reference(out, lse, ref_out, ref_lse, jnp.float32)


def test_rows_without_visible_keys_give_zero_and_neg_inf():
    # Keys start at position 16; queries 0..15 see nothing, 16..31 see a growing prefix.
    q, k, v = random_qkv(11, 32, 32, 2, 1, 16, jnp.float32)
    out, lse = flash_attention(q, k, v, sm_scale=0.25, causal=True, q_offset=0, k_offset=16)
    out, lse = np.asarray(out), np.asarray(lse)
    assert (out[:16] == 0).all() and np.isneginf(lse[:, :16]).all()
    assert np.isfinite(lse[:, 16:]).all() and (np.abs(out[16:]).sum(axis=-1) > 0).all()


@pytest.mark.parametrize("tiles", [FlashBlockSizes(8, 32), FlashBlockSizes(32, 48)])
def test_bad_block_sizes_raise(tiles):
    q, k, v = random_qkv(0, 32, 32, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="block_sizes"):
        flash_attention(q, k, v, sm_scale=1.0, causal=True, block_sizes=tiles)


def _f32(*shape):
    return jnp.ones(shape, jnp.float32)


@pytest.mark.parametrize(
    "q,k,v,kwargs,match",
    [
        (_f32(8, 4), _f32(8, 2, 16), _f32(8, 2, 16), {}, "q must be"),
        (_f32(8, 4, 16), _f32(8, 32), _f32(8, 2, 16), {}, "k must be"),
        (_f32(8, 4, 16), _f32(8, 2, 16), _f32(8, 2, 8), {}, "v must have"),
        (_f32(8, 4, 16), _f32(8, 2, 8), _f32(8, 2, 8), {}, "head_dim"),
        (_f32(8, 4, 16), _f32(8, 3, 16), _f32(8, 3, 16), {}, "multiple of k heads"),
        (_f32(8, 4, 16), _f32(0, 2, 16), _f32(0, 2, 16), {}, "at least one token"),
        (_f32(8, 4, 16), _f32(8, 2, 16).astype(jnp.bfloat16), _f32(8, 2, 16), {}, "dtype"),
        (_f32(8, 4, 16), _f32(8, 2, 16), _f32(8, 2, 16), {"soft_cap": 0.0}, "soft_cap"),
        (_f32(8, 4, 16), _f32(8, 2, 16), _f32(8, 2, 16), {"q_offset": jnp.zeros(2, jnp.int32)},
         "q_offset"),
    ],
)
@pytest.mark.parametrize("fn", [flash_attention, flash_attention_reference],
                         ids=["pallas", "reference"])
def test_bad_shapes_raise(fn, q, k, v, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, sm_scale=1.0, causal=True, **kwargs)
