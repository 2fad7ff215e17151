"""jaxserve: LLM inference serving on JAX.

The path of a request, one folder a stage:
  llm.py (notebook) / server/ (gRPC, HTTP) / cli/ (commands)
  -> engine/engine.py: requests in, outputs out, one overlapped step at a time
  -> core/: scheduler.py (+ scheduling_policy.py, length_predictor.py) picks the step's tokens,
     kv_cache.py (+ swap.py) gives them KV blocks
  -> worker/: runner.py packs the step (input_batch.py, step_inputs.py) and dispatches the
     compiled step (step_fn.py: models/, attention.py, sample/sampler.py)
  -> engine/output_processor.py: tokens appended, detokenized, stop checks (stop_matcher.py)
  -> outputs.py.
Beside it: speculative/ (n-gram and draft proposals, verified by sample/spec_sampling.py),
engine/disaggregation.py (a prefill engine hands requests to a decode engine, kv_handoff.py),
model_io/ (checkpoints, GGUF, tokenizers, chat templates, the built-in models), sim/ (the
scheduling simulator).

The names below are imported when first used, so that a command line that only parses its flags
(`jaxserve run --help`, a bad flag value) does not wait for the engine's imports.
"""

import importlib

_EXPORTS = {"LLM": "jaxserve.llm", "Engine": "jaxserve.engine.engine",
            "DisaggregatedEngine": "jaxserve.engine.disaggregation",
            "EngineConfig": "jaxserve.config",
            "ModelConfig": "jaxserve.config", "SamplingParams": "jaxserve.sampling_params",
            "RequestOutput": "jaxserve.outputs", "CompletionOutput": "jaxserve.outputs"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
