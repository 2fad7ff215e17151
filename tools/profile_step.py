"""Where a decode step's time goes, host and device: a cProfile of the engine loop over a batch
that only decodes, and the device-only time of each compiled call of one step, replayed alone.

    python -m tools.profile_step --shape=llama3-8b --batch_sizes=1,64 --max_model_len=2048 \
        --max_num_seqs=256 --profile_steps=40

Takes the engine, shape and batch flags of tools/benchmark_throughput.py. Prints JSON lines.
"""

import cProfile
import io
import json
import os
import pstats
import time

import jax
import numpy as np
from absl import app, flags

from jaxserve import Engine, SamplingParams
from jaxserve.cli.flags import FLAGS, engine_config_from_flags
from tools.benchmark_throughput import SHAPES_DIR, _decoding, run_batch

flags.DEFINE_integer("profile_steps", 40, "Decode steps under the profiler.")
flags.DEFINE_integer("top", 25, "Functions to list.")


def profile_batch(engine: Engine, batch: int) -> dict:
    rng = np.random.default_rng(2)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=FLAGS.output_len, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(0, vocab, FLAGS.input_len).tolist(), params)
    while not _decoding(engine):
        engine.step()
    for _ in range(3):
        engine.step()
    runner = engine.runner
    runner.record = []
    engine.step()
    recorded, runner.record = runner.record, None
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for _ in range(FLAGS.profile_steps):
        engine.step()
    profiler.disable()
    wall = (time.perf_counter() - t0) / FLAGS.profile_steps
    while engine.has_unfinished_requests:
        engine.step()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(FLAGS.top)
    stats.sort_stats("cumulative").print_stats(FLAGS.top)
    calls = {}
    for header, arrays in recorded:
        calls[str(list(map(int, header)))] = round(1e3 * runner.replay([(header, arrays)], 30), 3)
    # Host cost of one call of each compiled function, without waiting for the device: with
    # numpy arguments (transferred by the call) and with arguments already on the device.
    dispatch, dispatch_on_device, transfer = {}, {}, {}
    for header, arrays in recorded:
        name = str(list(map(int, header)))
        jax.block_until_ready(runner.last_tokens)
        t1 = time.perf_counter()
        for _ in range(10):
            runner._apply(header, arrays)
        dispatch[name] = round(1e6 * (time.perf_counter() - t1) / 10, 1)
        jax.block_until_ready(runner.last_tokens)
        t1 = time.perf_counter()
        on_device = [jax.device_put(arrays) for _ in range(10)]
        transfer[name] = round(1e6 * (time.perf_counter() - t1) / 10, 1)
        jax.block_until_ready((runner.last_tokens, on_device))
        t1 = time.perf_counter()
        for args in on_device:
            runner._apply(header, args)
        dispatch_on_device[name] = round(1e6 * (time.perf_counter() - t1) / 10, 1)
    jax.block_until_ready(runner.last_tokens)
    return {"batch": batch, "step_wall_ms": round(1e3 * wall, 3),
            "device_ms_per_call": calls, "host_us_per_call": dispatch,
            "host_us_per_call_args_on_device": dispatch_on_device,
            "host_us_device_put_args": transfer,
            "profile": out.getvalue()}


def main(argv):
    del argv
    random_weights = FLAGS.shape is not None
    model_dir = os.path.join(SHAPES_DIR, FLAGS.shape) if random_weights else FLAGS.model
    engine = Engine(model_dir, engine_config_from_flags(), precompile=False,
                    skip_tokenizer=random_weights, random_weights=random_weights)
    for batch in map(int, FLAGS.batch_sizes):
        run_batch(engine, batch, FLAGS.input_len, FLAGS.output_len, seed=0)  # compiles
        r = profile_batch(engine, batch)
        print(r.pop("profile"))
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    app.run(main)
