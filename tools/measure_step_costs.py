"""Measures the engine's step time over a grid of (batched tokens, sequences) for the simulator.

    python -m tools.measure_step_costs --out=jaxserve/sim/step_costs/cpu.json            # CPU
    python -m tools.measure_step_costs --dtype=bfloat16 --tokens=16,32,64,128,256,512,1024,2048 \
        --seqs=8,16,32,64,128,256 --out=jaxserve/sim/step_costs/h100.json                # GPU

Each cell runs the real `ModelRunner.execute` (input arrays built on the host, the compiled step,
sampled ids copied back) on a made-up step of `seqs` sequences and `tokens` tokens: seqs - 1
decodes with --context_len tokens of KV cache each, and one prefill chunk with the remaining
tokens. Grid points are the runner's bucket sizes (powers of two), so every cell is one compiled
shape. The grid is timed in --repeats rounds after a warm-up round, and each cell keeps its fastest
run (on a shared machine the minimum is the stable statistic; on a dedicated accelerator it is
close to the median). Cells with more
sequences than tokens cannot occur and are written as null. The scheduler's own host time is not
included: the simulator runs the real scheduler and could time it separately.
"""

import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.model_io.default_model import BUILTIN_MODEL
from jaxserve.request import Sequence
from jaxserve.core.scheduler import ScheduledSeq, SchedulerOutput

flags.DEFINE_string("model", BUILTIN_MODEL, "Checkpoint folder, or the built-in tiny model.")
flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Weights and activations.")
flags.DEFINE_list("tokens", ["16", "32", "64", "128", "256", "512", "1024"],
                  "Batched-token grid (powers of two, from 16).")
flags.DEFINE_list("seqs", ["8", "16", "32", "64", "128"], "Sequence grid (powers of two, from 8).")
flags.DEFINE_integer("context_len", 256, "KV cache tokens of each decoding sequence.")
flags.DEFINE_integer("max_model_len", 2048, "The engine's max_model_len: block tables are padded "
                     "to it, which the CPU reference attention pays for.")
flags.DEFINE_integer("block_size", 16, "Tokens per KV cache block.")
flags.DEFINE_integer("repeats", 10, "Timed runs per cell (the fastest is kept).")
flags.DEFINE_boolean("random_weights", False, "Initialize --model's config.json randomly (a "
                     "folder of tools/model_shapes/, say) instead of loading weights.")
flags.DEFINE_string("out", None, "Write the table here (JSON); default: print it.")

FLAGS = flags.FLAGS


def _fake_step(engine: Engine, rng, num_tokens: int, num_seqs: int) -> tuple[SchedulerOutput, list]:
    """num_seqs - 1 decodes at context_len, then one prefill chunk of the remaining tokens."""
    ctx, vocab = FLAGS.context_len, engine.model_config.vocab_size
    lengths = [ctx + 1] * (num_seqs - 1) + [num_tokens - (num_seqs - 1)]
    items, seqs = [], []
    for i, length in enumerate(lengths):
        seq = Sequence(i, str(i), 0, rng.integers(3, vocab, length).tolist(), SamplingParams(), i, 0.0)
        if not engine.kv_cache.allocate(seq, length):
            raise RuntimeError(f"KV cache too small for the ({num_tokens}, {num_seqs}) cell")
        start = length - 1 if i < num_seqs - 1 else 0
        items.append(ScheduledSeq(seq, start, length - start, sample=True))
        seqs.append(seq)
    return SchedulerOutput(items, [], []), seqs


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv):
    del argv
    tokens = sorted(int(t) for t in FLAGS.tokens)
    seqs = sorted(int(s) for s in FLAGS.seqs)
    max_model_len = FLAGS.max_model_len
    if max_model_len < FLAGS.context_len + 1 + max(tokens):
        raise ValueError(f"--max_model_len ({max_model_len}) must be >= context_len + 1 + the "
                         f"largest token count ({FLAGS.context_len + 1 + max(tokens)})")
    blocks = max(seqs) * -(-(FLAGS.context_len + 1) // FLAGS.block_size) + max(tokens) // FLAGS.block_size + 8
    config = EngineConfig(max_num_seqs=max(seqs), max_num_batched_tokens=max(tokens),
                          max_model_len=max_model_len, block_size=FLAGS.block_size,
                          num_kv_blocks=blocks, dtype=FLAGS.dtype, enable_prefix_caching=False)
    engine = Engine(FLAGS.model, config, precompile=False, progress=False, skip_tokenizer=True,
                    random_weights=FLAGS.random_weights)
    rng = np.random.default_rng(0)
    cells = [(t, s) for t in tokens for s in seqs if s <= t]
    times: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    # Rounds over all cells rather than all runs of one cell, so a burst of load from elsewhere
    # spoils a few runs of many cells, not every run of one. Round 0 compiles and warms up.
    for round_ in range(FLAGS.repeats + 1):
        for t, s in cells:
            out, made = _fake_step(engine, rng, t, s)
            runner = engine.runner
            start = time.perf_counter()
            runner.collect(runner.execute(out))  # dispatch, then wait: one whole step
            elapsed = time.perf_counter() - start
            if round_:
                times[(t, s)].append(elapsed)
            else:
                runner.collect(runner.execute(out))
            for seq in made:
                engine.kv_cache.free(seq)
                runner.batch.release(seq)
        print(f"round {round_} of {FLAGS.repeats} done", flush=True)
    seconds = [[min(times[(t, s)]) if s <= t else None for s in seqs] for t in tokens]
    for t, s in cells:
        print(f"tokens={t:5d} seqs={s:4d}: {min(times[(t, s)]) * 1e3:8.3f} ms")
    device = jax.devices()[0]
    table = {
        "device": f"{device.platform}: {device.device_kind}",
        "host": _cpu_name(), "num_cpus": os.cpu_count(),
        "model": FLAGS.model, "dtype": FLAGS.dtype, "block_size": FLAGS.block_size,
        "context_len": FLAGS.context_len, "max_model_len": max_model_len,
        "attention_backend": engine.runner.backend,
        "jax_version": jax.__version__, "date": datetime.date.today().isoformat(),
        "command": "python -m tools.measure_step_costs " + " ".join(sys.argv[1:]),
        "tokens": tokens, "seqs": seqs, "seconds": seconds,
    }
    text = json.dumps(table, indent=1)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {FLAGS.out}")
    else:
        print(text)


if __name__ == "__main__":
    app.run(main)
