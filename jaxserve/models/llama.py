"""The Llama family in Flax NNX: Llama 2/3, Mistral, Qwen2 (QKV bias) and Mixtral (MoE), one
file, variants through ModelConfig.

The forward pass takes one flat ragged batch: the tokens of many sequences (prefill chunks and
decode tokens mixed) with their positions, the attention metadata and one paged KV cache array
per layer. Shapes: T tokens, D hidden, H query heads, K KV heads, Dh head dim, R sampled rows.

With a `mesh` the same code runs split over it (sharding/): the weights arrive sharded by the
partition rules and GSPMD splits the matmuls; attention over the paged cache and the expert
dispatch run under shard_map; the residual stream is pinned to tokens over data x sequence.
Without a mesh (mesh=None) nothing is constrained: one device, plain jit.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.worker.attention import AttentionMetadata, KVCache, paged_attention, write_kv
from jaxserve.config import ModelConfig
from pallas_kernels.ring_attention import ring_attention
from sharding.mesh import constrain, token_spec
from sharding.moe_dispatch import routed_experts
from sharding.parallel_attention import parallel_paged_attention


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] of the rotary embedding, with llama3 or linear scaling, or
    divided by explicit per-frequency factors (llama3 scaling as a GGUF file stores it)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling_dict
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "freq_factors":
        inv_freq = inv_freq / np.asarray(scaling["freq_factors"], dtype=np.float64)
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [T, heads, Dh] by its positions [T] (the rotate-half convention of HF Llama)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def _linear(d_in, d_out, bias, dtype, rngs):
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.q_proj = _linear(c.hidden_size, c.num_q_heads * c.head_dim, c.attention_bias, dtype, rngs)
        self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, dtype, rngs)
        self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, dtype, rngs)
        self.o_proj = _linear(c.num_q_heads * c.head_dim, c.hidden_size, False, dtype, rngs)

    def __call__(self, x, positions, kv_cache, md: AttentionMetadata, backend: str, mesh=None,
                 ring_prefill: bool = False):
        """ring_prefill: x is one whole prompt (padded at the end); attention is ring attention
        over its own K/V on the mesh's sequence axis, the K/V still go to the paged cache."""
        c = self.config
        T = x.shape[0]
        q = self.q_proj(x).reshape(T, c.num_q_heads, c.head_dim)
        k = self.k_proj(x).reshape(T, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(T, c.num_kv_heads, c.head_dim)
        inv_freq = rope_inv_freq(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        sm_scale = c.head_dim ** -0.5
        attend = functools.partial(paged_attention, sm_scale=sm_scale,
                                   sliding_window=c.sliding_window, backend=backend)
        if mesh is None:
            kv_cache = write_kv(kv_cache, k, v, md.slot_mapping)
            out = attend(q, kv_cache, md)
        else:
            out, kv_cache = parallel_paged_attention(q, k, v, kv_cache, md, mesh=mesh,
                                                     write_kv=write_kv,
                                                     attend=None if ring_prefill else attend)
        if ring_prefill:
            if mesh is None:
                raise ValueError("ring_prefill needs a mesh with a sequence axis")
            out = ring_attention(q, k, v, mesh=mesh, axis_name="sequence", sm_scale=sm_scale)
        return self.o_proj(out.reshape(T, c.num_q_heads * c.head_dim)), kv_cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, False, dtype, rngs)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, False, dtype, rngs)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, False, dtype, rngs)

    def __call__(self, x, mesh=None, routing=None):  # GSPMD splits the matmuls by the weights
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nnx.Module):
    """Mixtral's block: top-k routing with renormalized weights; every token reaches its experts
    (no capacity, no dropping). Experts are stacked: w_gate/w_up [E, D, F], w_down [E, F, D].

    Given a `routing` list, each call appends its routing (expert ids [T, k]) to it: the runner
    counts tokens per expert from it."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        E, D, F = c.num_experts, c.hidden_size, c.intermediate_size
        init = nnx.initializers.lecun_normal()
        self.router = _linear(D, E, False, dtype, rngs)
        self.w_gate = nnx.Param(init(rngs.params(), (E, D, F), dtype))
        self.w_up = nnx.Param(init(rngs.params(), (E, D, F), dtype))
        self.w_down = nnx.Param(init(rngs.params(), (E, F, D), dtype))
        self.top_k = c.num_experts_per_tok

    def __call__(self, x, mesh=None, routing: list | None = None):  # x: [T, D]
        logits = self.router(x).astype(jnp.float32)  # [T, E]
        weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), self.top_k)
        weights = (weights / jnp.sum(weights, axis=-1, keepdims=True)).astype(x.dtype)
        if routing is not None:
            routing.append(experts)
        # Sort by expert, grouped matmuls (ragged_dot), unsort; split over expert x tensor.
        return routed_experts(x, experts, weights, self.w_gate[...], self.w_up[...],
                              self.w_down[...], mesh=mesh)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = SparseMoE(config, dtype, rngs) if config.num_experts else MLP(config, dtype, rngs)

    def __call__(self, x, positions, kv_cache, md, backend, mesh=None, ring_prefill=False,
                 routing=None):
        h, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, md, backend,
                                     mesh, ring_prefill)
        x = constrain(x + h, mesh, token_spec(None))
        x = x + self.mlp(self.post_attention_layernorm(x), mesh, routing)
        return constrain(x, mesh, token_spec(None)), kv_cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, rngs)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list[KVCache],
                 md: AttentionMetadata, backend: str = "reference", *, mesh=None,
                 ring_prefill: bool = False, routing: list | None = None):
        """input_ids, positions: [T] int32 -> hidden [T, D] and the updated caches.

        mesh: run split over this mesh (weights and caches laid out by sharding.partition_rules).
        ring_prefill: the batch is one whole prompt from position 0, padded at the end, and T
        divisible by 2 x the sequence axis: attention is ring attention over the sequence axis.
        routing: a list that receives each MoE layer's expert ids [T, k], in layer order.
        """
        x = constrain(self.embed_tokens(input_ids), mesh, token_spec(None))
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, kv_cache = layer(x, positions, kv_cache, md, backend, mesh, ring_prefill, routing)
            new_caches.append(kv_cache)
        return self.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [R, D] -> logits [R, V] in float32."""
        if self.config.tie_word_embeddings:
            w = self.embed_tokens.embedding[...].T
        else:
            w = self.lm_head.kernel[...]
        return jnp.dot(hidden, w, preferred_element_type=jnp.float32)


def hf_weight_names(config: ModelConfig) -> dict[str, tuple[tuple, bool]]:
    """Maps each Hugging Face tensor name to (path of our parameter, transpose?).

    HF linear weights are [out, in]; ours are [in, out], hence the transposes.
    """
    names: dict[str, tuple[tuple, bool]] = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
        "model.norm.weight": (("norm", "weight"), False),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        names[f"{hf}.input_layernorm.weight"] = (ours + ("input_layernorm", "weight"), False)
        names[f"{hf}.post_attention_layernorm.weight"] = (ours + ("post_attention_layernorm", "weight"), False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{hf}.self_attn.{proj}.weight"] = (ours + ("self_attn", proj, "kernel"), True)
            if config.attention_bias and proj != "o_proj":
                names[f"{hf}.self_attn.{proj}.bias"] = (ours + ("self_attn", proj, "bias"), False)
        if not config.num_experts:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names[f"{hf}.mlp.{proj}.weight"] = (ours + ("mlp", proj, "kernel"), True)
    return names
