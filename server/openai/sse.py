"""What streamed and unary responses share: per-choice deltas, usage, and server-sent events.

The engine's outputs before a request's last are deltas (only the new text, token ids and
logprobs); its last is whole. ChoiceDeltas turns both into "what is new since the last chunk"
for each choice, so a stream never repeats or drops text.
"""

import json

from jaxserve.outputs import CompletionOutput, RequestOutput

DONE = "data: [DONE]\n\n"


def event(body: dict) -> str:
    """One server-sent event carrying a JSON body."""
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


class ChoiceDeltas:
    """For each choice (prompt index, sample index): the token ids and characters sent so far."""

    def __init__(self):
        self._sent: dict[tuple[int, int], tuple[int, int]] = {}
        self._done: set[tuple[int, int]] = set()

    def new(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput
            ) -> tuple[str, list[int], list[dict] | None, bool] | None:
        """(new text, new token ids, their logprobs or None, whether this finishes the choice);
        None when nothing is new."""
        key = (prompt_index, completion.index)
        tokens, chars = self._sent.get(key, (0, 0))
        logprobs = completion.logprobs
        if output.delta:
            text, ids = completion.text, completion.token_ids
        else:
            text, ids = completion.text[chars:], completion.token_ids[tokens:]
            logprobs = logprobs[tokens:] if logprobs is not None else None
        self._sent[key] = (tokens + len(ids), chars + len(text))
        finishes = completion.finish_reason is not None and key not in self._done
        if finishes:
            self._done.add(key)
        if not (text or ids or finishes):
            return None
        return text, ids, logprobs, finishes


def usage(outputs: list[RequestOutput]) -> dict:
    """OpenAI's usage of the finished requests of one call (each prompt counted once, not per
    sample); prompt_tokens_details.cached_tokens: tokens found in the prefix cache."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}
