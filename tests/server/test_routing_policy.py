"""Routing policies (server/routing_policy.py), as pure functions of candidates and request."""

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.routing_policy import Candidate, LeastOutstanding, PrefixAffinity, RoundRobin
from tests.server.conftest import greedy


def candidates(*in_flight: int, routed=None) -> list[Candidate]:
    routed = routed or [0] * len(in_flight)
    return [Candidate(index=i, address=f"replica-{i}.test:50051", in_flight=n, routed=r)
            for i, (n, r) in enumerate(zip(in_flight, routed))]


def text(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, params=greedy(4))


def test_round_robin_cycles_and_skips_missing_backends():
    policy, three = RoundRobin(), candidates(0, 0, 0)
    assert [policy.choose(three, text("x")).index for _ in range(4)] == [0, 1, 2, 0]
    without_2 = [c for c in three if c.index != 2]
    assert [policy.choose(without_2, text("x")).index for _ in range(3)] == [1, 0, 1]


def test_least_outstanding_takes_fewest_in_flight_then_fewest_routed():
    assert LeastOutstanding().choose(candidates(3, 1, 2), text("x")).index == 1
    assert LeastOutstanding().choose(candidates(1, 1, 1, routed=[5, 2, 9]), text("x")).index == 1


def test_prefix_affinity_keeps_prefixes_together_and_spreads_others():
    policy = PrefixAffinity(prefix_chars=8, prefix_tokens=4, max_imbalance=2)
    three = candidates(0, 0, 0)
    same = {policy.choose(three, text(f"system: question {i}")).index for i in range(20)}
    assert len(same) == 1
    spread = [policy.choose(three, text(f"{i:03d} topic")).index for i in range(60)]
    assert all(spread.count(i) >= 8 for i in range(3)), spread
    ids = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3, 4, i])) for i in range(10)]
    assert len({policy.choose(three, r).index for r in ids}) == 1
    # Rendezvous hashing: without backend 2, only the prompts that were on it move.
    two = three[:2]
    for i, was in enumerate(spread):
        if was != 2:
            assert policy.choose(two, text(f"{i:03d} topic")).index == was


def test_prefix_affinity_falls_back_when_imbalanced():
    policy = PrefixAffinity(prefix_chars=8, max_imbalance=2)
    hashed = policy.choose(candidates(0, 0), text("shared prefix")).index
    load = [0, 0]
    load[hashed] = 2  # 2 beyond the other: still within max_imbalance
    assert policy.choose(candidates(*load), text("shared prefix")).index == hashed
    load[hashed] = 3
    assert policy.choose(candidates(*load), text("shared prefix")).index == 1 - hashed
    # No prompt to hash (Tokenize and the like): the least loaded.
    assert policy.choose(candidates(*load), pb.TokenizeRequest(text="x")).index == 1 - hashed
