"""Sampling on device, inside the compiled step: penalties, min_tokens, temperature, min-p,
top-k, top-p, per-request seeds and logprobs. R is the number of sampled rows, V the vocabulary.

The path of one step (vLLM V1's order):
  raw logits -> logprobs (log_softmax of the raw logits, only when some row asked for them)
  -> penalties -> banned ids (-inf) -> greedy rows: argmax
  -> random rows: / temperature -> min-p -> top-k -> top-p (over what min-p and top-k kept)
  -> one categorical draw per row; a row verifying a proposed token (speculative decoding)
  keeps it or draws from the residual instead (jaxserve/sample/spec_sampling.py). Greedy rows verify by
  their argmax alone: a proposal is kept iff it equals it.

The filters never sort the vocabulary. Each keeps an upper set of the row's values, so each is
a per-row threshold, found exactly by a multi-way search over an order-preserving int32 encoding
of the float32 values: FANOUT candidate thresholds per pass, each pass one read of [R, V], so
SEARCH_PASSES passes pin any threshold to one float32 value. top-k counts values at or above a
candidate; top-p sums their exp(x - max). Random mode reads [R, V] 2 + 2 * SEARCH_PASSES times
(18): one pass for the argmax and the maximum, 8 for top-k, 8 for top-p, one for the draw.
Logprobs add three (maximum, sum of exp, lax.top_k with k = max_logprobs).

Each row's random key is derived from (the request's seed, the index of the token being
sampled), so a seeded request gives the same text whatever else is in the batch.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxserve.sample.spec_sampling import verify_proposals


@dataclasses.dataclass(frozen=True)
class SamplerMode:
    """What this step's batch needs, chosen on the host: each mode compiles its own variant, so a
    batch of greedy rows without logprobs runs an argmax and nothing else."""
    random: bool = False  # some row has temperature > 0; else no filters and no RNG
    logprobs: bool = False  # some row asked for logprobs; else the output's logprob fields are None
    penalties: bool = False  # some row has a penalty; SamplingMetadata.penalties is set iff this is
    # Some random row verifies a proposed token (speculative decoding, jaxserve/sample/spec_sampling.py);
    # SamplingMetadata.draft_ids is set iff this is.
    spec: bool = False

    @classmethod
    def of(cls, *, random, logprobs, penalties, spec=False) -> "SamplerMode":
        """From anything truthy (numpy bools included), so the mode stays hashable."""
        return cls(random=bool(random), logprobs=bool(logprobs), penalties=bool(penalties),
                   spec=bool(spec))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_k", "top_p", "min_p", "seeds", "steps",
                                "banned_ids", "penalties", "draft_ids"],
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
    # [R] int32: the proposed token each row verifies, -1 for none; None: no row verifies.
    draft_ids: jax.Array | None = None


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
    # The rest are None unless SamplerMode.logprobs: log_softmax of the raw logits (before
    # penalties, banning and temperature), as vLLM reports them.
    logprobs: jax.Array | None  # [R] f32, the sampled token's
    top_ids: jax.Array | None  # [R, max_logprobs] int32
    top_logprobs: jax.Array | None  # [R, max_logprobs] f32


def apply_penalties(logits: jax.Array, p: PenaltyMetadata) -> jax.Array:
    """logits [R, V] -> [R, V]. Repetition (HF: divide positive, multiply negative logits of seen
    tokens), then presence and frequency (OpenAI: subtract per output occurrence)."""
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


FANOUT = 16  # candidate thresholds per pass: each pass cuts a row's search interval 16-fold


def _passes_to_one(width: int) -> int:
    """Passes of FANOUT-way search that shrink an interval of `width` keys to one key."""
    passes = 0
    while width > 1:
        width, passes = -(-width // FANOUT), passes + 1
    return passes


# Every search interval lies within [key(-inf), key(+inf)] (+1 for the exclusive end).
_KEY_SPAN = 2 * 0x7F800000 + 2
SEARCH_PASSES = _passes_to_one(_KEY_SPAN)  # 8


def _order_keys(x: jax.Array) -> jax.Array:
    """f32 [...] -> int32 [...] with key(a) < key(b) iff a < b (NaN aside). Negative floats
    order backwards as bit patterns: flipping their magnitude bits turns them around."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    keys = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return jnp.where(x == 0, 0, keys)  # -0.0 == 0.0, so they must share a key


def _search(lo: jax.Array, end: jax.Array, holds) -> jax.Array:
    """The largest key t in [lo, end) with holds(t), per row, for a predicate that is true at lo
    and non-increasing in t (true on a prefix of the interval).

    lo, end: [R] int32. holds(thresholds [R, F] int32, pass index) -> [R, F] bool, computed in one
    read of [R, V]. Returns [R] int32. Always SEARCH_PASSES passes: the graph stays static and
    the answer exact whatever the row.
    """
    # Widths reach 2**32 - 1, past int32: they live in uint32, and keys wrap back into int32.
    width = jax.lax.bitcast_convert_type(end - lo, jnp.uint32)
    j = jnp.arange(FANOUT, dtype=jnp.uint32)[None, :]
    for i in range(SEARCH_PASSES):
        step = width // FANOUT + (width % FANOUT != 0).astype(jnp.uint32)  # ceil
        offsets = j * step[:, None]  # [R, F]: j = 0 is lo itself, known to hold
        thresholds = lo[:, None] + jax.lax.bitcast_convert_type(offsets, jnp.int32)
        valid = offsets < width[:, None]
        n = jnp.sum(valid[:, 1:] & holds(thresholds, i)[:, 1:], axis=-1).astype(jnp.uint32)
        lo = lo + jax.lax.bitcast_convert_type(n * step, jnp.int32)
        width = jnp.minimum(width - n * step, step)
    return lo


