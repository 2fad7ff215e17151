"""Offline throughput of the engine beside a peer: a batch of random-token prompts, timed after a
warm-up pass, per batch size.

    python -m tools.benchmark_throughput --shape=llama3-8b --batch_sizes=1,64,256 --input_len=128 \
        --output_len=128 --max_model_len=2048 --max_num_seqs=256 --out=results.json

--shape names a folder of tools/model_shapes/ (its config.json only; weights are random,
initialized on the device), or --model gives a checkpoint folder. Per batch size it reports:

- output tokens/s over the whole run (prefill included);
- the engine's decode step: wall time between two `Engine.step()` returns while every request
  decodes (the overlapped loop's period: the device's step, or the host's work if longer);
- the device-only step: the same compiled calls of one such step (recorded), replayed back to
  back with nothing else on the host, so `engine - device` is host time not hidden;
- the host cost of building and dispatching one step, in microseconds.

With --peer (on by default) and torch + transformers importable with a GPU, Hugging Face
transformers `generate` runs first in the same process (tools/hf_peer.py), eager and with the
static cache under torch.compile, same shape, dtype and lengths; its memory is released before
the engine starts. --peer_static_max_batch bounds the static runs (their compilation is slow).
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from jaxserve import Engine, SamplingParams
from jaxserve.cli.flags import FLAGS, engine_config_from_flags
from jaxserve.speculative.spec_decode import spec_decode_stats
from tools import hf_peer

flags.DEFINE_string("shape", None, "A model shape from tools/model_shapes/ (random weights).")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Concurrent requests per run.")
flags.DEFINE_integer("input_len", 128, "Prompt tokens per request.")
flags.DEFINE_integer("output_len", 128, "Generated tokens per request.")
flags.DEFINE_integer("replays", 50, "Replays of the recorded step for the device-only time.")
flags.DEFINE_bool("peer", True, "Also run HF transformers generate (when torch imports).")
flags.DEFINE_list("peer_modes", list(hf_peer.MODES), "Peer modes: eager, static.")
flags.DEFINE_integer("peer_static_max_batch", 64, "Largest batch for the static peer.")
flags.DEFINE_string("out", None, "Write the results here as JSON.")

SHAPES_DIR = os.path.join(os.path.dirname(__file__), "model_shapes")


def _decoding(engine: Engine) -> bool:
    """Every request is past its prompt: the next step is decode-only."""
    s = engine.scheduler
    return not s.waiting and bool(s.running) and all(
        q.num_computed_tokens >= q.num_prompt_tokens for q in s.running)


def run_batch(engine: Engine, batch: int, input_len: int, output_len: int, seed: int,
              replays: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(0, vocab, input_len).tolist(), params)
    runner = engine.runner
    before = engine.stats()
    periods, dispatch_us, recorded = [], [], None
    t0 = last = time.perf_counter()
    step = 0
    while engine.has_unfinished_requests:
        decoding = _decoding(engine)
        if decoding and recorded is None and step >= output_len // 2:
            runner.record = []  # the calls of one mid-run decode step, for the replay
        engine.step()
        now = time.perf_counter()
        if runner.record is not None:
            recorded, runner.record = runner.record, None
        if decoding and _decoding(engine):
            periods.append(now - last)
            dispatch_us.append(1e6 * engine.last_dispatch_s)
        last = now
        step += 1
    elapsed = time.perf_counter() - t0
    result = {"batch": batch, "input_len": input_len, "output_len": output_len,
              "elapsed_s": elapsed, "output_tokens_per_s": batch * output_len / elapsed,
              "engine_decode_step_ms": _ms(np.median(periods)) if periods else None,
              "engine_decode_step_mean_ms": _ms(np.mean(periods)) if periods else None,
              "dispatch_us": float(np.median(dispatch_us)) if dispatch_us else None,
              "decode_steps": len(periods)}
    result.update(spec_decode_stats(before, engine.stats()))
    if recorded and replays:
        result["device_step_ms"] = _ms(runner.replay(recorded, replays))
        result["host_not_hidden_ms"] = result["engine_decode_step_ms"] - result["device_step_ms"]
        result["recorded_calls"] = [list(map(int, header)) for header, _ in recorded]
    return result


def _ms(seconds: float) -> float:
    return round(1e3 * float(seconds), 3)


def run_peer(model_dir: str, dtype: str) -> list[dict]:
    if not (FLAGS.peer and hf_peer.available()):
        return []
    results = []
    for batch in map(int, FLAGS.batch_sizes):
        for mode in FLAGS.peer_modes:
            if mode == "static" and batch > FLAGS.peer_static_max_batch:
                continue
            r = hf_peer.measure_generate(model_dir, batch=batch, input_len=FLAGS.input_len,
                                         output_len=FLAGS.output_len, dtype=dtype, mode=mode)
            print(json.dumps(r), flush=True)
            results.append(r)
    hf_peer.release()
    return results


def main(argv):
    del argv
    random_weights = FLAGS.shape is not None
    model_dir = os.path.join(SHAPES_DIR, FLAGS.shape) if random_weights else FLAGS.model
    config = engine_config_from_flags()
    peer = run_peer(model_dir, config.dtype)  # first: JAX takes most of the GPU when it starts
    t0 = time.perf_counter()
    engine = Engine(model_dir, config, precompile=False, skip_tokenizer=random_weights,
                    random_weights=random_weights)
    load_s = time.perf_counter() - t0
    results = []
    for batch in map(int, FLAGS.batch_sizes):
        t1 = time.perf_counter()
        run_batch(engine, batch, FLAGS.input_len, FLAGS.output_len, seed=0)  # warm-up: compiles
        warmup_s = time.perf_counter() - t1
        r = run_batch(engine, batch, FLAGS.input_len, FLAGS.output_len, seed=1,
                      replays=FLAGS.replays)
        r["warmup_s"] = round(warmup_s, 2)
        print(json.dumps(r), flush=True)
        results.append(r)
    report = {"device": str(jax.devices()[0].device_kind), "backend": engine.runner.backend,
              "shape": FLAGS.shape, "model": None if random_weights else FLAGS.model,
              "dtype": engine.config.dtype, "num_kv_blocks": engine.runner.num_kv_blocks,
              "async_scheduling": engine.async_scheduling, "load_s": load_s,
              "date": time.strftime("%Y-%m-%d"), "results": results, "peer": peer}
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
