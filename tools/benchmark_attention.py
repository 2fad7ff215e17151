"""Attention kernel check and benchmark on one GPU: paged decode and ragged prefill.

    python -m tools.benchmark_attention --out=/tmp/attention.json
    python -m tools.benchmark_attention --modes=check            # correctness only
    python -m tools.benchmark_attention --modes=decode --batches=32 --contexts=4096

check:   both Pallas kernels, compiled, against their pure-JAX references (f32 references at
         highest matmul precision) on random ragged batches over dtypes, KV quantization,
         GQA ratios, head dims, windows and soft-caps. Relative error bars: 1e-5 f32, 2e-2 bf16.
decode:  paged_decode_attention, 32 query heads, 8 KV heads, head dim 128, bf16, page 16, every
         sequence at the same context; time per call, achieved bandwidth (K/V bytes read plus q
         and output bytes, over the time) against --hbm_tb_s, and the XLA reference's time.
prefill: ragged_paged_attention on one fresh chunk (q_len = kv_len, causal); TFLOP/s counting
         the unmasked query-key pairs only, against --peak_tflops.
--autotune first times a few block-size variants per mode on representative shapes and runs
the table with the fastest. Times are medians over --trials runs of one jitted call that
invokes the function --inner times on different block tables (so successive calls read
different pages), after warm-up. Results are written as JSON after every row.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from pallas_kernels.paged_decode_attention import (  # noqa: E402
    paged_decode_attention, paged_decode_attention_reference)
from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    ragged_paged_attention, ragged_paged_attention_reference)

flags.DEFINE_list("modes", ["check", "decode", "prefill"], "Any of check, decode, prefill.")
flags.DEFINE_list("batches", ["1", "8", "32", "64", "128", "256"], "Decode batch sizes.")
flags.DEFINE_list("contexts", ["512", "2048", "8192", "32768"], "Decode context lengths.")
flags.DEFINE_list("chunks", ["512", "1024", "2048", "4096", "8192"], "Prefill chunk lengths.")
flags.DEFINE_integer("check_cases", None, "Run only the first this many check cases.")
flags.DEFINE_bool("autotune", False, "Time block-size variants first and use the fastest.")
flags.DEFINE_bool("reference", True, "Also time the pure-JAX references.")
flags.DEFINE_integer("trials", 7, "Timed runs per measurement (median taken).")
flags.DEFINE_integer("inner", 8, "Calls per timed run, each on different block tables.")
flags.DEFINE_float("max_cache_gb", 36.0, "Largest K+V page cache to allocate.")
flags.DEFINE_float("max_reference_gb", 24.0, "Skip the XLA reference above this working set.")
flags.DEFINE_float("hbm_tb_s", 2.9, "Measured copy bandwidth of the GPU, TB/s.")
flags.DEFINE_float("peak_tflops", 790.0, "Measured bf16 matmul rate of the GPU, TFLOP/s.")
flags.DEFINE_float("deadline_s", 540.0, "Start no new measurement after this many seconds.")
flags.DEFINE_string("out", None, "JSON results path (default: $OUT/attention_bench.json).")
FLAGS = flags.FLAGS

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
_START = time.monotonic()


def _out_of_time() -> bool:
    return time.monotonic() - _START > FLAGS.deadline_s


class Results:
    def __init__(self, path):
        self.path = path
        self.data = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                         date=datetime.date.today().isoformat(), hbm_tb_s=FLAGS.hbm_tb_s,
                         peak_tflops=FLAGS.peak_tflops, check=[], decode_tuning=[], decode=[],
                         prefill_tuning=[], prefill=[])

    def add(self, section, row):
        self.data[section].append(row)
        print(section, json.dumps(row), flush=True)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def _median_time(fn, args, trials):
    out = fn(*args)  # compile
    jax.block_until_ready(out)
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _repeat(call, inner):
    """One jitted function making `inner` calls, call i on tables[i]; the page cache is an
    argument, not a closed-over constant."""
    return jax.jit(lambda k, v, q, tables: [call(k, v, q, tables[i]) for i in range(inner)])


# ---------------------------------------------------------------------------------------------
# Correctness on the GPU
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CheckCase:
    name: str
    q_lens: tuple
    kv_lens: tuple
    heads: tuple = (32, 8)
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "bfloat16"
    kv_dtype: str | None = None
    sliding_window: int | None = None
    soft_cap: float | None = None


CHECK_CASES = [
    CheckCase("bf16 gqa4 d128", (1, 37, 1, 300, 0, 5), (900, 37, 16, 700, 3, 133)),
    CheckCase("f32 gqa4 d128", (1, 37, 1, 300, 0, 5), (900, 37, 16, 700, 3, 133),
              dtype="float32"),
    CheckCase("bf16 mha d64 window", (1, 64, 17), (1000, 64, 529), heads=(8, 8), head_dim=64,
              sliding_window=100),
    CheckCase("bf16 mqa d256 softcap", (3, 1, 100), (50, 77, 400), heads=(8, 1), head_dim=256,
              soft_cap=30.0),
    CheckCase("f32 gqa3 int8 window softcap page8", (1, 20, 1), (333, 20, 1), heads=(12, 4),
              block_size=8, dtype="float32", kv_dtype="int8", sliding_window=50, soft_cap=20.0),
    CheckCase("bf16 gqa2 fp8 page32", (1, 90, 2), (1200, 300, 64), heads=(16, 8),
              block_size=32, kv_dtype="float8_e4m3fn"),
    CheckCase("bf16 gqa4 int8 d64", (1,) * 8, (5, 4000, 1, 64, 65, 300, 2, 17), head_dim=64,
              kv_dtype="int8"),
]


def _check_inputs(case: CheckCase, seed: int):
    rng = np.random.default_rng(seed)
    nq, nkv = case.heads
    pages_per_seq = [-(-kv // case.block_size) for kv in case.kv_lens]
    num_blocks = sum(pages_per_seq) + 5
    order = rng.permutation(num_blocks)
    tables = rng.integers(num_blocks, 2 * num_blocks, (len(case.q_lens), max(pages_per_seq) + 2))
    used = 0
    for s, n in enumerate(pages_per_seq):
        tables[s, :n] = order[used:used + n]
        used += n
    shape = (num_blocks, case.block_size, nkv, case.head_dim)

    def pages():
        if case.kv_dtype is None:
            return jnp.asarray(rng.standard_normal(shape), case.dtype), None
        if case.kv_dtype == "int8":
            x = jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)
        else:
            x = jnp.asarray(rng.standard_normal(shape) * 4, jnp.float8_e4m3fn)
        return x, jnp.asarray(rng.uniform(0.005, 0.3, (num_blocks, nkv)), jnp.float32)

    (k, ks), (v, vs) = pages(), pages()
    cu = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((int(cu[-1]) + 3, nq, case.head_dim)), case.dtype)
    return dict(q=q, k=k, v=v, ks=ks, vs=vs, kv_lens=jnp.asarray(case.kv_lens, jnp.int32),
                tables=jnp.asarray(tables, jnp.int32), cu=jnp.asarray(cu),
                num_seqs=jnp.int32(len(case.q_lens)))


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)), bool(
        np.isfinite(out).all())


def run_check(results: Results):
    tol = {"float32": 1e-5, "bfloat16": 2e-2}
    for i, case in enumerate(CHECK_CASES[:FLAGS.check_cases]):
        x = _check_inputs(case, i)
        opts = dict(sm_scale=case.head_dim ** -0.5, sliding_window=case.sliding_window,
                    soft_cap=case.soft_cap, k_scales=x["ks"], v_scales=x["vs"])
        ragged_args = (x["q"], x["k"], x["v"], x["kv_lens"], x["tables"], x["cu"], x["num_seqs"])
        decode_q = x["q"][:len(case.q_lens)]
        decode_args = (decode_q, x["k"], x["v"], x["kv_lens"], x["tables"])
        with jax.default_matmul_precision("highest"):
            ref_r = ragged_paged_attention_reference(*ragged_args, **opts)
            ref_d = paged_decode_attention_reference(*decode_args, **opts)
        runs = [("ragged", functools.partial(ragged_paged_attention, *ragged_args, **opts,
                                             implementation="pallas"), ref_r)]
        for splits in (1, 3, None):
            runs.append((f"decode splits={splits}", functools.partial(
                paged_decode_attention, *decode_args, **opts, implementation="pallas",
                num_splits=splits), ref_d))
        for kernel, fn, ref in runs:
            try:
                err, finite = _rel_err(jax.block_until_ready(fn()), ref)
                row = dict(case=case.name, kernel=kernel, rel_err=err, finite=finite,
                           ok=finite and err < tol[case.dtype])
            except Exception as e:  # noqa: BLE001 - record and go on to the next case
                row = dict(case=case.name, kernel=kernel, ok=False,
                           error=f"{type(e).__name__}: {str(e)[:2000]}")
            results.add("check", row)


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------

class PageCache:
    """A random bf16 page cache shared by measurements; tables pick random pages over it."""

    def __init__(self, num_pages):
        shape = (num_pages, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        make = jax.jit(lambda key: jax.random.normal(key, shape, jnp.bfloat16))
        self.k = jax.block_until_ready(make(jax.random.key(1, impl="rbg")))
        self.v = jax.block_until_ready(make(jax.random.key(2, impl="rbg")))
        self.num_pages = num_pages
        self._perm = jax.jit(lambda key: jax.random.permutation(key, num_pages).astype(jnp.int32))

    def tables(self, key, inner, num_seqs, pages_per_seq):
        """[inner, num_seqs, pages_per_seq]: each call's pages drawn at random over the cache."""
        need = num_seqs * pages_per_seq
        keys = jax.random.split(key, inner)
        return jnp.stack([self._perm(k)[:need].reshape(num_seqs, pages_per_seq) for k in keys])


