"""A `tokenizers` tokenizer built from a GGUF file's metadata (a GGUF carries no tokenizer.json).

The metadata under `tokenizer.ggml.*` holds the vocabulary (tokens, and for SentencePiece their
scores), the token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), BPE merges,
the name of the pre-tokenizer, the special token ids and whether to prepend BOS. The tokenizer
built here gives the ids Hugging Face transformers' GGUF tokenizer gives (its
integrations/gguf/gguf_tokenizer_mapping.py, transformers 5), built with our own code:

* `tokenizer.ggml.model` "gpt2": byte-level BPE. Tokens outside the byte alphabet are respelled
  in it; the split regex is chosen by `tokenizer.ggml.pre` (GPT-2's own for names not listed);
* "llama": SentencePiece-style BPE with byte fallback; the file has scores, not merges, so the
  merges are recovered from the vocabulary, best score first; a "▁" is prepended to the first
  word (`tokenizer.ggml.add_space_prefix`, default on);
* control tokens (and the bos/eos/unk/pad tokens) are added as special tokens, user-defined
  ones as plain added tokens, so neither is cut into pieces;
* `tokenizer.ggml.add_bos_token` (default on for "llama") and `add_eos_token` become the
  post-processor.
"""

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxserve.model_io.gguf_checkpoint import metadata

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex. Names not here ("default", "gpt2", "smollm", ...) use GPT-2's
# own (ByteLevel's built-in); a vocabulary trained with single digits (SmolLM's) has no digit
# merges, so digit runs still come out one token per digit.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


def tokenizer_from_gguf(reader: GGUFReader) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes; ValueError if it has none we support."""
    kind = metadata(reader, "tokenizer.ggml.model")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    if kind not in SUPPORTED_TOKENIZER_MODELS or not tokens:
        raise ValueError(f"GGUF: tokenizer.ggml.model {kind!r} is not supported (or has no "
                         f"tokens); supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}")
    types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level_bpe(tokens, metadata(reader, "tokenizer.ggml.merges") or [],
                              metadata(reader, "tokenizer.ggml.pre"))
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    else:
        scores = metadata(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = _sentencepiece_bpe(tokens, scores,
                                 metadata(reader, "tokenizer.ggml.add_space_prefix", True))
        alphabet = None
    special_ids = [metadata(reader, f"tokenizer.ggml.{name}_token_id")
                   for name in ("bos", "eos", "unknown", "padding")]
    special = {i for i, t in enumerate(types) if t == _CONTROL}
    special.update(i for i in special_ids if i is not None and 0 <= i < len(tokens))
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel (transformers
    # skips it too): it is no token of the byte-level vocabulary.
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                            for i in sorted(special)
                            if alphabet is None or set(tokens[i]) <= alphabet])
    tok.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                    for i, t in enumerate(types)
                    if t == _USER_DEFINED and (alphabet is None or set(tokens[i]) <= alphabet)])
    tok.post_processor = _bos_eos_template(
        tokens, metadata(reader, "tokenizer.ggml.bos_token_id"),
        metadata(reader, "tokenizer.ggml.eos_token_id"),
        metadata(reader, "tokenizer.ggml.add_bos_token", kind == "llama"),
        metadata(reader, "tokenizer.ggml.add_eos_token", False))
    return tok


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Tokenizer:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    alphabet = set(byte_chars)
    spelling = bytes_to_unicode()
    vocab = {}
    for i, token in enumerate(tokens):
        if not set(token) <= alphabet:  # e.g. a special token stored with a plain space
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (ByteLevel's alphabet, by byte)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _sentencepiece_bpe(tokens: list[str], scores: list[float], add_space_prefix: bool) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(vocab, tokens, scores),
                               fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(vocab: dict[str, int], tokens: list[str],
                        scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-scored token first (ties: shorter left, then shorter right part first), as
    transformers' generate_merges orders them."""
    token_scores = dict(zip(tokens, scores))
    merges = []
    for token, score in token_scores.items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bos_eos_template(tokens, bos: int | None, eos: int | None, add_bos: bool,
                      add_eos: bool) -> processors.TemplateProcessing:
    first = [tokens[bos]] if add_bos and bos is not None else []
    last = [tokens[eos]] if add_eos and eos is not None else []
    specials = [(tokens[i], i) for i in {bos if first else None, eos if last else None} - {None}]
    return processors.TemplateProcessing(
        single=" ".join(first + ["$A:0"] + last),
        pair=" ".join(first + ["$A:0"] + last + first + ["$B:1"] + last),
        special_tokens=specials)
