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
LLM API, the CLI and the server drive it unchanged. Each `step()` runs a step of both engines
at once (the prefill one on a worker thread; JAX releases the GIL while the devices work), then
moves the hand-overs. The K/V cross host memory, as between two hosts; a device-to-device copy
is the faster path when both halves share a host and is left for later.

Outputs are those of a single engine: a seeded request gives the same tokens, since the sampler
keys each token on (seed, position) and the hand-over carries the seed.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import logging

import jax

from jaxserve.config import EngineConfig
from jaxserve.engine import Engine, EngineStats
from jaxserve.kv_handoff import KVHandoff
from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
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
        """As Engine.add_request; the request starts in the prefill engine."""
        if request_id is None:
            request_id = str(next(self._request_ids))
            while self._known(request_id):
                request_id = str(next(self._request_ids))
        elif self._known(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        return self.prefill.add_request(prompt, params, request_id, **kwargs)

    def _known(self, request_id: str) -> bool:
        return (request_id in self.prefill.requests or request_id in self.decode.requests
                or any(h.request_id == request_id for h in self.pending))

    def abort(self, request_id: str) -> RequestOutput | None:
        for handoff in self.pending:
            if handoff.request_id == request_id:
                self.pending.remove(handoff)
                return _handoff_output(handoff, "abort")
        if request_id in self.prefill.requests:
            return self.prefill.abort(request_id)
        return self.decode.abort(request_id)

    # ----- one step ----------------------------------------------------------------------
    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.prefill.requests or self.pending or self.decode.requests)

    def step(self) -> list[RequestOutput]:
        """A step of each engine, run at once; then the requests whose first token came out
        of the prefill engine move towards the decode engine."""
        prefill_step = self._worker.submit(self.prefill.step)
        try:
            decode_outputs = self.decode.step()
        finally:
            prefill_outputs = prefill_step.result()
        outputs = {}
        for out in prefill_outputs:
            outputs[out.request_id] = out
            if not out.finished and self.prefill.ready_for_handoff(out.request_id):
                self.pending.append(self.prefill.export_request(out.request_id))
                self.num_handoffs += 1
        for out in decode_outputs:
            outputs[out.request_id] = out
        for out in self._import_pending():
            outputs[out.request_id] = out
        return list(outputs.values())

    def _import_pending(self) -> list[RequestOutput]:
        """Hands over in arrival order while the decode engine has host slots; a hand-over it
        can never take ends with an error. -> the outputs of those that ended."""
        ended = []
        while self.pending:
            handoff = self.pending[0]
            try:
                if not self.decode.import_request(handoff):
                    break  # its slots free up as the decode engine swaps others in
            except ValueError:
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
    metrics = RequestMetrics(arrival_time=handoff.arrival_time)
    if head.first_scheduled_time is not None:
        metrics.queue_time = head.first_scheduled_time - handoff.arrival_time
    if head.first_token_time is not None:
        metrics.time_to_first_token = head.first_token_time - handoff.arrival_time
    return RequestOutput(request_id=handoff.request_id, prompt=handoff.prompt,
                         prompt_token_ids=list(handoff.prompt_token_ids), outputs=outputs,
                         finished=True, metrics=metrics,
                         num_cached_tokens=head.num_cached_prompt_tokens)
