"""Routing policies: which backend a call goes to, given the backends it may use and their load.

A policy sees only `Candidate`s (the backends that are SERVING and not yet tried for this call,
each with its load at the router) and the request message; it returns one of the candidates.
No gRPC, no clock, no I/O: the router's BackendPool builds the candidates and counts the load.

    round_robin          the next backend in --backends order after the last one picked
    least_outstanding    the fewest calls in flight at the router (ties: the fewest routed so far)
    prefix_affinity      prompts that share their first block of text or tokens go to the same
                         backend (rendezvous hashing over the backend addresses), so its prefix
                         cache is reused; least_outstanding when that backend is overloaded
"""

import dataclasses
import hashlib
from typing import Protocol, Sequence

from google.protobuf.message import Message

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """A backend a call may go to: its position in --backends, its address and its load at the
    router (calls in flight, calls routed since start)."""

    index: int
    address: str
    in_flight: int = 0
    routed: int = 0


class RoutingPolicy(Protocol):
    def choose(self, candidates: Sequence[Candidate], request: Message) -> Candidate:
        """One of `candidates` (never empty) for this request."""


class RoundRobin:
    """Cycles through the backends in order, skipping those that are not candidates."""

    def __init__(self):
        self._next_index = 0

    def choose(self, candidates: Sequence[Candidate], request: Message) -> Candidate:
        after = [c for c in candidates if c.index >= self._next_index]
        chosen = min(after or candidates, key=lambda c: c.index)
        self._next_index = chosen.index + 1
        return chosen


class LeastOutstanding:
    """The backend with the fewest calls in flight at the router."""

    def choose(self, candidates: Sequence[Candidate], request: Message) -> Candidate:
        return least_outstanding(candidates)


def least_outstanding(candidates: Sequence[Candidate]) -> Candidate:
    """Fewest in flight; ties go to the fewest routed so far, then the first in --backends."""
    return min(candidates, key=lambda c: (c.in_flight, c.routed, c.index))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixAffinity:
    """Cache-aware routing: the same prompt prefix, the same backend.

    Attributes:
      prefix_chars: how much of a text prompt decides the backend (about one KV block of tokens:
        the prefix cache shares whole blocks, so a shorter shared prefix shares nothing).
      prefix_tokens: the same for a prompt given as token ids.
      max_imbalance: when the hashed backend has more than this many calls in flight beyond the
        least loaded candidate, the call goes to the least loaded one instead.
    """

    prefix_chars: int = 64
    prefix_tokens: int = 16
    max_imbalance: int = 8

    def __post_init__(self):
        for name in ("prefix_chars", "prefix_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {self.max_imbalance}")

    def choose(self, candidates: Sequence[Candidate], request: Message) -> Candidate:
        key = self.prefix_key(request)
        if key is None:  # nothing cached to aim at (Tokenize, GetModelInfo, ...)
            return least_outstanding(candidates)
        hashed = max(candidates, key=lambda c: _rendezvous_score(c.address, key))
        least = least_outstanding(candidates)
        if hashed.in_flight > least.in_flight + self.max_imbalance:
            return least
        return hashed

    def prefix_key(self, request: Message) -> bytes | None:
        """The bytes that decide a Generate/Complete/Chat call's backend; None for other calls."""
        if isinstance(request, pb.ChatRequest):  # its prompt starts where its conversation does
            turns = "".join(f"{m.role}\n{m.content}\n" for m in request.messages)
            return b"chat:" + turns[:self.prefix_chars].encode() if turns else None
        if not isinstance(request, pb.GenerateRequest):
            return None
        which = request.WhichOneof("prompt")
        if which == "text":
            return b"text:" + request.text[:self.prefix_chars].encode()
        if which == "token_ids":
            ids = request.token_ids.ids[:self.prefix_tokens]
            return b"ids:" + b",".join(str(i).encode() for i in ids)
        return None  # no prompt: the backend refuses it, whichever it is


def _rendezvous_score(address: str, key: bytes) -> int:
    """Highest random weight hashing: each key goes to the backend with the highest score, so
    adding or removing a backend moves only the keys that scored highest on it."""
    digest = hashlib.blake2b(address.encode() + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


POLICIES = ("round_robin", "least_outstanding", "prefix_affinity")


def make_policy(name: str, prefix_affinity: PrefixAffinity = PrefixAffinity()) -> RoutingPolicy:
    """The policy called `name` (one of POLICIES; prefix_affinity is that policy's settings);
    ValueError names the choices."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_outstanding":
        return LeastOutstanding()
    if name == "prefix_affinity":
        return prefix_affinity
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
