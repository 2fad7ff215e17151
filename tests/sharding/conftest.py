"""Shared pieces of the sharding tests: one engine per (fixture, parallelism), kept for the session
so that the greedy, logits and HLO tests of one mesh compile it once; greedy runs; the logits at a
prompt's last position through the runner's own compiled forward; collective counts in HLO text.
"""

import json
import re

import jax
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.request import Sequence
from jaxserve.worker.buckets import pick_bucket
from jaxserve.core.scheduler import ScheduledSeq
from jaxserve.worker.step_inputs import build_step
from tests.conftest import build_engine, fixture_path, run_to_completion

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def need_devices(n: int) -> None:
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, have {jax.device_count()}: run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")


def golden(name: str) -> dict:
    with open(fixture_path(name) + "/golden.json") as f:
        return json.load(f)


_ENGINES: dict[tuple, object] = {}


def engine_for(fixture: str, **overrides):
    """A session-wide engine per (fixture, overrides); parallelism counts are among overrides."""
    key = (fixture, tuple(sorted(overrides.items())))
    if key not in _ENGINES:
        devices = 1
        for axis in ("tensor_parallel", "data_parallel", "sequence_parallel", "expert_parallel"):
            devices *= overrides.get(axis, 1)
        need_devices(devices)
        _ENGINES[key] = build_engine(fixture, **overrides)
    return _ENGINES[key]


def greedy(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outs = run_to_completion(engine)
    return [outs[i].outputs[0].token_ids for i in ids]


def last_position_logits(engine, prompt: list[int], ring: bool = False) -> np.ndarray:
    """Logits [V] after the whole prompt, prefilled through the engine's compiled forward (in
    chunks of its largest token bucket, or in one ring-attention prefill) into KV blocks taken
    from (and given back to) the engine's free list. Call it only while no request runs."""
    assert not engine.has_unfinished_requests
    runner, c = engine.runner, engine.config
    n = len(prompt)
    seq = Sequence(-1, "logits", 0, list(prompt), SamplingParams(), 0, 0.0)
    assert engine.kv_cache.allocate(seq, n)
    runner.batch.assign(seq)
    runner.batch.sync_block_table(seq)
    runner._table_updates(*runner.batch.take_table_updates())
    S = runner.seq_buckets[0]
    chunk = runner.ring_buckets[-1] if ring else runner.token_buckets[-1]
    if ring:
        assert n >= c.sequence_parallel_threshold and n <= chunk
    kinds = ("forward", "ring", "decode")
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        T = pick_bucket(runner.ring_buckets if ring else runner.token_buckets, max(end - start, S))
        step = build_step([ScheduledSeq(seq, start, end - start, end == n)], runner.batch, T, S)
        runner._apply((3, kinds.index("ring" if ring else "forward"), T, S),
                      (step.token_data, step.seq_data))
    hidden = runner._forward_out[0]
    runner._forward_out = None
    runner.batch.release(seq)
    engine.kv_cache.free(seq)
    head = runner.head.T if runner.tied else runner.head
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(lambda h, w: h @ w)(hidden, head))[0]


def assert_close(actual, expected, rtol=1e-5):
    """Equal within rtol of the largest magnitude (f32 sums in another order differ ~1e-7)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the compiled HLO text holds (async -start forms too)."""
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo_text)) for op in COLLECTIVES}
