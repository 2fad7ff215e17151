"""Engine and LLM features end to end: seeds, n > 1 (fork + copy-on-write), stop conditions,
min_tokens, logprobs, stop strings, abort, output order, streaming and metrics.

Most tests share one engine over a copy of the llama3 fixture whose generation_config adds token
20 to EOS: 20 is the greedy first token after prompt [1], so EOS handling is observable.
"""

import json
import os
import shutil

import numpy as np
import pytest

from jaxserve import LLM, Engine, EngineConfig, SamplingParams
from jaxserve.model_io.default_model import builtin_model_dir
from tests.conftest import fixture_path, run_to_completion

with open(os.path.join(fixture_path("llama3"), "golden.json")) as f:
    GOLDEN = json.load(f)
PROMPTS = GOLDEN["prompts"]  # lengths 1, 7, 33, 70
GREEDY = GOLDEN["greedy_tokens"]  # 12 tokens each
EOS = 20
LIMITS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
              dtype="float32")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("llama3_eos")
    shutil.copytree(fixture_path("llama3"), model_dir, dirs_exist_ok=True)
    with open(model_dir / "generation_config.json") as f:
        gen = json.load(f)
    gen["eos_token_id"] = [2, EOS]
    with open(model_dir / "generation_config.json", "w") as f:
        json.dump(gen, f)
    eng = Engine(str(model_dir), EngineConfig(**LIMITS), precompile=False, progress=False,
                 skip_tokenizer=True)
    assert eng.model_config.eos_token_ids == (2, EOS)
    return eng


@pytest.fixture(autouse=True)
def no_leak(request):
    """After every engine test: nothing left running and every KV block back."""
    yield
    if "engine" not in request.fixturenames:
        return
    eng = request.getfixturevalue("engine")
    leftover = list(eng.requests)
    for rid in leftover:
        eng.abort(rid)
    assert not leftover, f"requests left unfinished: {leftover}"
    assert_all_blocks_free(eng)


def assert_all_blocks_free(eng):
    kv = eng.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.ref_counts == [0] * kv.num_blocks
    assert not eng.scheduler.running and not eng.scheduler.waiting


def generate(eng, prompt, params):
    rid = eng.add_request(prompt, params)
    return run_to_completion(eng)[rid]


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def seeded(seed, max_tokens=10, **kw):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True, **kw)


# ----- seeds ---------------------------------------------------------------------------------

def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine):
    alone = generate(engine, PROMPTS[1], seeded(1234)).outputs[0].token_ids
    assert len(alone) == 10

    others = [(PROMPTS[2], greedy()), (PROMPTS[3], seeded(99, max_tokens=14)),
              (PROMPTS[0], seeded(5, top_k=20)), (list(range(3, 120)), greedy(5))]
    ids = [engine.add_request(p, sp) for p, sp in others[:2]]
    target = engine.add_request(PROMPTS[1], seeded(1234))
    engine.step()  # the rest arrive while the batch is already running
    ids += [engine.add_request(p, sp) for p, sp in others[2:]]
    outs = run_to_completion(engine)
    assert outs[target].outputs[0].token_ids == alone
    assert outs[ids[0]].outputs[0].token_ids == GREEDY[2]


def test_different_seeds_give_different_tokens(engine):
    a = generate(engine, PROMPTS[1], seeded(1)).outputs[0].token_ids
    b = generate(engine, PROMPTS[1], seeded(2)).outputs[0].token_ids
    again = generate(engine, PROMPTS[1], seeded(1)).outputs[0].token_ids
    assert a != b
    assert a == again


# ----- n > 1 ---------------------------------------------------------------------------------

def test_n3_gives_three_different_samples(engine):
    out = generate(engine, PROMPTS[2], seeded(7, n=3))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    tokens = [c.token_ids for c in out.outputs]
    assert all(len(t) == 10 for t in tokens)
    assert len({tuple(t) for t in tokens}) == 3
    assert all(c.finish_reason == "length" for c in out.outputs)
    # Sample i is seeded with seed + i: each must equal that seed run alone, which it only does
    # if its forked KV blocks (the prompt's partial last block copied on write) are right.
    for i, t in enumerate(tokens):
        assert generate(engine, PROMPTS[2], seeded(7 + i)).outputs[0].token_ids == t


@pytest.mark.parametrize("prompt_index", [
    1,  # 7 tokens: the fork shares a partial block
    2,  # 33 tokens: several full blocks and a partial one
    3,  # 70 tokens: more than one step's budget, but 64 of them are prefix-cache hits
])
def test_greedy_n2_equals_greedy_n1(engine, prompt_index):
    # n=1 first, which also puts the prompt in the prefix cache: the n=2 request then prefills
    # in one step whatever ran before (the chunked case is the next test).
    single = generate(engine, PROMPTS[prompt_index], greedy()).outputs[0].token_ids
    assert single == GREEDY[prompt_index]
    out = generate(engine, PROMPTS[prompt_index], greedy(n=2))
    assert [c.token_ids for c in out.outputs] == [GREEDY[prompt_index]] * 2


