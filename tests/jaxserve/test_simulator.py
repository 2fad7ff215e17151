"""The simulator: step-cost table, workloads, policies on a heavy-tailed workload, and the same
completion order as the real engine."""

import math

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.config import EngineConfig
from jaxserve.core.length_predictor import OraclePredictor, make_predictor
from jaxserve.core.scheduling_policy import (FairSharePolicy, FCFSPolicy, MLFQPolicy,
                                             PriorityPolicy, SJFPolicy, SRPTPolicy, make_policy)
from jaxserve.sim import (SimRequest, Simulator, StepCostModel, WorkloadSpec, generate_workload,
                          load_trace, save_trace)


def test_step_cost_interpolates_and_clamps():
    cost = StepCostModel([16, 32], [8, 16], [[1.0, 2.0], [3.0, 4.0]])
    assert cost(16, 8) == 1.0 and cost(32, 16) == 4.0
    assert cost(24, 12) == pytest.approx(2.5)
    assert cost(1, 1) == 1.0 and cost(1000, 1000) == 4.0  # clamped at the edges
    # A cell with more sequences than tokens is padded like the runner pads: the diagonal's cost.
    padded = StepCostModel([16, 32], [16, 32], [[1.0, None], [3.0, 4.0]])
    assert padded(16, 32) == 4.0


def test_cpu_step_cost_table_is_in_the_repo():
    cost = StepCostModel.load("cpu")
    assert cost.metadata["model"] == "builtin:tiny-llama"
    assert cost.table.shape == (len(cost.tokens), len(cost.seqs)) and (cost.table > 0).all()
    with pytest.raises(FileNotFoundError, match="known: .*cpu"):
        StepCostModel.load("abacus")


def test_workload_is_seeded_heavy_tailed_and_round_trips(tmp_path):
    spec = WorkloadSpec(num_requests=4000, rate=50.0, seed=3)
    requests = generate_workload(spec)
    again = generate_workload(spec)
    assert [r.output_len for r in requests] == [r.output_len for r in again]
    arrivals = np.array([r.arrival_time for r in requests])
    assert np.all(np.diff(arrivals) >= 0)
    assert len(requests) / arrivals[-1] == pytest.approx(50.0, rel=0.1)
    out = np.array([r.output_len for r in requests])
    assert np.median(out) == pytest.approx(64, rel=0.15)
    assert out.mean() > 1.3 * np.median(out) and np.percentile(out, 99) > 8 * np.median(out)
    assert all(r.output_len <= r.max_tokens for r in requests)
    path = str(tmp_path / "trace.json")
    save_trace(path, requests[:20])
    loaded = load_trace(path)
    assert [(r.request_id, list(r.prompt_token_ids), r.output_len) for r in loaded] == \
        [(r.request_id, list(r.prompt_token_ids), r.output_len) for r in requests[:20]]
    (tmp_path / "lens.json").write_text('{"requests": [{"arrival_time": 0.5, "prompt_len": 7, "output_len": 3}]}')
    assert len(load_trace(str(tmp_path / "lens.json"))[0].prompt_token_ids) == 7
    (tmp_path / "bad.json").write_text('{"requests": [{"arrival_time": 0.5, "output_len": 3}]}')
    with pytest.raises(ValueError, match="neither prompt_token_ids nor prompt_len"):
        load_trace(str(tmp_path / "bad.json"))


# A GPU-shaped cost: a decode step is memory-bound (flat in sequences), prefill tokens add compute.
GPU_SHAPED = StepCostModel([1, 4096], [1, 256], [[0.02, None], [0.02 + 4096 * 2e-5, 0.03 + 4096 * 2e-5]])


