"""Between the wire and the engine: proto messages to jaxserve objects and RequestOutputs back.

Pure functions and one small stateful encoder (StreamEncoder: what each sample has sent so
far, so that a stream carries only what is new). No gRPC context, no engine thread.
"""

from jaxserve.engine.engine import Engine
from jaxserve.model_io.generation_defaults import GenerationDefaults
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams
from server.config import ServerConfig
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb

# The optional scalar fields of pb.SamplingParams, same names as jaxserve.SamplingParams.
_SCALAR_FIELDS = ("n", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed", "max_tokens", "min_tokens",
                  "ignore_eos", "logprobs", "skip_special_tokens")
_FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                   "length": pb.FINISH_REASON_LENGTH}


def prompt_from_request(request: pb.GenerateRequest) -> str | list[int]:
    """The prompt as text or token ids; ValueError when neither is set."""
    which = request.WhichOneof("prompt")
    if which == "text":
        return request.text
    if which == "token_ids":
        return list(request.token_ids.ids)
    raise ValueError("prompt is not set: give text or token_ids")


def chat_from_request(request: pb.ChatRequest) -> tuple[list[dict], bool]:
    """(the conversation as jaxserve.LLM.chat takes it, add_generation_prompt: default True).
    The messages are checked where they are rendered (jaxserve/model_io/chat_template.py)."""
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    return messages, (request.add_generation_prompt
                      if request.HasField("add_generation_prompt") else True)


def sampling_params_from_proto(params: pb.SamplingParams,
                               defaults: GenerationDefaults = GenerationDefaults()
                               ) -> SamplingParams:
    """Fields set on the wire win; unset ones take the model's `defaults` (its
    generation_config), then SamplingParams' own. ValueError (from SamplingParams) when bad."""
    kwargs = {name: getattr(params, name) for name in _SCALAR_FIELDS if params.HasField(name)}
    if params.stop:
        kwargs["stop"] = tuple(params.stop)
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(params.stop_token_ids)
    return defaults.sampling_params(**kwargs)


def usage(output: RequestOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=len(output.prompt_token_ids),
                    cached_tokens=output.num_cached_tokens,
                    output_tokens=sum(len(c.token_ids) for c in output.outputs))


def _sample(completion: CompletionOutput, tokens_from: int, text_from: int) -> pb.SampleOutput:
    sample = pb.SampleOutput(index=completion.index, token_ids=completion.token_ids[tokens_from:],
                             text=completion.text[text_from:],
                             finish_reason=_FINISH_REASONS.get(completion.finish_reason,
                                                               pb.FINISH_REASON_UNSPECIFIED))
    for entry in (completion.logprobs or [])[tokens_from:]:
        (token, logprob), *top = entry.items()  # the sampled token comes first
        sample.logprobs.append(pb.TokenLogprob(
            token_id=token, logprob=logprob,
            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top]))
    if isinstance(completion.stop_reason, str):
        sample.stop_string = completion.stop_reason
    elif isinstance(completion.stop_reason, int):
        sample.stop_token_id = completion.stop_reason
    return sample


class StreamEncoder:
    """Turns the RequestOutputs of one request (deltas, then the whole final one) into
    GenerateResponse deltas."""

    def __init__(self):
        self._sent: dict[int, tuple[int, int, bool]] = {}  # index -> (tokens, chars, finished)

    def encode(self, output: RequestOutput) -> pb.GenerateResponse | None:
        """The delta since the last call; None when nothing changed."""
        response = pb.GenerateResponse(request_id=output.request_id, finished=output.finished)
        for completion in output.outputs:
            sent = self._sent.get(completion.index, (0, 0, False))
            done = completion.finish_reason is not None
            if output.delta:  # all of it is new
                now = (sent[0] + len(completion.token_ids), sent[1] + len(completion.text), done)
                if completion.token_ids or completion.text or done != sent[2]:
                    response.samples.append(_sample(completion, 0, 0))
            else:
                now = (len(completion.token_ids), len(completion.text), done)
                if now != sent:
                    response.samples.append(_sample(completion, sent[0], sent[1]))
            self._sent[completion.index] = now
        if output.finished:
            response.usage.CopyFrom(usage(output))
        elif not response.samples:
            return None
        return response


def complete_response(output: RequestOutput) -> pb.CompleteResponse:
    return pb.CompleteResponse(
        request_id=output.request_id, usage=usage(output),
        samples=[_sample(c, 0, 0) for c in sorted(output.outputs, key=lambda c: c.index)])


def model_info(engine: Engine, server_config: ServerConfig) -> pb.ModelInfo:
    model, config = engine.model_config, engine.config
    return pb.ModelInfo(
        model_path=engine.model_path, model_type=model.model_type, dtype=config.dtype,
        max_model_len=config.max_model_len, vocab_size=model.vocab_size,
        parallelism=pb.Parallelism(tensor=config.tensor_parallel, data=config.data_parallel,
                                   sequence=config.sequence_parallel,
                                   expert=config.expert_parallel),
        limits=pb.EngineLimits(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size, num_kv_blocks=engine.kv_cache.num_blocks,
            max_logprobs=config.max_logprobs, max_stop_token_ids=config.max_stop_token_ids,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_chunked_prefill=config.enable_chunked_prefill,
            attention_backend=config.attention_backend,
            scheduling_policy=config.scheduling_policy, max_pending=server_config.max_pending),
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_q_heads=model.num_q_heads,
        num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
        eos_token_ids=list(model.eos_token_ids), has_tokenizer=engine.tokenizer is not None,
        has_chat_template=(engine.tokenizer is not None
                           and engine.tokenizer.chat_template.template is not None))
