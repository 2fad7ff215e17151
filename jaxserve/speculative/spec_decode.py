"""Speculative decoding on the host: n-gram (prompt lookup) proposals, the split of a verified
step's rows into accepted tokens, and the per-sequence switch that turns speculation off when it
does not pay (docs/SPECULATIVE.md).

A speculating sequence whose last token is known proposes up to k tokens; the step runs its last
token and the k proposals as k + 1 query tokens, and samples a token at each of them (the
sampler's verification, jaxserve/sample/spec_sampling.py, either keeps the proposal or replaces it).
Row j's token equals proposal j + 1 exactly when that proposal was accepted, so the accepted
tokens are the longest prefix of rows whose token equals their proposal, plus the token of the
first row that differs (or of the last row, a bonus token, when all were accepted).

Host code only: numpy over token ids, no device array.
"""

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jaxserve.request import Sequence

# The switch (speculative_min_acceptance): judged over this many of the latest proposed tokens,
# and off after this many steps in a row without a proposal.
ACCEPTANCE_WINDOW = 16
MAX_STEPS_WITHOUT_PROPOSAL = 8


def propose_ngram(token_ids: np.ndarray, k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Prompt lookup: the longest suffix of token_ids (ngram_max down to ngram_min tokens) that
    also occurs earlier proposes the (up to) k tokens that followed its latest earlier
    occurrence. token_ids [L] int. -> at most k token ids; [] when no n-gram recurs.

    One vectorized comparison of all windows per n, no Python loop over the history.
    """
    n_tokens = len(token_ids)
    for n in range(min(ngram_max, n_tokens - 1), ngram_min - 1, -1):
        # Windows starting at 0 .. L - n - 1: each has at least one token after it, and the
        # suffix itself (starting at L - n) is not among them.
        windows = sliding_window_view(token_ids[:-1], n)
        hits = np.flatnonzero((windows == token_ids[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return token_ids[start:start + k].tolist()
    return []


def accepted_prefix(tokens: list[int], drafts: list[int]) -> int:
    """How many proposals were accepted: rows 0..k-1 carry drafts [k]; tokens [k + 1]."""
    for j, draft in enumerate(drafts):
        if tokens[j] != draft:
            return j
    return len(drafts)


@dataclasses.dataclass
class SpecState:
    """One sequence's speculation: on or off, this step's proposals, its record so far."""
    enabled: bool = True
    proposals: list[int] = dataclasses.field(default_factory=list)  # for the next step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    steps_without_proposal: int = 0
    # (proposed, accepted) of the latest verified steps, for the acceptance window.
    recent: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def record(self, num_draft: int, num_accepted: int, min_acceptance: float) -> None:
        """Counts one verified step; turns speculation off when it stopped paying."""
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        self.recent.append((num_draft, num_accepted))
        drafted = sum(d for d, _ in self.recent)
        while self.recent and drafted - self.recent[0][0] >= ACCEPTANCE_WINDOW:
            drafted -= self.recent.pop(0)[0]
        if min_acceptance > 0 and drafted >= ACCEPTANCE_WINDOW:
            if sum(a for _, a in self.recent) < min_acceptance * drafted:
                self.enabled = False

    def no_proposal(self, min_acceptance: float) -> None:
        self.steps_without_proposal += 1
        if min_acceptance > 0 and self.steps_without_proposal >= MAX_STEPS_WITHOUT_PROPOSAL:
            self.enabled = False


class NgramProposer:
    """Proposals for the running sequences whose tokens the host knows."""

    def __init__(self, k: int, ngram_min: int, ngram_max: int, max_model_len: int,
                 min_acceptance: float):
        self.k, self.ngram_min, self.ngram_max = k, ngram_min, ngram_max
        self.max_model_len = max_model_len
        self.min_acceptance = min_acceptance

    def num_to_propose(self, seq: Sequence) -> int:
        """k, less what max_tokens and max_model_len leave: the last accepted proposal plus the
        token after it must still be wanted, and every position must fit in the cache."""
        max_tokens = seq.params.max_tokens or self.max_model_len
        return max(0, min(self.k, max_tokens - seq.num_output_tokens - 1,
                          self.max_model_len - seq.num_tokens))

    def propose_batch(self, seqs: list[Sequence], running: list[Sequence]) -> None:
        """Proposals for each of seqs (running, all of their tokens known)."""
        del running  # no per-sequence state beyond SpecState
        for seq in seqs:
            self.propose(seq)

    def release(self, seq: Sequence) -> None:
        """A sequence finished; nothing to free."""

    def propose(self, seq: Sequence) -> None:
        """Sets seq.spec.proposals (empty when nothing recurs or nothing is left to propose)."""
        spec = seq.spec
        k = self.num_to_propose(seq)
        spec.proposals = []
        if k:
            tokens = np.asarray(seq.token_ids, np.int64)
            spec.proposals = propose_ngram(tokens, k, self.ngram_min, self.ngram_max)
        if spec.proposals:
            spec.steps_without_proposal = 0
        elif k:
            spec.no_proposal(self.min_acceptance)


def spec_decode_stats(before, after) -> dict:
    """Speculative decoding over a run, from the EngineStats before and after it (empty when
    nothing was verified): tokens proposed and accepted, the acceptance rate, and the mean
    accepted length (tokens a speculating sequence gains per verification: accepted + 1)."""
    drafts = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    steps = after.num_spec_steps - before.num_spec_steps
    if not steps:
        return {}
    return {"num_draft_tokens": drafts, "num_accepted_tokens": accepted,
            "acceptance_rate": round(accepted / drafts, 4),
            "mean_accepted_length": round(1 + accepted / steps, 3)}
