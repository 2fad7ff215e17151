"""How big a Complete reply can get, before it is generated: refuse what could not be sent.

A unary reply is one message, and gRPC will not send one over max_message_bytes (the client
would see RESOURCE_EXHAUSTED after all the work, a code that means "retry later"). So the
servicer bounds the reply from the request alone and refuses it up front with INVALID_ARGUMENT
naming the limit. The bound counts, per sample and output token, the largest encoding of each
proto field (packed varint ids, text, one TokenLogprob with its top entries):

    bound = overhead + n * (sample overhead + max stop string + tokens * per-token bytes)
    tokens = min(max_tokens, max_model_len - prompt tokens)

It is an upper bound, not an estimate: a reply it lets through fits. (Should one still exceed the
limit the servicer answers OUT_OF_RANGE after measuring it, never RESOURCE_EXHAUSTED.)

A stream needs no bound, but one message of it can still grow (a slow reader's deltas are merged
into one): `split_stream_response` cuts such a message into several under the limit.
"""

from jaxserve.sampling_params import SamplingParams
from jaxserve.model_io.tokenizer import Tokenizer
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb

_VARINT = 5  # a non-negative int32 as a varint, at most
_LENGTH = 5  # a length prefix, at most (messages under 4 GiB)
_DOUBLE = 8
_TOP_ENTRY = 1 + _LENGTH + (1 + _VARINT) + (1 + _DOUBLE)  # TopLogprob in TokenLogprob.top
_TOKEN_LOGPROB = 1 + _LENGTH + (1 + _VARINT) + (1 + _DOUBLE)  # without its top entries
# SampleOutput: index, the token_ids/text/stop_string tags and lengths, finish_reason, a stop
# token id; the sample's own tag and length in the reply.
_SAMPLE_OVERHEAD = (1 + _VARINT) + 3 * (1 + _LENGTH) + 2 + (1 + _VARINT) + (1 + _LENGTH)
_REPLY_OVERHEAD = 256  # request_id and Usage


def text_bytes_per_token(tokenizer: Tokenizer | None) -> int:
    """The most UTF-8 bytes one token adds to a sample's text (0 without a tokenizer)."""
    return tokenizer.max_token_bytes() if tokenizer is not None else 0


def complete_reply_bound(params: SamplingParams, room: int, text_bytes_per_token: int) -> int:
    """Bytes a CompleteResponse for this request can take at most.

    room: tokens the context leaves after the prompt (max_model_len - prompt tokens)."""
    tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    per_token = _VARINT + text_bytes_per_token
    if params.logprobs is not None:
        per_token += _TOKEN_LOGPROB + params.logprobs * _TOP_ENTRY
    longest_stop = max((len(s.encode("utf-8", "surrogatepass")) for s in params.stop), default=0)
    return _REPLY_OVERHEAD + params.n * (_SAMPLE_OVERHEAD + longest_stop + tokens * per_token)


def too_big_before(bound: int, limit: int, params: SamplingParams) -> str:
    return (f"request: the reply could reach {bound} bytes (n={params.n}, max_tokens="
            f"{params.max_tokens}, logprobs={params.logprobs}), over max_message_bytes "
            f"({limit}); lower n, max_tokens or logprobs, or stream it with Generate")


def too_big_after(size: int, limit: int, hint: str = "") -> str:
    return f"reply: {size} bytes, over max_message_bytes ({limit}){hint}"


COMPLETE_HINT = "; lower n, max_tokens or logprobs, or stream it with Generate"


def split_stream_response(response: pb.GenerateResponse, limit: int
                          ) -> list[pb.GenerateResponse]:
    """One streamed delta as messages of at most `limit` bytes, in order (a slow reader's merged
    deltas can outgrow the limit). A client appends each sample's token_ids, logprobs and text
    across messages, so any split in order reads the same; each sample's finish_reason and stop
    reason go on its last piece, `finished` and usage on the last message."""
    if response.ByteSize() <= limit:
        return [response]
    budget = max(limit // 2, limit - _REPLY_OVERHEAD)
    pieces = [piece for sample in response.samples for piece in _split_sample(sample, budget)]
    messages = [pb.GenerateResponse(request_id=response.request_id, samples=[piece])
                for piece in pieces] or [pb.GenerateResponse(request_id=response.request_id)]
    messages[-1].finished = response.finished
    if response.HasField("usage"):
        messages[-1].usage.CopyFrom(response.usage)
    return messages


def _split_sample(sample: pb.SampleOutput, budget: int) -> list[pb.SampleOutput]:
    parts = 1
    while True:
        parts *= 2
        pieces = _sample_pieces(sample, parts)
        if all(p.ByteSize() <= budget for p in pieces) or parts >= 2 * max(
                len(sample.token_ids), len(sample.text), 1):
            return pieces


def _sample_pieces(sample: pb.SampleOutput, parts: int) -> list[pb.SampleOutput]:
    """The sample cut into `parts` contiguous pieces of tokens (with their logprobs) and text."""
    def cut(seq, i):
        size = -(-len(seq) // parts)  # ceil
        return seq[i * size:(i + 1) * size]

    pieces = []
    for i in range(parts):
        piece = pb.SampleOutput(index=sample.index, token_ids=cut(sample.token_ids, i),
                                text=cut(sample.text, i), logprobs=cut(sample.logprobs, i))
        if piece.token_ids or piece.text or piece.logprobs:
            pieces.append(piece)
    last = pieces[-1] if pieces else pb.SampleOutput(index=sample.index)
    if not pieces:
        pieces.append(last)
    last.finish_reason = sample.finish_reason
    which = sample.WhichOneof("stop_reason")
    if which is not None:
        setattr(last, which, getattr(sample, which))
    return pieces
