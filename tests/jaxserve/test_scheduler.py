"""Scheduler with a real KVCacheManager and hand-made sequences: order, budgets, chunked prefill,
preemption by recompute (with prefix caching), and sequences that can never fit."""

import itertools

import pytest

from jaxserve.config import EngineConfig
from jaxserve.core.kv_cache import KVCacheManager
from jaxserve.request import Sequence, SequenceStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.core.scheduler import Scheduler
from jaxserve.core.scheduling_policy import FCFSPolicy

BLOCK_SIZE = 4
_seq_ids = itertools.count()
_arrivals = itertools.count()


def make_scheduler(num_blocks=64, *, budget=16, max_num_seqs=8, chunked=True, prefix_caching=True):
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          block_size=BLOCK_SIZE, enable_chunked_prefill=chunked,
                          enable_prefix_caching=prefix_caching)
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, prefix_caching)
    return Scheduler(config, kv, FCFSPolicy())


def make_seq(num_tokens, start=0, n=1):
    """A request's sequence (with its n - 1 fork children); arrival times increase per call."""
    arrival = float(next(_arrivals))
    params = SamplingParams(n=n)
    prompt = [start + i for i in range(num_tokens)]
    seqs = [Sequence(next(_seq_ids), f"r{arrival}", i, list(prompt), params, seed=i,
                     arrival_time=arrival) for i in range(n)]
    seqs[0].fork_children = seqs[1:]
    return seqs[0]


def step(sched, token=7):
    """One scheduler step, with the engine's part done by hand: every sampled row gets `token`."""
    out = sched.schedule()
    for item in out.scheduled:
        if item.sample:
            for seq in (item.seq, *item.forks):
                seq.output_token_ids.append(token)
    sched.on_step_done(out)
    return out


def plan(out):
    """[(seq, start, num_tokens, sample)] of a step."""
    return [(i.seq, i.start, i.num_tokens, i.sample) for i in out.scheduled]


def test_decodes_are_scheduled_before_prefill_chunks():
    sched = make_scheduler(budget=16)
    a, b = make_seq(4), make_seq(4, start=50)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prompts run whole and sample
    c = make_seq(30, start=100)
    sched.add(c)
    out = step(sched)
    assert plan(out) == [(a, 5 - 1, 1, True), (b, 4, 1, True), (c, 0, 14, False)]
    assert out.num_batched_tokens == 16
    # The next step: both decodes first again, then c's next chunk.
    assert plan(step(sched)) == [(a, 5, 1, True), (b, 5, 1, True), (c, 14, 14, False)]


