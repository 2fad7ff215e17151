"""The compiled step as pure functions of (weights, caches, persistent batch, step arrays): the
forward over one ragged batch, the sampler, and the two small updates between steps (block-table
deltas, copy-on-write block copies). The runner (jaxserve/worker/runner.py) jits and dispatches them;
the array layouts are jaxserve/worker/step_inputs.py's.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxserve.worker.attention import AttentionMetadata, copy_blocks
from jaxserve.sample.sampler import PenaltyMetadata, SamplerMode, SamplingMetadata, sample
from sharding.mesh import constrain
from sharding.moe_dispatch import expert_load
from sharding.partition_rules import vocab_sharded


def forward_fn(graphdef, treedef, param_leaves, kv_caches, block_tables, last_tokens,
               token_data, seq_data, *, backend: str, block_size: int, decode_only: bool = False,
               mesh: Mesh | None = None, ring_prefill: bool = False):
    """The model over one ragged batch (layouts: jaxserve/worker/step_inputs.py).

    block_tables [num_slots + 1, max_blocks] and last_tokens [num_slots + 1] int32 are the
    persistent batch's. -> (caches, hidden [S, D] at the sampled rows, their last input token
    [S], tokens routed to each expert [num_layers, num_experts] int32 or None for a dense model).
    """
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, param_leaves))
    S = seq_data.shape[1] - 1
    tokens, positions, token_slots = token_data[0], token_data[1], token_data[2]
    input_ids = jnp.where(tokens >= 0, tokens, last_tokens[jnp.maximum(-tokens - 1, 0)])
    pos = jnp.maximum(positions, 0)
    scratch_slot = (kv_caches[0][0].shape[0] - 1) * block_size  # the last block's first
    blocks = block_tables[token_slots, pos // block_size]
    slot_mapping = jnp.where(positions >= 0, blocks * block_size + pos % block_size,
                             scratch_slot)
    attn = AttentionMetadata(slot_mapping, block_tables[seq_data[0, :S]], seq_data[1, :S],
                             seq_data[2], seq_data[0, S], decode_only)
    routing = []  # each MoE layer's expert ids [T, k]
    hidden, kv_caches = model(input_ids, pos, kv_caches, attn, backend, mesh=mesh,
                              ring_prefill=ring_prefill, routing=routing)
    load = None
    if routing:
        valid = positions >= 0
        load = jnp.stack([expert_load(ids, model.config.num_experts, valid) for ids in routing])
    logits_indices = seq_data[3, :S]
    return kv_caches, hidden[logits_indices], input_ids[logits_indices], load


def sample_fn(head, hidden, last_input, last_tokens, row_i32, row_f32, penalties, *,
              mode: SamplerMode, max_logprobs: int, tied: bool, mesh: Mesh | None = None):
    """Logits only at the sampled rows, then sampling; each row's token goes into its slot of
    last_tokens (donated). head: the lm_head kernel [D, V], or the tied embedding [V, D].
    -> (SamplerOutput, last_tokens)."""
    logits = jnp.dot(hidden, head.T if tied else head, preferred_element_type=jnp.float32)
    vocab = logits.shape[1]
    if mesh is not None and vocab_sharded(vocab, mesh.shape["tensor"]):
        # Logits come out split over the vocabulary (as the lm_head is) and are gathered once,
        # here. Pinning both layouts keeps GSPMD from gathering the [D, V] lm_head instead.
        logits = constrain(logits, mesh, PartitionSpec(None, "tensor"))
    logits = constrain(logits, mesh, PartitionSpec())
    pen = None
    if penalties is not None:
        pen_f32, history, prompt_lens = penalties
        history = jnp.where(history == -2, last_input[:, None], history)
        pen = PenaltyMetadata(pen_f32[0], pen_f32[1], pen_f32[2], history, prompt_lens)
    md = SamplingMetadata(row_f32[0], row_i32[0], row_f32[1], row_f32[2],
                          jax.lax.bitcast_convert_type(row_i32[1], jnp.uint32), row_i32[2],
                          row_i32[5:].T, pen, row_i32[4] if mode.spec else None)
    out = sample(logits, md, mode, max_logprobs)
    return out, last_tokens.at[row_i32[3]].set(out.tokens)


def update_tables(block_tables, idx, vals):
    """Writes vals [n] at flat indices idx [n] of block_tables (out of range: skipped)."""
    flat = block_tables.reshape(-1).at[idx].set(vals, mode="drop")
    return flat.reshape(block_tables.shape)


def copy_all(kv_caches, src, dst):
    return [copy_blocks(c, src, dst) for c in kv_caches]
