"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered into the
prompt text a chat model was trained on, and that text into token ids.

A template is jinja2 source that comes with the model: a GGUF file's `tokenizer.chat_template`
metadata, or a folder's `chat_template.jinja` or `tokenizer_config.json` ("chat_template": a
string, or a list of named templates of which "default" is used). Templates are untrusted code,
so they run in jinja2's ImmutableSandboxedEnvironment, set up as Hugging Face transformers'
apply_chat_template sets it up (transformers/utils/chat_template_utils.py), so that the same
template gives the same text:

* `trim_blocks` and `lstrip_blocks` on; the `loopcontrols` extension ({% break %});
* in scope: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools` and
  `documents` (None), `raise_exception(message)`, `strftime_now(format)`, a `namespace` that
  refuses underscore names;
* `tojson` as transformers defines it: json.dumps without HTML escaping, non-ASCII kept;
* a `{% generation %}` block renders its body (transformers uses it to mask assistant tokens);
* one thing stricter: reading an unsafe attribute (`{{ ''.__class__ }}`) raises at once, where
  jinja2 (and so transformers) renders it as "" and fails only when it is used further.

The rendered text is tokenized without adding special tokens, as transformers'
apply_chat_template(tokenize=True) and vLLM's LLM.chat do: the template writes every special
token the model expects, BOS included, so a tokenizer that prepends BOS would double it.
"""

import dataclasses
import datetime
import functools
import json
import os

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxserve.model_io.gguf_checkpoint import is_gguf, metadata, open_gguf

# Each conversation is one list of messages; LLM.chat and the Chat RPC take these.
Conversation = list[dict]


class NoChatTemplateError(ValueError):
    """The model has no chat template and none was given (a server answers FAILED_PRECONDITION)."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template and the special tokens templates refer to."""

    template: str | None = None  # jinja2 source; None: the model has none
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def from_dir(cls, model_dir: str) -> "ChatTemplate":
        """From a GGUF file's metadata, or a folder's chat_template.jinja / tokenizer_config.json
        (special_tokens_map.json for bos/eos missing there); empty when none of them has one."""
        if is_gguf(model_dir):
            return _from_gguf(model_dir)
        config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        special = _read_json(os.path.join(model_dir, "special_tokens_map.json"))
        jinja_file = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(jinja_file):  # transformers gives this file priority, as here
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        else:
            template = _default_template(config.get("chat_template"), model_dir)
        token = lambda name: _token_text(config.get(name)) or _token_text(special.get(name))
        return cls(template, token("bos_token"), token("eos_token"))

    def render(self, conversation: Conversation, add_generation_prompt: bool = True,
               chat_template: str | None = None) -> str:
        """The prompt text of one conversation. chat_template: jinja2 source used instead of the
        model's. Raises NoChatTemplateError when there is neither, ValueError naming the problem
        for bad messages, a template that does not compile, fails or breaks the sandbox."""
        source = chat_template if chat_template is not None else self.template
        if source is None:
            raise NoChatTemplateError(
                "chat_template: this model has none (no tokenizer.chat_template in its GGUF "
                "metadata, no chat_template.jinja or chat_template in tokenizer_config.json); "
                "give one (LLM.chat's chat_template=) or use a model that has one")
        messages = check_messages(conversation)
        compiled = _compile(source)
        try:
            # As transformers: a special token the model lacks is left undefined.
            special = {name: token for name, token in (("bos_token", self.bos_token),
                                                       ("eos_token", self.eos_token)) if token}
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **special)
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"chat_template: refused by the sandbox: {e}") from e
        except _TemplateRaised as e:  # the template's own check of the messages
            raise ValueError(f"messages: the chat template refused them: {e}") from e
        except Exception as e:  # anything else an untrusted template may do wrong
            raise ValueError(f"chat_template: rendering failed: {type(e).__name__}: {e}") from e


def encode_chat(tokenizer, conversation: Conversation, add_generation_prompt: bool = True,
                chat_template: str | None = None) -> tuple[str, list[int]]:
    """(prompt text, prompt token ids) of one conversation, by the tokenizer's ChatTemplate.
    No special tokens are added to what the template wrote (see the module docstring)."""
    text = tokenizer.chat_template.render(conversation, add_generation_prompt, chat_template)
    return text, tokenizer.encode(text, add_special_tokens=False)


def check_messages(conversation) -> list[dict]:
    """The messages as plain JSON data, keys whose value is None dropped (as transformers does);
    ValueError naming the first bad field."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("messages: a conversation is a non-empty list of {'role', 'content'} "
                         f"dicts, got {_short(conversation)}")
    messages = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: a message is a dict, got {_short(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string, got {_short(role)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {_short(content)}")
        messages.append({key: _plain(value, f"messages[{i}].{key}")
                         for key, value in message.items() if value is not None})
    return messages


def _plain(value, field: str):
    """`value` rebuilt from JSON types only: a template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{field}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{field}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{field} must be JSON data (str, number, bool, list, dict), "
                     f"got {type(value).__name__}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----- the sandbox ------------------------------------------------------------------------------
class _TemplateRaised(jinja2.exceptions.TemplateError):
    """raise_exception(message) called by a template."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() without underscore attributes, which lead to Python's internals."""

    def __init__(*args, **kwargs):  # jinja2's signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a namespace attribute may not start with '_': {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's sandbox, but an unsafe attribute raises where it is read: jinja2 returns an
    undefined value that fails only when used further, and prints as "" ({{ ''.__class__ }})."""

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: not valid jinja2 (line {e.lineno}): {e.message}") from e


# ----- where templates come from ------------------------------------------------------------------
def _from_gguf(path: str) -> ChatTemplate:
    """tokenizer.chat_template, and the bos/eos tokens' text by their ids (as transformers)."""
    reader = open_gguf(path)
    tokens = metadata(reader, "tokenizer.ggml.tokens") or []

    def token(key: str) -> str | None:
        i = metadata(reader, key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
    return ChatTemplate(metadata(reader, "tokenizer.chat_template"),
                        token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))


def _default_template(value, model_dir: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or [{"name", "template"}, ...]."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"model: {model_dir!r}: tokenizer_config.json has chat templates "
                         f"{sorted(map(str, named))} but none named 'default'")
    raise ValueError(f"model: {model_dir!r}: tokenizer_config.json's chat_template is a "
                     f"{type(value).__name__}; expected a string or a list of named templates")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}