# Caches whose K (or V) array stays under 4 GiB keep 32-bit offsets in the Triton kernels, as a
# per-layer cache of a real model does; larger ones switch to 64-bit address arithmetic.
SMALL_CACHE_PAGES = 2 ** 32 // (BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2) - 1


class Caches:
    def __init__(self, big_pages):
        self.small = PageCache(min(SMALL_CACHE_PAGES, big_pages))
        self.big = PageCache(big_pages) if big_pages > SMALL_CACHE_PAGES else None

    def for_pages(self, pages):
        if pages <= self.small.num_pages:
            return self.small
        return self.big if self.big is not None and pages <= self.big.num_pages else None


def _decode_bytes(batch, context):
    kv = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2
    q_out = 2 * batch * NUM_Q_HEADS * HEAD_DIM * 2
    return kv + q_out


def _floor_time():
    """The harness's own cost: the same jitted repeat around a trivial op."""
    q = jnp.ones((8, NUM_Q_HEADS, HEAD_DIM), jnp.bfloat16)
    tables = jnp.zeros((FLAGS.inner, 8, 4), jnp.int32)
    call = lambda k, v, q, t: q * 2 + t[0, 0].astype(q.dtype)
    return _median_time(_repeat(call, FLAGS.inner), (q, q, q, tables), FLAGS.trials) / FLAGS.inner


