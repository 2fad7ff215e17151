"""The built-in byte-level tokenizer and the incremental detokenizer: multi-byte characters split
over tokens, held-back tails, invalid byte sequences."""

import numpy as np
import pytest

from jaxserve.model_io.default_model import builtin_model_dir
from jaxserve.model_io.tokenizer import IncrementalDetokenizer, Tokenizer

BOS, EOS = 1, 2
TEXTS = [
    "hello",
    "héllo wörld",
    "check ✓ done",
    "party 🎉🎉 time",
    "中文字符 and 日本語",
    "mixed: é✓🎉中 end",
    "🎉",
    "a\u0301 combining, \U0001F468\u200D\U0001F469 joined",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    model_dir = builtin_model_dir(str(tmp_path_factory.mktemp("jaxserve_cache")))
    tok = Tokenizer.from_dir(model_dir)
    assert tok is not None
    return tok


def byte_ids(tokenizer, text):
    """One token per UTF-8 byte, no <bos>."""
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, ids, prompt_ids=(BOS,), skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), skip_special_tokens)
    deltas = [detok.add(t) for t in ids]
    return deltas, detok.flush(), detok


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == BOS
    assert len(ids) == 1 + len(text.encode("utf-8"))  # byte-level: one token per byte
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert byte_ids(tokenizer, text) == ids[1:]


def test_vocab_and_special_tokens(tokenizer):
    assert tokenizer.vocab_size == 259
    assert tokenizer.token_to_id("<eos>") == EOS
    assert tokenizer.token_to_id("<bos>") == BOS
    assert tokenizer.decode([EOS]) == ""
    assert tokenizer.decode([EOS], skip_special_tokens=False) == "<eos>"


def test_a_folder_without_tokenizer_json_has_none(tmp_path):
    assert Tokenizer.from_dir(str(tmp_path)) is None


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_decoded_text(tokenizer, text):
    ids = byte_ids(tokenizer, text)
    deltas, tail, detok = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == text
    assert detok.text == text
    assert tail == ""  # complete characters: nothing held back at the end


@pytest.mark.parametrize("text", TEXTS)
def test_no_replacement_character_for_a_split_multibyte_character(tokenizer, text):
    deltas, _, _ = stream(tokenizer, byte_ids(tokenizer, text))
    assert not any("\ufffd" in d for d in deltas)
    # Each delta is whole characters, emitted as soon as the last byte of one arrives.
    emitted = ""
    for i, delta in enumerate(deltas):
        emitted += delta
        decoded_prefix = text.encode("utf-8")[:i + 1].decode("utf-8", errors="ignore")
        assert emitted == decoded_prefix


def test_flush_returns_a_held_back_partial_character(tokenizer):
    ids = byte_ids(tokenizer, "ok ✓")
    deltas, tail, _ = stream(tokenizer, ids[:-1])  # the last byte of ✓ never arrives
    assert "".join(deltas) == "ok "
    assert tail and set(tail) == {"\ufffd"}
    assert "".join(deltas) + tail == tokenizer.decode(ids[:-1])


def test_flush_returns_a_held_back_replacement_character(tokenizer):
    """A real U+FFFD at the end looks like a partial character: held until flush."""
    text = "ab\ufffd"
    deltas, tail, _ = stream(tokenizer, byte_ids(tokenizer, text))
    assert "".join(deltas) == "ab"
    assert tail == "\ufffd"


def test_flush_twice_returns_nothing_new(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [BOS])
    for t in byte_ids(tokenizer, "x✓")[:-1]:
        detok.add(t)
    assert detok.flush() != ""
    assert detok.flush() == ""


def test_the_prompt_is_not_emitted(tokenizer):
    prompt = tokenizer.encode("a prompt with ✓ and 中")
    ids = byte_ids(tokenizer, " then 🎉 output")
    deltas, tail, _ = stream(tokenizer, ids, prompt_ids=prompt)
    assert "".join(deltas) + tail == " then 🎉 output"


def test_a_prompt_ending_inside_a_character(tokenizer):
    """The first output bytes complete a character the prompt started."""
    all_ids = byte_ids(tokenizer, "x中y")
    prompt, output = [BOS] + all_ids[:2], all_ids[2:]  # "x" and the first byte of 中
    deltas, tail, _ = stream(tokenizer, output, prompt_ids=prompt)
    text = "".join(deltas) + tail
    assert text.endswith("y")
    assert "\ufffd" not in "".join(deltas[-1:])


def test_special_tokens_in_the_output(tokenizer):
    ids = byte_ids(tokenizer, "ab") + [EOS] + byte_ids(tokenizer, "✓")
    deltas, tail, _ = stream(tokenizer, ids)
    assert "".join(deltas) + tail == "ab✓"
    deltas, tail, _ = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(deltas) + tail == "ab<eos>✓"


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_valid_or_not_concatenate_to_decode(tokenizer, seed):
    """Arbitrary byte streams (what an untrained model emits) lose and invent nothing."""
    rng = np.random.default_rng(seed)
    pieces = [b"\xe4\xb8\xad", b"\xe2\x9c\x93", b"\xf0\x9f\x8e\x89", b"a", b" ", b"\xc3\xa9"]
    data = b""
    for _ in range(40):  # mostly valid characters, some stray or cut bytes
        if rng.random() < 0.2:
            data += bytes([int(rng.integers(0x80, 0x100))])
        else:
            piece = pieces[int(rng.integers(len(pieces)))]
            data += piece[:int(rng.integers(1, len(piece) + 1))] if rng.random() < 0.1 else piece
    ids = [3 + b for b in data]  # byte b is token 3 + b
    deltas, tail, _ = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert tokenizer.decode(ids) == data.decode("utf-8", errors="replace")
