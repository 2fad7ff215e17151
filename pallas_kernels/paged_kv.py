"""The paged KV cache as the attention kernels take it: argument checks (raised where a bad
shape enters, with the argument's name and the shape it should have), the float32 page gather
of the references, and the range of pages a kernel walks.

Pages are `[num_blocks, block_size, num_kv_heads, head_dim]`. Quantized pages (int8 or
float8_e4m3fn) carry one float32 scale per (block, kv head): `[num_blocks, num_kv_heads]`, and
the real value of an element is `pages[...] * scales[block, kv_head]`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class PagedKVShape:
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    quantized: bool


def _shape_error(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(got.shape)}")


def check_paged_kv(k_pages: jax.Array, v_pages: jax.Array, k_scales: jax.Array | None,
                   v_scales: jax.Array | None) -> PagedKVShape:
    expected = "[num_blocks, block_size, num_kv_heads, head_dim]"
    if k_pages.ndim != 4:
        raise _shape_error("k_pages", expected, k_pages)
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages must have the shape of k_pages {tuple(k_pages.shape)} "
                         f"({expected}), got {tuple(v_pages.shape)}")
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages dtype {v_pages.dtype} differs from k_pages dtype "
                         f"{k_pages.dtype}")
    num_blocks, block_size, num_kv_heads, head_dim = k_pages.shape
    quantized = jnp.dtype(k_pages.dtype) in QUANTIZED_DTYPES
    if not quantized and jnp.dtype(k_pages.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"k_pages dtype must be one of float32, bfloat16, float16, int8, "
                         f"float8_e4m3fn, got {k_pages.dtype}")
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales must be given together")
    if quantized and k_scales is None:
        raise ValueError(f"k_pages of dtype {k_pages.dtype} need k_scales and v_scales "
                         f"[num_blocks={num_blocks}, num_kv_heads={num_kv_heads}] float32")
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if scales is None:
            continue
        if scales.shape != (num_blocks, num_kv_heads):
            raise _shape_error(name, f"[num_blocks={num_blocks}, num_kv_heads={num_kv_heads}]",
                               scales)
        if scales.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32, got {scales.dtype}")
    return PagedKVShape(num_blocks, block_size, num_kv_heads, head_dim,
                        quantized=k_scales is not None)


def check_query(name: str, q: jax.Array, kv: PagedKVShape, *, leading: str) -> None:
    """q must be [<leading>, num_q_heads, head_dim] with num_q_heads a multiple of num_kv_heads."""
    expected = f"[{leading}, num_q_heads, head_dim={kv.head_dim}]"
    if q.ndim != 3 or q.shape[2] != kv.head_dim:
        raise _shape_error(name, expected, q)
    if q.shape[1] % kv.num_kv_heads:
        raise ValueError(f"{name} has {q.shape[1]} heads, not a multiple of num_kv_heads="
                         f"{kv.num_kv_heads} ({expected})")
    if jnp.dtype(q.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be float32, bfloat16 or float16, got {q.dtype}")


def check_int_array(name: str, x: jax.Array, shape: tuple[int, ...], expected: str) -> None:
    if tuple(x.shape) != shape:
        raise _shape_error(name, expected, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array (int32), got {x.dtype}")


def check_static(name: str, value) -> None:
    """sliding_window, soft_cap and sm_scale: Python numbers fixed at trace time, > 0 when set."""
    if value is None:
        return
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a Python number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def gather_pages(pages: jax.Array, scales: jax.Array | None,
                 block_tables: jax.Array) -> jax.Array:
    """pages[block_tables] dequantized to float32: [..., blocks, block_size, kv_heads, head_dim]."""
    x = pages[block_tables].astype(jnp.float32)
    if scales is not None:
        x = x * scales[block_tables][..., None, :, None]
    return x


def kv_block_range(kv_lo, kv_hi, *, block_size: int, pages_per_block: int, first_page=0,
                   end_page=None):
    """The compute blocks a kernel walks to see keys [kv_lo, kv_hi) (int32 scalars, >= 0).

    Blocks are `pages_per_block` consecutive block-table entries, aligned to `first_page` (a
    split's first entry); pages at or past `end_page` belong to the next split. Entries past the
    table's width or the keys are clamped and masked by the walkers. Returns (start_entry,
    num_blocks). Runs inside kernels (Triton and Mosaic) as well as outside.
    """
    lo_page = lax.div(kv_lo, block_size)
    skip = lax.div(jnp.maximum(lo_page - first_page, 0), pages_per_block) * pages_per_block
    start = first_page + skip
    hi_page = lax.div(kv_hi + block_size - 1, block_size)
    if end_page is not None:
        hi_page = jnp.minimum(hi_page, end_page)
    num_blocks = lax.div(jnp.maximum(hi_page - start, 0) + pages_per_block - 1, pages_per_block)
    return start, num_blocks
