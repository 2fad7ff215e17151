"""ring_attention over 4 and 8 simulated CPU devices against plain full attention.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import pallas_kernels.ring_attention as ring_module
from pallas_kernels.ring_attention import ring_attention, ring_attention_reference


def sequence_mesh(num_devices, axis_type=AxisType.Auto):
    if len(jax.devices()) < num_devices:
        pytest.skip(
            f"needs {num_devices} devices, have {len(jax.devices())}: run with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    return jax.sharding.Mesh(
        np.array(jax.devices()[:num_devices]), ("sequence",), axis_types=(axis_type,)
    )


def random_qkv(seed, seq_len, num_q_heads, num_kv_heads, head_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(seq_len, num_q_heads, head_dim)] + [(seq_len, num_kv_heads, head_dim)] * 2
    return [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes]


# Jitted once per shape: run eagerly, each jnp op would compile on its own.
reference = jax.jit(ring_attention_reference, static_argnames=("sm_scale", "causal"))


def relative_error(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any(), "ring attention left output elements unwritten (NaN)"
    return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("use_pallas", [True, False], ids=["pallas", "reference-block"])
@pytest.mark.parametrize("num_devices", [4, 8])
def test_zigzag_matches_full_causal_attention(num_devices, use_pallas):
    mesh = sequence_mesh(num_devices)
    seq_len = 16 * num_devices  # chunks of 8 tokens
    q, k, v = random_qkv(num_devices, seq_len, 4, 2, 16)
    out = ring_attention(q, k, v, mesh=mesh, sm_scale=0.25, use_pallas=use_pallas)
    ref = reference(q, k, v, sm_scale=0.25)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize(
    "layout,causal,dtype",
    [
        ("contiguous", True, jnp.float32),
        ("zigzag", False, jnp.float32),
        ("zigzag", True, jnp.bfloat16),
    ],
)
def test_other_layouts_masks_and_dtypes(layout, causal, dtype):
    mesh = sequence_mesh(4)
    q, k, v = random_qkv(5, 64, 6, 2, 16, dtype)
    out = ring_attention(q, k, v, mesh=mesh, sm_scale=0.25, causal=causal, layout=layout,
                         use_pallas=True)
    ref = reference(q, k, v, sm_scale=0.25, causal=causal)
    assert out.dtype == dtype
    assert relative_error(out, ref) < (1e-5 if dtype == jnp.float32 else 2e-2)


def test_explicit_mesh_axis():
    # jax.make_mesh's default axis type: shard_map then needs inputs already on the axis.
    mesh = sequence_mesh(4, AxisType.Explicit)
    q, k, v = random_qkv(3, 64, 4, 2, 16)
    out = ring_attention(q, k, v, mesh=mesh, sm_scale=0.25, use_pallas=False)
    assert relative_error(out, reference(q, k, v, sm_scale=0.25)) < 1e-5


def test_mesh_with_other_axes():
    # Sequence is the second axis of a 2 x 4 mesh; the first axis just replicates.
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "sequence"))
    q, k, v = random_qkv(9, 32, 2, 1, 16)
    out = ring_attention(q, k, v, mesh=mesh, sm_scale=0.25, use_pallas=False)
    assert relative_error(out, reference(q, k, v, sm_scale=0.25)) < 1e-5


def test_zigzag_steps_compute_half_blocks(monkeypatch):
    """Off-diagonal steps attend (2C queries x C keys) or (C x 2C), never a whole 2C x 2C block."""
    mesh = sequence_mesh(4)
    calls = []
    block = ring_module.flash_attention_reference

    def recording_block(q, k, v, **kwargs):
        calls.append((q.shape[0], k.shape[0], kwargs["causal"]))
        return block(q, k, v, **kwargs)

    monkeypatch.setattr(ring_module, "flash_attention_reference", recording_block)
    q, k, v = random_qkv(0, 8 * 2 * 4, 3, 1, 16)  # a shape no other test traces, so jit retraces
    jax.eval_shape(functools.partial(ring_attention, mesh=mesh, sm_scale=1.0, use_pallas=False),
                   q, k, v)
    chunk = 8
    assert calls[0] == (2 * chunk, 2 * chunk, True)  # the local block
    off_diagonal = set(calls[1:])
    assert off_diagonal == {(2 * chunk, chunk, False), (chunk, 2 * chunk, False)}


def test_bad_inputs_raise():
    mesh = sequence_mesh(4)
    q, k, v = random_qkv(1, 64, 4, 2, 16)
    call = functools.partial(ring_attention, mesh=mesh, sm_scale=1.0)
    with pytest.raises(ValueError, match=r"L=60 .* N=4"):
        call(q[:60], k[:60], v[:60])
    with pytest.raises(ValueError, match="k length"):
        call(q, k[:32], v[:32])
    with pytest.raises(ValueError, match="axis_name"):
        call(q, k, v, axis_name="tensor")
    with pytest.raises(ValueError, match="layout"):
        call(q, k, v, layout="striped")
    with pytest.raises(ValueError, match="multiple of k heads"):
        call(q[:, :3], k, v)
