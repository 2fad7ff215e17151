"""Scheduling policies: the order in which waiting sequences are admitted, and who is preempted.

The scheduler owns budgets, KV blocks and chunking; a policy only answers questions about order,
so it is a small object that is easy to test alone:

- `waiting_order`: waiting sequences in the order they should be admitted (every policy);
- `preemption_victim`: which running sequence gives way when KV blocks run out;
- `outranks`: for a preemptive policy, whether a waiting sequence that cannot start may
  preempt a running one (srpt, mlfq);
- `on_scheduled` / `on_finish`: what was served each step and what finished, for policies
  that keep counters (mlfq, fair) or learn lengths (sjf, srpt).

Times are seconds on the scheduler's clock (`now`); lower `priority` values run first.
"""

import abc
import heapq
import itertools
from typing import TYPE_CHECKING

from jaxserve.core.length_predictor import (LengthPredictor, Prediction, RequestMetadata,
                                            make_predictor)
from jaxserve.request import Sequence

if TYPE_CHECKING:
    from jaxserve.core.scheduler import ScheduledSeq

DEFAULT_PREDICTOR = "hybrid"


class SchedulingPolicy(abc.ABC):
    name: str
    preemptive = False  # True: the scheduler asks `outranks` when the first waiting one is stuck
    uses_predictor = False

    @abc.abstractmethod
    def waiting_order(self, waiting: list[Sequence], now: float) -> list[Sequence]:
        """Waiting sequences in the order they should be admitted."""

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence:
        """Which running sequence to preempt (default: the newest)."""
        return candidates[-1]

    def outranks(self, waiting: Sequence, running: Sequence, now: float) -> bool:
        """May `waiting`, unable to start, preempt `running`? (preemptive policies only)"""
        return False

    def on_scheduled(self, scheduled: "list[ScheduledSeq]") -> None:
        """Called with every step's decision."""

    def on_finish(self, seq: Sequence) -> None:
        """Called once for every sequence that ends (stop, length, abort, error, rejected)."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served; a preempted sequence keeps its arrival time, so it goes first."""

    name = "fcfs"

    def waiting_order(self, waiting, now):
        return sorted(waiting, key=lambda s: (s.arrival_time, s.seq_id))


class PriorityPolicy(SchedulingPolicy):
    """Lower `Sequence.priority` first, FCFS within a level. Aging: every `aging_s` seconds of
    waiting count as one level better, so a low-priority request waits at most
    (its priority - the best priority) * aging_s behind newer high-priority ones."""

    name = "priority"

    def __init__(self, aging_s: float = 10.0):
        self.aging_s = aging_s

    def _key(self, seq: Sequence, now: float):
        return seq.priority - (now - seq.arrival_time) / self.aging_s, seq.arrival_time, seq.seq_id

    def waiting_order(self, waiting, now):
        return sorted(waiting, key=lambda s: self._key(s, now))

    def preemption_victim(self, candidates):
        # The worst nominal priority, newest among those; ages do not count here.
        return max(candidates, key=lambda s: (s.priority, s.arrival_time, s.seq_id))


class _PredictedLengths:
    """One prediction per sequence, made when a policy first asks; finished sequences teach the
    predictor (stopped or length-capped ones: aborted and failed ones end early)."""

    def __init__(self, predictor: LengthPredictor):
        self.predictor = predictor
        self.cache: dict[int, Prediction] = {}

    def __getitem__(self, seq: Sequence) -> Prediction:
        guess = self.cache.get(seq.seq_id)
        if guess is None:
            guess = self.predictor.predict(seq.prompt_token_ids, RequestMetadata.of(seq))
            self.cache[seq.seq_id] = guess
        return guess

    def finished(self, seq: Sequence) -> None:
        self.cache.pop(seq.seq_id, None)
        if seq.finish_reason in ("stop", "length") and seq.output_token_ids:
            self.predictor.observe(seq.prompt_token_ids, RequestMetadata.of(seq),
                                   len(seq.output_token_ids))


class SJFPolicy(SchedulingPolicy):
    """Shortest predicted job (output length, or the ranker's score) first; never preempts."""

    name = "sjf"
    uses_predictor = True

    def __init__(self, predictor: LengthPredictor):
        self.predicted = _PredictedLengths(predictor)

    def waiting_order(self, waiting, now):
        return sorted(waiting, key=lambda s: (self.predicted[s].score, s.arrival_time, s.seq_id))

    def on_finish(self, seq):
        self.predicted.finished(seq)


