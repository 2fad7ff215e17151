"""paged_decode_attention: the Triton-style and Mosaic TPU split-K kernels, run in interpret
mode, against paged_decode_attention_reference on seeded random batches; the reference against
dense numpy attention and against the ragged reference; argument checks.

Interpret mode NaN-fills outputs before the kernel runs (see test_ragged_paged_attention), so
a split or a row left unwritten fails the finiteness check in `assert_close`.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from paged_cases import Case, assert_close, decode_args, make_inputs, options, random_case
from pallas_kernels.paged_decode_attention import (paged_decode_attention,
                                                   paged_decode_attention_reference)
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference


def _check(case: Case, seed: int, lowerings: dict):
    x = make_inputs(case, seed)
    args, scales = decode_args(x, case)
    ref = paged_decode_attention_reference(*args, **scales, **options(case))
    for lowering, (interpret, knobs) in lowerings.items():
        out = paged_decode_attention(*args, **scales, **options(case), implementation="pallas",
                                     lowering=lowering, interpret=interpret, **knobs)
        assert out.dtype == args[0].dtype
        assert_close(out, ref, case.dtype)
        empty = np.asarray(args[3]) == 0
        assert not np.asarray(out, np.float32)[empty].any(), "kv_len 0 must give zeros"


@pytest.mark.parametrize("index", range(6))
def test_kernels_match_reference(index):
    case = random_case(index, decode=True)
    # Small key blocks and several splits: splits that end mid-sequence and splits that are empty.
    num_splits = (1, 2, 3, None)[index % 4]
    lowerings = {"triton": (True, dict(block_kv=2 * case.block_size, num_splits=num_splits))}
    if index in (1, 4):
        lowerings["mosaic_tpu"] = (True, dict(block_kv=2 * case.block_size, num_splits=2))
    _check(case, index, lowerings)


def test_long_context_many_splits_head_dim_256():
    case = Case(q_lens=(1, 1), kv_lens=(200, 3), num_q_heads=8, num_kv_heads=2, head_dim=256,
                block_size=16, dtype="bfloat16", sliding_window=150)
    _check(case, 11, {"triton": (True, dict(num_splits=4))})


def test_window_edge_on_every_block_offset():
    case = Case(q_lens=(1,) * 8, kv_lens=tuple(range(33, 41)), num_q_heads=4, num_kv_heads=2,
                head_dim=64, block_size=4, sliding_window=16)
    _check(case, 13, {"triton": (True, dict(block_kv=8, num_splits=2))})


def test_tpu_kernel_in_tpu_interpreter_with_race_detection():
    case = Case(q_lens=(1, 1), kv_lens=(13, 0), num_q_heads=4, num_kv_heads=2, head_dim=128,
                block_size=4, kv_dtype="float8_e4m3fn", soft_cap=10.0)
    _check(case, 12, {"mosaic_tpu": (pltpu.InterpretParams(detect_races=True),
                                     dict(block_kv=8, num_splits=2))})


def test_reference_matches_ragged_reference_and_dense_numpy():
    case = Case(q_lens=(1, 1, 1), kv_lens=(5, 17, 9), num_q_heads=4, num_kv_heads=2,
                head_dim=16, block_size=4, sliding_window=6)
    x = make_inputs(case, 21)
    args, scales = decode_args(x, case)
    out = paged_decode_attention_reference(*args, **scales, **options(case))
    ragged = ragged_paged_attention_reference(x["q"], x["k_pages"], x["v_pages"], x["kv_lens"],
                                              x["block_tables"], x["cu_q_lens"], x["num_seqs"],
                                              **options(case))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ragged)[:3], rtol=1e-5, atol=1e-6)

    # Dense check of sequence 1: its keys are its pages laid end to end.
    k_pages, v_pages = np.asarray(x["k_pages"], np.float64), np.asarray(x["v_pages"], np.float64)
    pages = np.asarray(x["block_tables"])[1, :5]
    k = k_pages[pages].reshape(-1, 2, 16)[:17]
    v = v_pages[pages].reshape(-1, 2, 16)[:17]
    q = np.asarray(x["q"], np.float64)[1].reshape(2, 2, 16)
    scores = np.einsum("kgd,lkd->kgl", q, k) * case.sm_scale
    scores[:, :, :17 - 6] = -np.inf
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("kgl,lkd->kgd", probs, v).reshape(4, 16)
    np.testing.assert_allclose(np.asarray(out)[1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("q", jnp.zeros((3, 4, 32), jnp.float32), "q must have shape"),
    ("q", jnp.zeros((2, 4, 64), jnp.float32), r"kv_lens must have shape \[num_seqs=2\]"),
    ("q", jnp.zeros((3, 4, 64, 1), jnp.float32), "q must have shape"),
    ("k_pages", lambda x: x.astype(jnp.bfloat16), "v_pages dtype"),
    ("k_pages", lambda x: x[:, :, :1], "v_pages must have the shape of k_pages"),
    ("kv_lens", jnp.zeros((2,), jnp.int32), "kv_lens must have shape"),
    ("kv_lens", jnp.zeros((3,), jnp.float32), "kv_lens must be an integer array"),
    ("block_tables", jnp.zeros((2, 4), jnp.int32), "block_tables must have shape"),
])
def test_bad_shapes_raise_value_error(field, value, match):
    case = Case(q_lens=(1, 1, 1), kv_lens=(5, 3, 1), num_q_heads=4, num_kv_heads=2, head_dim=64,
                block_size=4)
    x = make_inputs(case, 0)
    args, _ = decode_args(x, case)
    named = dict(zip(("q", "k_pages", "v_pages", "kv_lens", "block_tables"), args))
    named[field] = value(named[field]) if callable(value) else value
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(*named.values(), sm_scale=0.1, implementation="pallas")


def test_triton_needs_power_of_two_block_size():
    case = Case(q_lens=(1,), kv_lens=(5,), num_q_heads=4, num_kv_heads=2, head_dim=64,
                block_size=6)
    args, _ = decode_args(make_inputs(case, 0), case)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        paged_decode_attention(*args, sm_scale=0.1, implementation="pallas", lowering="triton")
