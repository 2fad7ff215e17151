"""Draft-model proposals (speculative_method "draft"): a second, smaller model of the same
vocabulary, on the same mesh, with its own runner, paged KV cache and batch slots, runs k greedy
steps ahead of each speculating sequence (docs/SPECULATIVE.md).

Each target sequence has a twin `Sequence` in the draft's cache. Per step, for the sequences
that speculate: the twin catches up on the tokens the draft has not seen (the prompt at first,
then the target's latest tokens; in chunks within the token budget), whose last sample is
proposal 1; then k - 1 one-token steps follow, each fed on the device by the token the one
before sampled (the runner's `last_tokens`), and all k are read back together. The K/V the
draft wrote for proposals the target rejected are rolled back at the next step: the twin keeps
the prefix that matches the target's tokens and its blocks past it are freed. Greedy drafts are
point masses, so the target's verification keeps its distribution exactly.

Host code except for the draft runner's own device calls.
"""

import dataclasses

from jaxserve.model_io.checkpoint import load_model
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.model_io.default_model import resolve_model_path
from jaxserve.core.kv_cache import KVCacheManager
from jaxserve.request import Sequence, SequenceStatus
from jaxserve.worker.runner import ModelRunner
from jaxserve.sampling_params import SamplingParams
from jaxserve.core.scheduler import ScheduledSeq, SchedulerOutput

_GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


@dataclasses.dataclass
class _Twin:
    seq: Sequence  # the draft's copy: its prompt_token_ids are the target's known tokens
    tail_start: int = 0  # position of the first proposal fed to the draft in the last step
    tail: list[int] = dataclasses.field(default_factory=list)  # the proposals fed then


class DraftProposer:
    def __init__(self, config: EngineConfig, target: ModelConfig, mesh, precompile: bool,
                 progress: bool):
        path = resolve_model_path(config.speculative_model)
        draft_config = ModelConfig.from_dir(path)
        if draft_config.vocab_size != target.vocab_size:
            raise ValueError(f"EngineConfig.speculative_model: the draft's vocabulary "
                             f"({draft_config.vocab_size}) differs from the target's "
                             f"({target.vocab_size}); a draft needs the same tokenizer")
        # Room for every sequence at full length: the draft never preempts.
        c = dataclasses.replace(config, speculative_method="none", speculative_model=None,
                                enable_prefix_caching=False, preemption_mode="recompute",
                                num_kv_blocks=None).resolve(draft_config)
        num_blocks = c.max_num_seqs * c.max_blocks_per_seq
        self.config = dataclasses.replace(c, num_kv_blocks=num_blocks)
        model = load_model(path, config.dtype, mesh=mesh, progress=progress)
        self.runner = ModelRunner(model, self.config, num_blocks, precompile, progress, mesh=mesh)
        self.kv_cache = KVCacheManager(num_blocks, self.config.block_size, False)
        self.k = config.num_speculative_tokens
        self.max_model_len = config.max_model_len
        self._twins: dict[int, _Twin] = {}  # target seq_id -> twin

    def num_to_propose(self, seq: Sequence) -> int:
        max_tokens = seq.params.max_tokens or self.max_model_len
        return max(0, min(self.k, max_tokens - seq.num_output_tokens - 1,
                          self.max_model_len - seq.num_tokens))

    def propose_batch(self, seqs: list[Sequence], running: list[Sequence]) -> None:
        """Sets seq.spec.proposals for each of seqs (all of whose tokens are known); forgets
        the twins of sequences no longer running."""
        live = {s.seq_id for s in running if s.status == SequenceStatus.RUNNING}
        for seq_id in [i for i in self._twins if i not in live]:
            self._release(self._twins.pop(seq_id))
        wants = {}
        for seq in seqs:
            seq.spec.proposals = []
            k = self.num_to_propose(seq)
            if k:
                wants[seq.seq_id] = (seq, k, self._sync_twin(seq))
        if not wants:
            return
        drafted = self._run(list(wants.values()))
        for seq, k, twin in wants.values():
            proposals = drafted[seq.seq_id][:k]
            seq.spec.proposals = proposals
            twin.tail_start, twin.tail = seq.num_known_tokens, proposals[:-1]

    def _sync_twin(self, seq: Sequence) -> _Twin:
        """The twin holding the target's tokens, its cache cut to the prefix still valid."""
        twin = self._twins.get(seq.seq_id)
        tokens = seq.token_ids
        if twin is None:
            draft = Sequence(seq.seq_id, seq.request_id, seq.index, tokens, _GREEDY, 0,
                             seq.arrival_time)
            draft.status = SequenceStatus.RUNNING
            twin = self._twins[seq.seq_id] = _Twin(draft)
            return twin
        valid = min(twin.seq.num_computed_tokens, twin.tail_start)
        for j, token in enumerate(twin.tail):  # proposals the target accepted stay valid
            pos = twin.tail_start + j
            if pos >= len(tokens) or tokens[pos] != token:
                break
            valid = pos + 1
        valid = min(valid, len(tokens) - 1)  # the last token always runs: it samples
        twin.seq.prompt_token_ids = tokens
        twin.seq.num_computed_tokens = valid
        self.kv_cache.truncate(twin.seq, valid)
        return twin

    def _run(self, wants: list[tuple[Sequence, int, _Twin]]) -> dict[int, list[int]]:
        """Catch-up chunks, then k - 1 one-token steps, dispatched back to back; read once."""
        handles = []
        budget_per_step = self.config.max_num_batched_tokens
        pending = [twin.seq for _, _, twin in wants]
        while pending:  # catch up: chunks within the token budget, the last one samples
            items, budget, rest = [], budget_per_step, []
            for draft in pending:
                if budget <= 0:
                    rest.append(draft)
                    continue
                n = min(draft.num_tokens - draft.num_computed_tokens, budget)
                items.append(self._take(draft, n))
                budget -= n
                if draft.num_computed_tokens < draft.num_tokens:
                    rest.append(draft)
            handles.append(self._dispatch(items))
            pending = rest
        for step in range(1, max(k for _, k, _ in wants)):
            items = [self._take(twin.seq, 1) for _, k, twin in wants if step < k]
            handles.append(self._dispatch(items))
        drafted: dict[int, list[int]] = {seq.seq_id: [] for seq, _, _ in wants}
        for handle in handles:
            for row in self.runner.collect(handle):
                drafted[row.seq.seq_id] += row.tokens
        for _, _, twin in wants:
            twin.seq.num_pending = 0
        return drafted

    def _take(self, draft: Sequence, num_tokens: int) -> ScheduledSeq:
        if not self.kv_cache.allocate(draft, num_tokens):
            raise RuntimeError("draft KV cache full: it holds max_num_seqs sequences at "
                               "max_model_len, which should never run out")
        start = draft.num_computed_tokens
        draft.num_computed_tokens += num_tokens
        return ScheduledSeq(draft, start, num_tokens, draft.num_computed_tokens == draft.num_tokens)

    def _dispatch(self, items: list[ScheduledSeq]):
        handle = self.runner.execute(SchedulerOutput(items, [], []))
        for seq in handle.rows:
            seq.num_pending += 1  # its sample feeds the next step on the device
        return handle

    def release(self, seq: Sequence) -> None:
        """The target sequence finished: its twin's blocks and slot go back."""
        twin = self._twins.pop(seq.seq_id, None)
        if twin is not None:
            self._release(twin)

    def _release(self, twin: _Twin) -> None:
        self.kv_cache.free(twin.seq)
        self.runner.batch.release(twin.seq)
