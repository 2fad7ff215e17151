"""Offline throughput of the engine: a batch of random-token prompts, timed after a warm-up pass.

    python -m tools.benchmark_throughput --shape=llama3-8b --batch_sizes=1,64 --input_len=128 \
        --output_len=128 --out=results.json

--shape names a folder of tools/model_shapes/ (its config.json only; weights are random,
initialized on the device), or --model gives a checkpoint folder. Reports output tokens/s and mean decode step time.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from jaxserve import Engine, SamplingParams
from jaxserve.flags import FLAGS, engine_config_from_flags

flags.DEFINE_string("shape", None, "A model shape from tools/model_shapes/ (random weights).")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Concurrent requests per run.")
flags.DEFINE_integer("input_len", 128, "Prompt tokens per request.")
flags.DEFINE_integer("output_len", 128, "Generated tokens per request.")
flags.DEFINE_string("out", None, "Write the results here as JSON.")

SHAPES_DIR = os.path.join(os.path.dirname(__file__), "model_shapes")


def run_batch(engine: Engine, batch: int, input_len: int, output_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [engine.add_request(rng.integers(0, vocab, input_len).tolist(), params) for _ in range(batch)]
    step_times, decode_steps = [], 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests:
        s0 = time.perf_counter()
        sched_prefill = any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.waiting
        engine.step()
        if not sched_prefill:
            step_times.append(time.perf_counter() - s0)
            decode_steps += 1
    elapsed = time.perf_counter() - t0
    del ids
    return {"batch": batch, "input_len": input_len, "output_len": output_len,
            "elapsed_s": elapsed, "output_tokens_per_s": batch * output_len / elapsed,
            "mean_decode_step_ms": 1e3 * float(np.mean(step_times)) if step_times else None,
            "median_decode_step_ms": 1e3 * float(np.median(step_times)) if step_times else None}


def main(argv):
    del argv
    random_weights = FLAGS.shape is not None
    model_dir = os.path.join(SHAPES_DIR, FLAGS.shape) if random_weights else FLAGS.model
    t0 = time.perf_counter()
    engine = Engine(model_dir, engine_config_from_flags(), precompile=False,
                    skip_tokenizer=random_weights, random_weights=random_weights)
    load_s = time.perf_counter() - t0
    results = []
    for batch in map(int, FLAGS.batch_sizes):
        run_batch(engine, batch, FLAGS.input_len, FLAGS.output_len, seed=0)  # warm-up: compiles
        r = run_batch(engine, batch, FLAGS.input_len, FLAGS.output_len, seed=1)
        print(json.dumps(r))
        results.append(r)
    report = {"device": str(jax.devices()[0].device_kind), "backend": engine.runner.backend,
              "shape": FLAGS.shape, "model": None if random_weights else FLAGS.model,
              "dtype": engine.config.dtype, "num_kv_blocks": engine.runner.num_kv_blocks,
              "load_s": load_s, "results": results}
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
