"""Stop strings (issue 14, finding 1): the linear matcher gives exactly what the plain search
gives, and a hostile stop string costs no more per step than a short one."""

import time

from hypothesis import given, settings, strategies as st

from jaxserve.engine.output_processor import RequestState, append_token, release_held
from jaxserve.request import Sequence
from jaxserve.sampling_params import SamplingParams


class _ScriptedDetokenizer:
    """Token t decodes to deltas[t]; flush gives `tail` (the text a final flush may add)."""

    def __init__(self, deltas: list[str], tail: str):
        self.deltas, self.tail = deltas, tail

    def add(self, token: int) -> str:
        return self.deltas[token]

    def flush(self) -> str:
        tail, self.tail = self.tail, ""
        return tail


def reference(deltas: list[str], tail: str, stops: tuple[str, ...], min_tokens: int):
    """The plain search that output_processor did before the matcher: every step, each stop
    string searched in the held text plus the new text, every prefix tried for the hold-back.
    -> (text emitted after each step, the stop string or None)."""
    held, text, emitted = "", "", []
    for n, delta in enumerate(deltas, start=1):
        final = n == len(deltas)
        pending = held + delta + (tail if final else "")
        if n > min_tokens:
            hits = [(p, s) for s in stops
                    if (p := pending.find(s, max(0, len(held) - len(s) + 1))) >= 0]
            if hits:
                pos, s = min(hits)
                emitted.append(text + pending[:pos])
                return emitted, s
        keep = 0 if final else max(
            (k for s in stops for k in range(min(len(s) - 1, len(pending)), 0, -1)
             if pending.endswith(s[:k])), default=0)
        text += pending[:len(pending) - keep]
        held = pending[len(pending) - keep:]
        emitted.append(text)
    return emitted, None


def run_processor(deltas: list[str], tail: str, stops: tuple[str, ...], min_tokens: int):
    """The same through output_processor.append_token, one token per delta."""
    params = SamplingParams(stop=stops, min_tokens=min_tokens, max_tokens=len(deltas))
    seq = Sequence(0, "r", 0, [0], params, 0, 0.0)
    req = RequestState("r", None, [0], params, [seq], 0.0,
                       [_ScriptedDetokenizer(deltas, tail)], [""], [None], [""])
    emitted = []
    for token in range(len(deltas)):
        reason = append_token(req, seq, token, None, [], eos_token_ids=(), max_model_len=10**6)
        if reason is not None:
            release_held(req)
        emitted.append(req.texts[0])
        if reason == "stop":
            return emitted, req.stop_reasons[0]
    return emitted, None


_text = st.text(alphabet="ab\nc", max_size=6)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(deltas=st.lists(_text, min_size=1, max_size=12), tail=_text,
       stops=st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=5), min_size=1, max_size=4),
       min_tokens=st.integers(0, 4))
def test_matcher_equals_plain_search(deltas, tail, stops, min_tokens):
    min_tokens = min(min_tokens, len(deltas))
    stops = tuple(stops)
    assert run_processor(deltas, tail, stops, min_tokens) == reference(deltas, tail, stops,
                                                                          min_tokens)


def test_earliest_start_wins_over_list_order():
    # "bcd" comes first in the list and ends as early, but "abcdef" starts earlier.
    assert run_processor(["abc", "def"], "", ("bcd", "abcdef"), 0) == (["", ""], "abcdef")
    # At the same start the shorter one, which ends first, wins.
    assert run_processor(["xab", "c"], "", ("abc", "ab"), 0) == (["x"], "ab")
    # Below min_tokens a match does not count, but one that began then does once it ends.
    assert run_processor(["ab", "c"], "", ("ab",), 1) == (["ab", "abc"], None)
    assert run_processor(["xba", "bc"], "", ("babc",), 1) == (["x", "x"], "babc")


def _stream_seconds(stop: str, num_tokens: int) -> tuple[float, str]:
    """Host time of num_tokens tokens through append_token against one stop string, with the
    size limit set aside (SamplingParams refuses such a string: request_limits)."""
    deltas = ["\x01\x01\x01"] * num_tokens
    params = SamplingParams(stop=("x",), max_tokens=num_tokens)
    object.__setattr__(params, "stop", (stop,))
    seq = Sequence(0, "r", 0, [0], params, 0, 0.0)
    req = RequestState("r", None, [0], params, [seq], 0.0,
                       [_ScriptedDetokenizer(deltas, "")], [""], [None], [""])
    begin = time.perf_counter()
    for token in range(num_tokens - 1):
        assert append_token(req, seq, token, None, [], eos_token_ids=(), max_model_len=10**6) is None
    return time.perf_counter() - begin, req.texts[0]


def test_megabyte_stop_string_costs_per_step_what_a_short_one_does():
    # The text keeps matching the first characters of a 1,000,000-character stop string, so
    # the plain search held back ever more and tried every prefix each step (quadratic: this
    # took minutes).
    huge, other = "\x01" * 1_000_000 + "x", "\x02" * 8
    huge_s, huge_text = min(_stream_seconds(huge, 1000) for _ in range(2))
    other_s, other_text = min(_stream_seconds(other, 1000) for _ in range(2))
    assert huge_text == "" and len(other_text) == 3 * 999  # all held back / none held back
    assert huge_s < 5 * other_s + 0.05, (huge_s, other_s)