class SRPTPolicy(SchedulingPolicy):
    """Shortest remaining predicted output first. A newcomer that cannot start preempts a
    running sequence whose remaining length is more than `preempt_ratio` times its own
    (by recompute, its full blocks stay in the prefix cache; by swap, its blocks wait in host
    memory: EngineConfig.preemption_mode). A sequence that outlives its
    prediction is assumed to need as many tokens again as it has produced."""

    name = "srpt"
    preemptive = True
    uses_predictor = True

    def __init__(self, predictor: LengthPredictor, preempt_ratio: float = 4.0):
        if not predictor.gives_lengths:
            raise ValueError(f"srpt needs output lengths; the {predictor.name!r} predictor only ranks")
        self.predicted = _PredictedLengths(predictor)
        self.preempt_ratio = preempt_ratio

    def remaining(self, seq: Sequence) -> float:
        done = len(seq.output_token_ids)
        total = self.predicted[seq].length
        return total - done if done < total else max(done, 1)

    def waiting_order(self, waiting, now):
        return sorted(waiting, key=lambda s: (self.remaining(s), s.arrival_time, s.seq_id))

    def outranks(self, waiting, running, now):
        # As in mlfq, only a newcomer preempts, so preemptions cannot cascade.
        return (waiting.first_scheduled_time is None
                and self.remaining(running) > self.preempt_ratio * self.remaining(waiting))

    def preemption_victim(self, candidates):
        return max(candidates, key=lambda s: (self.remaining(s), s.arrival_time, s.seq_id))

    def on_finish(self, seq):
        self.predicted.finished(seq)


class MLFQPolicy(SchedulingPolicy):
    """Skip-join multi-level feedback queue (FastServe). Level i has a quantum of
    base_quantum * quantum_ratio**i served tokens (prompt tokens weighted by
    prompt_token_weight, output tokens 1). A new sequence joins the first level whose quantum
    covers its weighted prompt; it drops a level each time it uses up its level's quantum.
    Lower levels run first (FCFS within a level). With `preempt`, a newcomer that cannot start
    preempts a running sequence on a worse level; that costs the victim a re-prefill (recompute
    preemption; or copies to host memory and back, with preemption_mode "swap"), which is cheap on an accelerator but costly where any prefill token makes a
    step much dearer (the CPU step table), so it is off by default and levels then order
    admission only. Against starvation, a sequence that has waited `promotion_period_s` since it
    last ran (or arrived) is promoted to level 0, and again after every further period."""

    name = "mlfq"

    def __init__(self, num_levels: int = 6, base_quantum: float = 32.0, quantum_ratio: float = 4.0,
                 prompt_token_weight: float = 1.0, promotion_period_s: float = 60.0,
                 preempt: bool = False):
        self.preemptive = preempt
        self.quanta = [base_quantum * quantum_ratio**i for i in range(num_levels)]
        self.prompt_token_weight = prompt_token_weight
        self.promotion_period_s = promotion_period_s
        self.levels: dict[int, list[float]] = {}  # seq_id -> [level, tokens served on it]
        self.waiting_since: dict[int, float] = {}  # seq_id -> when it last ran, arrived or rose

    def level(self, seq: Sequence) -> int:
        state = self.levels.get(seq.seq_id)
        if state is None:  # skip-join
            cost = self.prompt_token_weight * seq.num_prompt_tokens
            level = next((i for i, q in enumerate(self.quanta) if cost <= q), len(self.quanta) - 1)
            state = self.levels[seq.seq_id] = [level, 0.0]
        return state[0]

    def waiting_order(self, waiting, now):
        for seq in waiting:
            since = self.waiting_since.setdefault(seq.seq_id, now)
            if now - since >= self.promotion_period_s:
                self.levels[seq.seq_id] = [0, 0.0]
                self.waiting_since[seq.seq_id] = now
        return sorted(waiting, key=lambda s: (self.level(s), s.arrival_time, s.seq_id))

    def outranks(self, waiting, running, now):
        # Only a newcomer preempts: one arrival costs at most one recompute, and preempted or
        # promoted sequences, which wait for a free slot, cannot set off a cascade.
        return waiting.first_scheduled_time is None and self.level(waiting) < self.level(running)

    def preemption_victim(self, candidates):
        return max(candidates, key=lambda s: (self.level(s), s.arrival_time, s.seq_id))

    def on_scheduled(self, scheduled):
        last = len(self.quanta) - 1
        for item in scheduled:
            self.level(item.seq)
            self.waiting_since.pop(item.seq.seq_id, None)
            state = self.levels[item.seq.seq_id]
            state[1] += _served(item, self.prompt_token_weight, 1.0)
            while state[0] < last and state[1] >= self.quanta[state[0]]:
                state[1] -= self.quanta[state[0]]
                state[0] += 1

    def on_finish(self, seq):
        self.levels.pop(seq.seq_id, None)
        self.waiting_since.pop(seq.seq_id, None)


