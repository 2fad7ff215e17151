"""What a dispatched step gives back: its batches' device results (`StepHandle`, from
`ModelRunner.execute`) and, once read, one `SampledSeq` per sampled sequence
(`ModelRunner.collect`). A speculating sequence's k + 1 rows are cut at its first rejected
proposal here (jaxserve/speculative/spec_decode.py). Host code: numpy results in, Python lists out.
"""

import dataclasses

from jaxserve.request import Sequence
from jaxserve.speculative.spec_decode import accepted_prefix


@dataclasses.dataclass
class SampledSeq:
    """What one step gave a sampled sequence: one token, or (speculating) the accepted
    proposals and the token after them, in order; logprobs and tops per token."""
    seq: Sequence
    tokens: list[int]
    logprobs: list[float | None]
    tops: list[list[tuple[int, float]]]
    num_draft: int = 0  # proposals verified (0: the sequence did not speculate)

    @property
    def num_accepted(self) -> int:
        return len(self.tokens) - 1 if self.num_draft else 0


@dataclasses.dataclass
class StepBatch:
    """One dispatched batch: its sampled rows (StepArrays' rows and drafts) and device results."""
    rows: list[Sequence]
    drafts: list[int]  # per row: the proposal it verifies, -1 for none
    first: list[bool]  # per row: the first row of its sequence
    result: object  # SamplerOutput
    load: object  # expert load or None

    def read(self, result) -> list[SampledSeq]:
        """result: this batch's SamplerOutput, on the host. -> one entry per sequence."""
        tokens = result.tokens.tolist()
        lps = result.logprobs.tolist() if result.logprobs is not None else None
        out, num_rows, r = [], len(self.rows), 0
        while r < num_rows:
            seq = self.rows[r]
            end = r + 1
            while end < num_rows and not self.first[end]:
                end += 1
            drafts = self.drafts[r:end - 1]
            keep = accepted_prefix(tokens[r:end], drafts) + 1
            n = seq.params.logprobs
            tops = [list(zip(result.top_ids[i, :n].tolist(),
                             result.top_logprobs[i, :n].tolist())) if n else []
                    for i in range(r, r + keep)]
            out.append(SampledSeq(seq, tokens[r:r + keep],
                                  lps[r:r + keep] if lps is not None else [None] * keep,
                                  tops, num_draft=len(drafts)))
            r = end
        return out


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: its batches and how long building and dispatching them took."""
    batches: list[StepBatch]
    dispatch_s: float  # host time spent building and dispatching it

    @property
    def rows(self) -> list[Sequence]:
        """The sampled sequences, each once."""
        return [seq for b in self.batches for seq, first in zip(b.rows, b.first) if first]
