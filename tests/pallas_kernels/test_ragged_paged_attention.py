"""ragged_paged_attention: the Triton-style and the Mosaic TPU kernels, run in interpret mode,
against ragged_paged_attention_reference on seeded random ragged batches; the reference against
dense numpy attention; argument checks.

Interpret mode fills every output buffer with NaN before the kernel runs (checked below), so an
output row the kernel should have written but did not shows up as NaN and fails `assert_close`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from paged_cases import Case, assert_close, make_inputs, options, ragged_args, random_case
from pallas_kernels.ragged_paged_attention import (ragged_paged_attention,
                                                   ragged_paged_attention_reference)


def _valid_rows(x):
    num_real = int(x["cu_q_lens"][int(x["num_seqs"])])
    return np.arange(x["q"].shape[0]) < num_real


def _check(case: Case, seed: int, lowerings: dict):
    """Runs each {lowering: (interpret, block overrides)} kernel against one reference call."""
    x = make_inputs(case, seed)
    args, scales = ragged_args(x)
    ref = ragged_paged_attention_reference(*args, **scales, **options(case))
    for lowering, (interpret, blocks) in lowerings.items():
        out = ragged_paged_attention(*args, **scales, **options(case), implementation="pallas",
                                     lowering=lowering, interpret=interpret, **blocks)
        assert out.dtype == x["q"].dtype
        assert_close(out, ref, case.dtype, valid_rows=_valid_rows(x))


@pytest.mark.parametrize("index", range(6))
def test_kernels_match_reference(index):
    case = random_case(index, decode=False)
    # Small blocks, so that a chunk spans several query blocks and a walk several key blocks.
    lowerings = {"triton": (True, dict(block_q=16, block_kv=2 * case.block_size))}
    if index in (0, 3):
        lowerings["mosaic_tpu"] = (True, dict(block_q=8, block_kv=2 * case.block_size))
    _check(case, index, lowerings)


def test_head_dim_256_with_tuned_blocks():
    case = dataclasses.replace(random_case(5, decode=False, head_dim=256), dtype="bfloat16")
    _check(case, 99, {"triton": (True, {})})


def test_window_and_causal_edges_on_every_block_offset():
    """Contexts 33..40 put the window's first key and the causal diagonal at every offset of
    an 8-key block: the edges between masked and unmasked blocks must be exact."""
    case = Case(q_lens=(1,) * 8 + (13,), kv_lens=tuple(range(33, 41)) + (40,), num_q_heads=4,
                num_kv_heads=2, head_dim=64, block_size=4, sliding_window=16)
    _check(case, 8, {"triton": (True, dict(block_q=16, block_kv=8))})


def test_tpu_kernel_in_tpu_interpreter_with_race_detection():
    case = Case(q_lens=(3, 1), kv_lens=(11, 6), num_q_heads=4, num_kv_heads=2, head_dim=128,
                block_size=4, kv_dtype="int8", sliding_window=7)
    _check(case, 7, {"mosaic_tpu": (pltpu.InterpretParams(detect_races=True),
                                    dict(block_q=8, block_kv=8))})


def test_auto_on_cpu_is_the_reference():
    case = random_case(1, decode=False)
    x = make_inputs(case, 5)
    args, scales = ragged_args(x)
    out = ragged_paged_attention(*args, **scales, **options(case))
    ref = ragged_paged_attention_reference(*args, **scales, **options(case))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_interpret_mode_poisons_unwritten_outputs():
    """The premise of the unwritten-output checks above."""
    def half(o_ref):
        o_ref[:4] = jnp.ones((4, 8), jnp.float32)

    out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((8, 8), jnp.float32),
                         interpret=True)()
    assert np.isnan(np.asarray(out[4:])).all()


def _dense_causal_attention(q, k, v, sm_scale):
    """q [q_len, H, D], k/v [kv_len, H, D]; queries are the last q_len positions."""
    q_len, kv_len = q.shape[0], k.shape[0]
    scores = np.einsum("qhd,khd->hqk", q, k) * sm_scale
    q_pos = np.arange(kv_len - q_len, kv_len)[:, None]
    scores = np.where(np.arange(kv_len)[None, :] <= q_pos, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v)


def test_reference_matches_dense_numpy_attention():
    rng = np.random.default_rng(0)
    block_size, heads, head_dim, kv_len, q_len = 4, 2, 16, 10, 6
    k = rng.standard_normal((kv_len, heads, head_dim))
    v = rng.standard_normal((kv_len, heads, head_dim))
    q = rng.standard_normal((q_len, heads, head_dim))
    num_pages = 3
    k_pages = np.zeros((num_pages, block_size, heads, head_dim))
    v_pages = np.zeros_like(k_pages)
    k_pages.reshape(-1, heads, head_dim)[:kv_len] = k
    v_pages.reshape(-1, heads, head_dim)[:kv_len] = v
    order = np.array([2, 0, 1])  # page i of the sequence lives in cache block order[i]
    out = ragged_paged_attention_reference(
        jnp.asarray(q, jnp.float32), jnp.asarray(k_pages[np.argsort(order)], jnp.float32),
        jnp.asarray(v_pages[np.argsort(order)], jnp.float32), jnp.array([kv_len], jnp.int32),
        jnp.asarray(order[None], jnp.int32), jnp.array([0, q_len], jnp.int32), jnp.int32(1),
        sm_scale=0.3)
    expected = _dense_causal_attention(q, k, v, 0.3)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def _bad_inputs():
    case = Case(q_lens=(2, 1), kv_lens=(5, 3), num_q_heads=4, num_kv_heads=2, head_dim=64,
                block_size=4)
    x = make_inputs(case, 0)
    return x


@pytest.mark.parametrize("field,value,match", [
    ("q", jnp.zeros((3, 4, 32), jnp.float32), "q must have shape"),
    ("q", jnp.zeros((3, 3, 64), jnp.float32), "not a multiple of num_kv_heads"),
    ("k_pages", jnp.zeros((8, 4, 2, 64, 1), jnp.float32), "k_pages must have shape"),
    ("v_pages", jnp.zeros((9, 4, 2, 64), jnp.float32), "v_pages must have the shape"),
    ("kv_lens", jnp.zeros((3,), jnp.int32), "block_tables must have shape"),
    ("block_tables", jnp.zeros((2,), jnp.int32), "block_tables must have shape"),
    ("cu_q_lens", jnp.zeros((2,), jnp.int32), "cu_q_lens must have shape"),
    ("cu_q_lens", jnp.zeros((3,), jnp.float32), "cu_q_lens must be an integer array"),
    ("num_seqs", jnp.zeros((2,), jnp.int32), "num_seqs must have shape"),
    ("k_scales", jnp.ones((3, 2), jnp.float32), "k_scales and v_scales must be given together"),
])
def test_bad_shapes_raise_value_error(field, value, match):
    x = _bad_inputs()
    x[field] = value
    args, scales = ragged_args(x)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, **scales, sm_scale=0.1, implementation="pallas")


def test_quantized_pages_need_scales_of_the_right_shape():
    x = _bad_inputs()
    x["k_pages"] = x["k_pages"].astype(jnp.int8)
    x["v_pages"] = x["v_pages"].astype(jnp.int8)
    args, _ = ragged_args(x)
    with pytest.raises(ValueError, match="need k_scales"):
        ragged_paged_attention(*args, sm_scale=0.1)
    bad = jnp.ones((2, 2), jnp.float32)
    with pytest.raises(ValueError, match=r"k_scales must have shape \[num_blocks="):
        ragged_paged_attention(*args, k_scales=bad, v_scales=bad, sm_scale=0.1)


def test_bad_options_raise_value_error():
    args, scales = ragged_args(_bad_inputs())
    with pytest.raises(ValueError, match="implementation must be one of"):
        ragged_paged_attention(*args, sm_scale=0.1, implementation="fast")
    with pytest.raises(ValueError, match="sliding_window must be > 0"):
        ragged_paged_attention(*args, sm_scale=0.1, sliding_window=0)
    with pytest.raises(ValueError, match="lowering must be one of"):
        ragged_paged_attention(*args, sm_scale=0.1, implementation="pallas", lowering="cuda")
