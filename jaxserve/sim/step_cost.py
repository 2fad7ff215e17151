"""How long one engine step takes, as a function of (batched tokens, sequences in the step).

The numbers are measured, not modelled: tools/measure_step_costs.py times the real engine's step
over a grid of (tokens, sequences) and writes a table to jaxserve/sim/step_costs/<name>.json; the
simulator interpolates it bilinearly (clamped at the grid's edges).
"""

import json
import os

import numpy as np

STEP_COSTS_DIR = os.path.join(os.path.dirname(__file__), "step_costs")


class StepCostModel:
    def __init__(self, tokens, seqs, seconds, metadata: dict | None = None):
        """tokens: [T] and seqs: [S] increasing grid points; seconds: [T, S] step times, with
        None where seqs > tokens (a step cannot have more sequences than tokens)."""
        self.tokens = np.asarray(tokens, np.float64)
        self.seqs = np.asarray(seqs, np.float64)
        table = np.array([[np.nan if v is None else v for v in row] for row in seconds], np.float64)
        if table.shape != (len(self.tokens), len(self.seqs)):
            raise ValueError(f"step cost table is {table.shape}, expected ({len(self.tokens)}, {len(self.seqs)})")
        # The runner pads a step's tokens up to at least its sequence count, so a cell with more
        # sequences than tokens costs what the diagonal cell with that many tokens costs.
        for i, j in zip(*np.nonzero(np.isnan(table))):
            k = min(np.searchsorted(self.tokens, self.seqs[j]), len(self.tokens) - 1)
            table[i, j] = table[k, j]
        if np.isnan(table).any() or (table <= 0).any():
            raise ValueError("step cost table has missing or non-positive entries")
        self.table = table
        self.metadata = metadata or {}
        self._memo: dict[tuple[int, int], float] = {}  # a simulation asks for few distinct shapes

    @classmethod
    def load(cls, name_or_path: str) -> "StepCostModel":
        """A table by name ("cpu" -> step_costs/cpu.json) or by path."""
        path = name_or_path
        if not os.path.isfile(path):
            path = os.path.join(STEP_COSTS_DIR, f"{name_or_path}.json")
        if not os.path.isfile(path):
            known = sorted(f[:-5] for f in os.listdir(STEP_COSTS_DIR) if f.endswith(".json"))
            raise FileNotFoundError(f"step cost table {name_or_path!r}: no such file; known: {known}")
        with open(path) as f:
            doc = json.load(f)
        meta = {k: v for k, v in doc.items() if k not in ("tokens", "seqs", "seconds")}
        return cls(doc["tokens"], doc["seqs"], doc["seconds"], meta)

    @classmethod
    def constant(cls, seconds: float) -> "StepCostModel":
        """Every step takes the same time (tests)."""
        return cls([1, 2], [1, 2], [[seconds, None], [seconds, seconds]])

    def __call__(self, num_tokens: int, num_seqs: int) -> float:
        seconds = self._memo.get((num_tokens, num_seqs))
        if seconds is None:
            seconds = self._memo[(num_tokens, num_seqs)] = self._interpolate(num_tokens, num_seqs)
        return seconds

    def _interpolate(self, num_tokens: int, num_seqs: int) -> float:
        i, ti = _bracket(self.tokens, num_tokens)
        j, tj = _bracket(self.seqs, num_seqs)
        t = self.table
        return float((1 - ti) * ((1 - tj) * t[i, j] + tj * t[i, j + 1])
                     + ti * ((1 - tj) * t[i + 1, j] + tj * t[i + 1, j + 1]))


def _bracket(grid: np.ndarray, x: float) -> tuple[int, float]:
    """(i, w): x lies w of the way from grid[i] to grid[i + 1], clamped to the grid."""
    i = int(np.clip(np.searchsorted(grid, x) - 1, 0, len(grid) - 2))
    w = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, min(max(w, 0.0), 1.0)