class FairSharePolicy(SchedulingPolicy):
    """Virtual token counter per client (VTC): each client's counter grows by the prompt and
    output tokens it is served (weighted, divided by the client's weight); the least-served
    client's oldest sequence is admitted first. A client that comes back after being idle starts
    level with the least-served active client, so idling earns no credit."""

    name = "fair"

    def __init__(self, client_weights: dict[str, float] | None = None,
                 prompt_token_weight: float = 1.0, output_token_weight: float = 2.0):
        self.client_weights = client_weights or {}
        self.prompt_token_weight = prompt_token_weight
        self.output_token_weight = output_token_weight
        self.counters: dict[str, float] = {}
        self.active: dict[str, set[int]] = {}  # client -> unfinished seq ids it has

    def _activate(self, waiting: list[Sequence]) -> None:
        for seq in waiting:
            members = self.active.setdefault(seq.client_id, set())
            if not members:
                busy = [self.counters[c] for c, s in self.active.items() if s and c in self.counters]
                self.counters[seq.client_id] = max(self.counters.get(seq.client_id, 0.0),
                                                   min(busy, default=0.0))
            members.add(seq.seq_id)

    def waiting_order(self, waiting, now):
        self._activate(waiting)
        queues: dict[str, list[Sequence]] = {}
        for seq in sorted(waiting, key=lambda s: (s.arrival_time, s.seq_id)):
            queues.setdefault(seq.client_id, []).append(seq)
        # Merge the clients' FCFS queues as if each admission charged its prompt right away.
        tie = itertools.count()
        heap = [(self.counters[c], next(tie), c, 0) for c in queues]
        heapq.heapify(heap)
        order = []
        while heap:
            counter, _, client, i = heapq.heappop(heap)
            seq = queues[client][i]
            order.append(seq)
            if i + 1 < len(queues[client]):
                charge = self.prompt_token_weight * seq.num_tokens / self.client_weights.get(client, 1.0)
                heapq.heappush(heap, (counter + charge, next(tie), client, i + 1))
        return order

    def on_scheduled(self, scheduled):
        for item in scheduled:
            client = item.seq.client_id
            # Forks share the chunk and each sample one more output token.
            served = (_served(item, self.prompt_token_weight, self.output_token_weight)
                      + self.output_token_weight * len(item.forks))
            self.counters[client] = (self.counters.get(client, 0.0)
                                     + served / self.client_weights.get(client, 1.0))

    def on_finish(self, seq):
        self.active.get(seq.client_id, set()).discard(seq.seq_id)


def _served(item: "ScheduledSeq", prompt_weight: float, output_weight: float) -> float:
    """Weighted tokens of one scheduled chunk: each sampled token is an output token, every other
    token it runs (prompt, or outputs recomputed after a preemption) counts as prompt."""
    sampled = 1 if item.sample else 0
    return prompt_weight * (item.num_tokens - sampled) + output_weight * sampled


POLICIES: dict[str, type[SchedulingPolicy]] = {
    cls.name: cls for cls in (FCFSPolicy, PriorityPolicy, SJFPolicy, SRPTPolicy, MLFQPolicy,
                              FairSharePolicy)}


def make_policy(name: str, predictor: LengthPredictor | None = None) -> SchedulingPolicy:
    """A policy by name; "sjf:regressor" also names the length predictor of a policy that uses
    one (default: hybrid). `predictor` gives one directly (the simulator's oracle)."""
    policy_name, _, predictor_name = name.partition(":")
    if policy_name not in POLICIES:
        raise ValueError(f"scheduling_policy {name!r} is unknown; known: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[policy_name]
    if predictor_name and predictor is not None:
        raise ValueError(f"scheduling_policy {name!r} names a predictor and one was given too")
    if not cls.uses_predictor:
        if predictor_name or predictor is not None:
            raise ValueError(f"scheduling_policy {policy_name!r} uses no length predictor, got {name!r}")
        return cls()
    return cls(predictor or make_predictor(predictor_name or DEFAULT_PREDICTOR))
