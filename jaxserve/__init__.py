"""jaxserve: LLM inference serving on JAX.

The path of a request: llm.py / server -> engine.py -> scheduler.py (+ scheduling_policy.py,
kv_cache.py) -> runner.py (step: models/, attention.py, sampler.py) -> engine.py -> outputs.py.
Disaggregated (disaggregation.py): a prefill engine hands each request to a decode engine
(kv_handoff.py) after its first token.
"""

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.disaggregation import DisaggregatedEngine
from jaxserve.engine import Engine
from jaxserve.llm import LLM
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams

__all__ = ["LLM", "Engine", "DisaggregatedEngine", "EngineConfig", "ModelConfig", "SamplingParams",
           "RequestOutput", "CompletionOutput"]
