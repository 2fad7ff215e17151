"""Tokenizer (Hugging Face `tokenizers`, from tokenizer.json or a GGUF file's metadata) and
incremental detokenization.

Detokenizing token by token is not decoding each token alone: a character can span several
byte-level tokens, and SentencePiece-style tokenizers change spacing with context. The
incremental detokenizer decodes a short window of recent tokens and emits only the text that
became final, holding back a trailing partial character (U+FFFD) until its bytes arrive.
"""

import os

from tokenizers import Tokenizer as HFTokenizer

from jaxserve.model_io.chat_template import ChatTemplate
from jaxserve.model_io.gguf_checkpoint import is_gguf, open_gguf
from jaxserve.model_io.gguf_tokenizer import tokenizer_from_gguf

_REPLACEMENT = "\ufffd"
# Past this many characters (or ids) encode and decode go through the tokenizers' batch calls,
# which release the GIL: other threads (the server's event loop, the engine) run meanwhile.
_LONG = 4096


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: ChatTemplate = ChatTemplate()):
        """chat_template: the model's (jaxserve/model_io/chat_template.py); empty if it has none."""
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, model_dir: str) -> "Tokenizer | None":
        """From the folder's tokenizer.json, or a GGUF model's metadata; None if neither. The
        chat template comes from the same place (tokenizer_config.json beside tokenizer.json)."""
        if is_gguf(model_dir):
            tok = tokenizer_from_gguf(open_gguf(model_dir))
        else:
            path = os.path.join(model_dir, "tokenizer.json")
            if not os.path.isfile(path):
                return None
            tok = HFTokenizer.from_file(path)
        return cls(tok, ChatTemplate.from_dir(model_dir))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _LONG:  # the batch call releases the GIL (the single one holds it)
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > _LONG:
            return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token adds to decoded text: the longest
        vocabulary string (byte-level and SentencePiece strings are at least as long as the text
        they decode to), and at least 3, a lone byte's U+FFFD."""
        longest = max((len(t.encode()) for t in self._tok.get_vocab(with_added_tokens=True)),
                      default=0)
        return max(longest, len(_REPLACEMENT.encode()))


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas; correct for multi-byte characters."""

    _CONTEXT = 5  # prompt tokens kept for the spacing of the first output token

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-self._CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text that became final (maybe empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back, partial characters included."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):] if full.startswith(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
