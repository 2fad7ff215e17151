"""The engine: requests in, outputs out, one overlapped scheduler step at a time.

`add_request` validates and queues. `step` is one turn of the overlapped loop:

    host                                               device
    ----                                               ------
    schedule step N+1 (step N's tokens are pending)    runs step N
    dispatch step N+1 (returns at once)                ... N, then N+1 queued behind it
    read step N's tokens (copied back asynchronously)  runs step N+1
    append, detokenize, stop checks, outputs of N      runs step N+1
    return step N's outputs                            runs step N+1

A token sampled by step N is step N+1's input on the device (runner.last_tokens), so the host
never stands between two steps. A sequence found finished when step N is read was already in
step N+1: its token from N+1 is dropped (never emitted or counted), and its KV blocks are freed
only once step N+1 has been read. Blocks freed while a step is in flight (by a preemption) are
only ever written by later steps, which the device runs after it. `EngineConfig.async_scheduling`
False reads each step back before the next is scheduled (the synchronous loop).

An error in one request finishes that request with finish_reason "error"; it never stops the
engine.
"""

import dataclasses
import gc
import itertools
import logging
import os
import random
import time

import jax

from jaxserve.model_io.checkpoint import load_model
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.model_io.default_model import jaxserve_cache_dir, resolve_model_path
from jaxserve.core.kv_cache import KVCacheManager
from jaxserve.engine import handoff
from jaxserve.engine.kv_handoff import KVHandoff, KVLayout
from jaxserve.engine.output_processor import RequestState, append_token, make_output, release_held
from jaxserve.outputs import RequestOutput
from jaxserve.request import Sequence
from jaxserve.request_limits import check_prompt_size, check_prompt_tokens
from jaxserve.worker.runner import ModelRunner
from jaxserve.sampling_params import SamplingParams
from jaxserve.core.scheduler import Scheduler, SchedulerOutput
from jaxserve.core.scheduling_policy import make_policy
from jaxserve.speculative.spec_decode import NgramProposer, SpecState
from jaxserve.speculative.spec_draft import DraftProposer
from jaxserve.worker.step_results import SampledSeq, StepHandle
from jaxserve.model_io.tokenizer import IncrementalDetokenizer, Tokenizer
from sharding.mesh import MeshShape, make_mesh

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _InFlight:
    """A dispatched step the host has not read yet."""
    sched: SchedulerOutput
    handle: StepHandle
    seq_ids: set[int]  # every sequence in it
    deferred_free: list[Sequence] = dataclasses.field(default_factory=list)  # blocks to free after
    # A sampled sequence in it speculates: the next step waits for its tokens (docs/SPECULATIVE.md).
    speculative: bool = False