def test_greedy_n2_equals_greedy_n1_after_a_chunked_prefill(engine):
    prompt = list(range(100, 170))  # seen by no other test: no prefix-cache hit, two chunks
    out = generate(engine, prompt, greedy(n=2))
    single = generate(engine, prompt, greedy()).outputs[0].token_ids
    assert [c.token_ids for c in out.outputs] == [single] * 2


def test_greedy_n3_on_a_block_aligned_prompt(engine):
    prompt = list(range(3, 19))  # 16 tokens: two full blocks, the forks share no partial block
    single = generate(engine, prompt, greedy()).outputs[0].token_ids
    out = generate(engine, prompt, greedy(n=3))
    assert [c.token_ids for c in out.outputs] == [single] * 3


# ----- stop conditions -----------------------------------------------------------------------

def test_stop_token_ids_stop_with_stop(engine):
    expected = GREEDY[2]
    stop = expected[4]
    assert stop not in expected[:4]
    out = generate(engine, PROMPTS[2], greedy(stop_token_ids=[stop])).outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.token_ids == expected[:5]
    assert out.token_ids[-1] == stop


def test_max_tokens_gives_length(engine):
    out = generate(engine, PROMPTS[3], greedy(max_tokens=5)).outputs[0]
    assert out.finish_reason == "length"
    assert out.token_ids == GREEDY[3][:5]
    assert out.stop_reason is None


def test_eos_stops_unless_ignored(engine):
    params = SamplingParams(temperature=0.0, max_tokens=12)
    out = generate(engine, PROMPTS[0], params).outputs[0]
    assert out.token_ids == [EOS]
    assert out.finish_reason == "stop"
    assert out.stop_reason is None  # EOS, not a stop token of the request

    out = generate(engine, PROMPTS[0], greedy()).outputs[0]  # ignore_eos=True
    assert out.token_ids == GREEDY[0]
    assert out.finish_reason == "length"


def test_min_tokens_prevents_eos_before_it(engine):
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=5, ignore_eos=False)
    out = generate(engine, PROMPTS[0], params).outputs[0]
    assert len(out.token_ids) >= 5
    assert not {2, EOS} & set(out.token_ids[:5])
    assert out.token_ids[0] != GREEDY[0][0]  # the greedy first token, EOS, was banned
    if len(out.token_ids) < 12:
        assert out.finish_reason == "stop" and out.token_ids[-1] in (2, EOS)


def test_min_tokens_also_holds_back_stop_token_ids(engine):
    stop = GREEDY[2][0]
    out = generate(engine, PROMPTS[2], greedy(stop_token_ids=[stop])).outputs[0]
    assert out.token_ids == [stop]
    out = generate(engine, PROMPTS[2], greedy(stop_token_ids=[stop], min_tokens=3)).outputs[0]
    assert len(out.token_ids) >= 3 and stop not in out.token_ids[:3]


def test_min_tokens_holds_for_every_seeded_sample(engine):
    params = SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=8, min_tokens=6)
    for c in generate(engine, PROMPTS[0], params).outputs:
        assert len(c.token_ids) >= 6 and not {2, EOS} & set(c.token_ids[:6])


# ----- logprobs ------------------------------------------------------------------------------

def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


@pytest.mark.parametrize("num_logprobs", [0, 1, 3])
def test_logprobs_per_token(engine, num_logprobs):
    params = seeded(11, max_tokens=8, logprobs=num_logprobs)
    out = generate(engine, PROMPTS[2], params).outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 8
    for token, entry in zip(out.token_ids, out.logprobs):
        assert next(iter(entry)) == token  # the sampled token comes first
        assert max(num_logprobs, 1) <= len(entry) <= num_logprobs + 1
        assert all(lp <= 0.0 for lp in entry.values())
        others = list(entry.values())[1:]  # the top N, in order, less the sampled token
        assert others == sorted(others, reverse=True)
        if num_logprobs and len(entry) == num_logprobs + 1:  # sampled outside the top N
            assert entry[token] <= min(others) + 1e-6
    # The first token's entries are the model's distribution after the prompt.
    expected = _log_softmax(GOLDEN["last_logits"][2])
    for t, lp in out.logprobs[0].items():
        assert lp == pytest.approx(expected[t], abs=1e-3)
    top = set(np.argsort(-expected)[:num_logprobs].tolist())
    assert top <= set(out.logprobs[0])
    # Asking for logprobs changes nothing about the sampled tokens.
    plain = generate(engine, PROMPTS[2], seeded(11, max_tokens=8)).outputs[0]
    assert plain.token_ids == out.token_ids


