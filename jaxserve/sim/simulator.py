"""Discrete-event simulator of the engine loop: the real Scheduler, KVCacheManager, policy and
length predictor, with the model step replaced by a measured step-time table.

Each iteration mirrors `Engine.step`: requests that have arrived by the virtual clock are added,
the scheduler decides, the clock advances by the step cost of (batched tokens, sequences), every
sampled sequence gets one token (a made-up id: the simulator knows only how many tokens each
request produces), finished ones are ended through `Scheduler.finish`, and `on_step_done` runs.
So scheduling, chunking, preemption and prefix caching behave exactly as in the engine.
"""

import dataclasses
import itertools
from collections.abc import Iterable

import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.core.kv_cache import KVCacheManager
from jaxserve.request import Sequence
from jaxserve.sampling_params import SamplingParams
from jaxserve.core.scheduler import Scheduler
from jaxserve.core.scheduling_policy import SchedulingPolicy
from jaxserve.sim.step_cost import StepCostModel
from jaxserve.sim.workload import SimRequest


@dataclasses.dataclass
class RequestRecord:
    """What happened to one request; times in seconds of virtual time."""

    request_id: str
    client_id: str
    priority: int
    arrival_time: float
    prompt_len: int
    output_len: int  # tokens it produced (0 if rejected)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_step: int | None = None
    num_preemptions: int = 0
    rejected: bool = False

    @property
    def jct(self) -> float:
        """Job completion time: arrival to last token."""
        return self.finish_time - self.arrival_time

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        n = self.output_len
        return (self.finish_time - self.first_token_time) / (n - 1) if n > 1 else 0.0


@dataclasses.dataclass
class SimResult:
    records: list[RequestRecord]  # in completion order
    num_steps: int
    makespan: float  # virtual seconds from the first arrival to the last finish
    num_preemptions: int
    served_tokens: dict[str, int]  # client -> prompt + output tokens scheduled for it

    def completion_order(self) -> list[tuple[int, str]]:
        """(step index, request id) of every finished request, in order."""
        return [(r.finish_step, r.request_id) for r in self.records]

    @property
    def mean_jct(self) -> float:
        return float(np.mean([r.jct for r in self.records if not r.rejected]))


class Simulator:
    def __init__(self, config: EngineConfig, policy: SchedulingPolicy, step_cost: StepCostModel,
                 num_kv_blocks: int | None = None):
        """config: the engine limits (max_model_len must be set); num_kv_blocks defaults to
        config.num_kv_blocks, else enough for max_num_seqs full-length sequences."""
        if config.max_model_len is None:
            raise ValueError("Simulator: EngineConfig.max_model_len must be set")
        if config.preemption_mode != "recompute":
            raise ValueError("Simulator: EngineConfig.preemption_mode must be 'recompute' (the "
                             "step-cost table has no cost for swap copies)")
        self.config = config
        self.num_kv_blocks = (num_kv_blocks or config.num_kv_blocks
                              or config.max_num_seqs * config.max_blocks_per_seq)
        self.policy = policy
        self.step_cost = step_cost
        self.now = 0.0

    def run(self, requests: Iterable[SimRequest], max_steps: int | None = None) -> SimResult:
        c = self.config
        kv_cache = KVCacheManager(self.num_kv_blocks, c.block_size, c.enable_prefix_caching)
        scheduler = Scheduler(c, kv_cache, self.policy, clock=lambda: self.now)
        arrivals = sorted(requests, key=lambda r: r.arrival_time)
        if not arrivals:
            return SimResult([], 0, 0.0, 0, {})
        for r in arrivals:
            if len(r.prompt_token_ids) + r.output_len > c.max_model_len:
                raise ValueError(f"request {r.request_id}: prompt {len(r.prompt_token_ids)} + output "
                                 f"{r.output_len} tokens exceed max_model_len {c.max_model_len}")
        self.now = arrivals[0].arrival_time
        start = self.now
        targets: dict[int, int] = {}  # seq_id -> output length at which it stops
        records: dict[int, RequestRecord] = {}
        finished: list[RequestRecord] = []
        served: dict[str, int] = {}
        seq_ids = itertools.count()
        next_arrival = 0
        step = 0  # Engine.step calls: one per schedule()
        while True:
            while next_arrival < len(arrivals) and arrivals[next_arrival].arrival_time <= self.now:
                r = arrivals[next_arrival]
                next_arrival += 1
                tokens = r.prompt_token_ids
                tokens = tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
                seq = Sequence(next(seq_ids), r.request_id, 0, tokens,
                               SamplingParams(max_tokens=r.max_tokens, ignore_eos=True), 0,
                               r.arrival_time, priority=r.priority, client_id=r.client_id)
                targets[seq.seq_id] = r.output_len
                records[seq.seq_id] = RequestRecord(r.request_id, r.client_id, r.priority,
                                                    r.arrival_time, len(r.prompt_token_ids), 0)
                scheduler.add(seq)
            if not scheduler.has_unfinished:
                if next_arrival == len(arrivals):
                    break
                self.now = arrivals[next_arrival].arrival_time
                continue
            if max_steps is not None and step >= max_steps:
                raise RuntimeError(f"simulation did not finish within {max_steps} steps")

            out = scheduler.schedule()
            rejected = scheduler.take_rejected()
            for seq in rejected:
                rec = records.pop(seq.seq_id)
                rec.rejected, rec.finish_time, rec.finish_step = True, self.now, step
                finished.append(rec)
            step += 1
            if out.is_empty:
                if not rejected:
                    raise RuntimeError(f"simulation stalled at step {step}: nothing was scheduled")
                continue
            self.now += self.step_cost(out.num_batched_tokens, len(out.scheduled))
            for item in out.scheduled:
                seq = item.seq
                served[seq.client_id] = served.get(seq.client_id, 0) + item.num_tokens
                if not item.sample:
                    continue
                rec = records[seq.seq_id]
                if rec.first_token_time is None:
                    rec.first_token_time = self.now
                    rec.first_scheduled_time = seq.first_scheduled_time
                seq.output_token_ids.append((seq.seq_id + len(seq.output_token_ids)) % 997)
                if len(seq.output_token_ids) >= targets[seq.seq_id]:
                    at_cap = len(seq.output_token_ids) == seq.params.max_tokens
                    scheduler.finish(seq, "length" if at_cap else "stop")
                    rec.output_len, rec.num_preemptions = len(seq.output_token_ids), seq.num_preemptions
                    rec.finish_time, rec.finish_step = self.now, step - 1
                    finished.append(records.pop(seq.seq_id))
                    del targets[seq.seq_id]
            scheduler.on_step_done(out)
        return SimResult(finished, step, self.now - start, scheduler.num_preemptions, served)
