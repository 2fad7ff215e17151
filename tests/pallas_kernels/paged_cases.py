"""Random paged-attention problems for the kernel tests: seeded, fresh random draws, never zeros.

A case fixes the shapes and options; `make_inputs` draws the arrays. Pages are scattered at
random over the cache, block-table entries past a sequence's last page hold out-of-range
garbage (a kernel must never follow them), and quantized caches come with random scales.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}

# (num_q_heads, num_kv_heads): GQA ratios 1, 2, 4, 3 (a group that is not a power of two), MQA.
HEADS = [(4, 4), (8, 4), (8, 2), (6, 2), (8, 1)]


@dataclasses.dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]  # per real sequence
    kv_lens: tuple[int, ...]  # per real sequence, >= q_len
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"
    kv_dtype: str | None = None  # None: q's dtype; "int8" or "float8_e4m3fn": quantized
    sliding_window: int | None = None
    soft_cap: float | None = None
    padding_seqs: int = 0  # sequences past num_seqs
    padding_tokens: int = 0  # tokens past cu_q_lens[num_seqs]
    spare_blocks: int = 3

    @property
    def sm_scale(self) -> float:
        return 1.0 / np.sqrt(self.head_dim)


def random_case(index: int, *, decode: bool, head_dim: int | None = None) -> Case:
    """Case `index` of a seeded family. Any 6 consecutive indices cover every (dtype, KV dtype)
    pair, block sizes 4/8/16 and head dims 64/128; 5 consecutive ones every GQA ratio; window
    and soft-cap go on and off. Lengths are random and ragged."""
    rng = np.random.default_rng(1000 + index + (500 if decode else 0))
    num_q_heads, num_kv_heads = HEADS[index % len(HEADS)]
    num_seqs = int(rng.integers(1, 5))
    if decode:
        q_lens = (1,) * num_seqs
        # kv_len 0 (an empty sequence) is legal for decode and must give zeros.
        kv_lens = tuple(int(x) for x in rng.integers(0, 60, num_seqs))
    else:
        # Chunks of 0, 1 (decode tokens) and up to 40 tokens (several query blocks).
        q_lens = tuple(int(rng.choice([0, 1, 1, int(rng.integers(2, 40))]))
                       for _ in range(num_seqs))
        if max(q_lens) < 2:
            q_lens = q_lens[:-1] + (int(rng.integers(2, 40)),)
        kv_lens = tuple(q + int(rng.integers(0, 40)) for q in q_lens)
    return Case(
        q_lens=q_lens,
        kv_lens=kv_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim or (64, 128)[(index // 3) % 2],
        block_size=(4, 8, 16)[(index // 2) % 3],
        dtype=("float32", "bfloat16")[index % 2],
        kv_dtype=(None, "int8", "float8_e4m3fn")[index % 3],
        sliding_window=int(rng.integers(1, 20)) if index % 4 in (1, 2) else None,
        soft_cap=float(rng.uniform(5.0, 30.0)) if index % 4 in (2, 3) else None,
        padding_seqs=int(rng.integers(0, 3)),
        padding_tokens=0 if decode else int(rng.integers(0, 4)),
    )


def _pages(rng, shape, case: Case):
    if case.kv_dtype is None:
        return jnp.asarray(rng.standard_normal(shape), case.dtype), None
    if case.kv_dtype == "int8":
        pages = jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)
        scales = rng.uniform(0.005, 0.02, (shape[0], shape[2]))
    else:
        pages = jnp.asarray(rng.standard_normal(shape) * 4.0, jnp.float8_e4m3fn)
        scales = rng.uniform(0.1, 0.4, (shape[0], shape[2]))
    return pages, jnp.asarray(scales, jnp.float32)


def make_inputs(case: Case, seed: int) -> dict:
    """Arrays for ragged_paged_attention (q, pages, kv_lens, block_tables, cu_q_lens, num_seqs,
    scales); `decode_args` turns them into paged_decode_attention's."""
    rng = np.random.default_rng(seed)
    num_seqs = len(case.q_lens)
    max_num_seqs = num_seqs + case.padding_seqs
    pages_per_seq = [-(-kv // case.block_size) for kv in case.kv_lens]
    max_blocks = max(max(pages_per_seq), 1) + 1
    num_blocks = sum(pages_per_seq) + case.spare_blocks
    order = rng.permutation(num_blocks)
    block_tables = rng.integers(num_blocks, 2 * num_blocks + 100, (max_num_seqs, max_blocks))
    used = 0
    for s, n in enumerate(pages_per_seq):
        block_tables[s, :n] = order[used:used + n]
        used += n
    kv_lens = np.zeros(max_num_seqs, np.int32)
    kv_lens[:num_seqs] = case.kv_lens
    cu_q_lens = np.zeros(max_num_seqs + 1, np.int32)
    cu_q_lens[1:num_seqs + 1] = np.cumsum(case.q_lens)
    cu_q_lens[num_seqs + 1:] = cu_q_lens[num_seqs]
    num_tokens = int(cu_q_lens[num_seqs]) + case.padding_tokens
    shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    k_pages, k_scales = _pages(rng, shape, case)
    v_pages, v_scales = _pages(rng, shape, case)
    q = jnp.asarray(rng.standard_normal((num_tokens, case.num_q_heads, case.head_dim)), case.dtype)
    return dict(q=q, k_pages=k_pages, v_pages=v_pages, kv_lens=jnp.asarray(kv_lens),
                block_tables=jnp.asarray(block_tables, jnp.int32),
                cu_q_lens=jnp.asarray(cu_q_lens), num_seqs=jnp.int32(num_seqs),
                k_scales=k_scales, v_scales=v_scales)


def ragged_args(x: dict):
    args = (x["q"], x["k_pages"], x["v_pages"], x["kv_lens"], x["block_tables"], x["cu_q_lens"],
            x["num_seqs"])
    return args, dict(k_scales=x["k_scales"], v_scales=x["v_scales"])


def decode_args(x: dict, case: Case):
    """One query per real sequence (q has exactly num_seqs rows)."""
    n = len(case.q_lens)
    args = (x["q"][:n], x["k_pages"], x["v_pages"], x["kv_lens"][:n], x["block_tables"][:n])
    return args, dict(k_scales=x["k_scales"], v_scales=x["v_scales"])


def options(case: Case) -> dict:
    return dict(sm_scale=case.sm_scale, sliding_window=case.sliding_window, soft_cap=case.soft_cap)


def assert_close(out, ref, dtype, *, valid_rows=None):
    """Every element finite (interpret mode NaN-fills outputs, so NaN means unwritten), and
    ||out - ref|| / ||ref|| under the dtype's tolerance."""
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all(), f"{np.sum(~np.isfinite(out))} output elements not finite"
    if valid_rows is not None:
        assert not out[~valid_rows].any(), "padding rows must be zeros"
    denom = max(float(np.linalg.norm(ref)), 1e-30)
    err = float(np.linalg.norm(out - ref)) / denom
    assert err < TOLERANCE[jnp.dtype(dtype)], f"relative error {err:.3g}"
