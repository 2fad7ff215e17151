"""Scheduling policies: the order in which waiting sequences are admitted, and who is preempted.

The scheduler asks a policy two things each step; everything else (budgets, KV blocks,
chunking) stays in the scheduler, so a policy is a small object that is easy to test alone.
"""

import abc

from jaxserve.request import Sequence


class SchedulingPolicy(abc.ABC):
    name: str

    @abc.abstractmethod
    def waiting_order(self, waiting: list[Sequence], now: float) -> list[Sequence]:
        """Waiting sequences in the order they should be admitted."""

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence:
        """Which running sequence to preempt when KV blocks run out (default: the newest)."""
        return candidates[-1]


class FCFSPolicy(SchedulingPolicy):
    """First come, first served; a preempted sequence keeps its arrival time, so it goes first."""

    name = "fcfs"

    def waiting_order(self, waiting, now):
        return sorted(waiting, key=lambda s: (s.arrival_time, s.seq_id))


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy}


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"scheduling_policy {name!r} is unknown; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()
