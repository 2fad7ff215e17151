"""A notebook interrupt loses nothing (issue 14, finding 6): Ctrl-C in LLM.generate or
LLM.stream, also between a step's dispatch and the store of the cache it donated, aborts that
call's requests and leaves an LLM that gives the same greedy text; a dropped stream frees its
blocks; a stream paused while generate runs misses none of its text."""

import _thread
import gc
import threading

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.model_io.default_model import BUILTIN_MODEL

ENGINE_LIMITS = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256, block_size=8,
                     num_kv_blocks=64, dtype="float32")
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
PROMPTS = ["Once upon a time", "The quick brown fox"]


@pytest.fixture(scope="module")
def llm():
    return LLM(BUILTIN_MODEL, precompile=False, progress=False, **ENGINE_LIMITS)


@pytest.fixture(scope="module")
def expected(llm):
    return [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _interrupt_from_a_thread():
    """Ctrl-C as a kernel interrupt gives it: SIGINT for the main thread, sent from another
    thread; it is pending when this returns."""
    timer = threading.Timer(0, _thread.interrupt_main)
    timer.start()
    timer.join()


class _InterruptAfterCall:
    """Wraps the runner's compiled device calls: the `at`-th call is followed by an interrupt,
    which lands before the runner stores the arrays it returned (their inputs were donated)."""

    def __init__(self, runner, at: int):
        self.runner, self.at, self.calls = runner, at, 0
        self.compiled = runner._compiled

    def __call__(self, key):
        fn = self.compiled(key)

        def call(*args):
            result = fn(*args)
            self.calls += 1
            if self.calls == self.at:
                _interrupt_from_a_thread()
            return result
        return call

    def __enter__(self):
        self.runner._compiled = self
        return self

    def __exit__(self, *exc):
        self.runner._compiled = self.compiled


def _assert_idle(llm):
    engine = llm.engine
    assert not engine.requests and not engine.has_unfinished_requests
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


@pytest.mark.parametrize("at", [1, 7, 12])
def test_interrupt_in_generate_loses_nothing(llm, expected, at):
    with _InterruptAfterCall(llm.engine.runner, at) as hook:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert hook.calls >= at
    _assert_idle(llm)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].text for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_interrupt_in_stream_aborts_it(llm, expected):
    stream = llm.stream(PROMPTS[0], GREEDY)
    first = next(stream)
    with _InterruptAfterCall(llm.engine.runner, 2):
        with pytest.raises(KeyboardInterrupt):
            list(stream)
    _assert_idle(llm)
    assert expected[0].startswith(first)
    assert "".join(llm.stream(PROMPTS[0], GREEDY)) == expected[0]


def test_dropped_stream_frees_its_blocks(llm, expected):
    stream = llm.stream(PROMPTS[0], GREEDY)
    next(stream)
    assert llm.engine.requests
    assert llm.engine.kv_cache.num_free_blocks < llm.engine.kv_cache.num_blocks
    del stream
    gc.collect()
    _assert_idle(llm)
    stream = llm.stream(PROMPTS[1], GREEDY)
    next(stream)
    stream.close()
    _assert_idle(llm)


def test_paused_stream_keeps_its_text_through_generate(llm, expected):
    stream = llm.stream(PROMPTS[0], GREEDY)
    text = next(stream)
    # generate steps the engine, so the paused stream's request runs on meanwhile.
    assert llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0].text == expected[1]
    assert text + "".join(stream) == expected[0]
    _assert_idle(llm)
