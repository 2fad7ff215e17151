"""Sampling on device, inside the compiled step: penalties, min_tokens, temperature, top-k,
top-p, min-p, per-request seeds, and logprobs. R is the number of sampled rows.

Each row's random key is derived from (the request's seed, the index of the token being
sampled), so a seeded request gives the same text whatever else is in the batch.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_k", "top_p", "min_p", "seeds", "steps",
                                "banned_ids", "penalties"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    temperature: jax.Array  # [R] f32, 0 = greedy
    top_k: jax.Array  # [R] int32, 0 = off
    top_p: jax.Array  # [R] f32, 1 = off
    min_p: jax.Array  # [R] f32, 0 = off
    seeds: jax.Array  # [R] uint32
    steps: jax.Array  # [R] int32, output index of the token being sampled
    banned_ids: jax.Array  # [R, B] int32, -1 padded: EOS and stop ids while below min_tokens
    penalties: "PenaltyMetadata | None"  # None compiles the step without the penalty code


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["repetition", "presence", "frequency", "history", "prompt_lens"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PenaltyMetadata:
    repetition: jax.Array  # [R] f32, 1 = off
    presence: jax.Array  # [R] f32
    frequency: jax.Array  # [R] f32
    history: jax.Array  # [R, max_model_len] int32: prompt then output token ids, -1 padded
    prompt_lens: jax.Array  # [R] int32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "logprobs", "top_ids", "top_logprobs"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    tokens: jax.Array  # [R] int32
    logprobs: jax.Array  # [R] f32, the sampled token's log-probability under the model
    top_ids: jax.Array  # [R, max_logprobs] int32
    top_logprobs: jax.Array  # [R, max_logprobs] f32


def apply_penalties(logits: jax.Array, p: PenaltyMetadata) -> jax.Array:
    """Repetition (HF: divide positive, multiply negative logits of seen tokens), then presence
    and frequency (OpenAI: subtract per output occurrence)."""
    rows, vocab = logits.shape
    valid = p.history >= 0
    ids = jnp.where(valid, p.history, 0)
    is_output = jnp.arange(p.history.shape[1])[None, :] >= p.prompt_lens[:, None]
    row = jnp.arange(rows)[:, None]
    seen = jnp.zeros((rows, vocab), jnp.bool_).at[row, ids].max(valid)
    counts = jnp.zeros((rows, vocab), jnp.float32).at[row, ids].add((valid & is_output).astype(jnp.float32))
    rep = p.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - p.frequency[:, None] * counts - p.presence[:, None] * (counts > 0)


def _filtered_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf."""
    vocab = logits.shape[-1]
    temp = jnp.where(md.temperature > 0, md.temperature, 1.0)[:, None]
    scaled = logits / temp
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = jnp.where(md.top_k > 0, jnp.minimum(md.top_k, vocab), vocab)
    rank = jnp.arange(vocab)[None, :]
    ordered = jnp.where(rank < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # top-p keeps the smallest head whose mass reaches top_p: a token stays while the mass
    # before it is below top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < md.top_p[:, None]) & (probs >= md.min_p[:, None] * probs[:, :1])
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits: jax.Array, md: SamplingMetadata, max_logprobs: int) -> SamplerOutput:
    """logits [R, V] f32 -> one token per row, with its logprob and the top max_logprobs."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if md.penalties is not None:
        logits = apply_penalties(logits, md.penalties)
    banned = md.banned_ids
    row = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[row, jnp.where(banned >= 0, banned, logits.shape[1])].set(-jnp.inf, mode="drop")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def random_tokens():
        filtered = _filtered_logits(logits, md)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(md.seeds, md.steps)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(md.temperature > 0), random_tokens, lambda: greedy)
    tokens = jnp.where(md.temperature > 0, sampled, greedy)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, max_logprobs)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return SamplerOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)
