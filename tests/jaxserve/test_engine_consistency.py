"""The same greedy tokens whatever the engine does around them: chunked prefill on/off, prefix
caching on/off, batched or alone, and under a KV budget so small that preemption happens."""

import json

import numpy as np
import pytest

from jaxserve.sampling_params import SamplingParams
from tests.conftest import build_engine, fixture_path, run_to_completion

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts():
    with open(fixture_path("llama3") + "/golden.json") as f:
        golden = json.load(f)
    rng = np.random.default_rng(7)
    extra = [[1] + rng.integers(3, 256, size=n).tolist() for n in (5, 20, 50, 90)]
    shared = golden["prompts"][3][:40]  # prompts sharing a 40-token prefix with prompt 3
    extra += [shared + rng.integers(3, 256, size=n).tolist() for n in (3, 17)]
    return golden["prompts"] + extra, golden["greedy_tokens"]


PROMPTS, GOLDEN_GREEDY = _prompts()


def generate(engine, prompts, params=GREEDY):
    ids = [engine.add_request(p, params) for p in prompts]
    outs = run_to_completion(engine)
    return [outs[i].outputs[0].token_ids for i in ids]


@pytest.fixture(scope="module")
def alone():
    """Each prompt alone through the default engine: the baseline."""
    engine = build_engine("llama3")
    results = [generate(engine, [p])[0] for p in PROMPTS]
    assert results[:4] == GOLDEN_GREEDY  # and the baseline itself matches transformers
    return results


def test_batched_equals_alone(alone, make_engine):
    assert generate(make_engine(), PROMPTS) == alone


def test_chunked_prefill_off_equals_on(alone, make_engine):
    engine = make_engine(enable_chunked_prefill=False, max_num_batched_tokens=256)
    assert generate(engine, PROMPTS) == alone


def test_small_chunks_equal_alone(alone, make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    assert generate(engine, PROMPTS) == alone


def test_prefix_caching_on_off_and_hits(alone, make_engine):
    off = make_engine(enable_prefix_caching=False)
    assert generate(off, PROMPTS) == alone
    on = make_engine(enable_prefix_caching=True)
    first = generate(on, PROMPTS)
    hits_before = on.kv_cache.prefix_hits
    second = generate(on, PROMPTS)  # now every prompt's full blocks are cached
    assert first == second == alone
    assert on.kv_cache.prefix_hits > hits_before
    assert off.kv_cache.prefix_hits == 0


def test_preemption_under_tiny_kv_budget(alone, make_engine):
    # 40 blocks of 8 tokens: the batch needs far more, so sequences are preempted and recomputed.
    engine = make_engine(num_kv_blocks=40)
    assert generate(engine, PROMPTS) == alone
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_no_recompile_while_serving(make_engine):
    engine = make_engine(precompile=True)
    compiled = dict(engine.runner.compiled)
    assert set(k[0] for k in compiled) == {"forward", "decode", "sample", "table", "copy"}
    generate(engine, PROMPTS[:5])
    generate(engine, PROMPTS[:2], SamplingParams(temperature=0.8, seed=1, max_tokens=4,
                                                 repetition_penalty=1.2))
    assert engine.runner.compiled == compiled  # every bucket was ready before serving


def test_pallas_backend_equals_reference(alone, make_engine):
    # The Pallas kernels run interpreted on the CPU: the ragged kernel for mixed steps and the
    # paged decode kernel for decode-only steps. A short batch keeps the interpreter's cost low.
    engine = make_engine(attention_backend="pallas")
    assert generate(engine, PROMPTS[:3]) == alone[:3]
    assert {"forward", "decode"} <= set(engine.runner.kind_counts)
