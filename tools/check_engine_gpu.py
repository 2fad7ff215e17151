"""Checks, on an accelerator, that the engine gives the golden greedy tokens with each attention
backend: every tiny fixture of tests/fixtures (float32), the Pallas kernels against the pure-JAX
reference against Hugging Face transformers' tokens recorded in golden.json.

    python -m tools.check_engine_gpu [--out=engine_check.json]
    python -m tools.check_engine_gpu --preemption_modes=recompute,swap --num_kv_blocks=32 --copies=4

Prints one line per (family, backend, preemption mode) and exits 1 on any mismatch. With a cache
too small for the batch (--num_kv_blocks, --copies of every prompt), sequences are preempted:
their tokens must still be the golden ones, whether they recompute or swap to host memory.
"""

import json
import os
import sys

import jax
from absl import app, flags

from jaxserve import Engine, EngineConfig, SamplingParams

flags.DEFINE_list("families", ["llama3", "llama2", "mistral", "qwen2", "mixtral"],
                  "Fixtures under tests/fixtures/.")
flags.DEFINE_list("backends", ["reference", "pallas"], "Attention backends to check.")
flags.DEFINE_list("preemption_modes", ["recompute"], "EngineConfig.preemption_mode values.")
flags.DEFINE_integer("num_kv_blocks", 512, "KV cache blocks of 8 tokens (32 hold one sequence).")
flags.DEFINE_integer("copies", 1, "Requests per golden prompt.")
flags.DEFINE_string("out", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def greedy_tokens(family: str, backend: str, preemption_mode: str
                  ) -> tuple[list[list[int]], list[list[int]], dict, dict]:
    """-> (engine tokens, golden tokens, which compiled kinds ran, preemption counts)."""
    path = os.path.join(FIXTURES, family)
    with open(os.path.join(path, "golden.json")) as f:
        golden = json.load(f)
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                          block_size=8, dtype="float32", attention_backend=backend,
                          num_kv_blocks=FLAGS.num_kv_blocks, preemption_mode=preemption_mode,
                          swap_space_gib=0.25)
    engine = Engine(path, config, precompile=False, progress=False, skip_tokenizer=True)
    want = golden["greedy_tokens"] * FLAGS.copies
    params = SamplingParams(temperature=0.0, max_tokens=len(want[0]), ignore_eos=True)
    ids = [engine.add_request(p, params) for p in golden["prompts"] * FLAGS.copies]
    done = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    kinds = dict(engine.runner.kind_counts)
    stats = engine.stats()
    preemptions = {"preemptions": stats.num_preemptions, "swap_outs": stats.num_swap_outs,
                   "swap_slots_left": f"{stats.num_free_swap_slots}/{stats.num_swap_slots}",
                   "blocks_left": f"{stats.num_free_blocks}/{stats.num_kv_blocks}"}
    return [done[i] for i in ids], want, kinds, preemptions


def main(argv):
    del argv
    results, ok = [], True
    for family in FLAGS.families:
        for backend in FLAGS.backends:
            for mode in FLAGS.preemption_modes:
                got, want, kinds, preemptions = greedy_tokens(family, backend, mode)
                match = got == want
                ok &= match
                print(f"{'PASS' if match else 'FAIL'} {family:8s} {backend:9s} {mode:9s} steps by "
                      f"kind {kinds} {preemptions}", flush=True)
                if not match:
                    print(f"  got  {got}\n  want {want}")
                results.append({"family": family, "backend": backend, "preemption_mode": mode,
                                "match": match, "steps_by_kind": kinds, **preemptions})
    print(f"{'PASS' if ok else 'FAIL'}: {sum(r['match'] for r in results)}/{len(results)} on "
          f"{jax.devices()[0].device_kind}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "results": results}, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    app.run(main)
