"""Expert parallelism on the mixtral fixture (4 experts, top-2): golden greedy tokens and logits
for expert 1, 2, 4 (4 with tensor 2: experts over expert and their columns over tensor), the
grouped-matmul dispatch against a dense reference, and the router load the runner reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharding.mesh import MeshShape, make_mesh
from sharding.moe_dispatch import grouped_experts, routed_experts
from tests.sharding.conftest import (assert_close, engine_for, golden, greedy,
                                     last_position_logits, need_devices)

MESHES = [dict(expert_parallel=1), dict(expert_parallel=2),
          dict(expert_parallel=4, tensor_parallel=2)]


@pytest.mark.parametrize("parallelism", MESHES, ids=lambda p: "x".join(
    f"{k.split('_')[0]}{v}" for k, v in p.items()))
def test_mixtral_golden_greedy_logits_and_router_load(parallelism):
    g = golden("mixtral")
    engine = engine_for("mixtral", **parallelism)
    before = engine.runner.total_expert_load
    before = 0 if before is None else before.copy()
    counts = engine.num_prompt_tokens_computed, engine.num_generated_tokens
    assert greedy(engine, g["prompts"], len(g["greedy_tokens"][0])) == g["greedy_tokens"]
    # Router load: every token run (not padding) reaches top_k experts in every layer; a
    # request's last generated token is never run.
    load = engine.runner.total_expert_load - before
    tokens = (engine.num_prompt_tokens_computed - counts[0]
              + engine.num_generated_tokens - counts[1] - len(g["prompts"]))
    assert load.shape == (2, 4)
    assert (load.sum(axis=1) == 2 * tokens).all()
    reference = engine_for("mixtral", expert_parallel=1)
    prompt = g["prompts"][-1]
    logits = last_position_logits(engine, prompt)
    assert_close(logits, last_position_logits(reference, prompt), rtol=1e-5)
    assert_close(logits, g["last_logits"][-1], rtol=1e-4)


def dense_experts(x, ids, weights, w_gate, w_up, w_down):
    """Every expert on every token, masked by the routing: the obviously right answer."""
    gate = jnp.einsum("td,edf->tef", x, w_gate)
    up = jnp.einsum("td,edf->tef", x, w_up)
    y = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, w_down)
    combine = jnp.sum(jax.nn.one_hot(ids, w_gate.shape[0]) * weights[..., None], axis=1)
    return jnp.einsum("ted,te->td", y, combine)


def random_moe(seed, tokens=24, experts=8, top_k=2, d=16, f=32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, d), np.float32)
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    weights = rng.random((tokens, top_k), np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    w_gate, w_up = rng.standard_normal((2, experts, d, f), np.float32) / 4
    w_down = rng.standard_normal((experts, f, d), np.float32) / 4
    return x, ids.astype(np.int32), weights, w_gate, w_up, w_down


def test_grouped_experts_equal_dense_experts_even_with_skewed_routing():
    args = random_moe(0)
    x, ids, weights, *w = args
    ids[:20] = [3, 5]  # most tokens to two experts: no capacity, no drops
    with jax.default_matmul_precision("highest"):
        assert_close(jax.jit(grouped_experts)(x, ids, weights, *w),
                     jax.jit(dense_experts)(x, ids, weights, *w))


@pytest.mark.parametrize("expert,tensor,data", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_routed_experts_on_the_mesh_equal_one_device(expert, tensor, data):
    need_devices(expert * tensor * data)
    mesh = make_mesh(MeshShape(expert=expert, tensor=tensor, data=data))
    x, ids, weights, *w = random_moe(1)
    with jax.default_matmul_precision("highest"):
        expected = jax.jit(dense_experts)(x, ids, weights, *w)
        got = jax.jit(lambda *a: routed_experts(*a, mesh=mesh))(x, ids, weights, *w)
    assert_close(got, expected)
