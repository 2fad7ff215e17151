"""Stop strings matched as text arrives, in time linear in the new text whatever their length.

Each stop string gets its Knuth-Morris-Pratt prefix table once per request (`StopStrings`,
O(total characters)); each sequence then carries, per stop string, how many of its first
characters the text ends with (`StopState`). Feeding new text advances those counts one
character at a time: amortized O(new characters x number of stop strings) per step, never a
scan of the old text or of every prefix of every stop string. The same counts say how much to
hold back: the longest tail of the text that is a proper prefix of some stop string (a match
may still grow out of it) is the largest of them.

A match is reported only when asked (`report`): jaxserve/output_processor.py asks once the
sequence has more than min_tokens tokens; before that the counts still advance, so a later
match that began earlier is found. The earliest match wins: the smallest start, then the
shortest stop string, as vLLM's `str.find` over each stop string gives.
"""

import array
import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class StopMatch:
    """A stop string found: it starts `start` characters into the text fed (negative: that many
    characters before it, in text fed earlier)."""
    start: int
    stop: str


class StopStrings:
    """A request's stop strings with their prefix tables; shared by its sequences."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        # tables[i][k]: for stops[i][:k + 1], the length of its longest proper prefix that is
        # also its suffix. [num_stops] arrays of [len(stop)].
        self.tables = [_prefix_table(s) for s in stops]

    def start(self) -> "StopState":
        return StopState(self, [0] * len(self.stops))


@functools.lru_cache(maxsize=64)
def stop_strings(stops: tuple[str, ...]) -> StopStrings:
    """The StopStrings of a stop tuple, built once for requests that share it."""
    return StopStrings(stops)


@dataclasses.dataclass
class StopState:
    """One sequence's progress through its request's stop strings."""
    strings: StopStrings
    matched: list[int]  # [num_stops]: the text ends with stops[i][:matched[i]]; < len(stops[i])

    @property
    def hold(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        return max(self.matched, default=0)

    def feed(self, text: str, *, report: bool) -> StopMatch | None:
        """Advances over text; -> the earliest stop string that ends in it, when report."""
        best: tuple[int, int, int] | None = None  # (start, length, index) of the earliest match
        stops, tables, matched = self.strings.stops, self.strings.tables, self.matched
        for i, (stop, table) in enumerate(zip(stops, tables)):
            k, n = matched[i], len(stop)
            for j, ch in enumerate(text):
                while k and stop[k] != ch:
                    k = table[k - 1]
                if stop[k] == ch:
                    k += 1
                    if k == n:
                        start = j + 1 - n
                        if report and (best is None or (start, n) < best[:2]):
                            best = (start, n, i)
                        k = table[k - 1]
            matched[i] = k
        return None if best is None else StopMatch(best[0], stops[best[2]])


def _prefix_table(s: str) -> array.array:
    table = array.array("i", [0]) * len(s)
    k = 0
    for j in range(1, len(s)):
        while k and s[k] != s[j]:
            k = table[k - 1]
        if s[k] == s[j]:
            k += 1
        table[j] = k
    return table
