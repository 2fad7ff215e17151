"""Golden parity: our model against Hugging Face transformers (float32, tools/make_golden_fixtures.py)."""

import functools
import json

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest

from jaxserve.worker.attention import AttentionMetadata
from jaxserve.model_io.checkpoint import load_model
from jaxserve.sampling_params import SamplingParams
from tests.conftest import fixture_path, run_to_completion

FAMILIES = ["llama3", "llama3_sharded", "llama2", "mistral", "qwen2", "mixtral"]


def golden(name):
    with open(fixture_path(name) + "/golden.json") as f:
        return json.load(f)


def prefill_logits(model, token_ids, block_size=8, backend="reference"):
    """Logits at every position of one prompt, run as a single prefill over a fresh paged cache."""
    n = len(token_ids)
    padded = np.zeros(PADDED_LEN, np.int32)
    padded[:n] = token_ids
    graphdef, params = nnx.split(model)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPU: compare true float32
        logits = _prefill_logits(graphdef, params, padded, np.int32(n), block_size, backend)
    return np.asarray(logits)[:n]


PADDED_LEN = 128  # every prompt padded to one length: one compilation per model


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _prefill_logits(graphdef, params, token_ids, n, block_size, backend):
    model = nnx.merge(graphdef, params)
    c = model.config
    num_blocks = PADDED_LEN // block_size
    zeros = lambda: jnp.zeros((num_blocks, block_size, c.num_kv_heads, c.head_dim), jnp.float32)
    caches = [(zeros(), zeros()) for _ in range(c.num_layers)]
    pos = jnp.arange(PADDED_LEN, dtype=jnp.int32)
    md = AttentionMetadata(
        slot_mapping=jnp.where(pos < n, pos, PADDED_LEN),  # padding writes are dropped
        block_tables=jnp.arange(num_blocks, dtype=jnp.int32)[None],
        kv_lens=n[None], cu_q_lens=jnp.stack([jnp.int32(0), n]), num_seqs=jnp.int32(1))
    hidden, _ = model(token_ids, pos, caches, md, backend)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_position_logits_match_transformers(family):
    g = golden(family)
    model = load_model(fixture_path(family), "float32", progress=False)
    for prompt, expected in zip(g["prompts"], g["last_logits"]):
        logits = prefill_logits(model, prompt)[-1]
        expected = np.asarray(expected, np.float32)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_all_prefill_positions_match_transformers():
    g = golden("llama3")
    model = load_model(fixture_path("llama3"), "float32", progress=False)
    logits = prefill_logits(model, g["prompts"][2])
    expected = np.asarray(g["all_logits_prompt2"], np.float32)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuations_match_transformers(family, make_engine):
    g = golden(family)
    engine = make_engine(family)
    params = SamplingParams(temperature=0.0, max_tokens=len(g["greedy_tokens"][0]), ignore_eos=True)
    ids = [engine.add_request(p, params) for p in g["prompts"]]
    outs = run_to_completion(engine)
    assert [outs[i].outputs[0].token_ids for i in ids] == g["greedy_tokens"]
