"""The device sampler: greedy, min-p, top-k, top-p, banned ids, penalties, per-request seeds and
logprobs, against a numpy reference of the filters (a full sort, in vLLM's order) and by
chi-square over seeded draws; and the compiled graph, which must not sort the vocabulary."""

import functools
import re

import jax
import numpy as np
import pytest

from jaxserve.sample.sampler import (PenaltyMetadata, SamplerMode, SamplingMetadata, _order_keys,
                                     apply_penalties, filtered_logits, sample)

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


def mode_for(md, logprobs=True):
    """The mode the runner would pick for these rows."""
    return SamplerMode.of(random=np.any(md.temperature > 0), logprobs=logprobs,
                          penalties=md.penalties is not None)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample(logits, md, mode, max_logprobs):
    return sample(logits, md, mode, max_logprobs)


PAD_ROWS = 512  # every call is padded to one shape: one compilation per mode
PAD_HISTORY = 16


def _pad(x, rows, fill, cols=None):
    x = np.asarray(x)
    shape = (rows,) + ((cols,) if cols is not None else x.shape[1:])
    out = np.full(shape, fill, x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def run(logits, md, max_logprobs=MAX_LOGPROBS, pad=True, mode=None):
    """The sampler's output for the given rows; padded with greedy rows to one shape. mode: the
    one the runner would pick (logprobs on) when None."""
    logits = np.asarray(logits, np.float32)
    rows = logits.shape[0]
    mode = mode_for(md) if mode is None else mode
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
    out = jax.device_get(_sample(logits, md, mode, max_logprobs))
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
    np.testing.assert_array_equal(run(logits, metadata(8, temperature=0.0)).tokens,
                                  logits.argmax(-1))
    out = run(logits, metadata(8, temperature=0.0), mode=SamplerMode())  # the argmax alone
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


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


def test_penalties_apply_to_random_rows_too():
    rows = 256
    logits = np.tile(logits_for_probs([0.9, 0.05, 0.05]), (rows, 1))
    history = np.tile(np.int32([0, 0, -1, -1]), (rows, 1))  # token 0 was generated twice
    pen = PenaltyMetadata(np.ones(rows, np.float32), np.zeros(rows, np.float32),
                          np.full(rows, 5.0, np.float32), history, np.zeros(rows, np.int32))
    out = run(logits, metadata(rows, temperature=1.0, top_k=2, penalties=pen))
    assert set(out.tokens.tolist()) == {1, 2}  # token 0 went from 0.9 to ~1e-5, then top-k cut it
    np.testing.assert_allclose(out.logprobs, np.log(0.05), rtol=1e-4)  # the model's, raw


def test_same_seed_and_step_give_the_same_token_whatever_the_batch():
    logits = random_logits(1, seed=9, scale=0.5)[0]
    seed, steps = 12345, [0, 1, 2, 3, 7]
    alone = [run(logits[None], metadata(1, temperature=1.0, seeds=[seed], steps=s), pad=False,
                 mode=SamplerMode(random=True)).tokens[0]
             for s in steps]  # alone, in a batch of 1 row, and without logprobs
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


# --- Modes --------------------------------------------------------------------------------------

def test_random_mode_without_logprobs_draws_the_same_and_keeps_greedy_rows_greedy():
    logits = random_logits(16, seed=14, scale=0.3)
    md = metadata(16, temperature=np.tile(np.float32([0.0, 2.0]), 8), top_k=6, top_p=0.9,
                  seeds=np.arange(16) * 3)
    out = run(logits, md, mode=mode_for(md, logprobs=False))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
    np.testing.assert_array_equal(out.tokens, run(logits, md).tokens)
    np.testing.assert_array_equal(out.tokens[::2], logits[::2].argmax(-1))
    assert not np.array_equal(out.tokens[1::2], logits[1::2].argmax(-1))


def test_mode_is_hashable_from_numpy_bools_and_must_match_the_metadata():
    mode = SamplerMode.of(random=np.bool_(True), logprobs=np.any([0, 1]), penalties=False)
    assert mode == SamplerMode(random=True, logprobs=True) and isinstance(hash(mode), int)
    with pytest.raises(ValueError, match="penalties"):
        sample(np.zeros((2, VOCAB), np.float32), metadata(2), SamplerMode(penalties=True), 5)


# --- The filters against a numpy reference ------------------------------------------------------

def softmax64(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def reference_keep(row, temperature, top_k, top_p, min_p, slack=0):
    """vLLM's filters on one row by a full sort -> [V] bool, the tokens that stay finite.
    Temperature in float32 as the sampler does (the same ties), the rest in float64: min-p, then
    top-k (ties with the k-th kept), then top-p as vLLM (sorted ascending, cut while the cumsum
    <= 1 - top_p, the top token kept), with ties of the last kept value kept. slack +1 / -1
    moves the boundaries of min-p and top-p, when on, by float32 rounding: more / fewer kept."""
    vocab = row.shape[0]
    scaled = np.float32(row) * (np.float32(1) / np.float32(temperature))
    keep = scaled > -np.inf
    if min_p > 0:  # prob / max prob = exp(x - max) >= min_p
        top, floor = np.float64(scaled.max()), np.log(np.float64(min_p))
        if floor < 0:  # the sampler's max + log(min_p): rounded log, rounded sum
            floor = min(floor - slack * (5e-7 * -floor + 1.2e-7 * abs(top + floor)), 0.0)
        keep &= scaled - top >= floor
    if 0 < top_k < vocab:
        kth = np.sort(np.where(keep, scaled, -np.inf))[vocab - top_k]
        keep &= scaled >= kth
    if top_p < 1:
        masked = np.where(keep, scaled, -np.inf)
        order = np.argsort(masked, kind="stable")
        cut = np.cumsum(softmax64(masked)[order]) <= 1 - top_p - slack * 1e-5
        cut[-1] = False
        keep &= scaled >= masked[order][~cut].min()
    return keep


def reference_cases(vocab, rows, rng):
    """Rows of logits of many kinds with random filter settings, each filter on and off."""
    def one_hot(scale):
        return np.eye(vocab)[rng.integers(vocab)] * scale

    kinds = [lambda x: x, lambda x: np.round(x * 2) / 2,  # normal; ties
             lambda x: x + one_hot(60.0),  # peaked
             lambda x: np.full(vocab, x[0]), lambda x: 1.5 + x * 1e-7,  # flat; nearly flat
             lambda x: np.where((rng.random(vocab) < 0.3) & (x != x[0]), -np.inf, x),  # banned
             lambda x: x * 1e-30,  # around +-0 (not subnormal: XLA flushes those to zero)
             lambda x: rng.integers(-2, 2, vocab)]  # few distinct values
    logits = np.stack([kinds[r % len(kinds)](rng.standard_normal(vocab)
                                             * rng.choice([0.1, 1.0, 4.0, 30.0]))
                       for r in range(rows)]).astype(np.float32)

    def pick(on, off):
        return np.where(rng.random(rows) < 0.35, off, on)

    temperature = np.exp(rng.uniform(np.log(0.05), np.log(20.0), rows)).astype(np.float32)
    temperature[rng.random(rows) < 0.2] = 1.0
    top_k = pick(rng.integers(1, vocab + 1, rows), np.where(rng.random(rows) < 0.5, 0, vocab + 3))
    top_p = pick(rng.choice([rng.uniform(0.01, 1.0), 1e-3, 0.999], rows), 1.0)
    min_p = pick(rng.uniform(0, 1, rows) ** 2, 0.0)
    min_p[rng.random(rows) < 0.05] = 1.0
    return logits, metadata(rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


_filtered_logits = jax.jit(filtered_logits)


@pytest.mark.parametrize("vocab", [1, 2, 3, 8, 33, 128, 301])
def test_filtered_logits_keep_exactly_the_reference_set(vocab):
    rows = 400
    rng = np.random.default_rng(100 + vocab)
    logits, md = reference_cases(vocab, rows, rng)
    got = np.asarray(_filtered_logits(logits, md))
    scaled = logits * (np.float32(1) / md.temperature[:, None])
    kept = got > -np.inf
    np.testing.assert_array_equal(got[kept], scaled[kept])  # kept tokens are scaled, untouched
    # A boundary within float32 rounding of top_p or min_p (sums in another order, log) may
    # fall either way: such a row keeps either side's set, and must be rare.
    ambiguous = 0
    for r in range(rows):
        args = logits[r], md.temperature[r], md.top_k[r], md.top_p[r], md.min_p[r]
        tight, loose = reference_keep(*args, slack=-1), reference_keep(*args, slack=1)
        if np.array_equal(tight, loose):
            np.testing.assert_array_equal(kept[r], reference_keep(*args), err_msg=f"row {r}")
        else:
            ambiguous += 1
            assert np.all(kept[r] >= tight) and np.all(kept[r] <= loose), f"row {r}"
    assert ambiguous <= rows // 100
    if vocab > 1:  # and the filters did cut: most rows lose tokens
        assert np.mean(kept.sum(-1) < np.isfinite(logits).sum(-1)) > 0.5


def test_filters_that_are_off_change_nothing():
    """Whole-row float32 masses round (a 1e-30 tail vanishes): off filters must not use them."""
    rows = np.float32([[2, -1.2, 3.6, -2.6, -1.3, 1.9, 0.1, 4],
                       [10, 0, -5, -20, -60, -100, -300, -1e4],
                       [0, 0, 0, 0, 0, 0, 0, 0]])
    for top_k in (0, 8, 9, 1000):
        md = metadata(3, temperature=np.float32([1.0, 0.3, 7.0]), top_k=top_k)
        np.testing.assert_array_equal(np.asarray(_filtered_logits(rows, md)),
                                      rows * (np.float32(1) / md.temperature[:, None]))


def test_top_k_alone_draws_only_the_top_k():
    """The issue: top_k 2 alone (top_p 1, min_p 0) kept the cut tokens, one draw in seven."""
    rows = 2048
    logits = np.tile(np.float32([2, -1.2, 3.6, -2.6, -1.3, 1.9, 0.1, 4]), (rows, 1))
    md = metadata(rows, temperature=1.0, top_k=2, seeds=np.arange(rows))
    tokens = run(logits, md, pad=False).tokens
    assert set(tokens.tolist()) == {7, 2}
    kept = np.asarray(_filtered_logits(logits[:1], metadata(1, top_k=2)))[0] > -np.inf
    np.testing.assert_array_equal(np.flatnonzero(kept), [2, 7])


# Chi-square critical values at p = 0.001, by degrees of freedom (scipy.stats.chi2.ppf(0.999)).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12,
            9: 27.88, 10: 29.59, 11: 31.26}


def chi_square(counts, probs):
    """Pearson's statistic of counts [V] against probs [V]; tokens of probability 0 are not drawn."""
    assert np.all(counts[probs == 0] == 0)
    expected = probs[probs > 0] * counts.sum()
    return float(((counts[probs > 0] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 0.9, 0.05), (1.3, 0, 0.8, 0.0), (1.0, 3, 1.0, 0.0),
    (2.0, 0, 1.0, 0.1), (0.5, 7, 0.95, 0.0)])
def test_draws_follow_the_reference_distribution(temperature, top_k, top_p, min_p):
    draws, vocab = 4096, 12
    row = np.random.default_rng(16).standard_normal(vocab).astype(np.float32) * 1.5
    md = metadata(draws, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  seeds=np.random.default_rng(17).integers(0, 2**32, draws, dtype=np.uint64),
                  steps=np.arange(draws) % 5)
    tokens = run(np.tile(row, (draws, 1)), md, pad=False, mode=mode_for(md, logprobs=False)).tokens
    counts = np.bincount(tokens, minlength=vocab)
    keep = reference_keep(row, temperature, top_k, top_p, min_p)

    def distribution(t):
        probs = np.where(keep, softmax64(np.float32(row) / np.float32(t)), 0.0)
        return probs / probs.sum()

    probs = distribution(temperature)
    critical = CHI2_999[int(keep.sum()) - 1]
    assert chi_square(counts, probs) < critical
    # The test has the power to see a wrong distribution over the same tokens: a fifth of the
    # mass spread evenly, or the temperature off by a quarter.
    assert chi_square(counts, 0.8 * probs + 0.2 * keep / keep.sum()) > critical
    assert chi_square(counts, distribution(temperature * 1.25)) > critical


# --- The search itself and the compiled graph ---------------------------------------------------

def test_order_keys_sort_like_the_floats():
    rng = np.random.default_rng(18)
    x = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-37, 38, 500),
                        [0.0, -0.0, np.inf, -np.inf, 1.2e-38, -1.2e-38, 3.4e38, -3.4e38]])
    x = x.astype(np.float32)
    keys = np.asarray(_order_keys(x)).astype(np.int64)
    a, b = np.meshgrid(np.arange(x.size), np.arange(x.size))
    np.testing.assert_array_equal(keys[a] < keys[b], x[a] < x[b])
    np.testing.assert_array_equal(keys[a] == keys[b], x[a] == x[b])