def filtered_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """logits [R, V] f32 -> [R, V] f32: logits / temperature (1 for greedy rows), with every token
    that min-p, top-k or top-p drops set to -inf.

    min-p keeps tokens with prob >= min_p * max prob, as x >= max + log(min_p). top-k keeps the
    k largest of those, and every token tied with the k-th. top-p then keeps, over the
    distribution renormalized on what is left and in descending order, each token whose mass
    strictly before it is < top_p (ties with the last one kept are kept; the top token always
    is). A filter that is off (top_k 0 or >= V, top_p >= 1, min_p <= 0) changes nothing: its
    test is made to hold for every token rather than compared against float32 masses of the
    whole row, which round (top_p 1 against them cuts the tail).
    """
    vocab = logits.shape[-1]
    # One reciprocal per row, then a product: what XLA makes of the division anyway, written out
    # so that every back end (and the tests' reference) rounds the same scaled values.
    inv_temp = 1.0 / jnp.where(md.temperature > 0, md.temperature, 1.0)[:, None]
    scaled = logits * inv_temp
    top = jnp.max(scaled, axis=-1, keepdims=True)  # pass 1 (beside the greedy argmax)
    # min-p as a bound on the scaled logits rather than on exp(scaled - top): XLA contracts
    # x * inv_temp - top into one fma, whose unrounded product can put the top token itself
    # below min_p 1. Only comparisons of rounded values decide what stays.
    min_p = md.min_p[:, None]
    floor = jnp.where(min_p > 0, top + jnp.log(min_p), -jnp.inf)
    scaled = jnp.where(scaled >= floor, scaled, -jnp.inf)
    relative = jnp.exp(scaled - top)  # [R, V], unnormalized probabilities: 0 where dropped
    keys = _order_keys(scaled)
    low = jnp.full(keys.shape[:1], _order_keys(jnp.float32(-jnp.inf)), jnp.int32)
    end = _order_keys(top[:, 0]) + 1

    # top-k: the k-th largest value is the largest t with k values at or above it. Off is k = V,
    # which holds down to the row's minimum, so nothing is dropped.
    k = jnp.where((md.top_k > 0) & (md.top_k < vocab), md.top_k, vocab)[:, None]

    def k_above(t, _):
        return jnp.sum(keys[:, None, :] >= t[:, :, None], axis=-1, dtype=jnp.int32) >= k

    kth = _search(low, end, k_above)

    # top-p: a value v stays iff mass(> v) < top_p * Z, so the threshold is the largest t with
    # mass(>= t) >= top_p * Z, Z the mass top-k kept: the first pass measures it at t = kth.
    top_p = md.top_p[:, None]
    z = None

    def p_above(t, i):
        nonlocal z
        mass = jnp.sum(jnp.where(keys[:, None, :] >= t[:, :, None], relative[:, None, :], 0.0),
                       axis=-1)
        if i == 0:
            z = mass[:, :1]  # the first pass's t[:, 0] is kth
        return mass >= jnp.where(top_p < 1, top_p * z, jnp.inf)

    threshold = _search(kth, end, p_above)
    return jnp.where(keys >= threshold[:, None], scaled, -jnp.inf)


def sample(logits: jax.Array, md: SamplingMetadata, mode: SamplerMode,
           max_logprobs: int) -> SamplerOutput:
    """logits [R, V] f32 -> one token per row and, in logprobs mode, its logprob under the raw
    logits with the top max_logprobs. Pure; jit it with mode and max_logprobs static."""
    if mode.penalties != (md.penalties is not None):
        raise ValueError(f"mode.penalties is {mode.penalties} but SamplingMetadata.penalties is "
                         f"{'set' if md.penalties is not None else 'None'}")
    raw = logits
    if md.penalties is not None:
        logits = apply_penalties(logits, md.penalties)
    banned = md.banned_ids
    row = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[row, jnp.where(banned >= 0, banned, logits.shape[1])].set(-jnp.inf, mode="drop")
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode.random:
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(md.seeds, md.steps)
        target = filtered_logits(logits, md)
        drawn = jax.vmap(jax.random.categorical)(keys, target).astype(jnp.int32)
        if md.draft_ids is not None:  # kept proposals, or draws from the residual
            drawn = verify_proposals(keys, target, md.draft_ids, drawn)
        tokens = jnp.where(md.temperature > 0, drawn.astype(jnp.int32), tokens)
    if not mode.logprobs:
        return SamplerOutput(tokens, None, None, None)
    # log_softmax's own arithmetic, (x - max) - log(sum), applied only where it is read: top-k
    # of the raw logits then gives the same values without writing [R, V] log-probabilities.
    peak = jnp.max(raw, axis=-1, keepdims=True)
    log_z = jnp.log(jnp.sum(jnp.exp(raw - peak), axis=-1, keepdims=True))
    top_raw, top_ids = jax.lax.top_k(raw, max_logprobs)
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)
    return SamplerOutput(tokens, ((chosen - peak) - log_z)[:, 0], top_ids.astype(jnp.int32),
                         (top_raw - peak) - log_z)
