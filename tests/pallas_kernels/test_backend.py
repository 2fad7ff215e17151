"""The platform dispatcher, and both kernels lowered for GPU (Triton) and TPU (Mosaic) on this
CPU through an abstract device: this runs Pallas' own lowering rules (not the Triton or Mosaic
compilers behind them), so a construct that a lowering rejects fails here, without a GPU."""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import backend
from pallas_kernels.paged_decode_attention import paged_decode_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


def test_pallas_is_default_on_gpu_and_tpu_only():
    assert backend.pallas_is_default("gpu")
    assert backend.pallas_is_default("tpu")
    assert not backend.pallas_is_default("cpu")
    assert backend.current_platform() == "cpu"
    assert not backend.pallas_is_default()


def test_implementation_and_target_on_cpu():
    assert backend.resolve_implementation("auto") == "reference"
    assert backend.resolve_implementation("pallas") == "pallas"
    with pytest.raises(ValueError, match="implementation must be one of"):
        backend.resolve_implementation("triton")
    assert backend.kernel_target() == backend.KernelTarget("triton", interpret=True)
    assert backend.kernel_target("mosaic_tpu") == backend.KernelTarget("mosaic_tpu", True)
    with pytest.raises(ValueError, match="lowering must be one of"):
        backend.kernel_target("mosaic_gpu")


_DEVICES = {
    "triton": ("cuda", "NVIDIA H100 80GB HBM3"),
    "mosaic_tpu": ("tpu", "TPU v5 lite"),
}


def _lower(fn, args, lowering):
    platform, kind = _DEVICES[lowering]
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    f = functools.partial(fn, implementation="pallas", lowering=lowering, interpret=False)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    target = "__gpu$xla.gpu.triton" if lowering == "triton" else "tpu_custom_call"
    assert target in text


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("lowering", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.int8])
def test_kernels_lower_for_gpu_and_tpu(lowering, kv_dtype):
    num_seqs, num_tokens, num_blocks, block_size = 4, 64, 40, 16
    q = jnp.zeros((num_tokens, 32, 128), jnp.bfloat16)
    pages = jnp.zeros((num_blocks, block_size, 8, 128), kv_dtype)
    scales = None if kv_dtype == jnp.bfloat16 else jnp.ones((num_blocks, 8), jnp.float32)
    lens = jnp.zeros((num_seqs,), jnp.int32)
    tables = jnp.zeros((num_seqs, 6), jnp.int32)
    cu_q_lens = jnp.zeros((num_seqs + 1,), jnp.int32)
    options = dict(sm_scale=0.1, soft_cap=30.0, sliding_window=64)

    num_seqs_scalar = jnp.int32(2)

    def ragged(q, pages, scales, lens, tables, cu_q_lens, num_seqs, **target):
        return ragged_paged_attention(q, pages, pages, lens, tables, cu_q_lens, num_seqs,
                                      k_scales=scales, v_scales=scales, **options, **target)

    def decode(q, pages, scales, lens, tables, **target):
        return paged_decode_attention(q, pages, pages, lens, tables, k_scales=scales,
                                      v_scales=scales, num_splits=2, **options, **target)

    _lower(ragged, (q, pages, scales, lens, tables, cu_q_lens, num_seqs_scalar), lowering)
    _lower(decode, (q[:num_seqs], pages, scales, lens, tables), lowering)
