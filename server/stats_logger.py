"""The serving log, as vLLM writes it: every `interval_s`, one INFO line of what the engine did.

    INFO ... stats_logger.py] prompt 812.4 tokens/s, generation 301.7 tokens/s; running 12,
        waiting 3 requests; KV cache 41.2% used; prefix cache hit rate 37.5%; preemptions 0

It runs as a task on the server's event loop and reads the engine loop's latest EngineStats
snapshot (server/engine_loop.py), so the engine thread does nothing for it. Rates are over the
interval; the hit rate and preemptions since start. A line is written only when something
happened in the interval: tokens computed, requests running or waiting, a preemption.
"""

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from jaxserve.engine.engine import EngineStats

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    time: float
    stats: EngineStats


def stats_line(before: _Snapshot, now: _Snapshot) -> str | None:
    """The line for the interval from `before` to `now`; None when nothing happened in it."""
    s, b = now.stats, before.stats
    prompt = s.num_prompt_tokens_computed - b.num_prompt_tokens_computed
    generated = s.num_generated_tokens - b.num_generated_tokens
    preempted = s.num_preemptions - b.num_preemptions
    if not (prompt or generated or preempted or s.num_running or s.num_waiting):
        return None
    elapsed = max(now.time - before.time, 1e-9)
    line = (f"prompt {prompt / elapsed:.1f} tokens/s, generation {generated / elapsed:.1f} "
            f"tokens/s; running {s.num_running}, waiting {s.num_waiting} requests; KV cache "
            f"{100 * s.kv_cache_usage:.1f}% used; prefix cache hit rate "
            f"{100 * s.prefix_cache_hit_rate:.1f}%; preemptions {s.num_preemptions}")
    drafted = s.num_draft_tokens - b.num_draft_tokens
    if drafted:  # speculative decoding
        accepted = s.num_accepted_tokens - b.num_accepted_tokens
        line += f"; draft acceptance {100 * accepted / drafted:.1f}%"
    return line


class StatsLogger:
    def __init__(self, stats: Callable[[], EngineStats | None], interval_s: float,
                 clock: Callable[[], float] = time.monotonic):
        """stats: the latest EngineStats (None while the model loads)."""
        if not interval_s > 0:
            raise ValueError(f"log_stats_interval_s must be > 0, got {interval_s}")
        self._stats, self.interval_s, self._clock = stats, interval_s, clock
        self._last: _Snapshot | None = None

    def tick(self) -> str | None:
        """Takes a snapshot; returns (and logs) the line for the interval since the last one."""
        stats = self._stats()
        if stats is None:
            return None
        now = _Snapshot(self._clock(), stats)
        before, self._last = self._last, now
        if before is None:  # the first snapshot starts the first interval
            return None
        line = stats_line(before, now)
        if line is not None:
            logger.info("%s", line)
        return line

    async def run(self) -> None:
        """Ticks every interval_s until cancelled."""
        while True:
            self.tick()
            await asyncio.sleep(self.interval_s)
