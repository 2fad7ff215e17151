"""The device sampler on hand-made logits: greedy, top-k, top-p, min-p, banned ids, penalties,
per-request seeds and logprobs."""

import functools

import jax
import numpy as np
import pytest

from jaxserve.sampler import PenaltyMetadata, SamplingMetadata, apply_penalties, sample

VOCAB = 32
MAX_LOGPROBS = 5


def metadata(rows, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, steps=0,
             banned=None, penalties=None):
    """SamplingMetadata for `rows` rows; scalars are broadcast, arrays taken per row."""
    def per_row(value, dtype):
        return np.broadcast_to(np.asarray(value, dtype), (rows,)).copy()

    seeds = np.arange(rows) if seeds is None else seeds
    banned = np.full((rows, 2), -1, np.int32) if banned is None else np.asarray(banned, np.int32)
    return SamplingMetadata(per_row(temperature, np.float32), per_row(top_k, np.int32),
                            per_row(top_p, np.float32), per_row(min_p, np.float32),
                            per_row(seeds, np.uint32), per_row(steps, np.int32), banned, penalties)


@functools.partial(jax.jit, static_argnums=2)
def _sample(logits, md, max_logprobs):
    return sample(logits, md, max_logprobs)


PAD_ROWS = 512  # every call is padded to one shape: one compilation (two with penalties)
PAD_HISTORY = 16


def _pad(x, rows, fill, cols=None):
    x = np.asarray(x)
    shape = (rows,) + ((cols,) if cols is not None else x.shape[1:])
    out = np.full(shape, fill, x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def run(logits, md, max_logprobs=MAX_LOGPROBS, pad=True):
    """The sampler's output for the given rows; padded with greedy rows to one shape."""
    logits = np.asarray(logits, np.float32)
    rows = logits.shape[0]
    if pad:
        p = md.penalties
        if p is not None:
            p = PenaltyMetadata(_pad(p.repetition, PAD_ROWS, 1), _pad(p.presence, PAD_ROWS, 0),
                                _pad(p.frequency, PAD_ROWS, 0),
                                _pad(p.history, PAD_ROWS, -1, PAD_HISTORY),
                                _pad(p.prompt_lens, PAD_ROWS, 0))
        md = SamplingMetadata(_pad(md.temperature, PAD_ROWS, 0), _pad(md.top_k, PAD_ROWS, 0),
                              _pad(md.top_p, PAD_ROWS, 1), _pad(md.min_p, PAD_ROWS, 0),
                              _pad(md.seeds, PAD_ROWS, 0), _pad(md.steps, PAD_ROWS, 0),
                              _pad(md.banned_ids, PAD_ROWS, -1), p)
        logits = _pad(logits, PAD_ROWS, 0)
    out = jax.device_get(_sample(logits, md, max_logprobs))
    return jax.tree.map(lambda x: x[:rows], out)


def random_logits(rows, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((rows, VOCAB)) * scale).astype(np.float32)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logits_for_probs(probs):
    """One row of VOCAB logits whose softmax is `probs` on the first tokens and ~0 elsewhere."""
    row = np.full(VOCAB, -1e4, np.float32)
    row[:len(probs)] = np.log(probs)
    return row


def test_greedy_is_argmax():
    logits = random_logits(8)
    out = run(logits, metadata(8, temperature=0.0))
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))


def test_greedy_ignores_seed_top_k_and_top_p():
    logits = random_logits(8, seed=1)
    out = run(logits, metadata(8, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2,
                               seeds=np.arange(8) * 7919, steps=5))
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0, 100.0])
def test_top_k_1_equals_greedy_under_any_temperature(temperature):
    logits = random_logits(64, seed=2, scale=1.0)
    out = run(logits, metadata(64, temperature=temperature, top_k=1))
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))


def test_random_sampling_is_not_greedy():
    """The filters below are only tested if sampling without them spreads over many tokens."""
    logits = np.tile(random_logits(1, seed=3, scale=0.5), (256, 1))
    out = run(logits, metadata(256, temperature=1.0, seeds=np.arange(256)))
    assert len(set(out.tokens.tolist())) > 16


