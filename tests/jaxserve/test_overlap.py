"""The overlapped loop (EngineConfig.async_scheduling, jaxserve/engine/engine.py) against the synchronous
one, which reads each step back before scheduling the next and is the reference here.

The overlapped loop schedules step N+1 while step N's tokens are still on the device, so a
sequence that a stop condition ends when N is read was already in N+1: its token from N+1 must
be dropped, and its KV blocks freed only once N+1 has been read. These tests check that

- outputs (tokens, finish and stop reasons, logprobs) equal the synchronous loop's on the golden
  fixture prompts and random ones, under small chunks, the prefix cache, and preemption by
  recompute and by swap, with n > 1, seeds, penalties and min_tokens;
- requests aborted at random steps leave the survivors unchanged and nothing behind;
- stop tokens, max_tokens and stop strings that end a sequence while the next step is in flight
  end it exactly where the synchronous loop does, and no dropped token is ever streamed or
  counted;
- no step dispatched while an earlier one is in flight writes a KV block that the earlier one
  reads for a sequence that has since finished;
- no block, batch slot or reference count is leaked by a random run;
- blocks waiting for the step in flight, and a preemption in a step that is not dispatched,
  change nothing for the requests around them, and the LLM front returns with the engine idle
  (regression tests for the bugs marked Regression below).
"""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.model_io.default_model import builtin_model_dir
from tests.conftest import build_engine, fixture_path

with open(os.path.join(fixture_path("llama3"), "golden.json")) as f:
    GOLDEN = json.load(f)
GOLDEN_PROMPTS = GOLDEN["prompts"]  # lengths 1, 7, 33, 70
GOLDEN_GREEDY = GOLDEN["greedy_tokens"]  # 12 tokens each
GREEDY_12 = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

# EngineConfig overrides of each engine pair (async, sync). Every pair keeps the shapes of
# conftest's build_engine (8 sequences, 256 tokens, blocks of 8), so compiled steps are shared.
CONFIGS = {
    "small_chunks": dict(max_num_batched_tokens=16, enable_prefix_caching=False),
    "prefix_cache": dict(enable_prefix_caching=True),
    # 32 blocks of 8 tokens hold one max_model_len sequence: the workload preempts.
    "recompute": dict(num_kv_blocks=32),
    "swap": dict(num_kv_blocks=32, preemption_mode="swap", swap_space_gib=0.01),
}


