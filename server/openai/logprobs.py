"""Log-probabilities in OpenAI's two shapes, from the engine's per-token {token_id: logprob}
dicts (the sampled token first, then the top N).

    /v1/completions (logprobs: N)       {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        top_logprobs[i]: {token text: logprob} of the sampled token and the top N (as vLLM)
    /v1/chat/completions (logprobs: true, top_logprobs: N)
        {"content": [{"token", "logprob", "bytes", "top_logprobs": [N of the same]}]}

A token's text is that token decoded alone, special tokens kept; a piece of a multi-byte
character decodes to U+FFFD (its `bytes` are then those of U+FFFD, as vLLM gives them). JSON has
no -inf: a logprob below -9999 is written as -9999, as vLLM writes it. A model without a
tokenizer names its tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids).
"""

_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _FLOOR)


class TokenTexts:
    """Token id -> its text, decoded once per id."""

    def __init__(self, tokenizer):
        self._tokenizer, self._cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self._tokenizer.decode([token_id], skip_special_tokens=False)
                    if self._tokenizer is not None else f"token_id:{token_id}")
            self._cache[token_id] = text
        return text


class CompletionLogprobs:
    """One sample's logprobs, chunk after chunk: text_offset runs on across chunks."""

    def __init__(self, texts: TokenTexts):
        self._texts, self._offset = texts, 0

    def format(self, entries: list[dict[int, float]]) -> dict:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for entry in entries:
            token_id, logprob = next(iter(entry.items()))
            text = self._texts(token_id)
            tokens.append(text)
            token_logprobs.append(_finite(logprob))
            top_logprobs.append({self._texts(t): _finite(lp) for t, lp in entry.items()})
            text_offset.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}


def chat_logprobs(texts: TokenTexts, entries: list[dict[int, float]], top_n: int) -> dict:
    """The chat shape of these tokens' logprobs, with the top_n most likely at each."""
    content = []
    for entry in entries:
        token_id, logprob = next(iter(entry.items()))
        top = sorted(entry.items(), key=lambda item: -item[1])[:top_n]
        content.append(dict(_chat_token(texts(token_id), logprob),
                            top_logprobs=[_chat_token(texts(t), lp) for t, lp in top]))
    return {"content": content}


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}