def _time_decode_kernel_only(cache, batch, context, knobs):
    """The pallas_call alone, on inputs already in its layout (no padding, no split merge)."""
    from pallas_kernels import backend
    from pallas_kernels import paged_decode_attention as pda
    sizes = dataclasses.replace(pda.tuned_block_sizes("triton", HEAD_DIM), **knobs)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    plan = pda._plan(backend.kernel_target("triton"), num_seqs=batch, num_kv_heads=NUM_KV_HEADS,
                     group=group, block_size=BLOCK_SIZE, entries=context // BLOCK_SIZE,
                     sizes=sizes, num_splits=None)
    inner = int(np.clip(2e-3 / (_decode_bytes(batch, context) / (FLAGS.hbm_tb_s * 1e12)), 1,
                        FLAGS.inner))
    q4 = jax.random.normal(jax.random.key(3), (batch, NUM_KV_HEADS, plan.rows, HEAD_DIM),
                           jnp.bfloat16)
    kv_lens = jnp.full((batch,), context, jnp.int32)
    tables = cache.tables(jax.random.key(context + batch), inner, batch, context // BLOCK_SIZE)
    call = lambda k, v, q, t: pda._decode_triton(
        q, k, v, kv_lens, t, None, None, plan=plan, sizes=sizes, sm_scale=HEAD_DIM ** -0.5,
        soft_cap=None, sliding_window=None, interpret=backend.kernel_target("triton").interpret)
    t = _median_time(_repeat(call, inner), (cache.k, cache.v, q4, tables), FLAGS.trials) / inner
    return t, plan.num_splits


def _time_decode(cache, batch, context, knobs, *, reference=False):
    pages_per_seq = context // BLOCK_SIZE
    est = _decode_bytes(batch, context) / (FLAGS.hbm_tb_s * 1e12)
    inner = int(np.clip(2e-3 / est, 1, FLAGS.inner))
    if reference:
        inner = min(inner, 2)
    q = jax.random.normal(jax.random.key(batch), (batch, NUM_Q_HEADS, HEAD_DIM), jnp.bfloat16)
    kv_lens = jnp.full((batch,), context, jnp.int32)
    tables = cache.tables(jax.random.key(context + batch), inner, batch, pages_per_seq)
    opts = dict(sm_scale=HEAD_DIM ** -0.5)
    if reference:
        call = lambda k, v, q, t: paged_decode_attention_reference(q, k, v, kv_lens, t, **opts)
    else:
        call = lambda k, v, q, t: paged_decode_attention(q, k, v, kv_lens, t, **opts,
                                                         implementation="pallas", **knobs)
    args = (cache.k, cache.v, q, tables)
    return _median_time(_repeat(call, inner), args, FLAGS.trials) / inner


DECODE_VARIANTS = [  # (block_kv, num_warps, num_stages)
    (64, 4, 3), (64, 4, 4), (64, 8, 3), (32, 4, 4), (128, 8, 2), (128, 4, 3),
]
DECODE_TUNING_SHAPES = [(32, 4096), (256, 2048), (1, 32768)]


def run_decode(results: Results, caches: Caches):
    knobs = {}
    cache = caches.small
    results.data["harness_floor_ms"] = _floor_time() * 1e3
    if FLAGS.autotune:
        scores = {}
        for variant in DECODE_VARIANTS:
            bkv, warps, stages = variant
            total = 0.0
            for batch, context in DECODE_TUNING_SHAPES:
                if _out_of_time():
                    return
                try:
                    t = _time_decode(cache, batch, context,
                                     dict(block_kv=bkv, num_warps=warps, num_stages=stages))
                except Exception as e:  # noqa: BLE001
                    results.add("decode_tuning", dict(variant=variant, error=str(e)[:1500]))
                    total = float("inf")
                    break
                total += t / (_decode_bytes(batch, context) / (FLAGS.hbm_tb_s * 1e12))
                results.add("decode_tuning", dict(variant=variant, batch=batch, context=context,
                                                  ms=t * 1e3))
            scores[variant] = total
        best = min(scores, key=scores.get)
        knobs = dict(block_kv=best[0], num_warps=best[1], num_stages=best[2])
        results.add("decode_tuning", dict(chosen=best))
    for context in map(int, FLAGS.contexts):
        for batch in map(int, FLAGS.batches):
            if _out_of_time():
                return
            kv_gb = _decode_bytes(batch, context) / 1e9
            cache = caches.for_pages(batch * context // BLOCK_SIZE)
            if cache is None:
                results.add("decode", dict(batch=batch, context=context, skipped="cache too small"))
                continue
            row = dict(batch=batch, context=context, kv_gb=kv_gb, knobs=knobs,
                       cache_gb=2 * cache.k.nbytes / 1e9)
            try:
                t = _time_decode(cache, batch, context, knobs)
                row.update(ms=t * 1e3, tb_s=_decode_bytes(batch, context) / t / 1e12)
                row["hbm_fraction"] = row["tb_s"] / FLAGS.hbm_tb_s
                tk, splits = _time_decode_kernel_only(cache, batch, context, knobs)
                row.update(kernel_ms=tk * 1e3, num_splits=splits)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
            ref_gb = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 4 / 1e9
            if FLAGS.reference and ref_gb <= FLAGS.max_reference_gb and not _out_of_time():
                try:
                    tr = _time_decode(cache, batch, context, knobs, reference=True)
                    row.update(xla_ms=tr * 1e3)
                    if "ms" in row:
                        row["speedup_vs_xla"] = tr * 1e3 / row["ms"]
                except Exception as e:  # noqa: BLE001
                    row["xla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            else:
                row["xla_ms"] = None
            results.add("decode", row)


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------

def _prefill_flops(chunk):
    return 4 * NUM_Q_HEADS * HEAD_DIM * chunk * (chunk + 1) / 2


def _time_prefill(cache, chunk, knobs, *, reference=False):
    inner = 1 if reference else max(1, min(FLAGS.inner, int(8192 // chunk)))
    q = jax.random.normal(jax.random.key(chunk), (chunk, NUM_Q_HEADS, HEAD_DIM), jnp.bfloat16)
    kv_lens = jnp.array([chunk], jnp.int32)
    cu = jnp.array([0, chunk], jnp.int32)
    tables = cache.tables(jax.random.key(chunk + 7), inner, 1, chunk // BLOCK_SIZE)
    opts = dict(sm_scale=HEAD_DIM ** -0.5)
    fn = ragged_paged_attention_reference if reference else functools.partial(
        ragged_paged_attention, implementation="pallas", **knobs)
    call = lambda k, v, q, t: fn(q, k, v, kv_lens, t, cu, jnp.int32(1), **opts)
    trials = 3 if reference else FLAGS.trials
    args = (cache.k, cache.v, q, tables)
    return _median_time(_repeat(call, inner), args, trials) / inner


PREFILL_VARIANTS = [  # (block_q rows, block_kv, num_warps, num_stages)
    (128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 2), (256, 128, 8, 2),
    (128, 256, 8, 2),
]


def run_prefill(results: Results, caches: Caches):
    knobs = {}
    cache = caches.small
    if FLAGS.autotune:
        scores = {}
        for variant in PREFILL_VARIANTS:
            if _out_of_time():
                return
            bq, bkv, warps, stages = variant
            try:
                t = _time_prefill(cache, 4096, dict(block_q=bq, block_kv=bkv, num_warps=warps,
                                                    num_stages=stages))
                scores[variant] = t
                results.add("prefill_tuning", dict(variant=variant, chunk=4096, ms=t * 1e3,
                                                   tflops=_prefill_flops(4096) / t / 1e12))
            except Exception as e:  # noqa: BLE001
                results.add("prefill_tuning", dict(variant=variant, error=str(e)[:1500]))
        if scores:
            best = min(scores, key=scores.get)
            knobs = dict(block_q=best[0], block_kv=best[1], num_warps=best[2],
                         num_stages=best[3])
            results.add("prefill_tuning", dict(chosen=best))
    for chunk in map(int, FLAGS.chunks):
        if _out_of_time():
            return
        row = dict(chunk=chunk, knobs=knobs)
        try:
            t = _time_prefill(cache, chunk, knobs)
            row.update(ms=t * 1e3, tflops=_prefill_flops(chunk) / t / 1e12)
            row["peak_fraction"] = row["tflops"] / FLAGS.peak_tflops
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        if FLAGS.reference and not _out_of_time():
            try:
                tr = _time_prefill(cache, chunk, knobs, reference=True)
                row.update(xla_ms=tr * 1e3)
            except Exception as e:  # noqa: BLE001
                row["xla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results.add("prefill", row)


def _print_table(data):
    print("\n== decode (32 q heads, 8 kv heads, d128, bf16, page 16) ==")
    print(f"harness floor {data.get('harness_floor_ms', 0):.4f} ms")
    print(f"{'batch':>6} {'context':>8} {'ms':>9} {'TB/s':>6} {'%HBM':>5} {'xla ms':>9} {'x':>6}"
          f" {'kern ms':>8} {'splits':>6}")
    for r in data["decode"]:
        if "ms" in r:
            xla = f"{r['xla_ms']:.3f}" if r.get("xla_ms") else "-"
            sp = f"{r['speedup_vs_xla']:.1f}" if r.get("speedup_vs_xla") else "-"
            print(f"{r['batch']:>6} {r['context']:>8} {r['ms']:>9.4f} {r['tb_s']:>6.2f} "
                  f"{100 * r['hbm_fraction']:>5.1f} {xla:>9} {sp:>6} "
                  f"{r.get('kernel_ms', 0):>8.4f} {r.get('num_splits', 0):>6}")
        else:
            print(r)
    print("\n== prefill (one causal chunk, q_len = kv_len) ==")
    for r in data["prefill"]:
        if "ms" in r:
            xla = f"{r['xla_ms']:.2f}" if r.get("xla_ms") else "-"
            print(f"{r['chunk']:>6} {r['ms']:>9.3f} ms {r['tflops']:>7.1f} TFLOP/s "
                  f"{100 * r['peak_fraction']:>5.1f}% xla {xla} ms")
        else:
            print(r)
    bad = [r for r in data["check"] if not r.get("ok")]
    print(f"\ncheck: {len(data['check']) - len(bad)}/{len(data['check'])} ok")
    for r in bad:
        print("FAILED", r)


def main(argv):
    del argv
    path = FLAGS.out or os.path.join(os.environ.get("OUT", "."), "attention_bench.json")
    results = Results(path)
    if "check" in FLAGS.modes:
        run_check(results)
    if "decode" in FLAGS.modes or "prefill" in FLAGS.modes:
        page_bytes = BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2 * 2
        wanted = max(int(b) * int(c) for b in FLAGS.batches for c in FLAGS.contexts) // BLOCK_SIZE
        num_pages = int(min(wanted, FLAGS.max_cache_gb * 1e9 // page_bytes))
        num_pages = max(num_pages, max(map(int, FLAGS.chunks)) // BLOCK_SIZE * FLAGS.inner)
        caches = Caches(num_pages)
        results.data["cache_gb"] = num_pages * page_bytes / 1e9
        if "decode" in FLAGS.modes:
            run_decode(results, caches)
        if "prefill" in FLAGS.modes:
            run_prefill(results, caches)
    _print_table(results.data)


if __name__ == "__main__":
    app.run(main)
