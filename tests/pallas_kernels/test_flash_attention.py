"""flash_attention (Pallas, interpret mode on CPU) against flash_attention_reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from pallas_kernels.flash_attention import (
    FlashBlockSizes,
    flash_attention,
    flash_attention_reference,
)

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Jitted once per shape: run eagerly, each jnp op would compile on its own.
reference = jax.jit(flash_attention_reference, static_argnames=("sm_scale", "causal", "soft_cap"))


def random_qkv(seed, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(q_len, num_q_heads, head_dim)] + [(kv_len, num_kv_heads, head_dim)] * 2
    return [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes]


def assert_matches_reference(out, lse, ref_out, ref_lse, dtype):
    out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    # Interpret mode fills outputs with NaN before the kernel runs: NaN means an unwritten element.
    assert not np.isnan(out).any(), "kernel left output elements unwritten (NaN)"
    assert not np.isnan(lse).any(), "kernel left lse elements unwritten (NaN)"
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    rel_err = np.abs(out - ref_out).max() / max(np.abs(ref_out).max(), 1e-30)
    assert rel_err < TOLERANCE[dtype], f"out rel err {rel_err}"
    # Rows that see no key: lse exactly -inf and output exactly 0.
    empty = np.isneginf(ref_lse)  # [Hq, Lq]
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    assert (out.transpose(1, 0, 2)[empty] == 0).all(), "rows with no visible key must be 0"
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=1e-5, atol=1e-5)


# (dtype, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, causal, q_offset, k_offset, soft_cap)
CASES = [
    pytest.param(jnp.float32, 64, 64, 4, 4, 32, True, 0, 0, None, id="f32-causal-mha"),
    pytest.param(jnp.bfloat16, 64, 64, 4, 4, 32, True, 0, 0, None, id="bf16-causal-mha"),
    pytest.param(jnp.float32, 64, 64, 4, 1, 32, False, 0, 0, None, id="f32-full-mqa"),
    pytest.param(jnp.bfloat16, 40, 72, 6, 2, 16, True, 40, 0, None,
                 id="bf16-causal-gqa3-q-after-k-ragged"),
    pytest.param(jnp.float32, 48, 80, 8, 2, 16, True, 17, 31, None,
                 id="f32-causal-gqa4-offsets-partly-empty"),
    pytest.param(jnp.float32, 33, 50, 3, 3, 24, False, 0, 0, 5.0, id="f32-full-softcap-ragged-d24"),
    pytest.param(jnp.bfloat16, 32, 96, 4, 2, 16, True, 64, 0, 3.0,
                 id="bf16-causal-softcap-chunk-at-end"),
]


@pytest.mark.parametrize(
    "dtype,q_len,kv_len,num_q_heads,num_kv_heads,head_dim,causal,q_offset,k_offset,soft_cap", CASES
)
def test_matches_reference(
    dtype, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, causal, q_offset, k_offset, soft_cap
):
    q, k, v = random_qkv(q_len + kv_len, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, dtype)
    args = dict(sm_scale=head_dim**-0.5, causal=causal, q_offset=q_offset, k_offset=k_offset,
                soft_cap=soft_cap)
    out, lse = flash_attention(q, k, v, **args)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_matches_reference(out, lse, *reference(q, k, v, **args), dtype)


def test_small_tiles_walk_full_and_masked_key_blocks():
    # 16x16 tiles over 40 queries / 88 keys: fully visible, diagonal, padded and skipped blocks.
    q, k, v = random_qkv(7, 40, 88, 4, 2, 16, jnp.float32)
    args = dict(sm_scale=0.25, causal=True, q_offset=36, k_offset=3)
    out, lse = flash_attention(q, k, v, **args, block_sizes=FlashBlockSizes(block_q=16, block_k=16))
    assert_matches_reference(out, lse, *reference(q, k, v, **args), jnp.float32)


@pytest.mark.parametrize(
    "dtype,head_dim,interpret",
    [
        (jnp.bfloat16, 24, True),
        (jnp.float32, 16, pltpu.InterpretParams(detect_races=True)),
    ],
    ids=["bf16-d24", "f32-tpu-interpreter"],
)
def test_mosaic_tpu_variant(dtype, head_dim, interpret):
    # The TPU variant (head-major layout, SMEM offset, lane-replicated lse) in interpret mode;
    # InterpretParams also simulates TPU memory spaces and checks for races.
    q, k, v = random_qkv(5, 48, 80, 4, 2, head_dim, dtype)
    args = dict(sm_scale=0.3, causal=True, q_offset=30, k_offset=0, soft_cap=4.0)
    out, lse = flash_attention(q, k, v, **args, lowering="mosaic_tpu", interpret=interpret)
    assert_matches_reference(out, lse, *reference(q, k, v, **args), dtype)


def test_traced_offsets():
    q, k, v = random_qkv(3, 32, 64, 4, 2, 16, jnp.float32)

    @jax.jit
    def both(q_offset, k_offset):
        args = dict(sm_scale=0.25, causal=True, q_offset=q_offset, k_offset=k_offset)
        return flash_attention(q, k, v, **args), flash_attention_reference(q, k, v, **args)

    # (5, 40): queries 0..34 see nothing; (100, 0): every key visible to every query.
    for q_offset, k_offset in [(0, 0), (32, 0), (5, 40), (100, 0)]:
        (out, lse), (ref_out, ref_lse) = both(jnp.int32(q_offset), jnp.int32(k_offset))
        assert_matches_reference(out, lse, ref_out, ref_lse, jnp.float32)
    assert np.isneginf(np.asarray(both(jnp.int32(5), jnp.int32(40))[0][1])[:, :35]).all()


@pytest.mark.parametrize(
    "lowering,device,platform,custom_call",
    [
        ("triton", AbstractDevice("NVIDIA H100 80GB HBM3", None, "cuda"), "cuda", "triton"),
        ("mosaic_tpu", AbstractDevice("TPU v5 lite", 1, "tpu"), "tpu", "tpu_custom_call"),
    ],
    ids=["triton-h100", "mosaic-tpu"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_lowers_ahead_of_time(lowering, device, platform, custom_call, dtype):
    # Interpret mode skips the GPU/TPU lowering rules; lowering for an abstract device runs them
    # (Pallas -> Triton IR / Mosaic MLIR) without the hardware. Compiling that IR is left to the
    # real machine (tools/check_ring_flash_gpu.py).
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    q = jax.ShapeDtypeStruct((512, 8, 80), dtype)
    kv = jax.ShapeDtypeStruct((384, 2, 80), dtype)
    offset = jax.ShapeDtypeStruct((), jnp.int32)

    def attend(q, k, v, q_offset):
        return flash_attention(q, k, v, sm_scale=0.1, causal=True, q_offset=q_offset,
                               soft_cap=30.0, lowering=lowering, interpret=False)

    with use_abstract_mesh(mesh):
        lowered = jax.jit(attend).trace(q, kv, kv, offset).lower(lowering_platforms=(platform,))
    assert custom_call in lowered.as_text()


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
