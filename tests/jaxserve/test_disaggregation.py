"""Prefill/decode disaggregation: a prefill engine and a decode engine on separate (simulated)
devices, with K/V handed over through host memory, give the outputs of one engine, free all
their blocks and slots, and end a request wherever it is when aborted."""

import dataclasses
import threading

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.disaggregation import DisaggregatedEngine
from jaxserve.worker.runner import kv_block_bytes
from jaxserve.sampling_params import SamplingParams
from tests.conftest import build_engine, fixture_path, run_to_completion
from tests.jaxserve.test_engine_consistency import GREEDY, PROMPTS, generate

ARGS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
            dtype="float32")


def build_pair(**overrides) -> DisaggregatedEngine:
    return DisaggregatedEngine(fixture_path("llama3"), EngineConfig(**{**ARGS, **overrides}),
                               precompile=False, progress=False, skip_tokenizer=True)


def swap_gib(num_blocks: int) -> float:
    model = build_engine(precompile=False).model_config
    return (num_blocks + 0.5) * kv_block_bytes(model, ARGS["block_size"], np.float32) / (1 << 30)


@pytest.fixture(scope="module")
def single():
    """The prompts through one engine: the baseline."""
    return generate(build_engine(), PROMPTS)


@pytest.fixture(scope="module")
def pair():
    return build_pair(swap_space_gib=0.01)


def assert_all_freed(engine: DisaggregatedEngine):
    for half in (engine.prefill, engine.decode):
        stats = half.stats()
        assert stats.num_free_blocks == stats.num_kv_blocks, half.config.disaggregation_role
    assert engine.decode.scheduler.num_free_swap_slots == engine.decode.scheduler.swap.num_slots
    assert not engine.pending and not engine.has_unfinished_requests


def test_greedy_tokens_equal_one_engine(pair, single):
    handoffs = pair.num_handoffs
    assert generate(pair, PROMPTS) == single
    assert pair.num_handoffs - handoffs == len(PROMPTS)
    # Each prompt ran in the prefill engine only, which sampled one token per request.
    assert pair.decode.num_prompt_tokens_computed == 0
    assert pair.prefill.num_generated_tokens == len(PROMPTS)
    assert pair.decode.num_generated_tokens == len(PROMPTS) * (GREEDY.max_tokens - 1)
    assert pair.prefill.runner.mesh.devices.flat[0] != pair.decode.runner.mesh.devices.flat[0]
    assert_all_freed(pair)


def test_seeded_sampling_with_n_samples_and_logprobs_equal_one_engine(pair):
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=11 + i, n=2, max_tokens=10,
                             logprobs=3, ignore_eos=True, presence_penalty=0.5)
              for i in range(3)]
    results = []
    for engine in (build_engine(), pair):
        ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS[:3], params)]
        outs = run_to_completion(engine)
        results.append([outs[i] for i in ids])
    for one, two in zip(*results):
        assert [o.token_ids for o in one.outputs] == [o.token_ids for o in two.outputs]
        for a, b in zip(one.outputs, two.outputs):
            for la, lb in zip(a.logprobs, b.logprobs):
                assert la.keys() == lb.keys()
                np.testing.assert_allclose(list(la.values()), list(lb.values()), rtol=1e-5,
                                           atol=1e-6)
        assert two.metrics.time_to_first_token is not None and two.metrics.e2e_latency > 0
    assert_all_freed(pair)


def test_hand_overs_wait_for_host_slots(single):
    # Room for one full-length sequence only (16 blocks), a step that prefills many prompts:
    # the rest wait in the pending queue until swap-ins give the slots back.
    engine = build_pair(swap_space_gib=swap_gib(16), max_model_len=128, max_num_batched_tokens=256)
    assert engine.decode.scheduler.swap.num_slots == 16
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    outs, most_pending = {}, 0
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        most_pending = max(most_pending, len(engine.pending))
    assert most_pending > 1
    assert [outs[i].outputs[0].token_ids for i in ids] == single
    assert_all_freed(engine)


def test_a_request_done_at_its_first_token_never_moves(pair):
    handoffs = pair.num_handoffs
    (out,) = run_to_completion_of(pair, [PROMPTS[0]], SamplingParams(max_tokens=1))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 1
    assert pair.num_handoffs == handoffs
    assert_all_freed(pair)


