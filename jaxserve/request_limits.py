"""Request-size limits: what bounds the host work one request can cause, checked before any of
it is done. Every front (LLM, Engine.add_request, the gRPC and HTTP servers) calls these same
checks; each raises ValueError naming the field and the limit, which the servers answer with
INVALID_ARGUMENT (OUT_OF_RANGE for a prompt longer than the context, as before).

- A text prompt is refused before tokenization when its UTF-8 size exceeds
  `max_model_len * MAX_PROMPT_BYTES_PER_TOKEN`: no prompt that fits the context can be that
  large, since no token of the tokenizers we load decodes to that many bytes (SmolLM2's longest
  is 81 bytes, the byte-level built-in model's 1). Tokenizing a 15 MiB prompt took the engine
  half a minute; measuring its size takes milliseconds.
- A token-id prompt is refused by its length alone, before its ids are looked at.
- Stop strings: at most MAX_STOP_STRINGS, each at most MAX_STOP_STRING_CHARS characters.
  Matching them costs time linear in the new text per step whatever their size
  (jaxserve/engine/stop_matcher.py); these bound the memory a request holds for them and the text
  held back while it may still begin one.
- stop_token_ids: at most EngineConfig.max_stop_token_ids (they are fixed on device), checked
  by the engine.
"""

MAX_PROMPT_BYTES_PER_TOKEN = 256
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024


def prompt_byte_limit(max_model_len: int) -> int:
    """The most UTF-8 bytes a text prompt may have for a context of max_model_len tokens."""
    return max_model_len * MAX_PROMPT_BYTES_PER_TOKEN


def check_prompt_size(prompt: str | list[int], max_model_len: int) -> None:
    """Refuses a prompt that cannot fit max_model_len, before it is tokenized or its ids read.

    prompt: text, or token ids. Raises ValueError: "prompt is N bytes; ..." for text over
    prompt_byte_limit(max_model_len), "prompt has N tokens; ..." for an id list of
    max_model_len or more (the message Engine gives after tokenizing). Cost: O(1) for lists,
    at most one UTF-8 measure of the text (none when its length alone decides)."""
    if isinstance(prompt, str):
        limit = prompt_byte_limit(max_model_len)
        if len(prompt) * 4 <= limit:  # a character is at most 4 UTF-8 bytes
            return
        # At least one byte a character: a text longer than the limit is not even measured.
        over = len(prompt) > limit
        size = len(prompt) if over else utf8_size(prompt)
        if size > limit:
            raise ValueError(
                f"prompt is {'at least ' if over else ''}{size} bytes; the limit before tokenization "
                f"is {limit} bytes (max_model_len {max_model_len} x {MAX_PROMPT_BYTES_PER_TOKEN} "
                f"bytes per token)")
    elif hasattr(prompt, "__len__"):  # ids: their count alone
        check_prompt_tokens(len(prompt), max_model_len)


def check_prompt_tokens(num_tokens: int, max_model_len: int) -> None:
    """Refuses a prompt of num_tokens that leaves no room for one output token."""
    if num_tokens >= max_model_len:
        raise ValueError(f"prompt has {num_tokens} tokens; the limit is max_model_len - 1 "
                         f"= {max_model_len - 1} (max_model_len {max_model_len})")


def utf8_size(text: str) -> int:
    """Bytes of text in UTF-8 (lone surrogates counted as 3 bytes, as Python writes them)."""
    return len(text.encode("utf-8", "surrogatepass"))


def check_stop_strings(stop: tuple, field: str = "SamplingParams.stop") -> None:
    """Refuses too many or too long stop strings, or ones that are not non-empty strings."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"{field} has {len(stop)} strings; at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise ValueError(f"{field} must hold non-empty strings; [{i}] is {s!r:.40}")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"{field}[{i}] has {len(s)} characters; at most "
                             f"{MAX_STOP_STRING_CHARS}")