def test_token_budget_is_respected():
    sched = make_scheduler(budget=16, max_num_seqs=16)
    seqs = [make_seq(5, start=10 * i) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(8):
        out = step(sched)
        assert 0 < out.num_batched_tokens <= 16
    assert all(s.status == SequenceStatus.RUNNING for s in seqs)


def test_max_num_seqs_is_respected():
    sched = make_scheduler(budget=64, max_num_seqs=3)
    seqs = [make_seq(3, start=10 * i) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    out = step(sched)
    assert [i.seq for i in out.scheduled] == seqs[:3]  # first come, first served
    assert len(sched.running) == 3 and sched.waiting == seqs[3:]
    out = step(sched)
    assert len(out.scheduled) == 3
    # A finished sequence frees its slot for the next waiting one.
    sched.finish(seqs[0], "stop")
    out = step(sched)
    assert [i.seq for i in out.scheduled] == [seqs[1], seqs[2], seqs[3]]


def test_max_num_seqs_counts_the_fork_children_of_a_request():
    sched = make_scheduler(budget=64, max_num_seqs=4)
    a = make_seq(3)
    b = make_seq(3, start=10, n=3)  # needs 3 slots: 1 + 1 > 4 - 2 is fine, 1 + 3 is not
    c = make_seq(3, start=20, n=3)
    for seq in (a, b, c):
        sched.add(seq)
    out = step(sched)
    assert [i.seq for i in out.scheduled] == [a, b]
    assert len(sched.running) == 4  # a, b and b's two forks
    assert out.scheduled[1].forks and len(out.scheduled[1].forks) == 2
    assert sched.waiting == [c]


def test_chunked_prefill_splits_a_long_prompt_over_steps():
    sched = make_scheduler(budget=16)
    seq = make_seq(40)
    sched.add(seq)
    assert plan(step(sched)) == [(seq, 0, 16, False)]
    assert seq.num_computed_tokens == 16 and not seq.output_token_ids
    assert plan(step(sched)) == [(seq, 16, 16, False)]
    assert plan(step(sched)) == [(seq, 32, 8, True)]
    assert seq.output_token_ids == [7]
    assert plan(step(sched)) == [(seq, 40, 1, True)]
    assert len(seq.block_table) == 11  # 41 tokens written -> ceil(41 / 4) = 11 blocks


def test_chunked_prefill_fills_the_budget_left_by_others():
    sched = make_scheduler(budget=16)
    a, b = make_seq(10), make_seq(30, start=100)
    sched.add(a)
    sched.add(b)
    assert plan(step(sched)) == [(a, 0, 10, True), (b, 0, 6, False)]


def test_without_chunked_prefill_a_prompt_is_scheduled_whole():
    sched = make_scheduler(budget=64, chunked=False)
    a, b = make_seq(30), make_seq(40, start=100)
    sched.add(a)
    sched.add(b)
    assert plan(step(sched)) == [(a, 0, 30, True)]  # b does not fit in the 34 left: it waits
    assert sched.waiting == [b]
    assert plan(step(sched)) == [(a, 30, 1, True), (b, 0, 40, True)]


def test_without_chunked_prefill_a_long_prompt_does_not_block_a_short_one_forever():
    sched = make_scheduler(budget=64, chunked=False)
    long = make_seq(60)
    sched.add(long)
    assert plan(step(sched)) == [(long, 0, 60, True)]


def test_the_newest_running_sequence_is_preempted_and_resumes_later():
    # 3 blocks of 4 tokens; three 4-token prompts take one block each.
    sched = make_scheduler(num_blocks=3, budget=16)
    kv = sched.kv_cache
    a, b, c = make_seq(4), make_seq(4, start=10), make_seq(4, start=20)
    for seq in (a, b, c):
        sched.add(seq)
    step(sched)
    assert kv.num_free_blocks == 0
    assert all(len(s.block_table) == 1 for s in (a, b, c))

    # Each now needs a second block for its 5th token; none is free. a, the oldest, runs:
    # c (newest) goes first, then b, which no longer fits either, preempts itself.
    out = step(sched)
    assert out.preempted == [c, b]
    assert plan(out) == [(a, 4, 1, True)]
    for seq in (b, c):
        assert seq.status == SequenceStatus.WAITING
        assert seq.num_computed_tokens == 0
        assert seq.block_table == []
        assert seq.num_preemptions == 1
        assert seq.output_token_ids == [7]  # its output is kept, to be recomputed
    assert sched.running == [a] and set(sched.waiting) == {b, c}
    assert sched.num_preemptions == 2
    assert len(a.block_table) == 2

    sched.finish(a, "stop")  # frees 2 blocks
    out = step(sched)
    # FCFS: b (older) first. b's full block, freed after c's, is still cached: only its 5th
    # token runs. c's block was evicted for a's second block: c needs 2 blocks, 1 is left.
    assert plan(out) == [(b, 4, 1, True)]
    assert b.status == SequenceStatus.RUNNING and b.output_token_ids == [7, 7]
    assert sched.waiting == [c]
    sched.finish(b, "stop")
    assert plan(step(sched)) == [(c, 0, 5, True)]
    assert c.output_token_ids == [7, 7]
    for seq in sched.running:
        assert seq.num_computed_tokens == seq.num_tokens - 1  # in sync with its tokens
    # Nothing leaks once everything ends.
    for seq in list(sched.running) + list(sched.waiting):
        sched.finish(seq, "stop")
    assert kv.num_free_blocks == kv.num_blocks


def test_preemption_with_prefix_cache_hit_resumes_in_sync():
    """A preempted sequence whose full blocks stay cached resumes from them, not from zero."""
    sched = make_scheduler(num_blocks=6, budget=32)
    kv = sched.kv_cache
    a = make_seq(12)  # 3 full blocks
    b = make_seq(11, start=100)  # 2 full + 1 partial
    sched.add(a)
    sched.add(b)
    step(sched)  # a: 13 tokens, b: 12 tokens; 6 blocks held
    assert kv.num_free_blocks == 0
    out = step(sched)  # a needs a 4th block for token 13: b is preempted
    assert out.preempted == [b]
    assert kv.num_free_blocks == 6 - 4
    b_cached = set(kv.cached_blocks)
    assert len(b_cached) == 2  # b's 2 full blocks wait in the cache

    sched.finish(a, "stop")
    out = step(sched)
    (item,) = out.scheduled
    assert item.seq is b
    assert item.start == 8  # the 2 cached blocks were reused
    assert item.num_tokens == b.num_tokens - 1 - 8  # the output sampled last step is new now
    assert set(b.block_table[:2]) == b_cached
    assert b.num_computed_tokens == 12 and b.num_tokens == 13
    assert kv.prefix_hits >= 8
    sched.finish(b, "stop")
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.ref_counts == [0] * kv.num_blocks


def test_preempted_sequence_finishes_with_the_same_tokens_as_an_unpreempted_one():
    """Schedules a workload under a tight cache and a roomy one; each sequence must run every
    one of its tokens exactly once per (re)computation and end with the same length."""
    def run(num_blocks):
        sched = make_scheduler(num_blocks=num_blocks, budget=16, max_num_seqs=4)
        seqs = [make_seq(6 + 3 * i, start=20 * i) for i in range(4)]
        for seq in seqs:
            sched.add(seq)
        for _ in range(200):
            out = step(sched)
            for item in out.scheduled:
                # Tokens are always computed in order, with no gap and no overlap.
                assert item.start + item.num_tokens == item.seq.num_computed_tokens
                assert item.seq.num_computed_tokens <= item.seq.num_tokens
            for seq in list(sched.running):
                if len(seq.output_token_ids) >= 10:
                    sched.finish(seq, "length")
            if not sched.has_unfinished:
                break
        assert not sched.has_unfinished
        assert sched.kv_cache.num_free_blocks == num_blocks
        return sched, [len(s.output_token_ids) for s in seqs]

    tight, tight_lens = run(10)
    roomy, roomy_lens = run(64)
    assert tight.num_preemptions > 0 and roomy.num_preemptions == 0
    assert tight_lens == roomy_lens == [10] * 4


def test_a_sequence_too_large_for_the_whole_cache_is_finished_with_length():
    sched = make_scheduler(num_blocks=2, budget=16)
    big = make_seq(10, n=2)  # 3 blocks; the cache has 2
    child = big.fork_children[0]
    sched.add(big)
    out = step(sched)
    assert out.is_empty
    rejected = sched.take_rejected()
    assert rejected == [big, child]
    assert all(s.is_finished and s.finish_reason == "length" for s in rejected)
    assert not sched.has_unfinished
    assert sched.take_rejected() == []
    assert sched.kv_cache.num_free_blocks == 2


def test_a_sequence_that_outgrows_the_cache_while_chunking_is_finished_not_stuck():
    sched = make_scheduler(num_blocks=2, budget=4, max_num_seqs=2)  # chunks of 4 tokens
    big = make_seq(10)
    small = make_seq(3, start=50)
    sched.add(big)
    sched.add(small)
    finished = []
    for _ in range(20):
        step(sched)
        finished += sched.take_rejected()
        for seq in list(sched.running):
            if len(seq.output_token_ids) >= 2:
                sched.finish(seq, "length")
        if not sched.has_unfinished:
            break
    assert not sched.has_unfinished, "the scheduler deadlocked"
    assert big in finished and big.finish_reason == "length"
    assert small.is_finished and small.output_token_ids == [7, 7]
    assert sched.kv_cache.num_free_blocks == 2


def test_fork_children_are_sampled_once_when_a_chunked_prompt_completes():
    """n > 1 whose prompt is admitted whole: the forks join `running` after the running loop."""
    sched = make_scheduler(budget=32)
    parent = make_seq(10, n=3)
    children = list(parent.fork_children)
    sched.add(parent)
    out = step(sched)
    assert plan(out) == [(parent, 0, 10, True)]
    assert out.scheduled[0].forks == children
    assert [s.output_token_ids for s in (parent, *children)] == [[7]] * 3
    assert plan(step(sched)) == [(s, 10, 1, True) for s in (parent, *children)]


def test_fork_children_are_sampled_once_when_a_chunked_prefill_completes_while_running():
    sched = make_scheduler(budget=16)
    parent = make_seq(20, n=3)  # 16 tokens, then 4 with 12 of the budget left
    children = list(parent.fork_children)
    sched.add(parent)
    step(sched)
    out = step(sched)
    assert plan(out) == [(parent, 16, 4, True)]
    assert out.scheduled[0].forks == children
    assert [s.output_token_ids for s in (parent, *children)] == [[7]] * 3
