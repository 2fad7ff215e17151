"""Scheduling policies on small hand-made cases, run through the real scheduler by the simulator
(one step = 1 ms of virtual time)."""

import math

import pytest

from jaxserve.config import EngineConfig
from jaxserve.core.length_predictor import OraclePredictor
from jaxserve.request import Sequence
from jaxserve.sampling_params import SamplingParams
from jaxserve.core.scheduler import ScheduledSeq
from jaxserve.core.scheduling_policy import (FairSharePolicy, FCFSPolicy, MLFQPolicy,
                                             PriorityPolicy, SJFPolicy, SRPTPolicy, make_policy)
from jaxserve.sim import SimRequest, Simulator, StepCostModel

STEP_S = 1e-3


def _run(policy, requests, max_num_seqs=1, **config):
    config = EngineConfig(**{**dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                                    max_model_len=512, block_size=8), **config})
    return Simulator(config, policy, StepCostModel.constant(STEP_S)).run(requests)


def _req(rid, t, output_len, prompt_len=8, **kw):
    return SimRequest(rid, t, [(7 * int(rid.strip("abcdefghijklmnopqrstuvwxyz") or 0) + i) % 200 + 3
                               for i in range(prompt_len)], output_len, **kw)


def _order(result):
    return [r.request_id for r in result.records]


def _oracle(requests):
    return OraclePredictor({r.request_id: r.output_len for r in requests})


def _seq(seq_id, prompt_len=8, output_len=0, arrival=0.0, **kw):
    seq = Sequence(seq_id, str(seq_id), 0, [5] * prompt_len, SamplingParams(), 0, arrival, **kw)
    seq.output_token_ids = [6] * output_len
    return seq


def test_sjf_picks_the_shortest_predicted():
    requests = [_req("r0", 0.0, 30), _req("r1", 0.0, 5), _req("r2", 0.0, 20), _req("r3", 0.0, 10)]
    assert _order(_run(FCFSPolicy(), requests)) == ["r0", "r1", "r2", "r3"]
    assert _order(_run(SJFPolicy(_oracle(requests)), requests)) == ["r1", "r3", "r2", "r0"]
    policy = SJFPolicy(OraclePredictor({"0": 9, "1": 3, "2": 3}))
    waiting = [_seq(0), _seq(1, arrival=1.0), _seq(2, arrival=0.5)]
    assert [s.seq_id for s in policy.waiting_order(waiting, 2.0)] == [2, 1, 0]  # ties: FCFS


def test_mlfq_skip_join_and_demotion_after_each_quantum():
    policy = MLFQPolicy(num_levels=5, base_quantum=8, quantum_ratio=2, prompt_token_weight=0.125)
    assert policy.level(_seq(0, prompt_len=8)) == 0  # cost 1 <= 8
    assert policy.level(_seq(1, prompt_len=200)) == 2  # cost 25: quanta 8, 16, 32
    assert policy.level(_seq(2, prompt_len=10_000)) == 4  # the last level takes the rest
    seq = _seq(0)
    policy.on_scheduled([ScheduledSeq(seq, 0, 8, True)])  # 7 * 0.125 + 1 = 1.875 served
    for _ in range(6):
        policy.on_scheduled([ScheduledSeq(seq, 8, 1, True)])
    assert policy.level(seq) == 0  # 7.875 < 8
    policy.on_scheduled([ScheduledSeq(seq, 8, 1, True)])
    assert policy.level(seq) == 1  # quantum 8 used up
    for _ in range(16):
        policy.on_scheduled([ScheduledSeq(seq, 8, 1, True)])
    assert policy.level(seq) == 2
    policy.on_finish(seq)
    assert seq.seq_id not in policy.levels


def test_mlfq_new_short_requests_overtake_a_demoted_long_one():
    requests = [_req("long", 0.0, 100), _req("s1", 0.030, 3), _req("s2", 0.031, 3)]
    fcfs = _run(FCFSPolicy(), requests)
    assert _order(fcfs) == ["long", "s1", "s2"]
    policy = MLFQPolicy(num_levels=5, base_quantum=8, quantum_ratio=2, prompt_token_weight=0.125,
                        preempt=True)
    result = _run(policy, requests)
    assert _order(result) == ["s1", "s2", "long"]
    long = next(r for r in result.records if r.request_id == "long")
    assert long.num_preemptions == 1  # s1 preempted it; s2 found it waiting
    short = [r for r in result.records if r.request_id != "long"]
    assert max(r.jct for r in short) < 0.015  # served at once, not after the long one
    assert result.mean_jct < fcfs.mean_jct
    # Without preemption the levels only order admission: the running long request finishes.
    polite = _run(MLFQPolicy(num_levels=5, base_quantum=8, quantum_ratio=2), requests)
    assert _order(polite) == ["long", "s1", "s2"] and polite.num_preemptions == 0


def test_mlfq_promotion_lets_a_demoted_request_run_again():
    # The long request is demoted to the last level; a stream of short requests would hold it
    # back for good, but every promotion period it returns to level 0 and gets a quantum.
    requests = [_req("long", 0.0, 40)] + [_req(f"s{i}", 0.02 + 0.004 * i, 5) for i in range(150)]
    starved = _run(MLFQPolicy(base_quantum=4, quantum_ratio=2, promotion_period_s=math.inf,
                              preempt=True), requests)
    assert _order(starved)[-1] == "long"
    promoted = _run(MLFQPolicy(base_quantum=4, quantum_ratio=2, promotion_period_s=0.05,
                               preempt=True), requests)
    assert _order(promoted).index("long") < 75  # of 151


