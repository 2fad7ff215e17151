"""Which lowering the Pallas kernels take on this machine, and whether the engine should use them.

Every kernel in this package is written twice over one shared piece of math: a Triton-style
variant (GPU; gathers pages through integer-array indexing of a ref, block tables read inside the
kernel) and a Mosaic TPU variant (scalar-prefetched block tables and lengths, K/V left in HBM and
copied page by page into VMEM). This module maps a platform to one of them:

    gpu -> "triton"      compiled through Pallas' Triton lowering
    tpu -> "mosaic_tpu"  compiled through Mosaic
    cpu -> "triton"      run with interpret=True (a jitted scan over the grid)

Tests pick a variant and an interpret mode explicitly through `kernel_target`.
"""

import dataclasses
from typing import Literal

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

Lowering = Literal["triton", "mosaic_tpu"]
IMPLEMENTATIONS = ("auto", "pallas", "reference")
LOWERINGS = ("triton", "mosaic_tpu")


def current_platform() -> str:
    """"gpu", "tpu" or "cpu" for the default JAX backend ("cuda"/"rocm" count as "gpu")."""
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def pallas_is_default(platform: str | None = None) -> bool:
    """True where `implementation="auto"` means the Pallas kernel: on GPU and TPU, not on CPU."""
    return (platform or current_platform()) in ("gpu", "tpu")


def resolve_implementation(implementation: str) -> str:
    """Maps "auto" | "pallas" | "reference" to "pallas" or "reference" for this platform."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        return "pallas" if pallas_is_default() else "reference"
    return implementation


@dataclasses.dataclass(frozen=True)
class KernelTarget:
    """How to build one pallas_call: which kernel variant, and whether to interpret it.

    interpret: False (compile), True (generic interpreter), or a `pltpu.InterpretParams`
    (TPU interpreter with simulated memory spaces and race detection; mosaic_tpu only).
    """

    lowering: Lowering
    interpret: bool | pltpu.InterpretParams = False


def kernel_target(lowering: str | None = None,
                  interpret: bool | pltpu.InterpretParams | None = None) -> KernelTarget:
    """The kernel variant for this platform; `lowering`/`interpret` override it (tests do)."""
    platform = current_platform()
    if lowering is None:
        lowering = "mosaic_tpu" if platform == "tpu" else "triton"
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    if interpret is None:
        native = {"triton": "gpu", "mosaic_tpu": "tpu"}[lowering]
        interpret = platform != native
    if isinstance(interpret, pltpu.InterpretParams) and lowering != "mosaic_tpu":
        raise ValueError("pltpu.InterpretParams only applies to lowering='mosaic_tpu'")
    return KernelTarget(lowering=lowering, interpret=interpret)


def triton_compiler_params(num_warps: int, num_stages: int) -> plgpu.CompilerParams:
    # Always explicit: with no compiler_params the 0.11 wheel picks a GPU lowering by itself.
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(dimension_semantics: tuple[str, ...],
                        vmem_limit_bytes: int | None = None) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics,
                                vmem_limit_bytes=vmem_limit_bytes)


# Shared memory a Triton program may plan for: the H100 gives 227 KiB per block; the rest goes
# to layout conversions, which grew an f32 decode tile of 196 KiB (estimated) to 264 KiB.
TRITON_SMEM_BUDGET = 180 * 1024


def fit_triton_block_kv(block_kv: int, *, rows: int, head_dim: int, itemsize: int,
                        num_stages: int) -> int:
    """Halves a tuned block_kv (down to 16) until its pipelined K and V tiles plus the query tile
    fit TRITON_SMEM_BUDGET: tables are tuned in bf16, and f32 doubles every tile."""
    def need(bkv):
        return (num_stages * 2 * bkv + rows) * head_dim * itemsize
    while block_kv > 16 and need(block_kv) > TRITON_SMEM_BUDGET:
        block_kv //= 2
    return block_kv