def test_greedy_logprobs_match_the_model(engine):
    out = generate(engine, PROMPTS[2], greedy(max_tokens=3, logprobs=4)).outputs[0]
    first = out.logprobs[0]
    assert len(first) == 4  # greedy: the sampled token is the top one, not repeated
    assert max(first, key=first.get) == out.token_ids[0]
    # The first token's distribution is the golden last-position logits of the prompt.
    expected = _log_softmax(GOLDEN["last_logits"][2])
    for token, lp in first.items():
        assert lp == pytest.approx(expected[token], abs=1e-3)
    assert sorted(first) == sorted(np.argsort(-expected)[:4].tolist())


def test_no_logprobs_when_not_asked(engine):
    assert generate(engine, PROMPTS[1], greedy(max_tokens=2)).outputs[0].logprobs is None


# ----- penalties -----------------------------------------------------------------------------

def test_repetition_penalty_applies_to_prompt_tokens(engine):
    prompt, logits = PROMPTS[3], np.asarray(GOLDEN["last_logits"][3], np.float64)
    assert int(logits.argmax()) in prompt  # the unpenalized first token repeats the prompt
    penalized = logits.copy()
    for t in set(prompt):
        penalized[t] = penalized[t] / 1.5 if penalized[t] > 0 else penalized[t] * 1.5
    out = generate(engine, prompt, greedy(max_tokens=1, repetition_penalty=1.5)).outputs[0]
    assert out.token_ids == [int(penalized.argmax())]
    assert out.token_ids != GREEDY[3][:1]
    # Presence and frequency penalties count output tokens only: the first token is unchanged.
    out = generate(engine, prompt, greedy(max_tokens=1, presence_penalty=2.0,
                                          frequency_penalty=2.0)).outputs[0]
    assert out.token_ids == GREEDY[3][:1]


def test_frequency_penalty_breaks_a_repetition_loop(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    (loop,) = llm.generate("abc", plain, use_tqdm=False)
    tokens = loop.outputs[0].token_ids
    assert max(tokens.count(t) for t in tokens) > 20  # the untrained model repeats itself
    penalized = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                               frequency_penalty=2.0)
    (out,) = llm.generate("abc", penalized, use_tqdm=False)
    tokens = out.outputs[0].token_ids
    assert max(tokens.count(t) for t in tokens) < 10


# ----- abort ---------------------------------------------------------------------------------

def test_abort_mid_run_frees_every_block(engine):
    ids = [
        engine.add_request(PROMPTS[3], seeded(1, n=3, max_tokens=30)),  # chunked prefill, n > 1
        engine.add_request(PROMPTS[2], greedy(max_tokens=30, n=2)),
        engine.add_request(list(range(3, 150)), greedy(max_tokens=30)),  # 3 prefill chunks
        engine.add_request(PROMPTS[1], greedy(max_tokens=30)),
    ]
    engine.step()
    engine.step()
    assert engine.kv_cache.num_free_blocks < engine.kv_cache.num_blocks
    for rid in ids[:2]:
        out = engine.abort(rid)
        assert out.finished
        assert all(c.finish_reason == "abort" for c in out.outputs)
    for _ in range(3):
        engine.step()
    for rid in ids[2:]:
        assert engine.abort(rid).outputs[0].finish_reason == "abort"
    assert engine.abort(ids[0]) is None  # already gone: ignored
    assert engine.abort("no-such-request") is None
    assert not engine.has_unfinished_requests
    assert_all_blocks_free(engine)
    assert engine.step() == []
    # The engine still serves after the aborts.
    assert generate(engine, PROMPTS[2], greedy()).outputs[0].token_ids == GREEDY[2]


