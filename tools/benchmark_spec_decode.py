"""Speculative decoding on a real model: acceptance rate, mean accepted length and output tokens/s
of n-gram speculation for k = 2, 4, 6 against none, at batch 1 and 8, on two workloads:

- copy: rewrite or edit a given passage or piece of code (the reply repeats much of the
  prompt: where prompt lookup shines);
- chat: open questions (little to copy; the per-sequence switch, speculative_min_acceptance,
  should turn speculation off before it costs).

    python -m tools.benchmark_spec_decode --model=smollm2 --out_dir=/tmp/spec \
        --ks=0,2,4,6 --batch_sizes=1,8 --output_len=128

--methods=ngram,draft adds the draft model (--speculative_model, or the target drafting for
itself: the machinery's overhead at full acceptance).

Greedy decoding, the model's chat template. One engine per k (0: speculative_method "none"),
all loaded at once (each with KV blocks for max_num_seqs x max_model_len unless
--num_kv_blocks), other engine flags as given (jaxserve.cli.flags). Each (workload, batch) runs once
per engine to warm up (compiling its shapes), then --repeats times, the engines interleaved; the
median run is kept. Writes summary.json under --out_dir and prints one line per result.
"""

import dataclasses
import json
import os
import time

import jax
from absl import app, flags

from jaxserve import Engine, SamplingParams
from jaxserve.model_io.chat_template import encode_chat
from jaxserve.cli.flags import FLAGS, engine_config_from_flags
from jaxserve.speculative.spec_decode import spec_decode_stats

flags.DEFINE_list("ks", ["0", "2", "4", "6"], "Speculative tokens per step; 0: no speculation.")
flags.DEFINE_list("methods", ["ngram"], "Speculative methods to run for each k > 0: ngram, "
                  "draft (the draft model is --speculative_model; the target itself when unset).")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Concurrent requests per run.")
flags.DEFINE_list("workloads", ["copy", "chat"], "copy, chat.")
flags.DEFINE_integer("output_len", 128, "Most tokens generated per request.")
flags.DEFINE_integer("repeats", 3, "Timed runs per engine and setting (the median is kept).")
flags.DEFINE_string("out_dir", None, "Write the results here (JSON).")

PASSAGE = (
    "The lighthouse stood at the edge of the cliff for more than two hundred years. Every night "
    "its keeper climbed the one hundred and twelve steps to light the lamp, and every morning he "
    "climbed them again to put it out. Ships passing the rocks below saw the light and turned "
    "away in time. When the keeper grew old, the town replaced the lamp with an electric one "
    "that needed no one at all, and the keeper moved to a small house by the harbour, where he "
    "could still see the light turning through his kitchen window.")
CODE = (
    "def mean(values):\n"
    "    total = 0\n"
    "    for v in values:\n"
    "        total = total + v\n"
    "    return total / len(values)\n\n"
    "def variance(values):\n"
    "    m = mean(values)\n"
    "    total = 0\n"
    "    for v in values:\n"
    "        total = total + (v - m) * (v - m)\n"
    "    return total / len(values)\n")
COPY_PROMPTS = [
    f"Rewrite this passage in the past perfect tense, keeping everything else the same:\n\n{PASSAGE}",
    f"Rename the variable `total` to `acc` in this code and return the whole code:\n\n{CODE}",
    f"Repeat the following passage exactly, then give it a title:\n\n{PASSAGE}",
    f"Add type hints to this code and return the whole code:\n\n{CODE}",
]
CHAT_PROMPTS = [
    "What are three good habits for staying healthy?",
    "Explain how a bicycle stays upright.",
    "Write a short poem about the sea.",
    "Why is the sky blue?",
]


def prompts(engine: Engine, workload: str, batch: int) -> list[list[int]]:
    texts = COPY_PROMPTS if workload == "copy" else CHAT_PROMPTS
    texts = [texts[i % len(texts)] for i in range(batch)]
    return [encode_chat(engine.tokenizer, [{"role": "user", "content": t}])[1] for t in texts]


def run(engine: Engine, workload: str, batch: int, output_len: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len)
    before = engine.stats()
    t0 = time.perf_counter()
    for ids in prompts(engine, workload, batch):
        engine.add_request(ids, params)
    outputs = []
    while engine.has_unfinished_requests:
        outputs += [o for o in engine.step() if o.finished]
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"workload": workload, "batch": batch, "output_tokens": tokens,
              "elapsed_s": round(elapsed, 3), "output_tokens_per_s": round(tokens / elapsed, 2)}
    result.update(spec_decode_stats(before, engine.stats()))
    return result


def write_report(base, summary: list[dict]) -> None:
    """Speed-ups against no speculation, then summary.json (rewritten after every setting, so a
    run cut short keeps what it measured)."""
    none = {(r["workload"], r["batch"]): r["output_tokens_per_s"] for r in summary if not r["k"]}
    for r in summary:
        if (r["workload"], r["batch"]) in none:
            r["speedup"] = round(r["output_tokens_per_s"] / none[(r["workload"], r["batch"])], 3)
    report = {"device": str(jax.devices()[0].device_kind), "model": FLAGS.model,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "output_len": FLAGS.output_len, "config": dataclasses.asdict(base),
              "results": summary}
    if FLAGS.out_dir:
        with open(os.path.join(FLAGS.out_dir, "summary.json"), "w") as f:
            json.dump(report, f, indent=2)


def main(argv):
    del argv
    base = engine_config_from_flags()
    if base.num_kv_blocks is None:  # several engines share the device: each its own share
        max_len = base.max_model_len or 2048
        base = dataclasses.replace(base, max_model_len=max_len, num_kv_blocks=base.max_num_seqs
                                   * -(-max_len // base.block_size))
    if FLAGS.out_dir:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
    runs = [("none", 0)] if 0 in map(int, FLAGS.ks) else []
    runs += [(m, k) for m in FLAGS.methods for k in map(int, FLAGS.ks) if k]
    engines = {}
    for method, k in runs:
        fields = dict(speculative_method=method, num_speculative_tokens=k or 1)
        if method == "draft":
            fields["speculative_model"] = base.speculative_model or FLAGS.model
        engines[method, k] = Engine(FLAGS.model, dataclasses.replace(base, **fields),
                                    precompile=False, progress=False)
    summary = []
    for workload in FLAGS.workloads:
        for batch in map(int, FLAGS.batch_sizes):
            for engine in engines.values():
                run(engine, workload, batch, FLAGS.output_len)  # warm-up: compiles
            # Interleaved repeats, the median kept: a busy machine slows every engine alike.
            timed = {key: [] for key in engines}
            for _ in range(FLAGS.repeats):
                for key, engine in engines.items():
                    timed[key].append(run(engine, workload, batch, FLAGS.output_len))
            for (method, k), rs in timed.items():
                r = dict(sorted(rs, key=lambda x: x["output_tokens_per_s"])[len(rs) // 2])
                r.update(method=method, k=k, repeats=len(rs),
                         output_tokens_per_s_all=[x["output_tokens_per_s"] for x in rs])
                print(json.dumps(r), flush=True)
                summary.append(r)
                write_report(base, summary)
    for r in summary:
        print(f"{r['workload']:5s} batch {r['batch']:2d} {r['method']:5s} k {r['k']}: "
              f"{r['output_tokens_per_s']:8.1f} tok/s  x{r.get('speedup', 1):.2f}  "
              f"acceptance {r.get('acceptance_rate', '-')}  "
              f"mean accepted length {r.get('mean_accepted_length', '-')}")


if __name__ == "__main__":
    app.run(main)