@pytest.mark.parametrize("k", [2, 5, 10])
def test_top_k_never_samples_outside_the_top_k(k):
    rows = 512
    logits = np.tile(random_logits(1, seed=4, scale=0.5), (rows, 1))
    top = set(np.argsort(-logits[0])[:k].tolist())
    out = run(logits, metadata(rows, temperature=2.0, top_k=k, seeds=np.arange(rows) * 31 + 5))
    sampled = set(out.tokens.tolist())
    assert sampled <= top
    assert len(sampled) == k  # flat logits at temperature 2: every one of the k shows up


def test_top_k_larger_than_the_vocab_is_no_filter():
    logits = np.tile(random_logits(1, seed=5, scale=0.3), (256, 1))
    out = run(logits, metadata(256, temperature=1.0, top_k=VOCAB + 100))
    assert len(set(out.tokens.tolist())) > 16


@pytest.mark.parametrize("top_p, allowed", [(0.45, {0}), (0.6, {0, 1}), (0.75, {0, 1}),
                                            (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_head_reaching_p(top_p, allowed):
    rows = 512
    logits = np.tile(logits_for_probs([0.5, 0.3, 0.15, 0.05]), (rows, 1))
    out = run(logits, metadata(rows, temperature=1.0, top_p=top_p))
    assert set(out.tokens.tolist()) == allowed


def test_top_p_is_applied_after_temperature():
    # At temperature 0.5 the probabilities [0.5, 0.3, 0.15, 0.05] become ~[0.68, 0.24, 0.06, 0.01]:
    # top_p 0.6 keeps token 0 alone.
    rows = 512
    logits = np.tile(logits_for_probs([0.5, 0.3, 0.15, 0.05]), (rows, 1))
    out = run(logits, metadata(rows, temperature=0.5, top_p=0.6))
    assert set(out.tokens.tolist()) == {0}


def test_top_p_works_on_unsorted_logits():
    rows = 512
    order = np.random.default_rng(6).permutation(VOCAB)
    logits = np.tile(logits_for_probs([0.5, 0.3, 0.15, 0.05])[order], (rows, 1))
    where = {int(np.where(order == i)[0][0]) for i in (0, 1)}  # positions of the 2 most likely
    out = run(logits, metadata(rows, temperature=1.0, top_p=0.75))
    assert set(out.tokens.tolist()) == where


@pytest.mark.parametrize("min_p, allowed", [(0.0, {0, 1, 2, 3}), (0.2, {0, 1, 2}),
                                            (0.5, {0, 1}), (0.9, {0})])
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(min_p, allowed):
    rows = 512
    logits = np.tile(logits_for_probs([0.5, 0.3, 0.15, 0.05]), (rows, 1))
    out = run(logits, metadata(rows, temperature=1.0, min_p=min_p))
    assert set(out.tokens.tolist()) == allowed


def test_banned_ids_are_never_sampled():
    rows = 256
    probs = [0.6, 0.3, 0.05, 0.05]
    logits = np.tile(logits_for_probs(probs), (rows, 1))
    banned = np.tile([[0, 2]], (rows, 1))
    sampled = run(logits, metadata(rows, temperature=1.0, banned=banned)).tokens
    assert set(sampled.tolist()) == {1, 3}
    greedy = run(logits, metadata(rows, temperature=0.0, banned=banned)).tokens
    assert set(greedy.tolist()) == {1}
    # Banning is per row: a row without banned ids still gets token 0 greedily.
    banned[0] = -1
    assert run(logits, metadata(rows, temperature=0.0, banned=banned)).tokens[0] == 0


def penalty_reference(logits, history, prompt_lens, rep, pres, freq):
    """vLLM/HF semantics in numpy: repetition over prompt + output, presence/frequency over
    output only."""
    out = np.array(logits, np.float64)
    for r in range(out.shape[0]):
        ids = [t for t in history[r] if t >= 0]
        seen = set(ids)
        output = ids[prompt_lens[r]:]
        for t in seen:
            out[r, t] = out[r, t] / rep[r] if out[r, t] > 0 else out[r, t] * rep[r]
        for t in set(output):
            out[r, t] -= freq[r] * output.count(t) + pres[r]
    return out


def test_apply_penalties_matches_a_numpy_reference():
    rows, hist = 4, 12
    rng = np.random.default_rng(7)
    logits = random_logits(rows, seed=8)
    history = np.full((rows, hist), -1, np.int32)
    prompt_lens = np.array([3, 5, 0, 4], np.int32)
    lengths = [8, 12, 6, 4]  # the last row has no output
    for r, n in enumerate(lengths):
        history[r, :n] = rng.integers(0, 8, n)  # few distinct ids: repeats are certain
    rep = np.array([1.3, 1.0, 2.0, 0.8], np.float32)
    pres = np.array([0.5, -0.7, 0.0, 1.0], np.float32)
    freq = np.array([0.25, 0.0, 1.5, 1.0], np.float32)
    pen = PenaltyMetadata(rep, pres, freq, history, prompt_lens)
    got = np.asarray(jax.jit(apply_penalties)(logits, pen))
    want = penalty_reference(logits, history, prompt_lens, rep, pres, freq)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, logits)  # the penalties did something
    np.testing.assert_array_equal(got[:, 8:], logits[:, 8:])  # unseen tokens are untouched


def test_penalties_change_the_sampled_token():
    logits = logits_for_probs([0.4, 0.35, 0.25])[None]
    history = np.array([[5, 0, 0, 0]], np.int32)  # token 0 was generated 3 times
    pen = PenaltyMetadata(np.ones(1, np.float32), np.zeros(1, np.float32),
                          np.full(1, 0.5, np.float32), history, np.array([1], np.int32))
    assert run(logits, metadata(1, temperature=0.0)).tokens[0] == 0
    out = run(logits, metadata(1, temperature=0.0, penalties=pen))
    assert out.tokens[0] == 1
    # The reported logprob is the model's, before penalties.
    np.testing.assert_allclose(out.logprobs[0], np.log(0.35), rtol=1e-4)


def test_same_seed_and_step_give_the_same_token_whatever_the_batch():
    logits = random_logits(1, seed=9, scale=0.5)[0]
    seed, steps = 12345, [0, 1, 2, 3, 7]
    alone = [run(logits[None], metadata(1, temperature=1.0, seeds=[seed], steps=s),
                 pad=False).tokens[0] for s in steps]  # alone, in a batch of 1 row
    assert len(set(alone)) > 1  # the step moves the random stream on

    rng = np.random.default_rng(10)
    for s, expected in zip(steps, alone):
        for position in (0, 3, 7):
            batch = random_logits(8, seed=int(rng.integers(1 << 30)))
            batch[position] = logits
            seeds = rng.integers(0, 2**32, 8, dtype=np.uint64)
            seeds[position] = seed
            step = rng.integers(0, 50, 8)
            step[position] = s
            temperature = rng.choice([0.0, 0.7, 1.0, 1.5], 8).astype(np.float32)
            temperature[position] = 1.0
            top_k = rng.choice([0, 3, 10], 8)
            top_k[position] = 0
            md = metadata(8, temperature=temperature, top_k=top_k, seeds=seeds, steps=step)
            assert run(batch, md).tokens[position] == expected


def test_different_seeds_give_different_streams():
    logits = np.tile(random_logits(1, seed=11, scale=0.5), (8, 1))
    a = [run(logits, metadata(8, seeds=np.arange(8), steps=s)).tokens for s in range(4)]
    b = [run(logits, metadata(8, seeds=np.arange(8) + 1000, steps=s)).tokens for s in range(4)]
    assert not np.array_equal(np.stack(a), np.stack(b))
    np.testing.assert_array_equal(
        np.stack(a), np.stack([run(logits, metadata(8, seeds=np.arange(8), steps=s)).tokens
                               for s in range(4)]))


def test_logprobs_are_log_softmax_of_the_raw_logits():
    rows = 6
    logits = random_logits(rows, seed=12)
    banned = np.full((rows, 2), -1, np.int32)
    banned[1] = [int(logits[1].argmax()), -1]  # banning does not change the reported logprobs
    md = metadata(rows, temperature=np.array([0, 1, 0.5, 2, 0, 1], np.float32), top_k=4,
                  banned=banned)
    out = run(logits, md)
    expected = log_softmax(logits)
    np.testing.assert_allclose(out.logprobs, expected[np.arange(rows), out.tokens], rtol=1e-5,
                               atol=1e-5)
    order = np.argsort(-expected, axis=-1)[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(out.top_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(expected, order, -1),
                               rtol=1e-5, atol=1e-5)
    assert out.tokens[1] != banned[1, 0]
