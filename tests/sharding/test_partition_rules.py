"""Partition rules and mesh validation, on plain values (no engine, no compilation)."""

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxserve.model_io.checkpoint import abstract_model
from jaxserve.config import ModelConfig
from sharding.mesh import MeshShape, validate
from sharding.partition_rules import kv_cache_spec, param_rules, param_specs, spec_for
from tests.conftest import fixture_path


def specs_of(fixture: str, tp: int) -> dict[str, P]:
    config = ModelConfig.from_dir(fixture_path(fixture))
    rules = param_rules(num_kv_heads=config.num_kv_heads, vocab_size=config.vocab_size,
                        tensor_parallel=tp)
    state = nnx.state(abstract_model(config, "float32"), nnx.Param)
    return {".".join(map(str, path)): spec
            for path, spec in nnx.to_flat_state(param_specs(state, rules))}


def test_megatron_layout_of_llama3():
    specs = specs_of("llama3", tp=2)  # 2 KV heads: split over 2
    assert specs["embed_tokens.embedding"] == P("tensor", None)
    assert specs["lm_head.kernel"] == P(None, "tensor")
    assert specs["layers.0.self_attn.q_proj.kernel"] == P(None, "tensor")
    assert specs["layers.0.self_attn.k_proj.kernel"] == P(None, "tensor")
    assert specs["layers.1.self_attn.o_proj.kernel"] == P("tensor", None)
    assert specs["layers.1.mlp.gate_proj.kernel"] == P(None, "tensor")
    assert specs["layers.1.mlp.down_proj.kernel"] == P("tensor", None)
    assert specs["layers.0.input_layernorm.weight"] == P()
    assert specs["norm.weight"] == P()


def test_kv_projections_and_cache_replicate_when_kv_heads_do_not_split():
    specs = specs_of("llama3", tp=4)  # 2 KV heads, 4 devices
    assert specs["layers.0.self_attn.q_proj.kernel"] == P(None, "tensor")
    assert specs["layers.0.self_attn.v_proj.kernel"] == P(None, None)
    assert kv_cache_spec(num_kv_heads=2, tensor_parallel=4) == P()
    assert kv_cache_spec(num_kv_heads=8, tensor_parallel=4) == P(None, None, "tensor", None)
    assert kv_cache_spec(num_kv_heads=3, tensor_parallel=2) == P()  # does not divide


def test_biases_experts_and_tied_embeddings():
    qwen = specs_of("qwen2", tp=2)
    assert qwen["layers.0.self_attn.q_proj.bias"] == P("tensor")
    assert qwen["layers.0.self_attn.k_proj.bias"] == P("tensor")
    assert "lm_head.kernel" not in qwen  # tied: the embedding serves both
    mixtral = specs_of("mixtral", tp=2)
    assert mixtral["layers.0.mlp.w_gate"] == P("expert", None, "tensor")
    assert mixtral["layers.0.mlp.w_up"] == P("expert", None, "tensor")
    assert mixtral["layers.0.mlp.w_down"] == P("expert", "tensor", None)
    assert mixtral["layers.0.mlp.router.kernel"] == P()


def test_odd_vocabulary_splits_the_embedding_over_hidden():
    rules = param_rules(num_kv_heads=2, vocab_size=259, tensor_parallel=2)
    assert spec_for("embed_tokens/embedding", rules) == P(None, "tensor")
    assert spec_for("lm_head/kernel", rules) == P("tensor", None)


def test_a_parameter_without_a_rule_is_an_error():
    rules = param_rules(num_kv_heads=2, vocab_size=256, tensor_parallel=2)
    with pytest.raises(ValueError, match="no rule for parameter 'layers/0/mystery/kernel'"):
        spec_for("layers/0/mystery/kernel", rules)


MODEL = dict(num_devices=8, num_q_heads=32, num_kv_heads=8, vocab_size=128256, hidden_size=4096,
             intermediate_size=14336, num_experts=0)


@pytest.mark.parametrize("shape,changes,message", [
    (MeshShape(tensor=8, data=2), {}, r"data 2 x sequence 1 x expert 1 x tensor 8 needs 16 "
                                      r"devices; 8 are available"),
    (MeshShape(tensor=3), {}, r"tensor_parallel \(3\) must divide the model's "
                              r"num_attention_heads \(32\)"),
    (MeshShape(tensor=4), dict(intermediate_size=11010), r"tensor_parallel \(4\) must divide the "
                                                         r"model's intermediate_size \(11010\)"),
    (MeshShape(tensor=4), dict(vocab_size=32001, hidden_size=4098),
     r"vocab_size \(32001\) or its hidden_size \(4098\)"),
    (MeshShape(expert=3), dict(num_experts=8), r"expert_parallel \(3\) must divide the model's "
                                               r"number of experts \(8\)"),
    (MeshShape(expert=2), {}, r"expert_parallel \(2\) needs a mixture-of-experts model"),
])
def test_validation_names_the_numbers(shape, changes, message):
    with pytest.raises(ValueError, match=message):
        validate(shape, **{**MODEL, **changes})


def test_what_fits():
    validate(MeshShape(tensor=8), **MODEL)
    validate(MeshShape(tensor=8), **{**MODEL, "num_kv_heads": 4})  # KV heads replicated
    validate(MeshShape(tensor=2), **{**MODEL, "vocab_size": 32001})  # embedding over hidden
    validate(MeshShape(expert=8), **{**MODEL, "num_experts": 8})


def test_mesh_shape_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match=r"tensor_parallel must be a positive integer, got 0"):
        MeshShape(tensor=0)