@pytest.fixture(scope="module")
def pairs():
    """pairs(name) -> (async engine, sync engine) of CONFIGS[name], built once per module."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = tuple(build_engine("llama3", async_scheduling=a, **CONFIGS[name])
                                for a in (True, False))
            assert built[name][0].async_scheduling and not built[name][1].async_scheduling
        return built[name]
    return get


# ----- driving an engine and checking what it streamed ----------------------------------------

def drive(engine, events, max_steps=3000):
    """Runs a schedule of events to completion and returns the final output of every request.

    events: {step index: [("add", request_id, prompt, params) | ("abort", request_id)]}, applied
    before that step. Checks on the way, for every request: one final output, whole, after
    outputs that are deltas; the deltas' tokens (and text) concatenated are a prefix of the final
    output's, which adds at most one token per sample; engine.num_generated_tokens grows by the
    number of tokens the final outputs hold (dropped tokens never count).
    """
    finals, tokens, texts = {}, collections.defaultdict(list), collections.defaultdict(str)
    generated_before = engine.num_generated_tokens
    last_event = max(events, default=-1)

    def take(out):
        assert out.request_id not in finals, f"output after the final one: {out.request_id}"
        if not out.finished:
            assert out.delta
            for c in out.outputs:
                tokens[out.request_id, c.index] += c.token_ids
                texts[out.request_id, c.index] += c.text
                if c.logprobs is not None:
                    assert len(c.logprobs) == len(c.token_ids)
            return
        assert not out.delta
        finals[out.request_id] = out
        for c in out.outputs:
            sent = tokens[out.request_id, c.index]
            assert c.token_ids[:len(sent)] == sent, (out.request_id, c.index, sent, c.token_ids)
            assert len(c.token_ids) - len(sent) <= 1, (out.request_id, c.index)
            assert c.text.startswith(texts[out.request_id, c.index]), (out.request_id, c.index)
            assert c.finish_reason in ("stop", "length", "abort"), c.finish_reason

    for step in range(max_steps):
        for event in events.get(step, ()):
            if event[0] == "add":
                engine.add_request(event[2], event[3], request_id=event[1])
            else:
                out = engine.abort(event[1])
                if out is not None:
                    take(out)
        if step > last_event and not engine.has_unfinished_requests:
            break
        for out in engine.step():
            take(out)
    else:
        raise AssertionError("engine did not finish within max_steps")
    emitted = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    assert engine.num_generated_tokens - generated_before == emitted
    return finals


def assert_idle_and_clean(engine):
    """Nothing left: no request, no step in flight; every KV block, batch slot, host slot free."""
    assert not engine.has_unfinished_requests
    assert not engine.requests
    assert not engine.scheduler.running and not engine.scheduler.waiting
    kv = engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.ref_counts == [0] * kv.num_blocks
    assert engine.runner.batch.num_free_slots == engine.config.max_num_seqs
    assert engine.scheduler.num_free_swap_slots == engine.scheduler.swap.num_slots


def assert_same_outputs(got, want, rids=None):
    """Per sample: token ids, finish reason, stop reason; logprobs to float32 rounding."""
    rids = sorted(want) if rids is None else rids
    for rid in rids:
        assert len(got[rid].outputs) == len(want[rid].outputs), rid
        for g, w in zip(got[rid].outputs, want[rid].outputs):
            where = (rid, g.index)
            assert g.token_ids == w.token_ids, where
            assert (g.finish_reason, g.stop_reason) == (w.finish_reason, w.stop_reason), where
            assert g.text == w.text, where
            assert len(g.logprobs or []) == len(w.logprobs or []), where
            assert (g.logprobs is None) == (w.logprobs is None), where
            for lg, lw in zip(g.logprobs or [], w.logprobs or []):
                assert list(lg) == list(lw), where
                assert list(lg.values()) == pytest.approx(list(lw.values()), abs=1e-4), where


def assert_prefix_consistent(a, b, rid):
    """One engine's output of a request cut short (aborted) continues the other's: per sample,
    the shorter token list is a prefix of the longer one."""
    for ca, cb in zip(a.outputs, b.outputs):
        short, long_ = sorted((ca.token_ids, cb.token_ids), key=len)
        assert long_[:len(short)] == short, (rid, ca.index)
        if len(ca.token_ids) == len(cb.token_ids) and "abort" not in (ca.finish_reason,
                                                                      cb.finish_reason):
            assert ca.finish_reason == cb.finish_reason, (rid, ca.index)


# ----- 1. the same outputs as the synchronous loop --------------------------------------------

def _mixed_workload():
    """(request id, prompt, params, arrival step): the golden prompts (greedy, 12 tokens) and
    random prompts, some sharing a 48-token prefix with golden prompt 3, over a mix of params."""
    rng = np.random.default_rng(2024)
    shared = GOLDEN_PROMPTS[3][:48]  # 6 full blocks
    prompts = [[1] + rng.integers(3, 256, size=n).tolist() for n in (5, 20, 50, 90, 12)]
    prompts += [shared + rng.integers(3, 256, size=n).tolist() for n in (3, 17, 30)]
    prompts += [GOLDEN_PROMPTS[2], GOLDEN_PROMPTS[1] + [9, 10, 11], GOLDEN_PROMPTS[3][:20]]
    stop_ids = tuple(range(40, 56))  # 16 ids: a seeded sample hits one in a few tokens
    variants = [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, seed=12, max_tokens=7, n=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=10, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=30, seed=13, max_tokens=12, n=3,
                       logprobs=2),
        SamplingParams(temperature=0.8, seed=14, max_tokens=16, repetition_penalty=1.3,
                       presence_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=11, repetition_penalty=1.2, n=2),
        SamplingParams(temperature=1.0, seed=15, max_tokens=12, min_tokens=6,
                       stop_token_ids=stop_ids),
        SamplingParams(temperature=0.8, seed=16, max_tokens=1, logprobs=0),
        SamplingParams(temperature=1.0, seed=17, max_tokens=20, stop_token_ids=stop_ids, n=2),
        # Negative penalties make greedy repeat its outputs, the last (pending) one included.
        SamplingParams(temperature=0.0, max_tokens=10, presence_penalty=-2.0,
                       frequency_penalty=-0.5, ignore_eos=True),
    ]
    work = [(f"golden{i}", p, GREEDY_12, 0) for i, p in enumerate(GOLDEN_PROMPTS)]
    work += [(f"r{i}", p, variants[i % len(variants)], i // 2) for i, p in enumerate(prompts)]
    # Up to max_model_len (256): ends with "length" after 11 tokens, no max_tokens.
    work.append(("to_max_len", [1] + rng.integers(3, 256, size=244).tolist(),
                 SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True), 3))
    return work


def _events(work):
    events = collections.defaultdict(list)
    for rid, prompt, params, step in work:
        events[step].append(("add", rid, prompt, params))
    return dict(events)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_async_equals_sync_on_a_mixed_workload(pairs, name):
    async_engine, sync_engine = pairs(name)
    work = _mixed_workload()
    got = drive(async_engine, _events(work))
    want = drive(sync_engine, _events(work))
    assert sorted(got) == sorted(want) == sorted(w[0] for w in work)
    assert_same_outputs(got, want)
    for i, tokens in enumerate(GOLDEN_GREEDY):
        assert got[f"golden{i}"].outputs[0].token_ids == tokens
    assert len(got["to_max_len"].outputs[0].token_ids) == 11
    # The workload stops some samples on a stop token, before max_tokens: in flight.
    reasons = {c.finish_reason for out in got.values() for c in out.outputs}
    assert reasons == {"stop", "length"}
    if name == "prefix_cache":  # again, now from the prefix cache: still the same outputs
        hits = async_engine.kv_cache.prefix_hits
        again = drive(async_engine, _events([(f"again-{r}", *rest) for r, *rest in work]))
        assert async_engine.kv_cache.prefix_hits > hits
        assert_same_outputs({r[len("again-"):]: o for r, o in again.items()}, want)
    if name in ("recompute", "swap"):
        assert async_engine.scheduler.num_preemptions > 0
        assert sync_engine.scheduler.num_preemptions > 0
    if name == "swap":
        assert async_engine.scheduler.num_swap_outs > 0
        assert sync_engine.scheduler.num_swap_outs > 0
    for engine in (async_engine, sync_engine):
        assert_idle_and_clean(engine)


# ----- 2. aborts at random steps --------------------------------------------------------------

def _abort_schedule(seed, num_requests=24):
    rng = np.random.default_rng(seed)
    events = collections.defaultdict(list)
    aborted = set()
    for i in range(num_requests):
        rid = f"a{i}"
        prompt = [1] + rng.integers(3, 256, size=int(rng.integers(1, 60))).tolist()
        params = SamplingParams(
            temperature=float(rng.choice([0.0, 0.9])), seed=int(rng.integers(1 << 20)),
            n=int(rng.choice([1, 1, 2, 3])), max_tokens=int(rng.integers(1, 24)),
            ignore_eos=True, logprobs=[None, 1][i % 2])
        arrival = int(rng.integers(0, 16))
        events[arrival].append(("add", rid, prompt, params))
        if rng.random() < 0.5:
            # An abort from before the request's prompt has run to after it may have finished.
            events[arrival + int(rng.integers(0, 14))].append(("abort", rid))
            aborted.add(rid)
    events[3].append(("abort", "no-such-request"))  # ignored
    events[20].append(("abort", "a0"))  # a second abort of a0, or a first after it finished
    aborted.add("a0")
    return dict(events), aborted


@pytest.mark.parametrize("name", ["prefix_cache", "recompute"])
def test_aborts_at_random_steps(pairs, name):
    async_engine, sync_engine = pairs(name)
    events, aborted = _abort_schedule(seed=5)
    got, want = drive(async_engine, events), drive(sync_engine, events)
    assert sorted(got) == sorted(want)
    survivors = [rid for rid in want if rid not in aborted]
    assert len(survivors) >= 8
    assert_same_outputs(got, want, survivors)
    num_cut = 0
    for rid in aborted & set(want):
        assert_prefix_consistent(got[rid], want[rid], rid)
        num_cut += any(c.finish_reason == "abort" for c in got[rid].outputs)
    assert num_cut >= 5  # most aborts hit a running request, not a finished one
    for engine in (async_engine, sync_engine):
        assert_idle_and_clean(engine)


def test_aborting_the_last_request_with_a_step_in_flight_leaves_the_engine_idle(pairs):
    engine, _ = pairs("prefix_cache")
    engine.add_request(GOLDEN_PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=50, n=2),
                       request_id="last")
    first = engine.step()  # dispatches the prefill; nothing read yet
    assert first == [] and engine.has_unfinished_requests
    engine.step()  # reads the prefill, dispatches the first decode
    out = engine.abort("last")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 2
    assert [len(c.token_ids) for c in out.outputs] == [1, 1]
    assert_idle_and_clean(engine)
    assert engine.step() == []


# ----- 3. stops found one step late -----------------------------------------------------------

def _cut(tokens, stop_token):
    """tokens up to and including the first stop_token."""
    return tokens[:tokens.index(stop_token) + 1] if stop_token in tokens else tokens


def test_stop_token_and_max_tokens_found_while_the_next_step_is_in_flight(pairs, monkeypatch):
    async_engine, sync_engine = pairs("prefix_cache")
    num_rows = []  # tokens read back per step, dropped ones included
    collect = async_engine.runner.collect
    monkeypatch.setattr(async_engine.runner, "collect",
                        lambda handle: num_rows.append(len(rows := collect(handle))) or rows)
    base = {
        "greedy": (GOLDEN_PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=16,
                                                      ignore_eos=True)),
        "seeded": (GOLDEN_PROMPTS[1], SamplingParams(temperature=0.9, seed=3, max_tokens=16,
                                                      ignore_eos=True, logprobs=1)),
        "n2": (GOLDEN_PROMPTS[3], SamplingParams(temperature=0.9, seed=8, max_tokens=16, n=2,
                                                  ignore_eos=True)),
    }
    # Keeps the engine stepping after the others are done.
    background = ([1, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    ref = drive(sync_engine, {0: [("add", rid, p, sp) for rid, (p, sp) in base.items()]})

    events = [("add", "background", *background)]
    expected = {}
    for first_k, (rid, (prompt, params)) in zip((2, 5, 9), base.items()):
        tokens = ref[rid].outputs[0].token_ids
        k = next(i for i in range(first_k, 16) if tokens[i] not in tokens[:i])  # its first time
        stop = tokens[k]
        events += [("add", f"{rid}-stop", prompt,
                    dataclasses.replace(params, stop_token_ids=(stop,))),
                   ("add", f"{rid}-len", prompt, dataclasses.replace(params, max_tokens=k + 1))]
        for c in ref[rid].outputs:
            cut = _cut(c.token_ids, stop)
            expected[f"{rid}-stop", c.index] = (cut, "stop" if stop in c.token_ids else "length",
                                                stop if stop in c.token_ids else None)
            expected[f"{rid}-len", c.index] = (c.token_ids[:k + 1], "length", None)
    got = drive(async_engine, {0: events})
    # Each "-stop" sample was in the next step when its stop token was read: a token dropped.
    num_stopped = sum(reason == "stop" for _, reason, _ in expected.values())
    emitted = sum(len(c.token_ids) for out in got.values() for c in out.outputs)
    assert sum(num_rows) - emitted == num_stopped >= 3
    for (rid, index), (tokens, reason, stop_reason) in expected.items():
        c = got[rid].outputs[index]
        assert c.token_ids == tokens, (rid, index)  # not one token past the stop
        assert (c.finish_reason, c.stop_reason) == (reason, stop_reason), (rid, index)
        if c.logprobs is not None:
            assert len(c.logprobs) == len(tokens)
    assert_idle_and_clean(async_engine)


# Regression (fails on 323db0b): the scheduler finishes the head of the
# waiting queue with "length" ("needs more KV blocks than the cache has") when nothing is running
# and it does not fit in the free blocks (Scheduler._reject_unfittable). In the overlapped loop the
# blocks of a sequence that ended on a stop token one step late are still held then, waiting for the
# step in flight (Engine._InFlight.deferred_free), so a request that fits once they are back is
# rejected: the synchronous loop serves it. (An abort while a step is in flight does the same.)
def test_a_waiting_request_is_not_rejected_while_blocks_wait_for_the_step_in_flight(pairs):
    async_engine, sync_engine = pairs("recompute")  # 32 blocks
    rng = np.random.default_rng(0)
    long_prompt = [1] + rng.integers(3, 256, size=194).tolist()  # 25 blocks
    next_prompt = [1] + rng.integers(3, 256, size=69).tolist()  # its first chunk of 64: 8
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = drive(sync_engine, {0: [("add", "ref", long_prompt, greedy)]})
    tokens = ref["ref"].outputs[0].token_ids
    k = next(i for i in range(2, 20) if tokens[i] not in tokens[:i])
    events = {0: [("add", "long", long_prompt,
                   dataclasses.replace(greedy, stop_token_ids=(tokens[k],)))],
              # Waits: the long one leaves 7 blocks free until it stops.
              1: [("add", "next", next_prompt, SamplingParams(temperature=0.0, max_tokens=5,
                                                              ignore_eos=True))]}
    want = drive(sync_engine, events)
    assert want["long"].outputs[0].token_ids == tokens[:k + 1]
    assert len(want["next"].outputs[0].token_ids) == 5
    got = drive(async_engine, events)
    assert_same_outputs(got, want)  # 323db0b: "next" ends with "length" and no tokens
    assert_idle_and_clean(async_engine)


def _tight_engine():
    """A fresh engine of 32 blocks (one max_model_len sequence), no prefix cache: which blocks
    it hands out depends only on what it ran."""
    return build_engine("llama3", num_kv_blocks=32, enable_prefix_caching=False)


def _long_and_next_prompts():
    rng = np.random.default_rng(0)
    long_prompt = [1] + rng.integers(3, 256, size=179).tolist()  # 180 tokens: 24 blocks at 188
    next_prompt = [1] + rng.integers(3, 256, size=107).tolist()  # 108 tokens: 14 blocks
    return long_prompt, next_prompt


# Regression (fails on 323db0b): a sequence preempted in a step that ends up
# empty keeps its batch slot, and comes back with a stale block-table row. Here the long request's
# last token is pending (Scheduler._at_length_limit skips it: nothing to run for it) while the next
# one, half prefilled, needs blocks: it preempts itself, so nothing is scheduled and the engine does
# not dispatch the step (SchedulerOutput.is_empty). The runner releases the slots of preempted
# sequences only in execute(), so the victim keeps its slot; when readmitted, InputBatch.assign
# returns early (slot >= 0) and sync_block_table writes only the delta from the old row's length, as
# if its new block table extended its old one. The device row keeps old block ids: the sequence
# reads and writes KV blocks it no longer holds, and samples wrong tokens.
def test_a_sequence_preempted_in_an_empty_step_comes_back_with_the_right_blocks(pairs):
    engine, sync_engine = _tight_engine(), pairs("recompute")[1]
    long_prompt, next_prompt = _long_and_next_prompts()
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    # "next" arrives when the long one samples its last token: its first chunk (63 tokens, 8
    # blocks) and the long one's 24 blocks fill the cache; its second chunk finds none free.
    events = {0: [("add", "long", long_prompt, greedy)],
              9: [("add", "next", next_prompt, dataclasses.replace(greedy, max_tokens=10))]}
    empty_with_preemption = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        if out.is_empty and out.preempted:
            empty_with_preemption.append([seq.request_id for seq in out.preempted])
        return out
    engine.scheduler.schedule = recording_schedule
    got, want = drive(engine, events), drive(sync_engine, events)
    assert empty_with_preemption == [["next"]]  # the case under test happened
    assert_same_outputs(got, want)  # 323db0b: "next" differs from its second token on
    assert_idle_and_clean(engine)


# Regression (fails on 323db0b): the two bugs above together leak a batch slot
# for good. The long request ends on a stop token, found one step late, so its 24 blocks wait for
# the step in flight; "next", half prefilled and alone running, preempts itself in a step that ends
# up empty (keeping its slot) and is then rejected as never fitting. It never runs again, so its
# slot is never given back: every such event leaves max_num_seqs one lower, and once all are gone
# each step fails with "no free batch slot" (every sequence in it ends with "error").
def test_no_batch_slot_leaked_by_a_sequence_rejected_after_preempting_itself(pairs):
    engine, sync_engine = _tight_engine(), pairs("recompute")[1]
    long_prompt, next_prompt = _long_and_next_prompts()
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = drive(sync_engine, {0: [("add", "ref", long_prompt, greedy)]})["ref"].outputs[0]
    stop = tokens.token_ids[7]
    assert stop not in tokens.token_ids[:7]
    stopping = dataclasses.replace(greedy, stop_token_ids=(stop,))
    events = {0: [("add", "long", long_prompt, stopping)],
              6: [("add", "next", next_prompt, dataclasses.replace(greedy, max_tokens=10))]}
    got, want = drive(engine, events), drive(sync_engine, events)
    assert len(want["next"].outputs[0].token_ids) == 10
    # 323db0b: 7 of 8 slots free, "next" ended with "length" and no tokens
    assert engine.runner.batch.num_free_slots == engine.config.max_num_seqs
    assert_same_outputs(got, want)
    assert_idle_and_clean(engine)


# ----- 4. stop strings, with a tokenizer ------------------------------------------------------

@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    """(async LLM, sync LLM) over the built-in byte-level model (untrained: random bytes)."""
    model_dir = builtin_model_dir(str(tmp_path_factory.mktemp("jaxserve_cache")))
    limits = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
                  dtype="float32")
    return tuple(LLM(model_dir, precompile=False, progress=False, async_scheduling=a, **limits)
                 for a in (True, False))


def _pick_stop(text, length, start):
    """A printable substring of `text` whose first occurrence begins at index k >= start."""
    for k in range(start, len(text) - length):
        s = text[k:k + length]
        if s.isprintable() and "\ufffd" not in s and s.strip() == s and text.find(s) == k:
            return k, s
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_end_the_async_run_where_the_sync_run_ends(llms):
    async_llm, sync_llm = llms
    prompts = {"greedy": ("abc", dict(temperature=0.0)),
               "seeded": ("Hello, world", dict(temperature=0.8, seed=21)),
               "n2": ("The quick brown fox", dict(temperature=0.8, seed=4, n=2))}
    base = {rid: SamplingParams(max_tokens=40, ignore_eos=True, **kw)
            for rid, (_, kw) in prompts.items()}
    ref = drive(sync_llm.engine, {0: [("add", rid, prompts[rid][0], sp)
                                      for rid, sp in base.items()]})
    events, cuts = [], {}
    for (rid, params), (length, start) in zip(base.items(), ((2, 3), (3, 6), (1, 10))):
        k, stop = _pick_stop(ref[rid].outputs[0].text, length, start)
        cuts[rid] = k, stop
        events.append(("add", rid, prompts[rid][0],
                       dataclasses.replace(params, stop=(stop,))))
    # Other requests keep the engine stepping, so the stops are found with a step in flight.
    events.append(("add", "background", "zzz", SamplingParams(temperature=0.0, max_tokens=60,
                                                              ignore_eos=True)))
    got = drive(async_llm.engine, {0: events})
    want = drive(sync_llm.engine, {0: events})
    assert_same_outputs(got, want)
    for rid, (k, stop) in cuts.items():
        c, full = got[rid].outputs[0], ref[rid].outputs[0]
        assert (c.finish_reason, c.stop_reason, c.text) == ("stop", stop, full.text[:k])
        assert len(c.token_ids) < len(full.token_ids)
        assert c.token_ids == full.token_ids[:len(c.token_ids)]
    assert_idle_and_clean(async_llm.engine)


def _matches(tokenizer, prompt_ids, token_ids, stop):
    """Each occurrence of `stop` in the text of token_ids: (tokens that complete it, its index)."""
    from jaxserve.model_io.tokenizer import IncrementalDetokenizer
    detok, text, matches = IncrementalDetokenizer(tokenizer, prompt_ids), "", []
    for n, token in enumerate(token_ids, 1):
        text += detok.add(token)
        start = matches[-1][1] + 1 if matches else 0
        while (p := text.find(stop, start)) >= 0:
            matches.append((n, p))
            start = p + 1
    return matches


def test_stop_string_counts_only_after_min_tokens(llms):
    # As vLLM: stop strings do not count while the output has at most min_tokens tokens, so a
    # match that completes earlier does not end the request; the first one after min_tokens does.
    async_llm, sync_llm = llms
    prompt = "Hello, world"
    params = dict(temperature=0.0, max_tokens=60, ignore_eos=True)
    (full,) = sync_llm.generate(prompt, SamplingParams(**params), use_tqdm=False)
    full_ids, text = full.outputs[0].token_ids, full.outputs[0].text
    prompt_ids = async_llm.tokenizer.encode(prompt)
    # A one-character stop string that first completes early and more than twice in all.
    candidates = []
    for ch in sorted(set(text)):
        if ch.isprintable() and not ch.isspace() and ch != "\ufffd":
            matches = _matches(async_llm.tokenizer, prompt_ids, full_ids, ch)
            if len(matches) >= 3 and matches[0][0] >= 2 and matches[-1][0] > matches[0][0] + 2:
                candidates.append((matches[0][0], ch, matches))
    assert candidates, f"no stop character occurring three times in {text!r}"
    first, stop, matches = min(candidates)
    min_tokens = first + 2  # at least one match completes at or below min_tokens
    expected_count, expected_pos = next(m for m in matches if m[0] > min_tokens)
    events = {0: [("add", "early", prompt, SamplingParams(stop=[stop], **params)),
                  ("add", "late", prompt, SamplingParams(stop=[stop], min_tokens=min_tokens,
                                                         **params))]}
    for llm in (async_llm, sync_llm):
        outs = drive(llm.engine, events)
        early, late = outs["early"].outputs[0], outs["late"].outputs[0]
        assert (early.finish_reason, early.stop_reason) == ("stop", stop)
        assert early.token_ids == full_ids[:first]
        assert early.text == text[:matches[0][1]]
        # min_tokens bans only EOS and stop ids: the greedy tokens are the same ones.
        assert (late.finish_reason, late.stop_reason) == ("stop", stop)
        assert late.token_ids == full_ids[:expected_count]
        assert late.text == text[:expected_pos]
        assert stop in late.text  # the early match did not end the request
        assert_idle_and_clean(llm.engine)


# Regression (fails on 323db0b): when the last running request ends on a stop
# string or stop token, it is found one step late, with the next step (holding that request) already
# in flight. LLM.generate and LLM.stream return its final output without reading that step: the
# engine is left with has_unfinished_requests True and the request's KV blocks held
# (Engine._InFlight.deferred_free) until some later step() call. Engine.abort, which LLM.stream
# calls at its end, ignores a finished request and so does not read the step either.
def test_llm_front_leaves_the_engine_idle_after_a_stop_found_in_flight(llms):
    async_llm, _ = llms
    engine = async_llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    (full,) = async_llm.generate("abc", params, use_tqdm=False)
    k, stop = _pick_stop(full.outputs[0].text, 2, 3)
    (out,) = async_llm.generate("abc", dataclasses.replace(params, stop=(stop,)), use_tqdm=False)
    assert out.outputs[0].text == full.outputs[0].text[:k]
    assert_idle_and_clean(engine)  # 323db0b: a step still in flight holds the request's blocks


# ----- 5. no KV block written while an in-flight step reads it for a finished sequence ---------

class InFlightBlockChecker:
    """Wraps engine.runner.execute. At each dispatch it records, for every sequence in the step,
    its block table and chunk; at the next dispatch it takes the sequences of the previous step
    that have finished since (that step is still in flight in the overlapped loop) and checks
    that the new step writes none of the blocks the previous one reads for them.

    A step writes the blocks holding positions start..start+num_tokens-1 of each chunk, and the
    destinations of its block copies and swap-ins; it reads, per sequence, the blocks holding
    positions 0..start+num_tokens-1. Only for the overlapped loop: the synchronous one has read
    a step back before it dispatches the next.
    """

    def __init__(self, engine):
        self.block_size = engine.config.block_size
        self.previous = []  # [(seq, block table, start, num_tokens)] of the last dispatch
        self.violations = []  # (step, seq_id, blocks)
        self.num_finished_in_flight = 0
        self.num_steps = 0
        self._execute = engine.runner.execute
        engine.runner.execute = self.execute

    def execute(self, sched):
        bs = self.block_size
        written = {dst for _, dst in sched.block_copies} | {dst for _, dst in sched.swap_in}
        for item in sched.scheduled:
            table = item.seq.block_table
            written.update(table[item.start // bs:-(-(item.start + item.num_tokens) // bs)])
        for seq, table, start, num_tokens in self.previous:
            if seq.is_finished:
                self.num_finished_in_flight += 1
                reused = written & set(table[:-(-(start + num_tokens) // bs)])
                if reused:
                    self.violations.append((self.num_steps, seq.seq_id, sorted(reused)))
        self.previous = [(seq, list(seq.block_table), item.start, item.num_tokens)
                         for item in sched.scheduled for seq in (item.seq, *item.forks)]
        self.num_steps += 1
        return self._execute(sched)


def _churn_schedule(seed, num_steps=60):
    """Many short requests, new ones every step, each of one KV block (prompt and output within
    8 tokens, so none ever allocates again: no preemption); some stop on a stop token (found one
    step late), some are aborted while their step is in flight."""
    rng = np.random.default_rng(seed)
    events = collections.defaultdict(list)
    for step in range(num_steps):
        for j in range(int(rng.integers(1, 4))):
            rid = f"c{step}-{j}"
            max_tokens = int(rng.integers(1, 5))
            prompt = [1] + rng.integers(3, 256, size=int(rng.integers(0, 8 - max_tokens))).tolist()
            stop_ids = tuple(int(t) for t in rng.choice(np.arange(3, 256), 16, replace=False))
            params = SamplingParams(temperature=1.0, seed=int(rng.integers(1 << 20)),
                                    max_tokens=max_tokens, ignore_eos=True,
                                    n=int(rng.choice([1, 1, 1, 2])),
                                    stop_token_ids=stop_ids if rng.random() < 0.5 else ())
            events[step].append(("add", rid, prompt, params))
            if rng.random() < 0.3:
                events[step + int(rng.integers(1, 4))].append(("abort", rid))
    return dict(events)


@pytest.fixture(scope="module")
def churn_engine():
    # 8 blocks, one per sequence at most: the cache is full nearly all the time, so a block
    # freed is handed out again at the next schedule.
    return build_engine("llama3", max_model_len=64, num_kv_blocks=8, enable_prefix_caching=False)


def test_no_block_reused_while_an_in_flight_step_reads_it(churn_engine):
    engine = churn_engine
    preemptions = engine.scheduler.num_preemptions
    checker = InFlightBlockChecker(engine)
    try:
        drive(engine, _churn_schedule(seed=1))
    finally:
        engine.runner.execute = checker._execute
    assert checker.num_finished_in_flight >= 10, checker.num_finished_in_flight  # not vacuous
    assert checker.violations == []
    assert engine.scheduler.num_preemptions == preemptions
    assert_idle_and_clean(engine)


def test_block_checker_catches_blocks_freed_while_in_flight(churn_engine, monkeypatch):
    # A broken engine that frees a finished sequence's blocks at once, even while a step in
    # flight reads them: the checker must see the next step write them.
    engine = churn_engine

    def finish_and_free_at_once(seq, reason):
        engine.scheduler.finish(seq, reason, free_blocks=True)
        engine.runner.batch.release(seq)
    monkeypatch.setattr(engine, "_finish_seq", finish_and_free_at_once)
    checker = InFlightBlockChecker(engine)
    try:
        drive(engine, _churn_schedule(seed=1))
    finally:
        engine.runner.execute = checker._execute
    assert checker.violations, "the checker saw no block reused by the broken engine"


# ----- 6. a random run leaks nothing ----------------------------------------------------------

def assert_block_refs_consistent(engine):
    """Each block's reference count is the number of block tables holding it, counting the
    finished sequences whose blocks wait for the step in flight; every unreferenced block is
    free or cached, exactly once."""
    holders = {s.seq_id: s for req in engine.requests.values() for s in req.seqs}
    if engine._in_flight is not None:
        holders.update((s.seq_id, s) for s in engine._in_flight.deferred_free)
    expected = collections.Counter(b for s in holders.values() for b in s.block_table)
    kv = engine.kv_cache
    assert {b: n for b, n in enumerate(kv.ref_counts) if n} == dict(expected)
    unreferenced = {b for b, n in enumerate(kv.ref_counts) if not n}
    assert len(kv.free_blocks) + len(kv.cached_blocks) == len(unreferenced)
    assert set(kv.free_blocks) | set(kv.cached_blocks) == unreferenced


def _random_requests(rng, num_requests):
    shared = [[1] + rng.integers(3, 256, size=int(n)).tolist() for n in (16, 40)]
    for i in range(num_requests):
        tail = rng.integers(3, 256, size=int(rng.integers(1, 80))).tolist()
        prompt = (shared[i % 2] if rng.random() < 0.4 else [1]) + tail
        max_tokens = int(rng.integers(1, 40))
        params = SamplingParams(
            temperature=float(rng.choice([0.0, 0.8, 1.0])), top_k=int(rng.choice([0, 10])),
            top_p=float(rng.choice([1.0, 0.9])), seed=int(rng.integers(1 << 20)),
            n=int(rng.choice([1, 1, 2, 3])), max_tokens=max_tokens,
            min_tokens=int(rng.integers(0, max_tokens + 1)) if rng.random() < 0.3 else 0,
            logprobs=[None, None, 0, 2][int(rng.integers(4))],
            repetition_penalty=float(rng.choice([1.0, 1.0, 1.2])),
            stop_token_ids=tuple(range(40, 48)) if rng.random() < 0.3 else (),
            ignore_eos=bool(rng.random() < 0.5))
        yield f"x{i}", prompt, params


@pytest.mark.parametrize("name", ["recompute", "swap"])
def test_random_run_leaks_nothing(pairs, name):
    engine, _ = pairs(name)
    rng = np.random.default_rng({"recompute": 11, "swap": 12}[name])
    pending = list(_random_requests(rng, 30))
    params_of = {rid: params for rid, _, params in pending}
    live, finished, step = [], set(), 0  # live: added, not finished nor aborted
    preemptions, swap_outs = engine.scheduler.num_preemptions, engine.scheduler.num_swap_outs
    while pending or engine.has_unfinished_requests:
        for _ in range(int(rng.integers(0, 3))):
            if pending:
                rid, prompt, params = pending.pop()
                engine.add_request(prompt, params, request_id=rid)
                live.append(rid)
        if live and rng.random() < 0.15:
            rid = live.pop(int(rng.integers(len(live))))
            engine.abort(rid)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished
                finished.add(out.request_id)
                live.remove(out.request_id)
                stop_ids = params_of[out.request_id].stop_token_ids
                for c in out.outputs:
                    assert c.finish_reason in ("stop", "length")
                    # Nothing after a stop token: it is the last token, or there is none.
                    assert not set(c.token_ids[:-1]) & set(stop_ids), (out.request_id, c.index)
        assert_block_refs_consistent(engine)
        step += 1
        assert step < 3000
    assert engine.scheduler.num_preemptions > preemptions
    assert (engine.scheduler.num_swap_outs > swap_outs) == (name == "swap")
    assert_idle_and_clean(engine)