def test_priority_is_fcfs_within_a_level_and_lower_values_first():
    requests = [_req("a", 0.0, 5, priority=1), _req("b", 0.0, 5, priority=0),
                _req("c", 0.0, 5, priority=1), _req("d", 0.0, 5, priority=0)]
    assert _order(_run(PriorityPolicy(aging_s=math.inf), requests)) == ["b", "d", "a", "c"]
    victims = [_seq(0, priority=0), _seq(1, priority=2, arrival=0.0), _seq(2, priority=2, arrival=1.0)]
    assert PriorityPolicy().preemption_victim(victims).seq_id == 2


def test_priority_with_aging_does_not_starve():
    # Priority-0 requests arrive faster than they can be served (5 steps each, one every 4 ms):
    # without aging the priority-1 request waits for the whole stream.
    stream = [_req(f"h{i}", 0.004 * i, 5, priority=0) for i in range(100)]
    low = _req("low", 0.0005, 5, priority=1)
    starved = _run(PriorityPolicy(aging_s=math.inf), stream + [low])
    assert _order(starved)[-1] == "low"
    aging_s = 0.05
    result = _run(PriorityPolicy(aging_s=aging_s), stream + [low])
    # It overtakes every priority-0 request that arrived more than aging_s after it.
    arrived_within = sum(r.arrival_time <= low.arrival_time + aging_s for r in stream)
    assert _order(result).index("low") <= arrived_within


def test_fair_share_a_heavy_client_does_not_crowd_out_a_light_one():
    heavy = [_req(f"h{i}", 0.0001 * i, 10, client_id="heavy") for i in range(40)]
    light = [_req(f"l{i}", 0.005 + 0.0001 * i, 10, client_id="light") for i in range(4)]
    requests = heavy + light

    def heavy_done_before_light(result):
        order = _order(result)
        last_light = max(order.index(r.request_id) for r in light)
        return sum(order.index(r.request_id) < last_light for r in heavy)

    assert heavy_done_before_light(_run(FCFSPolicy(), requests, max_num_seqs=2)) == 40
    result = _run(FairSharePolicy(), requests, max_num_seqs=2)
    # Equal requests: an equal share of tokens means about as many heavy requests finish as
    # light ones while light ones wait (plus what was running when the light client came).
    assert heavy_done_before_light(result) <= len(light) + 2
    # Scheduled tokens: the prompt, then every output but the last as the next step's input.
    assert result.served_tokens == {"heavy": 40 * 17, "light": 4 * 17}


def test_fair_share_weights_and_no_credit_for_idling():
    policy = FairSharePolicy(client_weights={"gold": 2.0})
    gold, plain = _seq(0, client_id="gold"), _seq(1, client_id="plain")
    policy.waiting_order([gold, plain], 0.0)
    policy.on_scheduled([ScheduledSeq(gold, 0, 8, True), ScheduledSeq(plain, 0, 8, True)])
    assert policy.counters == {"gold": (7 + 2) / 2, "plain": 7 + 2}
    # A client that was idle starts level with the least-served active one.
    late = _seq(2, client_id="late")
    policy.waiting_order([late], 0.0)
    assert policy.counters["late"] == policy.counters["gold"]


def test_srpt_preempts_only_for_a_much_shorter_request():
    much_shorter = [_req("long", 0.0, 100), _req("short", 0.010, 5)]
    result = _run(SRPTPolicy(_oracle(much_shorter)), much_shorter)
    assert _order(result) == ["short", "long"]
    assert next(r for r in result.records if r.request_id == "long").num_preemptions == 1
    # 90 tokens left vs 40: not 4x shorter, so the running one keeps going.
    not_much = [_req("long", 0.0, 100), _req("mid", 0.010, 40)]
    result = _run(SRPTPolicy(_oracle(not_much), preempt_ratio=4.0), not_much)
    assert _order(result) == ["long", "mid"] and result.num_preemptions == 0


def test_srpt_outlived_prediction_and_needs_lengths():
    policy = SRPTPolicy(OraclePredictor({"0": 10}))
    assert policy.remaining(_seq(0, output_len=4)) == 6
    assert policy.remaining(_seq(0, output_len=30)) == 30  # past its prediction: as much again
    with pytest.raises(ValueError, match="only ranks"):
        make_policy("srpt:ranker")


def test_make_policy():
    assert make_policy("fcfs").name == "fcfs"
    assert make_policy("sjf").predicted.predictor.name == "hybrid"
    assert make_policy("sjf:regressor").predicted.predictor.name == "regressor"
    with pytest.raises(ValueError, match="unknown; known: fair, fcfs, mlfq, priority, sjf, srpt"):
        make_policy("lifo")
    with pytest.raises(ValueError, match="uses no length predictor"):
        make_policy("mlfq:regressor")
    with pytest.raises(ValueError, match="unknown"):
        make_policy("sjf:psychic")
