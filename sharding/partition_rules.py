"""Partition rules: parameter path -> PartitionSpec, Megatron-style, plus the KV cache's spec.

A parameter's path is its keys joined by "/" ("layers/0/self_attn/q_proj/kernel"). Kernels are
[in, out] (the transpose of Hugging Face's [out, in]). The first rule whose regex matches wins;
a parameter no rule matches is an error, never silently replicated.

    q/k/v_proj kernel [D, H*Dh]   columns over tensor (whole heads per device)
    o_proj kernel     [H*Dh, D]   rows over tensor: one all-reduce after attention
    gate/up_proj      [D, F]      columns over tensor
    down_proj         [F, D]      rows over tensor: one all-reduce after the MLP
    w_gate/w_up       [E, D, F]   experts over expert, F over tensor
    w_down            [E, F, D]   experts over expert, F over tensor: one all-reduce after the MoE
    embedding         [V, D]      vocabulary over tensor (lookup: masked gather + all-reduce)
    lm_head kernel    [D, V]      vocabulary over tensor (logits all-gathered before sampling)
    router, norms                 replicated

A vocabulary that tensor does not divide (a few added tokens) splits the embedding and lm_head
over the hidden dimension instead: the lookup ends in an all-gather, the logits in an all-reduce.

When the KV heads cannot be split over tensor (fewer KV heads than devices, or a count that does
not divide) the K/V projections and the KV cache are replicated over tensor: every device computes
all KV heads (they are few) and keeps the whole cache, and attention picks the heads it needs.
"""

import re

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, P], ...]


def kv_heads_sharded(num_kv_heads: int, tensor_parallel: int) -> bool:
    """True when the KV heads split evenly over the tensor axis."""
    return num_kv_heads % tensor_parallel == 0


def vocab_sharded(vocab_size: int, tensor_parallel: int) -> bool:
    """True when the embedding and lm_head split over the vocabulary, False: over hidden."""
    return vocab_size % tensor_parallel == 0


def param_rules(*, num_kv_heads: int, vocab_size: int, tensor_parallel: int) -> Rules:
    kv = "tensor" if kv_heads_sharded(num_kv_heads, tensor_parallel) else None
    by_vocab = vocab_sharded(vocab_size, tensor_parallel)
    return (
        (r"(^|/)embed_tokens/embedding$", P("tensor", None) if by_vocab else P(None, "tensor")),
        (r"(^|/)lm_head/kernel$", P(None, "tensor") if by_vocab else P("tensor", None)),
        (r"/self_attn/q_proj/kernel$", P(None, "tensor")),
        (r"/self_attn/q_proj/bias$", P("tensor")),
        (r"/self_attn/[kv]_proj/kernel$", P(None, kv)),
        (r"/self_attn/[kv]_proj/bias$", P(kv)),
        (r"/self_attn/o_proj/kernel$", P("tensor", None)),
        (r"/mlp/(gate|up)_proj/kernel$", P(None, "tensor")),
        (r"/mlp/down_proj/kernel$", P("tensor", None)),
        (r"/mlp/router/kernel$", P()),
        (r"/mlp/w_(gate|up)$", P("expert", None, "tensor")),
        (r"/mlp/w_down$", P("expert", "tensor", None)),
        (r"(^|/)(input_layernorm|post_attention_layernorm|norm)/weight$", P()),
    )


def kv_cache_spec(*, num_kv_heads: int, tensor_parallel: int) -> P:
    """Spec of each of one layer's key and value caches [num_blocks, block_size, num_kv_heads,
    head_dim]."""
    if kv_heads_sharded(num_kv_heads, tensor_parallel):
        return P(None, None, "tensor", None)
    return P()


def path_string(keypath) -> str:
    """A jax key path -> "a/b/0/c", dropping the `.value` attribute of Flax variables."""
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


def spec_for(path: str, rules: Rules) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    raise ValueError(f"partition rules: no rule for parameter {path!r}")


def param_specs(tree, rules: Rules):
    """The same pytree with a PartitionSpec in place of every array leaf."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: spec_for(path_string(kp), rules), tree)


def param_shardings(tree, rules: Rules, mesh: Mesh):
    specs = param_specs(tree, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, P))
