"""Verification of proposed tokens by rejection sampling (Leviathan et al. 2023, Chen et al.
2023), on device: the kept token is distributed exactly as the target's own sample would be.

For a row whose proposal x came from a draft distribution q, with target distribution p (the
sampler's, after penalties, bans, temperature, min-p, top-k and top-p): keep x with probability
min(1, p(x) / q(x)); otherwise draw from max(0, p - q), normalized. A proposal that no
distribution produced (n-gram prompt lookup, a greedy draft) is a point mass, q = one-hot(x):
keep x with probability p(x), otherwise draw from p with x removed, renormalized: exactly what
the row's ordinary draw from p does, kept iff it equals x (so that draw is the token).

Greedy rows (temperature 0) need none of this: the target's token is its argmax, and a proposal
is kept iff it equals it (jaxserve/sample/sampler.py). R rows, V the vocabulary.
"""

import jax
import jax.numpy as jnp

# fold_in tags of a row's key (the one its ordinary draw uses): the uniform, the residual draw.
_UNIFORM, _RESIDUAL = 1, 2


def verify_proposals(keys: jax.Array, target_logits: jax.Array, draft_ids: jax.Array,
                     drawn: jax.Array, draft_probs: jax.Array | None = None) -> jax.Array:
    """Each row's token after verification.

    keys [R] (typed PRNG keys), target_logits [R, V] f32 (-inf where filtered out), draft_ids
    [R] int32 (-1: the row has no proposal and keeps `drawn`, its ordinary sample [R] int32),
    draft_probs [R, V] f32 or None (point-mass proposals). -> [R] int32: the proposal where it
    is kept, a residual draw where not; so a row kept its proposal iff the token equals it.
    """
    if draft_probs is None:
        # q = one-hot(x): the row's ordinary draw from p is x with probability p(x), and
        # otherwise a draw from p without x; that is the rule exactly. Taking it makes a row's
        # token the same whatever was proposed (or cut by the scheduler): a seeded request's
        # text depends on its seed, not on its batch.
        return drawn
    has_draft = draft_ids >= 0
    x = jnp.maximum(draft_ids, 0)
    log_p = jax.nn.log_softmax(target_logits, axis=-1)  # -inf stays -inf
    log_px = jnp.take_along_axis(log_p, x[:, None], axis=-1)[:, 0]
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _UNIFORM)))(keys)
    qx = jnp.take_along_axis(draft_probs, x[:, None], axis=-1)[:, 0]
    keep = u * qx < jnp.exp(log_px)  # u < p(x) / q(x), without dividing by q(x) = 0
    residual = jnp.maximum(jnp.exp(log_p) - draft_probs, 0.0)
    residual_logits = jnp.where(residual > 0, jnp.log(residual), -jnp.inf)
    resampled = jax.vmap(lambda k, lg: jax.random.categorical(
        jax.random.fold_in(k, _RESIDUAL), lg))(keys, residual_logits).astype(jnp.int32)
    token = jnp.where(keep, x, resampled)
    return jnp.where(has_draft, token, drawn)
