"""`LLM`: the notebook API, shaped like vLLM's.

    llm = LLM(model="/path/to/checkpoint")      # or the built-in "builtin:tiny-llama"
    outputs = llm.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=32))
    for delta in llm.stream("Hello"): print(delta, end="")
"""

import dataclasses
from typing import Iterator, Sequence as Seq

from tqdm.auto import tqdm

from jaxserve.config import EngineConfig
from jaxserve.default_model import BUILTIN_MODEL
from jaxserve.disaggregation import DisaggregatedEngine
from jaxserve.engine import Engine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    def __init__(self, model: str = BUILTIN_MODEL, *, precompile: bool = True,
                 progress: bool = True, skip_tokenizer: bool = False, disaggregate: bool = False,
                 **engine_args):
        """engine_args: EngineConfig fields. disaggregate: prefill and decode in two engines on
        separate devices (jaxserve/disaggregation.py)."""
        unknown = set(engine_args) - _CONFIG_FIELDS
        if unknown:
            raise TypeError(f"LLM: unknown engine arguments {sorted(unknown)}; "
                            f"known: {sorted(_CONFIG_FIELDS)}")
        engine_class = DisaggregatedEngine if disaggregate else Engine
        self.engine = engine_class(model, EngineConfig(**engine_args), precompile=precompile,
                                   progress=progress, skip_tokenizer=skip_tokenizer)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs prompts (text or token-id lists) to completion; outputs in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:  # a bad prompt leaves nothing of this call behind
                self.engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in ids:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[rid] for rid in ids]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Yields the text of one prompt (its first sample) as it is generated."""
        rid = self.engine.add_request(prompt, sampling_params)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    # A delta carries only new text; the final output is whole.
                    text = out.outputs[0].text if out.delta else out.outputs[0].text[sent:]
                    if text:
                        yield text
                        sent += len(text)
                    if out.finished:
                        return
        finally:
            self.engine.abort(rid)
