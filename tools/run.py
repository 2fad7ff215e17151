"""Generate text for prompts and print a throughput summary (`jaxserve run`, or python -m tools.run).

    jaxserve run                                   # SmolLM2 on three prompts
    jaxserve run --prompt="Hello" --max_tokens=32 --temperature=0      # greedy
    jaxserve run --chat --prompt="What is 2+2?"    # a user turn, in the chat template
    jaxserve run --model=/ckpt/llama-3-8b --prompts_file=prompts.txt --temperature=0.7 --seed=1

Sampling flags are SamplingParams' (vLLM's names and defaults: temperature 1.0, max_tokens 16);
those not given take the model's generation defaults where it has them. --engine_seed seeds the
requests that give no --seed, so a run is reproducible. Multi-host: the same command on every
host plus --coordinator_address, --num_processes and --process_id (docs/SHARDING.md); process 0
prints the results.
"""

import json
import time

from absl import app, flags

from jaxserve import Engine
from jaxserve.cli import cli_app
from jaxserve.model_io.chat_template import encode_chat
from jaxserve.model_io.default_model import BUILTIN_MODEL, UNTRAINED_NOTICE, resolve_model_path
from jaxserve.model_io.generation_defaults import GenerationDefaults
from sharding import distributed
from jaxserve.cli.flags import (FLAGS, engine_class_from_flags, engine_config_from_flags,
                                initialize_distributed_from_flags)
from jaxserve.cli.sampling_flags import sampling_params_from_flags

flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
flags.DEFINE_integer("num_prompts", None, "Repeat the prompts cyclically up to this many requests.")
flags.DEFINE_bool("precompile", False, "Compile every step shape first; off: each shape when a "
                  "step first needs it (a one-shot batch meets few of them).")
flags.DEFINE_string("json_out", None, "Also write generations and the summary here as JSON.")
flags.DEFINE_bool("chat", False, "Send each prompt as a user message, rendered by the model's "
                  "chat template (tokenizer_config.json or GGUF metadata).")
flags.DEFINE_string("system", None, "With --chat: a system message before each prompt.")

DEFAULT_PROMPTS = ["The capital of France is", "Photosynthesis is the process by which",
                   "The best way to learn a new language is"]


def _prompts() -> list[str]:
    prompts = list(FLAGS.prompt or [])
    if "" in prompts:
        raise ValueError("--prompt: an empty prompt; give some text")
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    prompts = prompts or DEFAULT_PROMPTS
    if FLAGS.num_prompts:
        prompts = [prompts[i % len(prompts)] for i in range(FLAGS.num_prompts)]
    return prompts


def _chat_prompt_ids(engine: Engine, prompt: str) -> list[int]:
    """--chat: the prompt as a user turn (after the --system message), templated and tokenized."""
    if engine.tokenizer is None:
        raise ValueError("--chat needs the model's tokenizer; this model has none")
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    return encode_chat(engine.tokenizer, system + [{"role": "user", "content": prompt}])[1]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (a prompt goes in --prompt)")
    try:  # the flags alone, before anything loads
        sampling_params_from_flags()
        engine_config = engine_config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    initialize_distributed_from_flags()
    prompts = None
    if distributed.is_leader():  # (the prompts file may be on process 0's host only)
        try:  # before the model loads, as the flags are
            prompts = _prompts()
        except OSError as e:
            raise app.UsageError(f"--prompts_file: {e.strerror}: {FLAGS.prompts_file!r}") from e
        except ValueError as e:
            raise app.UsageError(str(e)) from e
    t0 = time.perf_counter()
    try:  # a bad checkpoint, a mesh that does not fit, a limit past the model's: named
        params = sampling_params_from_flags(
            GenerationDefaults.from_model(resolve_model_path(FLAGS.model)))
        engine = engine_class_from_flags()(FLAGS.model, engine_config,
                                           precompile=FLAGS.precompile)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    load_s = time.perf_counter() - t0
    if not distributed.is_leader():  # run process 0's steps until it is done
        engine.runner.follow()
        return 0
    try:  # no chat template, or one that refuses the messages; a prompt past the context
        requests = [_chat_prompt_ids(engine, p) for p in prompts] if FLAGS.chat else prompts
        t1 = time.perf_counter()
        ids = [engine.add_request(p, params) for p in requests]
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    done = {}
    steps = 0
    while engine.has_unfinished_requests:
        steps += 1
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    elapsed = time.perf_counter() - t1
    if isinstance(engine, Engine):  # (a DisaggregatedEngine runs in one process)
        engine.runner.release_followers()
    outputs = [done[i] for i in ids]
    if FLAGS.model == BUILTIN_MODEL:
        print(UNTRAINED_NOTICE)
    for prompt, out in zip(prompts, outputs):
        for c in out.outputs:
            print(f"--- prompt: {prompt!r} [sample {c.index}, {len(c.token_ids)} tokens, "
                  f"finish: {c.finish_reason}]")
            print(c.text)
    gen = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    stats = engine.stats()
    summary = {
        "requests": len(outputs), "prompt_tokens": prompt_tokens, "generated_tokens": gen,
        "steps": steps, "elapsed_s": round(elapsed, 4), "load_and_compile_s": round(load_s, 2),
        "output_tokens_per_s": round(gen / elapsed, 2),
        "total_tokens_per_s": round((gen + prompt_tokens) / elapsed, 2),
        "preemptions": stats.num_preemptions, "prefix_cache_hit_rate": round(stats.prefix_cache_hit_rate, 4),
        "num_kv_blocks": stats.num_kv_blocks,
    }
    print(f"=== {summary['requests']} requests, {prompt_tokens} prompt + {gen} generated tokens "
          f"in {elapsed:.2f} s over {steps} steps: {summary['output_tokens_per_s']} output tok/s, "
          f"{summary['total_tokens_per_s']} total tok/s (load + compile {load_s:.1f} s)")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"summary": summary, "outputs": [
                {"prompt": p, "samples": [{"text": c.text, "token_ids": c.token_ids,
                                           "finish_reason": c.finish_reason} for c in o.outputs]}
                for p, o in zip(prompts, outputs)]}, f, indent=2)
    return 0


def cli(argv: list[str] | None = None) -> None:
    """`jaxserve run`: main() under jaxserve/cli/cli_app.py's flag parsing and error handling."""
    cli_app.run(main, "run", argv)


if __name__ == "__main__":
    cli()
