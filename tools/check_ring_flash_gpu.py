"""Checks the flash-attention Pallas kernel compiled for the GPU against its jnp reference.

Run on a GPU machine from the repository root:

    python -m tools.check_ring_flash_gpu

1. Correctness: random f32 and bf16 inputs over several shapes (GQA, offsets, soft cap, ragged
   lengths, rows with no visible key), Triton-compiled kernel vs `flash_attention_reference`;
   then `ring_attention` over all local GPUs (one GPU: a 1-device ring) vs full attention.
2. Speed: Lq=Lk=4096, Hq=32, Hkv=8, D=128, causal, bf16; TFLOP/s (causal FLOPs = 2 * 2 * L^2 *
   Hq * D / 2) for the default tiles and a few alternatives, with cuDNN attention as the bar.
Prints one line per case and a final PASS/FAIL summary; exits 1 on any failure.
`--bench_len=0` skips the timing (useful for a CPU smoke run with JAX_PLATFORMS=cpu).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.flash_attention import (
    FlashBlockSizes,
    flash_attention,
    flash_attention_reference,
)
from pallas_kernels.ring_attention import ring_attention, ring_attention_reference

flags.DEFINE_integer("bench_len", 4096, "Sequence length of the timed case; 0 skips timing.")
flags.DEFINE_integer("iters", 20, "Timed repetitions per configuration (median reported).")
FLAGS = flags.FLAGS

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
# (Lq, Lk, Hq, Hkv, D, causal, q_offset, k_offset, soft_cap)
CASES = [
    (256, 256, 8, 2, 128, True, 0, 0, None),
    (1024, 1024, 32, 8, 128, True, 0, 0, None),
    (200, 333, 6, 2, 64, True, 133, 0, None),
    (128, 512, 4, 4, 80, False, 0, 0, 30.0),
    (96, 160, 4, 1, 128, True, 0, 64, None),  # queries 0..63 see no key
]
TILES = [
    FlashBlockSizes(64, 64, num_warps=4, num_stages=3),
    FlashBlockSizes(128, 64, num_warps=4, num_stages=3),
    FlashBlockSizes(128, 64, num_warps=8, num_stages=3),
    FlashBlockSizes(128, 128, num_warps=8, num_stages=2),
    FlashBlockSizes(64, 128, num_warps=4, num_stages=3),
]


def random_qkv(seed, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, dtype):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (q_len, num_q_heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (kv_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (kv_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def relative_error(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if np.isnan(out).any():
        return float("nan")
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def check_flash(dtype) -> bool:
    ok = True
    for seed, (lq, lk, hq, hkv, d, causal, q_off, k_off, cap) in enumerate(CASES):
        q, k, v = random_qkv(seed, lq, lk, hq, hkv, d, dtype)
        args = dict(sm_scale=d**-0.5, causal=causal, q_offset=q_off, k_offset=k_off, soft_cap=cap)
        out, lse = flash_attention(q, k, v, **args)
        ref_out, ref_lse = flash_attention_reference(q, k, v, **args)
        err = relative_error(out, ref_out)
        lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
        same_empty = bool((np.isneginf(lse) == np.isneginf(ref_lse)).all())
        finite = np.isfinite(ref_lse)
        lse_err = float(np.abs(lse[finite] - ref_lse[finite]).max()) if finite.any() else 0.0
        good = err < TOLERANCE[jnp.dtype(dtype).name] and same_empty and lse_err < 1e-3
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} flash {jnp.dtype(dtype).name:8s} Lq={lq} Lk={lk} "
              f"Hq={hq} Hkv={hkv} D={d} causal={causal} offsets=({q_off},{k_off}) cap={cap}: "
              f"rel err {err:.2e}, lse err {lse_err:.2e}, empty rows match {same_empty}")
    return ok


def check_ring(dtype) -> bool:
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("sequence",))
    seq_len = 512 * 2 * len(devices)
    q, k, v = random_qkv(7, seq_len, seq_len, 8, 2, 128, dtype)
    out = ring_attention(q, k, v, mesh=mesh, sm_scale=128**-0.5, use_pallas=True)
    err = relative_error(out, ring_attention_reference(q, k, v, sm_scale=128**-0.5))
    good = err < TOLERANCE[jnp.dtype(dtype).name]
    print(f"  {'ok  ' if good else 'FAIL'} ring  {jnp.dtype(dtype).name:8s} L={seq_len} over "
          f"{len(devices)} device(s): rel err {err:.2e}")
    return good


def median_seconds(fn, *args):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(FLAGS.iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(seq_len):
    hq, hkv, d = 32, 8, 128
    q, k, v = random_qkv(0, seq_len, seq_len, hq, hkv, d, jnp.bfloat16)
    flops = 4 * seq_len * seq_len * hq * d / 2
    print(f"Timing Lq=Lk={seq_len} Hq={hq} Hkv={hkv} D={d} causal bf16 "
          f"({flops / 1e9:.1f} GFLOP) on {jax.devices()[0].device_kind}:")
    for tiles in [None, *TILES]:
        fn = jax.jit(lambda q, k, v, tiles=tiles: flash_attention(
            q, k, v, sm_scale=d**-0.5, causal=True, block_sizes=tiles))
        try:
            seconds = median_seconds(fn, q, k, v)
            print(f"  pallas {tiles or 'default tiles'}: {seconds * 1e3:.3f} ms, "
                  f"{flops / seconds / 1e12:.1f} TFLOP/s")
        except Exception as e:  # a tile choice that fails to compile should not hide the others
            print(f"  pallas {tiles}: failed to compile or run: {type(e).__name__}: {e}"[:400])
    for name, impl in [("cudnn", "cudnn"), ("xla", "xla")]:
        fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q[None], k[None], v[None], is_causal=True, scale=d**-0.5, implementation=impl))
        try:
            seconds = median_seconds(fn, q, k, v)
            print(f"  jax.nn.dot_product_attention[{name}]: {seconds * 1e3:.3f} ms, "
                  f"{flops / seconds / 1e12:.1f} TFLOP/s")
        except Exception as e:
            print(f"  jax.nn.dot_product_attention[{name}]: unavailable: {type(e).__name__}"[:400])


def main(argv):
    del argv
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    if jax.default_backend() != "gpu":
        print("warning: not a GPU backend; the kernel runs in interpret mode")
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        results[f"flash {jnp.dtype(dtype).name}"] = check_flash(dtype)
        results[f"ring {jnp.dtype(dtype).name}"] = check_ring(dtype)
    if FLAGS.bench_len:
        bench(FLAGS.bench_len)
    for name, good in results.items():
        print(f"{'PASS' if good else 'FAIL'} {name}")
    all_good = all(results.values())
    print("PASS" if all_good else "FAIL")
    sys.exit(0 if all_good else 1)


if __name__ == "__main__":
    app.run(main)