def run_to_completion_of(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    outs = run_to_completion(engine)
    return [outs[i] for i in ids]


def test_abort_wherever_the_request_is(pair):
    long = dataclasses.replace(GREEDY, max_tokens=40)
    fresh = [1] + np.random.default_rng(3).integers(3, 256, size=99).tolist()
    a = pair.add_request(fresh, long)  # 100 uncached tokens: two prefill chunks
    pair.step()
    assert a in pair.prefill.requests
    out = pair.abort(a)
    assert out.finished and out.outputs[0].finish_reason == "abort"

    b = pair.add_request(PROMPTS[0], long)
    pair.step()  # prefilled and handed over: its blocks are in the decode engine's slots
    assert b in pair.decode.requests and pair.decode.scheduler.num_free_swap_slots < (
        pair.decode.scheduler.swap.num_slots)
    out = pair.abort(b)
    assert out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 1

    c = pair.add_request(PROMPTS[1], long)
    for _ in range(3):
        pair.step()
    assert c in pair.decode.requests
    out = pair.abort(c)
    assert out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) > 1
    assert_all_freed(pair)
    assert pair.abort("unknown") is None


def test_abort_of_a_pending_hand_over(pair):
    handoff_in_flight = []
    real_import = pair.decode.import_request
    pair.decode.import_request = lambda h: handoff_in_flight.append(h) and False
    try:
        rid = pair.add_request(PROMPTS[0], GREEDY)
        pair.step()
        assert [h.request_id for h in pair.pending] == [rid] and handoff_in_flight
        out = pair.abort(rid)
    finally:
        pair.decode.import_request = real_import
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert len(out.outputs[0].token_ids) == 1 and out.metrics.time_to_first_token is not None
    assert_all_freed(pair)


def test_request_ids_are_unique_across_both_engines(pair):
    rid = pair.add_request(PROMPTS[0], GREEDY, request_id="x")
    pair.step()
    assert rid in pair.decode.requests
    with pytest.raises(ValueError, match="already in use"):
        pair.add_request(PROMPTS[1], GREEDY, request_id="x")
    run_to_completion(pair)


def test_bad_hand_overs_and_set_ups_are_refused(pair):
    with pytest.raises(ValueError, match="2 x 16 devices"):
        build_pair(tensor_parallel=16)
    with pytest.raises(ValueError, match="swap_space_gib"):
        build_pair(swap_space_gib=swap_gib(31))
    with pytest.raises(ValueError, match="not ready"):
        pair.prefill.export_request("nothing")
    with pytest.raises(ValueError, match="disaggregation_role 'prefill'"):
        pair.decode.export_request("nothing")
    with pytest.raises(ValueError, match="disaggregation_role"):
        EngineConfig(disaggregation_role="both")

    rid = pair.prefill.add_request(PROMPTS[0], GREEDY)
    while not pair.prefill.ready_for_handoff(rid):
        pair.prefill.step()
    handoff = pair.prefill.export_request(rid)
    with pytest.raises(ValueError, match="disaggregation_role 'decode'"):
        pair.prefill.import_request(handoff)
    wrong = dataclasses.replace(handoff, layout=dataclasses.replace(handoff.layout, block_size=16))
    with pytest.raises(ValueError, match="KV layout"):
        pair.decode.import_request(wrong)
    assert pair.decode.import_request(handoff)
    with pytest.raises(ValueError, match="already in use"):
        pair.decode.import_request(handoff)
    assert run_to_completion(pair)[rid].outputs[0].token_ids[:1] == handoff.seqs[0].output_token_ids
    assert_all_freed(pair)


def test_llm_text_and_stop_strings_equal_one_engine():
    # The built-in model has a tokenizer: text, held-back stop-string tails and stop strings
    # cross the hand-over as in one engine.
    from jaxserve import LLM
    from jaxserve.model_io.default_model import BUILTIN_MODEL
    args = dict(model=BUILTIN_MODEL, precompile=False, progress=False, dtype="float32",
                max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, block_size=8)
    prompts = ["The quick brown fox", "Once upon a time", "jax"]
    one = LLM(**args).generate(prompts, SamplingParams(max_tokens=16, temperature=0.0),
                               use_tqdm=False)
    stops = [o.outputs[0].text[3:5] for o in one]  # strings the outputs contain
    params = [SamplingParams(max_tokens=16, temperature=0.0, stop=[s]) for s in stops]
    llm = LLM(disaggregate=True, swap_space_gib=0.01, **args)
    pair_outs = llm.generate(prompts, params, use_tqdm=False)
    one_outs = LLM(**args).generate(prompts, params, use_tqdm=False)
    for a, b in zip(one_outs, pair_outs):
        assert (a.outputs[0].text, a.outputs[0].token_ids, a.outputs[0].finish_reason,
                a.outputs[0].stop_reason) == (b.outputs[0].text, b.outputs[0].token_ids,
                                              b.outputs[0].finish_reason, b.outputs[0].stop_reason)
    assert [o.outputs[0].finish_reason for o in pair_outs] == ["stop"] * 3
    assert llm.engine.num_handoffs > 0


