"""Prefill/decode disaggregation (as in DistServe and Splitwise): two engines on separate
devices, one running prompts, the other decoding, so that long prefills never stall the
decode steps of running requests, and each half can be sized for its own phase.

    add_request ──► prefill Engine (role "prefill", devices A)
                      │ prompt runs in chunks; its first token is sampled and reported
                      ▼
                    export_request: the request's K/V blocks copied to host memory (KVHandoff),
                      │ its device blocks freed (full ones stay in A's prefix cache)
                      ▼
                    pending hand-overs (FIFO, host memory)
                      │ import_request when the decode engine has host slots for them
                      ▼
                  decode Engine (role "decode", devices B): the blocks wait in its swap space
                    and come back through the scheduler's swap-in when it admits the request;
                    then it decodes to the end.

`DisaggregatedEngine` has the Engine's interface (add_request, abort, step, stats, ...), so the
LLM API, the CLI and the server drive it unchanged. The prefill engine steps on a worker thread
(JAX releases the GIL while the devices work); each `step()` is one decode step, and collects
the prefill step only once it has ended, so decode steps do not wait for long prefills. The K/V
cross host memory, as between two hosts; a device-to-device copy is the faster path when both
halves share a host and is left for later.

Outputs are those of a single engine: a seeded request gives the same tokens, since the sampler
keys each token on (seed, position) and the hand-over carries the seed.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import time

import jax

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import Engine, EngineStats
from jaxserve.engine.kv_handoff import KVHandoff
from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput, merge_outputs
from jaxserve.sampling_params import SamplingParams
from sharding.mesh import MeshShape

logger = logging.getLogger(__name__)


class DisaggregatedEngine:
    def __init__(self, model_path: str, config: EngineConfig = EngineConfig(), *,
                 prefill_devices=None, decode_devices=None, precompile: bool = True,
                 progress: bool = True, skip_tokenizer: bool = False,
                 random_weights: bool = False):
        """Each engine gets config's parallelism; by default the prefill engine takes the first
        such group of jax.devices() and the decode engine the next. The decode engine receives
        K/V into config.swap_space_gib of host memory."""
        n = MeshShape.of(config).num_devices
        if prefill_devices is None and decode_devices is None:
            devices = jax.devices()
            if len(devices) < 2 * n:
                raise ValueError(f"disaggregation needs 2 x {n} devices (a prefill and a decode "
                                 f"engine of {MeshShape.of(config).describe()}); "
                                 f"{len(devices)} are available")
            prefill_devices, decode_devices = devices[:n], devices[n:2 * n]
        elif prefill_devices is None or decode_devices is None:
            raise ValueError("give both prefill_devices and decode_devices, or neither")
        kwargs = dict(precompile=precompile, progress=progress, skip_tokenizer=skip_tokenizer,
                      random_weights=random_weights)
        self.prefill = Engine(model_path, dataclasses.replace(config, disaggregation_role="prefill"),
                              devices=prefill_devices, **kwargs)
        self.decode = Engine(model_path, dataclasses.replace(config, disaggregation_role="decode"),
                             devices=decode_devices, **kwargs)
        self.model_path = self.prefill.model_path
        self.model_config = self.prefill.model_config
        self.config = dataclasses.replace(self.prefill.config, disaggregation_role="none")
        self.tokenizer = self.prefill.tokenizer
        self.pending: collections.deque[KVHandoff] = collections.deque()
        self.num_handoffs = 0
        # Touched only by the caller's thread; the prefill engine only while no step of it runs.
        self._prefill_step: concurrent.futures.Future | None = None
        self._queued: list[tuple[str, str | list[int], SamplingParams, dict]] = []  # adds for prefill
        self._outputs: dict[str, RequestOutput] = {}  # from a collected prefill step
        self._request_ids = itertools.count()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "jaxserve-prefill")

    @property
    def kv_cache(self):
        """The decode engine's: where requests spend most of their life."""
        return self.decode.kv_cache

    @property
    def num_generated_tokens(self) -> int:
        return self.prefill.num_generated_tokens + self.decode.num_generated_tokens

    @property
    def num_prompt_tokens_computed(self) -> int:
        return self.prefill.num_prompt_tokens_computed + self.decode.num_prompt_tokens_computed

    # ----- requests in -------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, **kwargs) -> str:
        """As Engine.add_request (checked at once); the request starts in the prefill engine,
        queued until its current step, if one is running, ends."""
        params = params or SamplingParams()
        if request_id is None:
            request_id = str(next(self._request_ids))
            while self._known(request_id):
                request_id = str(next(self._request_ids))
        elif self._known(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.prefill.check_request(prompt, params)
        kwargs.setdefault("arrival_time", time.monotonic())
        self._queued.append((request_id, prompt, params, kwargs))
        if self._prefill_step is None:
            self._add_queued()
        return request_id

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """As Engine.check_request: the prompt's token ids, or ValueError. Changes nothing."""
        return self.prefill.check_request(prompt, params)

    def _add_queued(self) -> None:
        """Hands the queued requests to the prefill engine (no step of it is running)."""
        for request_id, prompt, params, kwargs in self._queued:
            self.prefill.add_request(prompt, params, request_id, **kwargs)
        self._queued = []

    def _known(self, request_id: str) -> bool:
        return (request_id in self.prefill.requests or request_id in self.decode.requests
                or any(h.request_id == request_id for h in self.pending)
                or any(q[0] == request_id for q in self._queued))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends a request wherever it is; waits for a running prefill step first (its outputs
        come with the next step())."""
        if self._prefill_step is not None:
            self._collect_prefill()
        self._add_queued()
        for handoff in self.pending:
            if handoff.request_id == request_id:
                self.pending.remove(handoff)
                return _handoff_output(handoff, "abort")
        if request_id in self.prefill.requests:
            self._outputs.pop(request_id, None)
            return self.prefill.abort(request_id)
        return self.decode.abort(request_id)

    # ----- one step ----------------------------------------------------------------------
    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._queued or self._prefill_step is not None or self.prefill.requests
                    or self.pending or self.decode.requests or self._outputs)

    def step(self) -> list[RequestOutput]:
        """A decode step, while the prefill engine's step runs on the worker thread. The prefill
        step's outputs are collected when it has ended (waited for only when the decode engine
        has nothing to do), and its requests that have their first token move towards the
        decode engine; then the next prefill step starts at once."""
        self._start_prefill()
        decode_busy = self.decode.has_unfinished_requests
        decode_outputs = self.decode.step() if decode_busy else []
        if self._prefill_step is not None and (self._prefill_step.done() or not decode_busy):
            self._collect_prefill()
        outputs, self._outputs = self._outputs, {}
        for out in decode_outputs + self._import_pending():
            outputs[out.request_id] = merge_outputs(outputs.get(out.request_id), out)
        self._start_prefill()
        return list(outputs.values())

    def _start_prefill(self) -> None:
        """Submits a prefill step, unless one runs, it has nothing to do, or hand-overs pile up
        (max_num_seqs of them wait for the decode engine: back-pressure on the prefill side)."""
        if self._prefill_step is not None or len(self.pending) >= self.config.max_num_seqs:
            return
        self._add_queued()
        if self.prefill.has_unfinished_requests:
            self._prefill_step = self._worker.submit(self.prefill.step)

    def _collect_prefill(self) -> None:
        """Waits for the running prefill step; keeps its outputs for the next step() and
        exports the requests that are ready. A failed export ends that request with an error."""
        step, self._prefill_step = self._prefill_step, None
        for out in step.result():
            self._outputs[out.request_id] = merge_outputs(self._outputs.get(out.request_id), out)
            if out.finished or not self.prefill.ready_for_handoff(out.request_id):
                continue
            try:
                self.pending.append(self.prefill.export_request(out.request_id))
                self.num_handoffs += 1
            except Exception:
                logger.exception("exporting request %s failed", out.request_id)
                self._outputs[out.request_id] = self.prefill.abort(out.request_id, "error")

    def _import_pending(self) -> list[RequestOutput]:
        """Hands over in arrival order while the decode engine has host slots; a hand-over it
        cannot take ends with an error. -> the outputs of those that ended."""
        ended = []
        while self.pending:
            handoff = self.pending[0]
            try:
                if not self.decode.import_request(handoff):
                    break  # its slots free up as the decode engine swaps others in
            except Exception:
                logger.exception("request %s cannot be handed to the decode engine",
                                 handoff.request_id)
                ended.append(_handoff_output(handoff, "error"))
            self.pending.popleft()
        return ended

    def stats(self) -> EngineStats:
        """The two engines' figures added up (hand-overs waiting count as waiting); prefix cache
        hits are the prefill engine's, swap figures the decode engine's."""
        p, d = self.prefill.stats(), self.decode.stats()
        blocks = p.num_kv_blocks + d.num_kv_blocks
        free = p.num_free_blocks + d.num_free_blocks
        return EngineStats(
            num_waiting=p.num_waiting + len(self.pending) + d.num_waiting,
            num_running=p.num_running + d.num_running,
            num_free_blocks=free, num_kv_blocks=blocks, kv_cache_usage=1.0 - free / blocks,
            prefix_cache_hit_rate=p.prefix_cache_hit_rate,
            num_preemptions=p.num_preemptions + d.num_preemptions,
            num_generated_tokens=p.num_generated_tokens + d.num_generated_tokens,
            num_prompt_tokens_computed=p.num_prompt_tokens_computed + d.num_prompt_tokens_computed,
            num_swap_outs=d.num_swap_outs, num_swap_ins=d.num_swap_ins,
            num_swap_slots=d.num_swap_slots, num_free_swap_slots=d.num_free_swap_slots)

    def close(self) -> None:
        self._worker.shutdown(wait=True)


def _handoff_output(handoff: KVHandoff, reason: str) -> RequestOutput:
    """The final output of a request that ends between the engines."""
    outputs = [CompletionOutput(
        index=h.index, text=h.text + h.held, token_ids=list(h.output_token_ids),
        finish_reason=h.finish_reason or reason,
        logprobs=list(h.output_logprobs) if handoff.params.logprobs is not None else None,
        stop_reason=h.stop_reason) for h in handoff.seqs]
    head = handoff.seqs[0]
    metrics = RequestMetrics.started(handoff.arrival_time, head.first_scheduled_time,
                                     head.first_token_time)
    return RequestOutput(request_id=handoff.request_id, prompt=handoff.prompt,
                         prompt_token_ids=list(handoff.prompt_token_ids), outputs=outputs,
                         finished=True, metrics=metrics,
                         num_cached_tokens=head.num_cached_prompt_tokens)