@dataclasses.dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_kv_blocks: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_generated_tokens: int
    num_prompt_tokens_computed: int
    num_swap_outs: int = 0  # preemptions that swapped to host memory (the others recomputed)
    num_swap_ins: int = 0  # readmissions of swapped-out sequences
    num_swap_slots: int = 0  # host slots for swapped-out (or handed-over) blocks
    num_free_swap_slots: int = 0
    num_draft_tokens: int = 0  # proposed tokens verified (speculative decoding)
    num_accepted_tokens: int = 0  # of those, accepted
    num_spec_steps: int = 0  # verifications: (sequence, step) pairs that speculated


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in the jaxserve cache folder, unless one is set."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(jaxserve_cache_dir(), "jax-compilation"))
        # Every step shape, however quick to compile: a small model's start-up is many of them.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class Engine:
    def __init__(self, model_path: str, config: EngineConfig = EngineConfig(), *,
                 precompile: bool = True, progress: bool = True, skip_tokenizer: bool = False,
                 random_weights: bool = False, devices=None):
        """random_weights: initialize the model randomly from config.json instead of loading
        weights (for benchmarking a model shape whose weights are not at hand). devices: the
        devices the mesh is laid over (the first ones of jax.devices() when None)."""
        if config.compilation_cache:
            enable_compilation_cache()
        self.model_path = resolve_model_path(model_path)
        model_config = ModelConfig.from_dir(self.model_path)
        self.config = config.resolve(model_config)
        self.model_config = model_config
        self.tokenizer = None if skip_tokenizer else Tokenizer.from_dir(self.model_path)
        # The mesh comes first so that every device reads only its own slices of the weights.
        mesh = make_mesh(MeshShape.of(self.config), devices)
        model = load_model(self.model_path, self.config.dtype, mesh=mesh, progress=progress,
                           random_weights=random_weights)
        c = self.config
        self.proposer = None
        if c.speculative_method == "ngram":
            self.proposer = NgramProposer(c.num_speculative_tokens, c.ngram_min, c.ngram_max,
                                          c.max_model_len, c.speculative_min_acceptance)
        elif c.speculative_method == "draft":  # before the target's KV cache takes the memory
            self.proposer = DraftProposer(c, model_config, mesh, precompile, progress)
        self.runner = ModelRunner(model, self.config, self.config.num_kv_blocks, precompile,
                                  progress, mesh=mesh)
        self.kv_cache = KVCacheManager(self.runner.num_kv_blocks, self.config.block_size,
                                       self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.kv_cache, make_policy(self.config.scheduling_policy),
                                   num_swap_slots=self.runner.num_swap_slots)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._seed_rng = random.Random(self.config.seed)
        self.num_generated_tokens = 0
        self.num_prompt_tokens_computed = 0
        self.num_draft_tokens = self.num_accepted_tokens = self.num_spec_steps = 0
        # A prefill engine hands requests over right after their first token: no step ahead.
        self.async_scheduling = (self.config.async_scheduling
                                 and self.config.disaggregation_role != "prefill")
        self._in_flight: _InFlight | None = None
        self.last_dispatch_s = 0.0  # host time of the last step's build and dispatch
        # The model's Python objects live as long as the engine: keep them out of the cyclic
        # garbage collector's scans, whose pauses would otherwise stall steps now and then.
        gc.collect()
        gc.freeze()

    # ----- requests in -------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, priority: int = 0, client_id: str = "",
                    arrival_time: float | None = None) -> str:
        """Validates and queues one request; raises ValueError naming the bad field."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._request_ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_ids = self.check_request(prompt, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        base_seed = params.seed if params.seed is not None else self._seed_rng.randrange(2**32 - 64)
        seqs = [Sequence(next(self._seq_ids), request_id, i, list(prompt_ids), params,
                         (base_seed + i) % 2**32, arrival, priority=priority, client_id=client_id,
                         spec=SpecState() if self.proposer else None)
                for i in range(params.n)]
        seqs[0].fork_children = seqs[1:]
        detoks = [IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
                  if self.tokenizer else None for _ in seqs]
        self.requests[request_id] = RequestState(
            request_id, prompt if isinstance(prompt, str) else None, list(prompt_ids), params, seqs,
            arrival, detoks, [""] * len(seqs), [None] * len(seqs), [""] * len(seqs))
        self.scheduler.add(seqs[0])
        return request_id

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids; ValueError naming the bad field. Changes nothing."""
        check_prompt_size(prompt, self.config.max_model_len)  # before tokenizing it
        prompt_ids = self._prompt_ids(prompt)
        self._validate(prompt_ids, params)
        return prompt_ids

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this engine has no tokenizer; give token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be integers")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        c, vocab = self.config, self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids: {bad[:5]} outside the vocabulary [0, {vocab})")
        check_prompt_tokens(len(prompt_ids), c.max_model_len)
        if params.n > c.max_num_seqs:
            raise ValueError(f"SamplingParams.n ({params.n}) exceeds max_num_seqs ({c.max_num_seqs})")
        if params.logprobs is not None and params.logprobs > c.max_logprobs:
            raise ValueError(f"SamplingParams.logprobs ({params.logprobs}) exceeds max_logprobs "
                             f"({c.max_logprobs})")
        if len(params.stop_token_ids) > c.max_stop_token_ids:
            raise ValueError(f"SamplingParams.stop_token_ids has {len(params.stop_token_ids)} ids; "
                             f"at most {c.max_stop_token_ids}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be < vocab size {vocab}")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer; this engine has none")

    def abort(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        """Stops a request now and frees its blocks; unknown or finished ids are ignored.
        reason: the finish reason of its unfinished samples ("error" for a fault)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish_seq(seq, reason)
        out = self._finish_request(req)
        self._read_in_flight_if_idle()
        return out

    # ----- prefill/decode hand-over (jaxserve/engine/disaggregation.py) --------------------------
    @property
    def kv_layout(self) -> KVLayout:
        m = self.model_config
        return KVLayout(num_layers=m.num_layers, block_size=self.config.block_size,
                        num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, dtype=self.config.dtype,
                        vocab_size=m.vocab_size)

    def ready_for_handoff(self, request_id: str) -> bool:
        """The request's prompt has run and each live sample holds its first token."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        live = [s for s in req.seqs if not s.is_finished]
        return bool(live) and all(
            s.output_token_ids and s.num_computed_tokens == s.num_tokens - 1 for s in live)

    def export_request(self, request_id: str) -> KVHandoff:
        """Takes a request ready for hand-over out of this engine, with a host copy of the K/V
        of its live samples; frees its blocks (the full ones stay in the prefix cache)."""
        return handoff.export_request(self, request_id)

    def import_request(self, kv_handoff: KVHandoff) -> bool:
        """Continues a request handed over by a prefill engine: its K/V go into host slots and
        come in as a swap-in when the scheduler admits it. Returns False, changing nothing,
        while the host slots are short; raises ValueError for a hand-over this engine cannot
        take."""
        return handoff.import_request(self, kv_handoff)

    # ----- one step ----------------------------------------------------------------------
    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Schedules and dispatches the next step, then finishes the one before it (or, with
        async_scheduling off, this one); returns an output for every request that changed.

        A step in flight with a speculating sequence is read first: its proposals need its
        tokens (docs/SPECULATIVE.md)."""
        touched: dict[str, RequestState] = {}
        if self._in_flight is not None and self._in_flight.speculative:
            flight, self._in_flight = self._in_flight, None
            self._finish_step(flight, touched)
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        # Out of the running set, also in a step that ends up empty: their slots go back now.
        for seq in sched.preempted:
            self.runner.batch.release(seq)
        for seq in self.scheduler.take_rejected():
            self.runner.batch.release(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        flight = None if sched.is_empty else self._dispatch(sched, touched)
        previous, self._in_flight = self._in_flight, None
        if self.async_scheduling:
            self._in_flight = flight
            if previous is not None:
                self._finish_step(previous, touched)
        elif flight is not None:
            self._finish_step(flight, touched)
        outputs = [self._output_or_finish(r) for r in touched.values()]
        self._read_in_flight_if_idle()
        return outputs

    def _propose(self) -> None:
        """Proposals for the running speculating sequences whose tokens are all known."""
        ready = []
        for seq in self.scheduler.running:
            spec = seq.spec
            if spec is None:
                continue
            if (spec.enabled and not seq.num_pending
                    and seq.num_computed_tokens == seq.num_tokens - 1):
                ready.append(seq)
            else:
                spec.proposals = []
        try:
            self.proposer.propose_batch(ready, self.scheduler.running)
        except Exception:  # a failed draft costs this step its proposals, nothing else
            logger.exception("proposing failed; %d sequences run this step without", len(ready))
            for seq in ready:
                seq.spec.proposals = []

    def _read_in_flight_if_idle(self) -> None:
        """With no request left, nothing overlaps the step in flight: read it now (its tokens
        are all dropped), so that an idle engine holds no blocks."""
        if not self.requests and self._in_flight is not None:
            flight, self._in_flight = self._in_flight, None
            self._finish_step(flight, {})

    def _dispatch(self, sched: SchedulerOutput, touched: dict) -> _InFlight | None:
        """Starts the step on the device; None when that failed (its sequences end with
        "error"). Its sampled sequences now each have one more pending token."""
        try:
            handle = self.runner.execute(sched)
        except Exception:  # a failed step: every request in it ends with "error", the engine goes on
            logger.exception("step failed; finishing its %d sequences with an error", len(sched.scheduled))
            for seq in sched.preempted:  # their swap-out may not have happened: recompute them
                self.scheduler.drop_swapped(seq)
            self._fail(sched, touched)
            return None
        for seq in handle.rows:
            seq.num_pending += 1
        self.num_prompt_tokens_computed += sum(
            max(0, min(i.start + i.num_tokens, i.seq.num_prompt_tokens) - i.start) for i in sched.scheduled)
        self.last_dispatch_s = handle.dispatch_s
        seq_ids = {seq.seq_id for item in sched.scheduled for seq in (item.seq, *item.forks)}
        speculative = any(seq.spec is not None and seq.spec.enabled for seq in handle.rows)
        return _InFlight(sched, handle, seq_ids, speculative=speculative)

    def _fail(self, sched: SchedulerOutput, touched: dict) -> None:
        for item in sched.scheduled:
            for seq in (item.seq, *item.forks):
                seq.num_pending = 0
                if not seq.is_finished:
                    self._finish_seq(seq, "error")
                if seq.request_id in self.requests:
                    touched[seq.request_id] = self.requests[seq.request_id]

    def _finish_step(self, flight: _InFlight, touched: dict) -> None:
        """Reads a step's tokens and processes them: append, detokenize, stop checks."""
        try:
            rows = self.runner.collect(flight.handle)
        except Exception:
            logger.exception("step failed; finishing its %d sequences with an error",
                             len(flight.sched.scheduled))
            self._fail(flight.sched, touched)
            rows = []
        now = time.monotonic()
        for row in rows:
            seq = row.seq
            seq.num_pending -= 1
            if seq.is_finished:  # found finished one step late (or aborted): token dropped
                continue
            req = self.requests[seq.request_id]
            touched[req.request_id] = req
            try:
                reason = self._append_tokens(req, row, now)
            except Exception:  # one request's bad state never takes the others down
                logger.exception("request %s failed while processing its token", req.request_id)
                reason = "error"
            if reason is not None:
                self._finish_seq(seq, reason)
            elif row.num_draft:
                # Rejected proposals: their K/V slots are written over later, and the blocks
                # taken for them alone go back now (no step in flight reads them: the loop
                # waited for this step).
                seq.num_computed_tokens = seq.num_known_tokens - 1
                self.kv_cache.truncate(seq, seq.num_known_tokens)
        self.scheduler.on_step_done(flight.sched)
        for seq in flight.deferred_free:
            self.kv_cache.free(seq)
        self.scheduler.frees_pending = bool(self._in_flight and self._in_flight.deferred_free)

    def _append_tokens(self, req: RequestState, row: SampledSeq, now: float) -> str | None:
        """Appends a step's tokens for one sequence, one by one through the same stop checks
        as without speculation; tokens after a stop are dropped. -> the finish reason."""
        seq = row.seq
        if row.num_draft:
            self.num_draft_tokens += row.num_draft
            self.num_accepted_tokens += row.num_accepted
            self.num_spec_steps += 1
            seq.spec.record(row.num_draft, row.num_accepted, self.config.speculative_min_acceptance)
        for token, logprob, top in zip(row.tokens, row.logprobs, row.tops):
            self.num_generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = append_token(req, seq, token, logprob, top,
                                  eos_token_ids=self.model_config.eos_token_ids,
                                  max_model_len=self.config.max_model_len)
            if reason is not None:
                return reason
        return None

    def _finish_seq(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence; its blocks wait for the step in flight when that step has it."""
        flight = self._in_flight
        in_flight = flight is not None and seq.seq_id in flight.seq_ids
        self.scheduler.finish(seq, reason, free_blocks=not in_flight)
        if self.proposer is not None:
            self.proposer.release(seq)
        if in_flight:
            flight.deferred_free.append(seq)
            self.scheduler.frees_pending = True
        self.runner.batch.release(seq)

    # ----- outputs -----------------------------------------------------------------------
    def _output_or_finish(self, req: RequestState) -> RequestOutput:
        if req.finished:
            return self._finish_request(req)
        return make_output(req, finished=False)

    def _finish_request(self, req: RequestState) -> RequestOutput:
        release_held(req)
        self.requests.pop(req.request_id, None)
        return make_output(req, finished=True)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            num_free_blocks=self.kv_cache.num_free_blocks, num_kv_blocks=self.kv_cache.num_blocks,
            kv_cache_usage=self.kv_cache.usage, prefix_cache_hit_rate=self.kv_cache.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_generated_tokens=self.num_generated_tokens,
            num_prompt_tokens_computed=self.num_prompt_tokens_computed,
            num_swap_outs=self.scheduler.num_swap_outs, num_swap_ins=self.scheduler.num_swap_ins,
            num_swap_slots=self.scheduler.swap.num_slots,
            num_free_swap_slots=self.scheduler.num_free_swap_slots,
            num_draft_tokens=self.num_draft_tokens, num_accepted_tokens=self.num_accepted_tokens,
            num_spec_steps=self.num_spec_steps)

