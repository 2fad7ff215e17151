"""Tensor and data parallelism on the simulated 8-device CPU mesh: the golden greedy tokens and
last-position logits of the llama3 fixture (4 query heads, 2 KV heads: the KV cache is split for
tensor 2 and replicated for tensor 4), tensor 8 on an 8-head model, data 2 x tensor 4, the
collectives in the compiled HLO, and meshes that do not fit failing at start-up."""

import json
import os

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxserve import Engine, EngineConfig
from jaxserve.sample.sampler import SamplerMode
from tests.conftest import build_engine, fixture_path
from tests.sharding.conftest import (assert_close, collective_counts, engine_for, golden, greedy,
                                     last_position_logits, need_devices)

LLAMA3_MESHES = [dict(tensor_parallel=1), dict(tensor_parallel=2), dict(tensor_parallel=4),
                 dict(data_parallel=2, tensor_parallel=4)]


def mesh_id(parallelism: dict) -> str:
    return "x".join(f"{k.split('_')[0]}{v}" for k, v in parallelism.items())


@pytest.mark.parametrize("parallelism", LLAMA3_MESHES, ids=mesh_id)
def test_llama3_golden_greedy_and_logits(parallelism):
    g = golden("llama3")
    engine = engine_for("llama3", **parallelism)
    assert greedy(engine, g["prompts"], len(g["greedy_tokens"][0])) == g["greedy_tokens"]
    reference = engine_for("llama3", tensor_parallel=1)
    prompt = g["prompts"][-1]  # 70 tokens: two chunks through the paged cache
    logits = last_position_logits(engine, prompt)
    assert_close(logits, last_position_logits(reference, prompt), rtol=1e-5)
    assert_close(logits, g["last_logits"][-1], rtol=1e-4)  # and transformers, as test_golden_parity


def test_kv_cache_layout_follows_kv_heads():
    specs = {tp: engine_for("llama3", tensor_parallel=tp).runner.kv_caches[0][0].sharding.spec
             for tp in (2, 4)}
    assert specs[2] == PartitionSpec(None, None, "tensor", None)  # 2 KV heads, 2 devices
    assert all(axis is None for axis in specs[4])  # 2 KV heads, 4 devices: replicated


@pytest.fixture(scope="module")
def eight_head_model(tmp_path_factory):
    """A folder with the config of a llama with 8 query heads and 2 KV heads (random weights)."""
    folder = tmp_path_factory.mktemp("eight_heads")
    with open(os.path.join(fixture_path("llama3"), "config.json")) as f:
        config = json.load(f)
    config.update(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    return str(folder)


def test_tensor_parallel_8_on_an_eight_head_model(eight_head_model):
    # The fixtures have 4 query heads, which 8 devices cannot split; this model has 8.
    need_devices(8)
    engines = [Engine(eight_head_model, EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
        dtype="float32", tensor_parallel=tp), precompile=False, progress=False,
        skip_tokenizer=True, random_weights=True) for tp in (1, 8)]
    prompts = [list(range(3, 15)), [7, 1, 200, 9]]  # 16 tokens: one bucket to compile
    assert greedy(engines[1], prompts, 6) == greedy(engines[0], prompts, 6)
    assert_close(last_position_logits(engines[1], prompts[0]),
                 last_position_logits(engines[0], prompts[0]), rtol=1e-5)


@pytest.mark.parametrize("family,parallelism,num_layers", [
    ("llama3", dict(tensor_parallel=2), 2),  # KV heads split
    ("llama3", dict(tensor_parallel=4), 2),  # KV heads replicated
    ("mixtral", dict(expert_parallel=4, tensor_parallel=2), 2),
])
def test_step_collectives_are_exactly_the_megatron_ones(family, parallelism, num_layers):
    """The forward step holds one all-reduce for the vocabulary-parallel embedding lookup and
    two per layer (after attention's o_proj and after the MLP's down_proj or the experts), and
    nothing else: no all-gather, all-to-all, collective-permute or reduce-scatter, so nothing is
    resharded behind our back. Sampling holds one all-gather: the [S, V] logits."""
    runner = engine_for(family, **parallelism).runner
    forward = collective_counts(runner._compiled(("forward", 16, 8)).as_text())
    assert forward == {"all-reduce": 2 * num_layers + 1, "all-gather": 0, "all-to-all": 0,
                       "collective-permute": 0, "reduce-scatter": 0}
    for mode in (SamplerMode(), SamplerMode(random=True, logprobs=True, penalties=True)):
        text = runner._compiled(("sample", 8, mode)).as_text()
        assert collective_counts(text) == {"all-reduce": 0, "all-gather": 1, "all-to-all": 0,
                                           "collective-permute": 0, "reduce-scatter": 0}
        gathered = [line for line in text.splitlines() if " all-gather(" in line]
        assert "[8,256]" in gathered[0]  # the logits, not the [D, V] lm_head


@pytest.mark.parametrize("overrides,message", [
    (dict(data_parallel=2, tensor_parallel=8), r"needs 16 devices; 8 are available"),
    (dict(tensor_parallel=8), r"tensor_parallel \(8\) must divide the model's "
                              r"num_attention_heads \(4\)"),
    (dict(expert_parallel=2), r"expert_parallel \(2\) needs a mixture-of-experts model"),
    (dict(tensor_parallel=0), r"EngineConfig.tensor_parallel must be a positive integer, got 0"),
])
def test_a_mesh_that_does_not_fit_fails_at_start_up(overrides, message):
    need_devices(8)
    with pytest.raises(ValueError, match=message):
        build_engine("llama3", **overrides)


def test_too_many_experts_per_device_fails_at_start_up():
    with pytest.raises(ValueError, match=r"expert_parallel \(3\) must divide the model's number "
                                         r"of experts \(4\)"):
        build_engine("mixtral", expert_parallel=3)


def test_sampling_with_penalties_and_temperature_is_the_same_on_the_mesh():
    from jaxserve import SamplingParams
    from tests.conftest import run_to_completion
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=6,
                            repetition_penalty=1.3, logprobs=3)
    results = []
    for tp in (1, 4):
        engine = engine_for("llama3", tensor_parallel=tp)
        rid = engine.add_request(golden("llama3")["prompts"][1], params)
        out = run_to_completion(engine)[rid].outputs[0]
        results.append((out.token_ids, [sorted(d) for d in out.logprobs],
                        np.array([[v for _, v in sorted(d.items())] for d in out.logprobs])))
    assert results[0][:2] == results[1][:2]
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-5, atol=1e-5)
