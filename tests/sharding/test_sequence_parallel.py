"""Sequence parallelism: a long prompt scheduled whole is prefilled with ring attention over the
sequence axis (its K/V still written to the paged cache), decode continues on the paged cache;
greedy tokens and the prompt's last logits equal sequence parallel 1's."""

import numpy as np
import pytest

from tests.sharding.conftest import assert_close, engine_for, greedy, last_position_logits

# Prompts of >= 64 tokens scheduled whole (budget 128) take the ring path.
LIMITS = dict(max_num_batched_tokens=128, sequence_parallel_threshold=64)
RNG = np.random.default_rng(7)
LONG = RNG.integers(0, 256, 100).tolist()
SHORT = RNG.integers(0, 256, 9).tolist()


@pytest.fixture(scope="module")
def reference():
    engine = engine_for("llama3", **LIMITS)
    return greedy(engine, [LONG, SHORT], 8), last_position_logits(engine, LONG)


@pytest.mark.parametrize("sequence", [2, 4])
def test_ring_prefill_equals_sequence_parallel_1(sequence, reference):
    engine = engine_for("llama3", sequence_parallel=sequence, **LIMITS)
    assert engine.runner.ring_buckets == [64, 128]
    # The long prompt and a short one in the same step: the long one runs as its own ring
    # prefill, the short one in the ragged batch; then both decode on the paged cache.
    assert greedy(engine, [LONG, SHORT], 8) == reference[0]
    assert ("ring", 128, 8) in engine.runner.compiled
    assert_close(last_position_logits(engine, LONG, ring=True), reference[1], rtol=1e-5)


def test_short_or_chunked_prompts_skip_the_ring():
    engine = engine_for("llama3", sequence_parallel=2, **LIMITS)
    runner = engine.runner
    from jaxserve.request import Sequence
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.core.scheduler import ScheduledSeq
    seq = Sequence(0, "r", 0, list(LONG), SamplingParams(), 0, 0.0)
    assert runner._ring_eligible(ScheduledSeq(seq, 0, 100, True))
    assert not runner._ring_eligible(ScheduledSeq(seq, 0, 50, False))  # a chunk
    assert not runner._ring_eligible(ScheduledSeq(seq, 32, 68, True))  # after a cached prefix
    short = Sequence(1, "s", 0, list(SHORT), SamplingParams(), 0, 0.0)
    assert not runner._ring_eligible(ScheduledSeq(short, 0, 9, True))  # below the threshold
