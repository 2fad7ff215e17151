"""jaxserve: LLM inference serving on JAX.

The path of a request: llm.py / server -> engine.py -> scheduler.py (+ scheduling_policy.py,
kv_cache.py) -> runner.py (step: models/, attention.py, sampler.py) -> engine.py -> outputs.py.
Disaggregated (disaggregation.py): a prefill engine hands each request to a decode engine
(kv_handoff.py) after its first token.

The names below are imported when first used, so that a command line that only parses its flags
(`jaxserve run --help`, a bad flag value) does not wait for the engine's imports.
"""

import importlib

_EXPORTS = {"LLM": "jaxserve.llm", "Engine": "jaxserve.engine",
            "DisaggregatedEngine": "jaxserve.disaggregation", "EngineConfig": "jaxserve.config",
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
