"""Verification of proposed tokens by rejection sampling keeps the target's distribution: a
chi-square over seeded draws, through the whole sampler (temperature, top-k, top-p, penalties
shape the target p), for point-mass proposals (n-gram) and for proposals drawn from a draft
distribution q; a deliberately wrong rule fails the same test."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sample.sampler import SamplerMode, sample
from jaxserve.sample.spec_sampling import verify_proposals
from tests.jaxserve.test_sampler import (CHI2_999, chi_square, metadata, reference_keep,
                                         softmax64)

DRAWS, VOCAB = 8192, 10
ROW = np.random.default_rng(30).standard_normal(VOCAB).astype(np.float32) * 1.5


def target_probs(temperature, top_k, top_p):
    keep = reference_keep(ROW, temperature, top_k, top_p, 0.0)
    probs = np.where(keep, softmax64(np.float32(ROW) / np.float32(temperature)), 0.0)
    return probs / probs.sum()


@functools.partial(jax.jit, static_argnums=(2,))
def _sample(logits, md, mode):
    return sample(logits, md, mode, 1).tokens


def sampled_with_proposals(drafts, temperature, top_k, top_p):
    """Tokens of DRAWS seeded rows of ROW, each verifying drafts[i] (-1: none)."""
    md = metadata(DRAWS, temperature=temperature, top_k=top_k, top_p=top_p,
                  seeds=np.random.default_rng(31).integers(0, 2**32, DRAWS, dtype=np.uint64),
                  steps=np.arange(DRAWS) % 7)
    md = dataclasses.replace(md, draft_ids=np.asarray(drafts, np.int32))
    mode = SamplerMode(random=True, spec=True)
    return np.asarray(_sample(np.tile(ROW, (DRAWS, 1)), md, mode))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 6, 0.9)])
def test_point_mass_proposals_keep_the_target_distribution(temperature, top_k, top_p):
    probs = target_probs(temperature, top_k, top_p)
    # Proposals of every kind: likely, unlikely, and one top-k / top-p dropped (never kept).
    drafts = np.random.default_rng(32).integers(0, VOCAB, DRAWS)
    tokens = sampled_with_proposals(drafts, temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=VOCAB)
    critical = CHI2_999[int((probs > 0).sum()) - 1]
    assert chi_square(counts, probs) < critical
    kept = tokens == drafts
    # A proposal is kept about p(x) of the time, and one p gives no mass never is.
    assert not kept[probs[drafts] == 0].any()
    np.testing.assert_allclose(kept.mean(), probs[drafts].mean(), atol=0.02)


def test_always_keeping_the_proposal_fails_the_same_test():
    probs = target_probs(1.0, 0, 1.0)
    drafts = np.random.default_rng(32).integers(0, VOCAB, DRAWS)
    # The rule that trusts the proposal: its output is the proposals' (uniform) distribution.
    counts = np.bincount(drafts, minlength=VOCAB)
    assert chi_square(counts, probs) > CHI2_999[VOCAB - 1]


def _draft_distribution(rng, n):
    q = rng.dirichlet(np.ones(VOCAB), size=n)
    x = np.minimum((q.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1), VOCAB - 1)
    return q.astype(np.float32), x


@jax.jit
def _verify(seeds, logits, drafts, q):
    keys = jax.vmap(jax.random.key)(seeds)
    drawn = jnp.full(drafts.shape, -1, jnp.int32)
    return verify_proposals(keys, logits, drafts, drawn, q)


@jax.jit
def _wrong_verify(seeds, logits, drafts, q):
    """The rule with its residual drawn from p instead of max(0, p - q): biased towards q."""
    keys = jax.vmap(jax.random.key)(seeds)
    drawn = jax.vmap(lambda k, lg: jax.random.categorical(jax.random.fold_in(k, 2), lg))(
        keys, logits).astype(jnp.int32)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
    p = jax.nn.softmax(logits, axis=-1)
    px = jnp.take_along_axis(p, drafts[:, None], axis=-1)[:, 0]
    qx = jnp.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
    return jnp.where(u * qx < px, drafts, drawn)


def test_drafts_from_a_distribution_keep_the_target_distribution_and_a_wrong_rule_does_not():
    rng = np.random.default_rng(33)
    q, drafts = _draft_distribution(rng, DRAWS)
    probs = target_probs(1.0, 0, 1.0)
    logits = np.tile(ROW, (DRAWS, 1))
    seeds = rng.integers(0, 2**32, DRAWS, dtype=np.uint64).astype(np.uint32)
    critical = CHI2_999[VOCAB - 1]
    tokens = np.asarray(_verify(seeds, logits, drafts.astype(np.int32), q))
    assert chi_square(np.bincount(tokens, minlength=VOCAB), probs) < critical
    wrong = np.asarray(_wrong_verify(seeds, logits, drafts.astype(np.int32), q))
    assert chi_square(np.bincount(wrong, minlength=VOCAB), probs) > critical


def test_a_draft_equal_to_the_target_is_always_kept():
    rng = np.random.default_rng(34)
    p = softmax64(ROW).astype(np.float32)
    drafts = rng.choice(VOCAB, size=DRAWS, p=p / p.sum()).astype(np.int32)
    seeds = np.arange(DRAWS, dtype=np.uint32)
    tokens = np.asarray(_verify(seeds, np.tile(ROW, (DRAWS, 1)), drafts, np.tile(p, (DRAWS, 1))))
    np.testing.assert_array_equal(tokens, drafts)