@pytest.mark.parametrize("logprobs", [False, True])
@pytest.mark.parametrize("penalties", [False, True])
def test_random_mode_never_sorts_the_vocabulary(logprobs, penalties):
    rows, vocab = 4, 1000
    zeros = np.zeros(rows, np.float32)
    pen = PenaltyMetadata(zeros + 1, zeros, zeros, np.zeros((rows, 8), np.int32),
                          np.zeros(rows, np.int32)) if penalties else None
    md = metadata(rows, top_k=5, top_p=0.9, min_p=0.1, penalties=pen)
    mode = SamplerMode(random=True, logprobs=logprobs, penalties=penalties)
    logits = np.zeros((rows, vocab), np.float32)
    jaxpr = str(jax.make_jaxpr(lambda x, m: sample(x, m, mode, MAX_LOGPROBS))(logits, md))
    assert not re.search(r"\b(sort|while|cond|scan)\[", jaxpr)  # nested jaxprs print inline
    assert re.findall(r"\btop_k\[[^\]]*?k=(\d+)", jaxpr) == [str(MAX_LOGPROBS)] * logprobs
    lowered = jax.jit(sample, static_argnums=(2, 3)).lower(logits, md, mode, MAX_LOGPROBS)
    assert "stablehlo.sort" not in lowered.as_text()
    assert not re.search(r"\bsort\(", lowered.compile().as_text())

