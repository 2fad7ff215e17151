"""Iteration-level scheduler with chunked prefill.

Once per step, `schedule()` decides which sequences run and how many of their tokens:
running sequences first, in admission order (a decode takes one token, an unfinished prefill
takes the next chunk), then waiting sequences in the policy's order, all within the token budget
(`max_num_batched_tokens`) and the sequence budget (`max_num_seqs`). When KV blocks run out it
preempts: by recompute, the victim's blocks are freed (full ones stay in the prefix cache) and it
returns to the waiting queue to run its prompt and outputs again later; by swap
(`preemption_mode="swap"`), its blocks are first listed for copying to host slots (jaxserve/core/swap.py),
and when readmitted it gets fresh blocks that are filled back from them, keeping its progress.
Swap falls back to recompute when the host slots run out. A preemptive policy
(srpt, mlfq) may also have running sequences give way, at the start of a step, to the first
waiting one when that one cannot start for want of a sequence slot or KV blocks.

The decision is a plain `SchedulerOutput` that the runner turns into device arrays.
"""

import dataclasses
import logging
import time
from collections.abc import Callable

from jaxserve.config import EngineConfig
from jaxserve.core.kv_cache import KVCacheManager
from jaxserve.request import Sequence, SequenceStatus
from jaxserve.core.scheduling_policy import SchedulingPolicy
from jaxserve.core.swap import SwapSpace

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first token of this step's chunk (== num_computed_tokens before the step)
    num_tokens: int  # tokens of this sequence in the step
    sample: bool  # the chunk reaches the sequence's last token: sample the next one
    forks: list[Sequence] = dataclasses.field(default_factory=list)  # also sample from this row
    # Proposed tokens verified in this step (speculative decoding): they run after the
    # sequence's last token, inside num_tokens.
    spec_tokens: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    block_copies: list[tuple[int, int]]  # (src, dst) blocks to copy before the step writes
    preempted: list[Sequence]
    # Made before the step, swap-outs first: (device block, host slot) and (host slot, device block).
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Nothing to run; a swap-out alone must still run, before its blocks are reused."""
        return not self.scheduled and not self.swap_out


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache: KVCacheManager, policy: SchedulingPolicy,
                 clock: Callable[[], float] = time.monotonic, num_swap_slots: int = 0):
        """num_swap_slots: host slots for swapped-out blocks (preemption_mode "swap") and for
        blocks received from a prefill engine (Engine.import_request)."""
        self.config = config
        self.kv_cache = kv_cache
        self.policy = policy
        self.clock = clock  # the simulator passes its virtual clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # admission order; the newest is last
        self.num_preemptions = 0
        self.num_swap_outs = 0  # preemptions that swapped (the rest recomputed)
        self.num_swap_ins = 0  # readmissions of swapped sequences
        self._swapped_now: set[int] = set()  # seq ids swapped out in this step
        self.swap = SwapSpace(num_swap_slots)
        self._swap_out: list[tuple[int, int]] = []  # this step's copies
        self._swap_in: list[tuple[int, int]] = []
        self._slots_read_this_step: list[int] = []  # freed at the next schedule()
        self.rejected: list[Sequence] = []  # finished by the scheduler itself, not yet reported
        # Set by the engine while finished sequences' blocks wait for a step in flight to be
        # read: they will be free, so nothing waiting is "too big for the cache" meanwhile.
        self.frees_pending = False

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        self.swap.free(self._slots_read_this_step)  # the last step's swap-ins have run
        self._slots_read_this_step = []
        self._swapped_now.clear()
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = self._yield_to_waiting(now)
        out_of_blocks = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            # Proposals follow the last token (not at a fork: its children copy this length).
            spec = (seq.spec.proposals[:budget - 1]
                    if seq.spec and num_tokens == 1 and not seq.fork_children else [])
            num_tokens += len(spec)
            # 0: a fork child that joined running in this very step. At its length limit: its
            # pending token ends it once read back (one step late), so no step is spent on it.
            if num_tokens == 0 or self._at_length_limit(seq):
                i += 1
                continue
            if spec and not self.kv_cache.allocate(seq, num_tokens):
                num_tokens, spec = num_tokens - len(spec), []  # proposals never preempt
            while not self.kv_cache.allocate(seq, num_tokens):
                victim = self.policy.preemption_victim(self.running[i:])
                self._preempt(victim)
                preempted.append(victim)
                out_of_blocks = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue  # it preempted itself; self.running[i] is now the next sequence
            scheduled.append(self._take(seq, num_tokens, spec))
            budget -= num_tokens
            i += 1

        if not out_of_blocks:
            self._admit(scheduled, budget, now)
        if (not scheduled and self.waiting and not self.running and not self.frees_pending
                and self._admissible(now)):
            self._reject_unfittable(now)
        self.policy.on_scheduled(scheduled)
        out = SchedulerOutput(scheduled, self.kv_cache.take_pending_copies(), preempted,
                              self._swap_out, self._swap_in)
        self._swap_out, self._swap_in = [], []
        return out

    def _at_length_limit(self, seq: Sequence) -> bool:
        """Its tokens, pending ones included, reach max_tokens or max_model_len."""
        if not seq.num_pending:
            return False
        max_tokens = seq.params.max_tokens or self.config.max_model_len
        return (seq.num_output_tokens >= max_tokens
                or seq.num_tokens >= self.config.max_model_len)

    def _admissible(self, now: float) -> list[Sequence]:
        """The waiting queue in the policy's order, less sequences whose last token is still
        being read back from a step in flight (preempted while it ran)."""
        return [s for s in self.policy.waiting_order(self.waiting, now) if not s.num_pending]

    def _yield_to_waiting(self, now: float) -> list[Sequence]:
        """Preempts running sequences that the policy ranks below the first waiting one, while
        that one could not start for want of a sequence slot or free KV blocks."""
        if not self.policy.preemptive or not self.waiting:
            return []
        order = self._admissible(now)
        if not order:
            return []
        head = order[0]
        chunk = min(head.num_tokens, self.config.max_num_batched_tokens)
        blocks = -(-chunk // self.kv_cache.block_size)
        slots = 1 + len(head.fork_children)
        victims = []
        while (len(self.running) + slots > self.config.max_num_seqs
               or blocks > self.kv_cache.num_free_blocks):
            candidates = [s for s in self.running if self.policy.outranks(head, s, now)]
            if not candidates:
                break
            victim = self.policy.preemption_victim(candidates)
            self._preempt(victim)
            victims.append(victim)
        return victims

    def _admit(self, scheduled: list[ScheduledSeq], budget: int, now: float) -> None:
        if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
            return  # no room for anyone: skip ordering the queue
        for seq in self._admissible(now):
            slots = 1 + len(seq.fork_children)
            if budget <= 0 or len(self.running) + slots > self.config.max_num_seqs:
                break
            if seq.seq_id in self._swapped_now:
                continue  # swapped out in this very step: no round trip
            cached = self.kv_cache.find_cached_prefix(seq) if not seq.block_table else []
            num_computed = len(cached) * self.kv_cache.block_size
            if seq.swap_slots:  # swapped out: the blocks past the cached prefix come back
                num_computed = max(num_computed, seq.num_computed_tokens)
            remaining = seq.num_tokens - num_computed
            assert remaining > 0, (seq.request_id, seq.num_tokens, num_computed)
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            num_tokens = min(remaining, budget)
            if not self.kv_cache.allocate(seq, num_tokens, cached):
                self.kv_cache.seq_hashes.pop(seq.seq_id, None)
                break
            self.waiting.remove(seq)
            seq.num_computed_tokens = num_computed
            if seq.swap_slots:  # slot i holds block i; cached blocks need no copy
                self._swap_in += zip(seq.swap_slots[len(cached):], seq.block_table[len(cached):])
                self._slots_read_this_step += seq.swap_slots
                seq.swap_slots = []
                self.num_swap_ins += 1
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                seq.num_cached_prompt_tokens = min(num_computed, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._take(seq, num_tokens))
            budget -= num_tokens

    def _take(self, seq: Sequence, num_tokens: int, spec: list[int] = ()) -> ScheduledSeq:
        """num_tokens includes the proposals `spec`: num_computed_tokens runs past num_tokens
        until the step is read and the engine sets it to the accepted length."""
        start = seq.num_computed_tokens
        seq.num_computed_tokens += num_tokens
        sample = seq.num_computed_tokens >= seq.num_tokens
        item = ScheduledSeq(seq, start, num_tokens, sample, spec_tokens=list(spec))
        if sample and seq.fork_children:
            for child in seq.fork_children:
                self.kv_cache.fork(seq, child)
                child.num_computed_tokens = seq.num_computed_tokens
                child.first_scheduled_time = seq.first_scheduled_time
                child.num_cached_prompt_tokens = seq.num_cached_prompt_tokens
                child.status = SequenceStatus.RUNNING
                self.running.append(child)
            item.forks, seq.fork_children = seq.fork_children, []
        return item

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        # Swap: the blocks holding its computed tokens go to host slots (copied before this
        # step, which may hand the freed blocks to others). When the slots run out: recompute.
        num_blocks = -(-seq.num_computed_tokens // self.kv_cache.block_size)
        swap = self.config.preemption_mode == "swap" and num_blocks
        slots = self.swap.allocate(num_blocks) if swap else None
        if slots is not None:
            self._swap_out += zip(seq.block_table[:num_blocks], slots)
            seq.swap_slots = slots
            self._swapped_now.add(seq.seq_id)
            self.num_swap_outs += 1
        self.kv_cache.free(seq)
        if slots is None:
            seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.num_preemptions += 1
        logger.debug("preempted seq %d (%s)", seq.seq_id, seq.request_id)

    def _reject_unfittable(self, now: float) -> None:
        """Nothing runs and the next waiting sequence still does not fit: it never will."""
        head = self._admissible(now)[0]
        logger.warning("request %s needs more KV blocks than the cache has; finishing it",
                       head.request_id)
        self.waiting.remove(head)
        self.drop_swapped(head)
        for seq in [head, *head.fork_children]:
            seq.finish("length")
            self.policy.on_finish(seq)
            self.rejected.append(seq)

    def take_rejected(self) -> list[Sequence]:
        rejected, self.rejected = self.rejected, []
        return rejected

    def finish(self, seq: Sequence, reason: str, free_blocks: bool = True) -> None:
        """Ends a sequence (stop, length, abort, error) and frees its blocks, unless
        free_blocks is False: the caller frees them later (`kv_cache.free`), once no step in
        flight reads them."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free_blocks:
            self.kv_cache.free(seq)
        self.drop_swapped(seq)
        seq.finish(reason)
        self.policy.on_finish(seq)

    @property
    def num_free_swap_slots(self) -> int:
        """Free host slots, counting those whose swap-in has run (returned at the next step)."""
        return self.swap.num_free_slots + len(self._slots_read_this_step)

    def drop_swapped(self, seq: Sequence) -> None:
        """Forgets a sequence's swapped-out blocks (it ends, or their copy failed): frees the
        host slots; a sequence still waiting will recompute."""
        if seq.swap_slots:
            self.swap.free(seq.swap_slots)
            seq.swap_slots = []
            seq.num_computed_tokens = 0

    def on_step_done(self, output: SchedulerOutput) -> None:
        for item in output.scheduled:
            for seq in [item.seq, *item.forks]:
                # Not one preempted since (the overlapped loop reads a step after scheduling
                # the next): its blocks are gone.
                if seq.status == SequenceStatus.RUNNING:
                    self.kv_cache.cache_full_blocks(seq)
