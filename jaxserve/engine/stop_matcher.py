"""Stop strings matched as text arrives, in time linear in the new text whatever their length.

A sequence's `StopMatcher` carries, per stop string, how many of its first characters the text
ends with. Feeding new text advances those counts one character at a time with the
Knuth-Morris-Pratt prefix table of each stop string: amortized O(new characters x number of
stop strings) per step, never a scan of the old text or of every prefix of every stop string.
The same counts say how much to hold back: the longest tail of the text that is a proper prefix
of some stop string (a match may still grow out of it) is the largest of them.

The prefix tables grow only as far as the text has matched, so a stop string costs nothing up
front either: a million-character one that the text never begins costs what "\\n" does.

A match is reported only when asked (`report`): jaxserve/engine/output_processor.py asks once the
sequence has more than min_tokens tokens; before that the counts still advance, so a later
match that began earlier is found. The earliest match wins: the smallest start, then the
shortest stop string, as vLLM's `str.find` over each stop string gives.
"""

import array
import dataclasses


@dataclasses.dataclass(frozen=True)
class StopMatch:
    """A stop string found: it starts `start` characters into the text fed (negative: that many
    characters before it, in text fed earlier)."""
    start: int
    stop: str


class StopMatcher:
    """One sequence's progress through its stop strings."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        # matched[i]: the text ends with stops[i][:matched[i]], always < len(stops[i]).
        self.matched = [0] * len(stops)
        # tables[i][j]: the longest proper prefix of stops[i][:j + 1] that is also its suffix;
        # filled for j < the most characters of stops[i] matched so far.
        self.tables = [array.array("i", [0]) for _ in stops]

    @property
    def hold(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        return max(self.matched, default=0)

    def feed(self, text: str, *, report: bool) -> StopMatch | None:
        """Advances over text; -> the earliest stop string that ends in it, when report."""
        best: tuple[int, int, int] | None = None  # (start, length, index) of the earliest match
        for i, stop in enumerate(self.stops):
            table, k, n = self.tables[i], self.matched[i], len(stop)
            for j, ch in enumerate(text):
                while k and stop[k] != ch:
                    k = table[k - 1]
                if stop[k] == ch:
                    k += 1
                    if k == len(table) < n:
                        _extend(table, stop)
                    if k == n:
                        start = j + 1 - n
                        if report and (best is None or (start, n) < best[:2]):
                            best = (start, n, i)
                        k = table[k - 1]
            self.matched[i] = k
        return None if best is None else StopMatch(best[0], self.stops[best[2]])


def _extend(table: array.array, s: str) -> None:
    """Adds the next entry of s's prefix table (the classic loop, one step of it)."""
    j = len(table)
    k = table[j - 1]
    while k and s[k] != s[j]:
        k = table[k - 1]
    table.append(k + 1 if s[k] == s[j] else 0)