def test_abort_a_waiting_request(engine):
    rid = engine.add_request(PROMPTS[2], greedy(n=2))
    out = engine.abort(rid)
    assert [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert [c.token_ids for c in out.outputs] == [[], []]
    assert_all_blocks_free(engine)


def test_all_blocks_free_after_runs_to_completion(engine):
    for p in PROMPTS:
        engine.add_request(p, seeded(4, n=3, max_tokens=6))
    engine.add_request(list(range(3, 200)), greedy(max_tokens=4))
    outs = run_to_completion(engine)
    assert len(outs) == 5
    assert_all_blocks_free(engine)


# ----- metrics -------------------------------------------------------------------------------

def test_request_metrics_are_set_and_ordered(engine):
    out = generate(engine, PROMPTS[3], greedy(max_tokens=6))
    m = out.metrics
    for name in ("queue_time", "time_to_first_token", "time_per_output_token", "e2e_latency"):
        assert getattr(m, name) is not None, name
    assert 0.0 <= m.queue_time <= m.time_to_first_token <= m.e2e_latency
    assert m.time_per_output_token > 0.0
    # 5 gaps after the first token fit between it and the end.
    assert m.time_per_output_token * 5 == pytest.approx(m.e2e_latency - m.time_to_first_token,
                                                        rel=1e-6, abs=1e-6)


def test_metrics_while_running_are_partial(engine):
    rid = engine.add_request(PROMPTS[1], greedy(max_tokens=4))
    outs = []
    while not outs:  # the overlapped loop reports a step one step() late
        outs = [o for o in engine.step() if o.request_id == rid]
    (out,) = outs
    assert not out.finished
    assert out.metrics.time_to_first_token is not None
    assert out.metrics.e2e_latency is None and out.metrics.time_per_output_token is None
    run_to_completion(engine)


# ----- with a tokenizer: stop strings, LLM.generate, LLM.stream -------------------------------

@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = builtin_model_dir(str(tmp_path_factory.mktemp("jaxserve_cache")))
    return LLM(model_dir, precompile=False, progress=False, **LIMITS)


def _pick_stop(text, length=3, start=2):
    """A printable substring of `text` whose first occurrence is at index k >= start."""
    for k in range(start, len(text) - length):
        s = text[k:k + length]
        if s.isprintable() and "\ufffd" not in s and text.find(s) == k:
            return k, s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt, params", [
    ("abc", dict(temperature=0.0)),
    ("Hello, world", dict(temperature=0.8, seed=21)),
], ids=["greedy", "seeded"])
def test_stop_string_ends_the_text_right_before_it(llm, prompt, params):
    base = SamplingParams(max_tokens=40, ignore_eos=True, **params)
    first = llm.generate(prompt, base, use_tqdm=False)[0].outputs[0]
    k, stop = _pick_stop(first.text)
    out = llm.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop],
                                              **params), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == first.text[:k]
    assert stop not in out.text
    assert len(out.token_ids) < len(first.token_ids)
    assert out.token_ids == first.token_ids[:len(out.token_ids)]


def test_generate_returns_outputs_in_input_order(llm):
    prompts = ["a long one first", [1, 70, 71, 72], "xyz", [1, 80]]
    max_tokens = [20, 3, 9, 1]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == 4
    for prompt, n, out in zip(prompts, max_tokens, outs):
        if isinstance(prompt, str):
            assert out.prompt == prompt
            assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        else:
            assert out.prompt is None and out.prompt_token_ids == prompt
        assert len(out.outputs[0].token_ids) == n
        assert out.finished
    assert len({o.request_id for o in outs}) == 4


def test_generate_a_single_prompt_and_token_ids(llm):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    (by_text,) = llm.generate("hi", params, use_tqdm=False)
    (by_ids,) = llm.generate(llm.tokenizer.encode("hi"), params, use_tqdm=False)
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids


def test_stream_deltas_concatenate_to_the_generated_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    (full,) = llm.generate("The quick brown fox", params, use_tqdm=False)
    deltas = list(llm.stream("The quick brown fox", params))
    assert len(deltas) > 1
    assert all(deltas)
    assert "".join(deltas) == full.outputs[0].text
    assert not llm.engine.has_unfinished_requests


def test_stream_closed_early_aborts_its_request(llm):
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    stream = llm.stream("abc", params)
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished_requests
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks


# ----- under KV pressure: preemption with seeds, n > 1 and the prefix cache --------------------

@pytest.fixture(scope="module")
def tight_engine():
    """32 blocks of 8 tokens: one max_model_len sequence fits, a few long ones preempt."""
    from tests.conftest import build_engine
    return build_engine("llama3", num_kv_blocks=32)


def test_seeded_samples_survive_preemption(engine, tight_engine):
    n3_prompt = [1, 40, 41, 42, 43, 44]  # admitted first, whole: its forks start at once
    requests = [(n3_prompt, seeded(50, n=3, max_tokens=40))]
    requests += [(list(range(3 + i, 60 + i)), seeded(60 + i, max_tokens=40)) for i in range(3)]
    ids = [tight_engine.add_request(p, sp) for p, sp in requests]
    outs = run_to_completion(tight_engine)
    assert tight_engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(tight_engine)
    # Each sample equals its seed run alone on the roomy engine.
    for rid, (prompt, sp) in zip(ids, requests):
        for c in outs[rid].outputs:
            alone = generate(engine, prompt, seeded(sp.seed + c.index, max_tokens=40))
            assert c.token_ids == alone.outputs[0].token_ids, (rid, c.index)


def test_n2_with_prefix_cache_hits(engine):
    prompt = list(range(200, 227))  # 27 tokens: 3 full blocks cached, a partial one
    first = generate(engine, prompt, seeded(70, n=2))
    again = generate(engine, prompt, seeded(70, n=2))
    assert again.num_cached_tokens == 24
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]
