"""Prefill/decode hand-over, the engine's side: a request taken out of a prefill engine with a
host copy of its K/V (`export_request`), and continued in a decode engine, its K/V brought in
through host slots as a swap-in (`import_request`). The data that moves is kv_handoff.py's;
disaggregation.py drives the two engines. `Engine.export_request`/`import_request` call these.
"""

from typing import TYPE_CHECKING

from jaxserve.engine.kv_handoff import KVHandoff, SeqHandoff
from jaxserve.engine.output_processor import RequestState
from jaxserve.model_io.tokenizer import IncrementalDetokenizer
from jaxserve.request import Sequence, SequenceStatus

if TYPE_CHECKING:
    from jaxserve.engine.engine import Engine


def export_request(engine: "Engine", request_id: str) -> KVHandoff:
    """Engine.export_request."""
    if engine.config.disaggregation_role != "prefill":
        raise ValueError("export_request needs EngineConfig.disaggregation_role 'prefill'")
    if not engine.ready_for_handoff(request_id):
        raise ValueError(f"request {request_id!r} is not ready for hand-over (unknown, "
                         "finished, or its prompt has not run)")
    req = engine.requests[request_id]
    bs = engine.config.block_size
    seqs = []
    for seq in req.seqs:
        live = not seq.is_finished
        blocks = seq.block_table[:-(-seq.num_computed_tokens // bs)] if live else []
        seqs.append(SeqHandoff(
            index=seq.index, seed=seq.seed, output_token_ids=list(seq.output_token_ids),
            output_logprobs=list(seq.output_logprobs),
            num_computed_tokens=seq.num_computed_tokens,
            kv=engine.runner.host_kv.read(engine.runner.kv_caches, blocks),
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            text=req.texts[seq.index], held=req.held[seq.index],
            stop_reason=req.stop_reasons[seq.index],
            finish_reason=seq.finish_reason, finished_time=seq.finished_time))
    for seq in req.seqs:
        if not seq.is_finished:
            engine._finish_seq(seq, "handoff")
    del engine.requests[request_id]
    return KVHandoff(request_id=request_id, prompt=req.prompt,
                     prompt_token_ids=list(req.prompt_token_ids), params=req.params,
                     arrival_time=req.arrival_time, priority=req.seqs[0].priority,
                     client_id=req.seqs[0].client_id, layout=engine.kv_layout, seqs=seqs)


def import_request(engine: "Engine", handoff: KVHandoff) -> bool:
    """Engine.import_request."""
    if engine.config.disaggregation_role != "decode":
        raise ValueError("import_request needs EngineConfig.disaggregation_role 'decode'")
    host_kv = engine.runner.host_kv
    if handoff.layout != engine.kv_layout:
        raise ValueError(f"hand-over KV layout {handoff.layout} differs from this engine's "
                         f"{engine.kv_layout}")
    if handoff.request_id in engine.requests:
        raise ValueError(f"request_id {handoff.request_id!r} is already in use")
    engine._validate(handoff.prompt_token_ids, handoff.params)
    if [h.index for h in handoff.seqs] != list(range(handoff.params.n)):
        raise ValueError(f"hand-over has samples {[h.index for h in handoff.seqs]}; "
                         f"SamplingParams.n is {handoff.params.n}")
    longest = max(s.num_computed_tokens + 1 for s in handoff.seqs)
    if longest > engine.config.max_model_len:
        raise ValueError(f"hand-over of {longest} tokens exceeds max_model_len "
                         f"({engine.config.max_model_len})")
    _check_seqs(engine, handoff, host_kv.data)
    if handoff.num_blocks > engine.scheduler.swap.num_slots:
        raise ValueError(f"hand-over of {handoff.num_blocks} KV blocks exceeds this engine's "
                         f"{engine.scheduler.swap.num_slots} host slots (swap_space_gib)")
    slots = engine.scheduler.swap.allocate(handoff.num_blocks)
    if slots is None:
        return False
    try:
        _take(engine, handoff, slots)
    except Exception:
        engine.scheduler.swap.free(slots)
        raise
    return True


def _check_seqs(engine: "Engine", handoff: KVHandoff, host_data) -> None:
    """Each live sample: its tokens in the vocabulary, all but the last one computed, K/V
    blocks of the shape and dtype that this engine stores."""
    vocab, bs = engine.model_config.vocab_size, engine.config.block_size
    num_prompt = len(handoff.prompt_token_ids)
    for h in handoff.seqs:
        if any(not 0 <= t < vocab for t in h.output_token_ids):
            raise ValueError(f"hand-over sample {h.index}: output_token_ids outside the "
                             f"vocabulary [0, {vocab})")
        if h.finish_reason is not None:
            continue
        if not h.output_token_ids or h.num_computed_tokens != num_prompt + len(
                h.output_token_ids) - 1:
            raise ValueError(f"hand-over sample {h.index}: num_computed_tokens "
                             f"{h.num_computed_tokens} must be all its tokens but the last "
                             f"({num_prompt} prompt + {len(h.output_token_ids)} output - 1)")
        shape = (-(-h.num_computed_tokens // bs), *host_data.shape[1:])
        if h.kv.shape != shape or h.kv.dtype != host_data.dtype:
            raise ValueError(f"hand-over sample {h.index}: kv is {h.kv.dtype}{list(h.kv.shape)}"
                             f"; expected {host_data.dtype}{list(shape)}")


def _take(engine: "Engine", handoff: KVHandoff, slots: list[int]) -> None:
    host_kv = engine.runner.host_kv
    params, prompt_ids = handoff.params, handoff.prompt_token_ids
    seqs, detoks = [], []
    for h in handoff.seqs:
        seq = Sequence(next(engine._seq_ids), handoff.request_id, h.index, list(prompt_ids),
                       params, h.seed, handoff.arrival_time, priority=handoff.priority,
                       client_id=handoff.client_id, output_token_ids=list(h.output_token_ids),
                       output_logprobs=list(h.output_logprobs),
                       num_cached_prompt_tokens=h.num_cached_prompt_tokens,
                       first_scheduled_time=h.first_scheduled_time,
                       first_token_time=h.first_token_time)
        detok = None
        if h.finish_reason is not None:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, h.finish_reason
            seq.finished_time = h.finished_time
        else:
            seq.num_computed_tokens = h.num_computed_tokens
            seq.swap_slots, slots = slots[:h.kv.shape[0]], slots[h.kv.shape[0]:]
            host_kv.data[seq.swap_slots] = h.kv
            if engine.tokenizer:  # the same state as the prefill engine's, replayed
                detok = IncrementalDetokenizer(engine.tokenizer, prompt_ids,
                                               params.skip_special_tokens)
                for token in h.output_token_ids:
                    detok.add(token)
        seqs.append(seq)
        detoks.append(detok)
    engine.requests[handoff.request_id] = RequestState(
        handoff.request_id, handoff.prompt, list(prompt_ids), params, seqs,
        handoff.arrival_time, detoks, [h.text for h in handoff.seqs],
        [h.stop_reason for h in handoff.seqs], [h.held for h in handoff.seqs],
        # The prefill engine's outputs carried these already.
        sent_tokens=[len(h.output_token_ids) for h in handoff.seqs],
        sent_chars=[len(h.text) for h in handoff.seqs])
    for seq in seqs:
        if not seq.is_finished:
            engine.scheduler.add(seq)