def test_decode_steps_do_not_wait_for_a_running_prefill_step(pair):
    # A request decoding in the decode engine keeps getting tokens while a prefill step is held
    # up on the worker thread.
    long = dataclasses.replace(GREEDY, max_tokens=30)
    decoding = pair.add_request(PROMPTS[0], long)
    for _ in range(2):
        pair.step()
    assert decoding in pair.decode.requests
    gate, real_step = threading.Event(), pair.prefill.step
    pair.prefill.step = lambda: (gate.wait(30), real_step())[1]
    try:
        fresh = [1] + np.random.default_rng(5).integers(3, 256, size=40).tolist()
        prefilling = pair.add_request(fresh, long)
        tokens, total = [], 0
        for _ in range(5):  # the prefill step is held: only the decode engine moves
            out = {o.request_id: o for o in pair.step()}
            assert prefilling not in out
            total += len(out[decoding].outputs[0].token_ids)  # outputs are deltas
            tokens.append(total)
        assert tokens == sorted(set(tokens)) and len(tokens) == 5
        assert pair._prefill_step is not None and not pair._prefill_step.done()
        gate.set()
    finally:
        gate.set()
        pair.prefill.step = real_step
    outs = run_to_completion(pair)
    assert outs[prefilling].outputs[0].token_ids == generate(build_engine(), [fresh],
                                                             long)[0]
    assert len(outs[decoding].outputs[0].token_ids) == 30
    assert_all_freed(pair)


def test_a_failed_hand_over_ends_that_request_only(pair, single):
    # The first export's device read fails: that request ends with "error", the rest finish.
    read, calls = pair.prefill.runner.host_kv.read, []

    def failing_read(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected copy failure")
        return read(*args)

    pair.prefill.runner.host_kv.read = failing_read
    try:
        ids = [pair.add_request(p, GREEDY) for p in PROMPTS[:3]]
        outs = run_to_completion(pair)
    finally:
        pair.prefill.runner.host_kv.read = read
    reasons = [outs[i].outputs[0].finish_reason for i in ids]
    assert reasons.count("error") == 1 and reasons.count("length") == 2
    for i, expected in zip(ids, single[:3]):
        if outs[i].outputs[0].finish_reason == "length":
            assert outs[i].outputs[0].token_ids == expected
    assert_all_freed(pair)


def test_a_hand_over_that_does_not_match_is_refused_without_leaking_slots(pair):
    rid = pair.prefill.add_request(PROMPTS[5], GREEDY)
    while not pair.prefill.ready_for_handoff(rid):
        pair.prefill.step()
    handoff = pair.prefill.export_request(rid)
    seq = handoff.seqs[0]
    free = pair.decode.scheduler.num_free_swap_slots
    bad = [dataclasses.replace(seq, kv=seq.kv[:-1]),  # a block short
           dataclasses.replace(seq, kv=seq.kv.astype(np.float16)),
           dataclasses.replace(seq, num_computed_tokens=seq.num_computed_tokens + 1),
           dataclasses.replace(seq, output_token_ids=[10**6])]
    for wrong, match in zip(bad, ["expected", "expected", "num_computed_tokens", "vocabulary"]):
        with pytest.raises(ValueError, match=match):
            pair.decode.import_request(dataclasses.replace(handoff, seqs=[wrong]))
        assert pair.decode.scheduler.num_free_swap_slots == free
    # A failure after the slots were taken gives them back.
    broken = dataclasses.replace(handoff, seqs=[dataclasses.replace(seq, output_logprobs=None)])
    with pytest.raises(TypeError):
        pair.decode.import_request(broken)
    assert pair.decode.scheduler.num_free_swap_slots == free and rid not in pair.decode.requests
    assert pair.decode.import_request(handoff)
    run_to_completion(pair)
    assert_all_freed(pair)
