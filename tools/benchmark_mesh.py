"""Sharding overhead: compile time and step time of the same tiny model on one device and on
meshes of the simulated 8-device CPU (or on whatever devices are there).

    python -m tools.benchmark_mesh --out=mesh.json

On a CPU the "devices" of --xla_force_host_platform_device_count share the same cores, so a mesh
can only add work (partitioned programs, collectives through host memory, per-device dispatch):
the figures measure that overhead, not a speed-up.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxserve import Engine, EngineConfig, SamplingParams  # noqa: E402

flags.DEFINE_list("models", ["tests/fixtures/llama3", "tests/fixtures/mixtral"],
                  "Model folders (tiny checkpoints).")
flags.DEFINE_integer("batch", 8, "Concurrent requests.")
flags.DEFINE_integer("input_len", 32, "Prompt tokens per request.")
flags.DEFINE_integer("output_len", 32, "Generated tokens per request.")
flags.DEFINE_string("out", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS

DENSE_MESHES = [{}, dict(tensor_parallel=2), dict(tensor_parallel=4),
                dict(data_parallel=2, tensor_parallel=4),
                dict(sequence_parallel=2, tensor_parallel=4)]
MOE_MESHES = [{}, dict(expert_parallel=4), dict(expert_parallel=4, tensor_parallel=2)]


def mesh_name(parallelism: dict) -> str:
    return " x ".join(f"{k.split('_')[0]} {v}" for k, v in parallelism.items()) or "one device"


def measure(model_dir: str, parallelism: dict) -> dict:
    config = EngineConfig(max_num_seqs=FLAGS.batch, max_num_batched_tokens=64, max_model_len=256,
                          block_size=8, dtype="float32", **parallelism)
    t0 = time.perf_counter()
    engine = Engine(model_dir, config, precompile=False, progress=False, skip_tokenizer=True)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.runner.compile_all(progress=False)  # every bucket: forward (T, S) and sample
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=FLAGS.output_len, ignore_eos=True)
    for _ in range(FLAGS.batch):
        engine.add_request(rng.integers(0, vocab, FLAGS.input_len).tolist(), params)
    prefill, decode = [], []
    t_all = time.perf_counter()
    while engine.has_unfinished_requests:
        prefilling = bool(engine.scheduler.waiting) or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running)
        t0 = time.perf_counter()
        engine.step()
        (prefill if prefilling else decode).append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - t_all
    return {"model": os.path.basename(model_dir.rstrip("/")), "mesh": mesh_name(parallelism),
            "devices": engine.runner.mesh.size, "load_s": load_s, "compile_s": compile_s,
            "num_compiled": len(engine.runner.compiled),
            "median_prefill_step_ms": 1e3 * float(np.median(prefill)),
            "median_decode_step_ms": 1e3 * float(np.median(decode)),
            "output_tokens_per_s": FLAGS.batch * FLAGS.output_len / elapsed}


def main(argv):
    del argv
    results = []
    print("| model | mesh | devices | compile (s, %s) | prefill step (ms) | decode step (ms) | "
          "output tok/s |" % "buckets")
    print("|---|---|---|---|---|---|---|")
    for model_dir in FLAGS.models:
        moe = json.load(open(os.path.join(model_dir, "config.json"))).get("num_local_experts")
        for parallelism in (MOE_MESHES if moe else DENSE_MESHES):
            if np.prod(list(parallelism.values()) or [1]) > jax.device_count():
                continue
            r = measure(model_dir, parallelism)
            results.append(r)
            print(f"| {r['model']} | {r['mesh']} | {r['devices']} | {r['compile_s']:.1f} "
                  f"({r['num_compiled']}) | {r['median_prefill_step_ms']:.1f} | "
                  f"{r['median_decode_step_ms']:.1f} | {r['output_tokens_per_s']:.0f} |",
                  flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind),
                       "num_devices": jax.device_count(), "batch": FLAGS.batch,
                       "input_len": FLAGS.input_len, "output_len": FLAGS.output_len,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
