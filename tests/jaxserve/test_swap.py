"""Swap preemption: the scheduler's host-slot bookkeeping, the runner's copies between the device
cache and host memory, and the engine's greedy outputs with swapping (and its fallback to
recompute) against each prompt run alone."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.core.kv_cache import KVCacheManager
from jaxserve.worker.runner import kv_block_bytes
from jaxserve.sampling_params import SamplingParams
from jaxserve.core.scheduler import Scheduler
from jaxserve.core.scheduling_policy import FCFSPolicy, MLFQPolicy
from jaxserve.core.swap import HostKVStore, SwapSpace
from sharding.mesh import MeshShape, make_mesh
from tests.conftest import build_engine
from tests.jaxserve.test_engine_consistency import PROMPTS, generate
from tests.jaxserve.test_scheduler import BLOCK_SIZE, make_seq, step


def three_in_three_blocks(num_slots, mode="swap"):
    """3 blocks of 4 tokens, filled by three 4-token prompts after one step: at the next step
    each needs a second block and two are preempted."""
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=16, block_size=BLOCK_SIZE,
                          preemption_mode=mode)
    sched = Scheduler(config, KVCacheManager(3, BLOCK_SIZE), FCFSPolicy(),
                      num_swap_slots=num_slots)
    seqs = make_seq(4), make_seq(4, start=10), make_seq(4, start=20)
    for seq in seqs:
        sched.add(seq)
    step(sched)
    return sched, seqs


def test_swap_out_keeps_progress_and_swap_in_refills_fresh_blocks():
    sched, (a, b, c) = three_in_three_blocks(num_slots=4)
    c_block, b_block = c.block_table[0], b.block_table[0]

    out = step(sched)  # each needs a second block: c, then b, are preempted, by swap
    assert out.preempted == [c, b]
    assert out.swap_out == [(c_block, 0), (b_block, 1)]
    assert out.swap_in == []
    for seq, slots in ((c, [0]), (b, [1])):
        assert seq.swap_slots == slots and seq.block_table == []
        assert seq.num_computed_tokens == 4  # its prompt stays computed, in host memory
    assert sched.swap.num_free_slots == 2 and sched.num_swap_outs == 2

    sched.finish(a, "stop")  # frees 2 blocks
    out = step(sched)
    # b comes back first (FCFS). Its full block, freed after c's, is still in the prefix cache:
    # it is taken from there and nothing is copied back; only b's 5th token runs.
    (item,) = out.scheduled
    assert (item.seq, item.start, item.num_tokens) == (b, 4, 1)
    assert b.block_table[0] == b_block and out.swap_in == [] and out.swap_out == []
    assert b.swap_slots == [] and sched.num_swap_ins == 1
    assert sched.swap.num_free_slots == 2  # slot 1 is given back at the next step
    assert sched.num_free_swap_slots == 3  # (and counted as free already)
    sched.finish(b, "stop")
    out = step(sched)
    assert sched.swap.num_free_slots == 3
    # c's block was evicted for a's second block: it comes back from its host slot, into a
    # fresh block, then its 5th token runs.
    (item,) = out.scheduled
    assert (item.seq, item.start, item.num_tokens) == (c, 4, 1)
    assert out.swap_in == [(0, c.block_table[0])]
    step(sched)
    assert sched.swap.num_free_slots == 4

    sched.finish(c, "stop")
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks


def test_a_swapped_sequence_that_ends_gives_its_slots_back():
    sched, (a, b, c) = three_in_three_blocks(num_slots=4)
    step(sched)
    assert c.swap_slots == [0]
    sched.finish(c, "abort")
    assert c.swap_slots == [] and sched.swap.num_free_slots == 3
    sched.drop_swapped(b)  # as the engine does when the step that swapped b out failed
    assert b.swap_slots == [] and b.num_computed_tokens == 0  # b will recompute
    assert sched.swap.num_free_slots == 4


def test_swap_falls_back_to_recompute_when_host_slots_run_out():
    sched, (a, b, c) = three_in_three_blocks(num_slots=1)
    out = step(sched)
    assert out.preempted == [c, b]
    assert len(out.swap_out) == 1 and c.swap_slots == [0]  # c took the only slot
    assert b.swap_slots == [] and b.num_computed_tokens == 0  # b recomputes
    assert sched.num_swap_outs == 1 and sched.num_preemptions == 2


def test_recompute_mode_never_swaps():
    sched, _ = three_in_three_blocks(num_slots=8, mode="recompute")
    out = step(sched)
    assert len(out.preempted) == 2 and out.swap_out == [] and sched.swap.num_free_slots == 8
    assert all(not seq.swap_slots for seq in out.preempted)


def test_swap_space_bookkeeping():
    space = SwapSpace(3)
    assert space.allocate(4) is None and space.num_free_slots == 3
    slots = space.allocate(2)
    assert sorted(slots) == [0, 1] and space.num_free_slots == 1
    space.free(slots)
    assert space.num_free_slots == 3
    with pytest.raises(ValueError, match="swap space"):
        SwapSpace(-1)


@pytest.mark.parametrize("field,value", [("preemption_mode", "disk"), ("swap_space_gib", -1.0),
                                         ("swap_space_gib", float("nan")),
                                         ("swap_space_gib", float("inf")),
                                         ("swap_space_gib", True)])
def test_bad_swap_config_is_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_host_store_round_trips_blocks_through_host_memory():
    # KV heads over a tensor axis of 2 devices: the copies gather and scatter sharded caches.
    mesh = make_mesh(MeshShape(tensor=2))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "tensor"))
    rng = np.random.default_rng(0)
    shape = (12, 4, 2, 8)  # blocks, block size, KV heads, head dim
    layers = [(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
              for _ in range(3)]
    caches = [(jax.device_put(k, sharding), jax.device_put(v, sharding)) for k, v in layers]
    store = HostKVStore(num_slots=8, kv_caches=caches, kv_sharding=sharding, max_blocks=4)
    assert store.buckets == [1, 2, 4]
    out = [(3, 5), (0, 1), (11, 0), (7, 7), (4, 2), (9, 3)]  # 6 blocks: chunks of 4 and 2
    store.swap_out(caches, out)
    for block, slot in out:
        for layer, (k, v) in enumerate(layers):
            np.testing.assert_array_equal(store.data[slot, layer, 0], k[block])
            np.testing.assert_array_equal(store.data[slot, layer, 1], v[block])

    back = [(5, 10), (1, 2), (0, 6)]  # 3 blocks: one chunk padded to 4
    for caches in store.swap_in(caches, back):
        pass
    for layer, (k, v) in enumerate(layers):
        want_k, want_v = k.copy(), v.copy()
        for slot, block in back:
            src = dict((s, b) for b, s in out)[slot]
            want_k[block], want_v[block] = k[src], v[src]
        np.testing.assert_array_equal(np.asarray(caches[layer][0]), want_k)  # no other block moved
        np.testing.assert_array_equal(np.asarray(caches[layer][1]), want_v)
        assert caches[layer][0].sharding == sharding


@pytest.fixture(scope="module")
def unpreempted():
    """The batch with room for all of it: no preemption."""
    engine = build_engine()
    outputs = generate(engine, PROMPTS)
    assert engine.scheduler.num_preemptions == 0
    return outputs


@pytest.fixture(scope="module")
def recompute_run():
    """The batch of test_preemption_under_tiny_kv_budget (40 blocks of 8 tokens), preempting by
    recompute: its outputs and how many prompt tokens ran."""
    engine = build_engine(num_kv_blocks=40)
    outputs = generate(engine, PROMPTS)
    assert engine.scheduler.num_preemptions > 0
    return outputs, engine.num_prompt_tokens_computed


def test_swap_preemption_gives_the_same_greedy_tokens(unpreempted, recompute_run):
    engine = build_engine(num_kv_blocks=40, preemption_mode="swap", swap_space_gib=0.01,
                          precompile=True)
    compiled = dict(engine.runner.host_kv.compiled)
    assert generate(engine, PROMPTS) == unpreempted == recompute_run[0]
    stats = engine.stats()
    assert stats.num_swap_outs == stats.num_swap_ins == stats.num_preemptions > 0
    assert stats.num_free_swap_slots == stats.num_swap_slots > 0  # host memory all given back
    assert stats.num_free_blocks == stats.num_kv_blocks
    # Swapped sequences kept their K/V: fewer prompt tokens ran than with recompute.
    assert engine.num_prompt_tokens_computed < recompute_run[1]
    assert engine.runner.host_kv.compiled == compiled  # swap copies compiled at start-up


def test_swap_with_too_few_host_slots_mixes_in_recompute():
    # Longer outputs in a 32-block cache: 4 preemptions of 5 to 9 blocks each. With 6 host
    # blocks, some fit and swap, the others recompute.
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    model = build_engine(precompile=False).model_config
    gib = 6 * kv_block_bytes(model, 8, jnp.float32) / (1 << 30)  # 6 host blocks
    engine = build_engine(num_kv_blocks=32, preemption_mode="swap", swap_space_gib=gib)
    assert engine.runner.num_swap_slots == 6
    assert generate(engine, PROMPTS, params) == generate(build_engine(), PROMPTS, params)
    stats = engine.stats()
    assert 0 < stats.num_swap_outs < stats.num_preemptions
    assert stats.num_free_swap_slots == 6


def test_swap_under_a_preemptive_policy(unpreempted):
    # Preemptive MLFQ with tiny quanta: newcomers preempt demoted sequences at the start of a
    # step (then admission runs in the same step), on top of the preemptions for want of blocks.
    engine = build_engine(max_num_seqs=3, num_kv_blocks=40, preemption_mode="swap",
                          swap_space_gib=0.01)
    engine.scheduler.policy = MLFQPolicy(base_quantum=4, quantum_ratio=2, prompt_token_weight=0.25,
                                         promotion_period_s=math.inf, preempt=True)
    assert generate(engine, PROMPTS) == unpreempted
    stats = engine.stats()
    assert stats.num_swap_outs == stats.num_swap_ins == stats.num_preemptions > 1
    assert stats.num_free_swap_slots == stats.num_swap_slots
    assert stats.num_free_blocks == stats.num_kv_blocks
