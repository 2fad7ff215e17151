"""Request state on the host and what the engine returns: each sampled token appended,
detokenized incrementally, checked against the stop conditions, and turned into outputs.

Outputs are deltas: a request's output from a step carries only what is new since its last one
(text, token ids, logprobs; `RequestOutput.delta` is True), so a step costs the host time of
its new tokens, never of a request's whole history. The final output (`finished`) is whole.

Stop conditions, as vLLM checks them: a stop token (EOS unless ignore_eos, or stop_token_ids;
the sampler bans them below min_tokens) ends a sequence without its text; max_tokens and
max_model_len end it with "length"; a stop string ends it with the text before the string.
Stop strings count only once the sequence has more than min_tokens tokens, and only a match
that ends in new text; text that might begin a stop string is held back until it cannot. Both
cost time linear in the new text, whatever the stop strings' length (jaxserve/engine/stop_matcher.py).
"""

import dataclasses

from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxserve.request import Sequence
from jaxserve.sampling_params import SamplingParams
from jaxserve.engine.stop_matcher import StopMatcher
from jaxserve.model_io.tokenizer import IncrementalDetokenizer


@dataclasses.dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    detokenizers: list[IncrementalDetokenizer | None]
    texts: list[str]
    stop_reasons: list[str | int | None]
    held: list[str]  # text withheld per sequence because it may begin a stop string
    # What earlier outputs carried, per sequence: tokens (and logprobs), characters.
    sent_tokens: list[int] = dataclasses.field(default_factory=list)
    sent_chars: list[int] = dataclasses.field(default_factory=list)
    # Per sequence: its progress through the stop strings, made at its first text.
    stop_matchers: list[StopMatcher | None] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        n = len(self.seqs)
        self.sent_tokens = self.sent_tokens or [0] * n
        self.sent_chars = self.sent_chars or [0] * n
        self.stop_matchers = self.stop_matchers or [None] * n

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def append_token(req: RequestState, seq: Sequence, token: int, logprob: float | None,
                 top: list[tuple[int, float]], *, eos_token_ids: tuple[int, ...],
                 max_model_len: int) -> str | None:
    """Appends a sampled token to its sequence; -> the finish reason it causes, or None."""
    params = seq.params
    seq.output_token_ids.append(token)
    if params.logprobs is not None:
        entry = {token: logprob}
        entry.update({t: lp for t, lp in top if t not in entry})
        seq.output_logprobs.append(entry)
    i = seq.index
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
        req.stop_reasons[i] = token if token in params.stop_token_ids else None
        _detokenize(req, seq, None, final=True)  # the stop token's text is not emitted
        return "stop"
    max_tokens = params.max_tokens or max_model_len
    at_limit = (len(seq.output_token_ids) >= max_tokens
                or seq.num_known_tokens >= max_model_len)
    if _detokenize(req, seq, token, final=at_limit):
        return "stop"
    return "length" if at_limit else None


def _detokenize(req: RequestState, seq: Sequence, token: int | None, *, final: bool) -> bool:
    """Adds the token's text; returns True when a stop string ended the sequence."""
    detok = req.detokenizers[seq.index]
    if detok is None:
        return False
    i = seq.index
    delta = detok.add(token) if token is not None else ""
    if final:
        delta += detok.flush()
    held = req.held[i]
    if seq.params.stop:
        matcher = req.stop_matchers[i] or _start_matcher(req, i)
        # Only a match that ends in the new text: an older one was looked for before (or came
        # before min_tokens, when stop strings do not count).
        match = matcher.feed(delta, report=len(seq.output_token_ids) > seq.params.min_tokens)
        if match is not None:
            cut = match.start  # into delta; negative: into the held text
            req.texts[i] += held[:len(held) + cut] if cut < 0 else held + delta[:cut]
            req.held[i] = ""
            req.stop_reasons[i] = match.stop
            return True
        if not final:
            # Hold back the longest tail that could be the start of a stop string.
            keep = matcher.hold
            if keep <= len(delta):
                req.texts[i] += held + delta[:len(delta) - keep]
                req.held[i] = delta[len(delta) - keep:]
            else:
                cut = len(held) + len(delta) - keep
                req.texts[i] += held[:cut]
                req.held[i] = held[cut:] + delta
            return False
    req.texts[i] += held + delta
    req.held[i] = ""
    return False


def _start_matcher(req: RequestState, i: int) -> StopMatcher:
    """Sequence i's stop-string matcher; text already held (a hand-over's) is fed first."""
    matcher = req.stop_matchers[i] = StopMatcher(req.params.stop)
    matcher.feed(req.held[i], report=False)
    return matcher


def release_held(req: RequestState) -> None:
    """At the end of a request: text held back for a stop string that never came is output."""
    for seq in req.seqs:
        if req.held[seq.index]:
            req.texts[seq.index] += req.held[seq.index]
            req.held[seq.index] = ""


def make_output(req: RequestState, finished: bool) -> RequestOutput:
    """The request's output: what is new since its last output, or everything once finished."""
    outputs = []
    for s in req.seqs:
        i = s.index
        wants_logprobs = s.params.logprobs is not None
        if finished:
            text, token_ids = req.texts[i], list(s.output_token_ids)
            logprobs = list(s.output_logprobs) if wants_logprobs else None
        else:
            text = req.texts[i][req.sent_chars[i]:]
            token_ids = s.output_token_ids[req.sent_tokens[i]:]
            logprobs = s.output_logprobs[req.sent_tokens[i]:] if wants_logprobs else None
        req.sent_chars[i], req.sent_tokens[i] = len(req.texts[i]), len(s.output_token_ids)
        outputs.append(CompletionOutput(index=i, text=text, token_ids=token_ids,
                                        finish_reason=s.finish_reason, logprobs=logprobs,
                                        stop_reason=req.stop_reasons[i]))
    head = req.seqs[0]
    return RequestOutput(
        request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
        outputs=outputs, finished=finished, metrics=request_metrics(req),
        num_cached_tokens=head.num_cached_prompt_tokens, delta=not finished)


def request_metrics(req: RequestState) -> RequestMetrics:
    head = req.seqs[0]
    m = RequestMetrics.started(req.arrival_time, head.first_scheduled_time, head.first_token_time)
    finished = [s.finished_time for s in req.seqs if s.finished_time is not None]
    if len(finished) == len(req.seqs):
        m.e2e_latency = max(finished) - req.arrival_time
        n = len(head.output_token_ids)
        if n > 1 and head.first_token_time is not None and head.finished_time is not None:
            m.time_per_output_token = (head.finished_time - head.first_token_time) / (n - 1)
    return m