@pytest.mark.parametrize("table", ["cpu", "gpu-shaped"])
def test_sjf_and_mlfq_lower_mean_latency_on_a_heavy_tailed_workload(table):
    # Loads where FCFS queues (its mean latency is several times the unloaded one) but keeps up.
    if table == "cpu":
        cost, rate, max_num_seqs = StepCostModel.load("cpu"), 3.3, 16
        mlfq = make_policy("mlfq")  # no preemption (the default)
    else:
        # Where a few re-prefilled tokens cost little, preemptive MLFQ pays off too. (On the CPU
        # table any prefill token makes a step up to 6x dearer; see docs/SCHEDULING.md.)
        cost, rate, max_num_seqs = GPU_SHAPED, 18.0, 32
        mlfq = MLFQPolicy(preempt=True)
    spec = WorkloadSpec(num_requests=1500, rate=rate, prompt_len_median=64, max_prompt_len=512,
                        output_len_median=32, output_len_sigma=1.2, max_output_len=1024, seed=7)
    requests = generate_workload(spec)
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256,
                          max_model_len=1536, block_size=16)
    oracle = OraclePredictor({r.request_id: r.output_len for r in requests})

    def mean_jct(policy):
        return Simulator(config, policy, cost).run(requests).mean_jct

    fcfs = mean_jct(FCFSPolicy())
    results = {"sjf oracle": mean_jct(SJFPolicy(oracle)),
               "sjf predicted": mean_jct(make_policy("sjf")),
               "mlfq": mean_jct(mlfq)}
    for name, jct in results.items():
        assert jct < 0.9 * fcfs, (name, jct, fcfs)
    assert results["sjf oracle"] <= results["sjf predicted"]


def _engine_trace(seed=0, n=10):
    rng = np.random.default_rng(seed)
    return [SimRequest(str(i), 0.0, rng.integers(3, 250, int(rng.integers(4, 40))).tolist(),
                       int(rng.integers(2, 30)), None, priority=int(rng.integers(0, 2)),
                       client_id="ab"[i % 3 == 0]) for i in range(n)]


POLICIES = {
    "fcfs": lambda lengths: FCFSPolicy(),
    "priority": lambda lengths: PriorityPolicy(),
    "sjf": lambda lengths: SJFPolicy(OraclePredictor(lengths)),
    "sjf-heuristic": lambda lengths: SJFPolicy(make_predictor("heuristic")),
    "srpt": lambda lengths: SRPTPolicy(OraclePredictor(lengths), preempt_ratio=1.5),
    # Small quanta so requests are demoted (and preempted) within the trace; no time-based
    # promotion, which would depend on the engine's wall clock.
    "mlfq": lambda lengths: MLFQPolicy(base_quantum=4, quantum_ratio=2, prompt_token_weight=0.25,
                                       promotion_period_s=math.inf),
    "mlfq-preempt": lambda lengths: MLFQPolicy(base_quantum=4, quantum_ratio=2,
                                               prompt_token_weight=0.25,
                                               promotion_period_s=math.inf, preempt=True),
    "fair": lambda lengths: FairSharePolicy(),
}


@pytest.mark.parametrize("name", POLICIES)
def test_engine_and_simulator_finish_requests_in_the_same_order(make_engine, name):
    # Everything arrives at once, so both sides see the same queue on every step; each request
    # ignores EOS and stops at its max_tokens, so its length is known to both. The KV cache is
    # small, so sequences are preempted and recomputed (with prefix-cache hits) on both sides.
    trace = _engine_trace()
    lengths = {r.request_id: r.output_len for r in trace}
    # The simulator models the synchronous loop: each step read back before the next.
    engine = make_engine(max_num_seqs=3, max_num_batched_tokens=32, block_size=8, max_model_len=80,
                         num_kv_blocks=10, async_scheduling=False)
    engine.scheduler.policy = POLICIES[name](lengths)
    for r in trace:
        engine.add_request(list(r.prompt_token_ids),
                           SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0),
                           r.request_id, priority=r.priority, client_id=r.client_id, arrival_time=0.0)
    engine_order = []
    for step in range(1000):
        if not engine.has_unfinished_requests:
            break
        engine_order += sorted((step, out.request_id) for out in engine.step() if out.finished)

    sim_requests = [SimRequest(r.request_id, 0.0, r.prompt_token_ids, r.output_len, r.output_len,
                               r.priority, r.client_id) for r in trace]
    result = Simulator(engine.config, POLICIES[name](lengths), StepCostModel.constant(1e-3),
                       num_kv_blocks=engine.kv_cache.num_blocks).run(sim_requests)
    assert sorted(result.completion_order()) == engine_order
    assert result.num_preemptions == engine.scheduler.num_preemptions > 0
