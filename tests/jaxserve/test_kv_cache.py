"""KVCacheManager: block counts, prefix caching by chained hashes, LRU eviction, fork, copy-on-write."""

import itertools

from jaxserve.core.kv_cache import KVCacheManager
from jaxserve.request import Sequence
from jaxserve.sampling_params import SamplingParams

BLOCK_SIZE = 4
_seq_ids = itertools.count()


def make_seq(tokens):
    return Sequence(next(_seq_ids), "r", 0, list(tokens), SamplingParams(), seed=0, arrival_time=0.0)


def compute(kv, seq, num_tokens, cached=()):
    """Allocates and marks `num_tokens` more tokens as computed, as one scheduler step would."""
    assert kv.allocate(seq, num_tokens, list(cached))
    seq.num_computed_tokens = max(seq.num_computed_tokens, len(cached) * BLOCK_SIZE) + num_tokens
    kv.cache_full_blocks(seq)


def prefill(kv, tokens):
    """A new sequence whose whole prompt is computed, with its prefix hits taken."""
    seq = make_seq(tokens)
    cached = kv.find_cached_prefix(seq)
    compute(kv, seq, len(tokens) - len(cached) * BLOCK_SIZE, cached)
    return seq


def assert_consistent(kv):
    """Every block is in exactly one place: held (ref > 0), cached, or free."""
    held = {b for b in range(kv.num_blocks) if kv.ref_counts[b] > 0}
    cached = set(kv.cached_blocks)
    free = set(kv.free_blocks)
    assert len(free) == len(kv.free_blocks), "a block is twice on the free list"
    assert not (held & cached) and not (held & free) and not (cached & free)
    assert held | cached | free == set(range(kv.num_blocks))
    assert all(r >= 0 for r in kv.ref_counts)
    assert all(b in kv.block_hashes for b in cached)
    assert {kv.hash_to_block[h] for h in kv.block_hashes.values()} == set(kv.block_hashes)


def test_allocate_and_free_counts():
    kv = KVCacheManager(10, BLOCK_SIZE)
    seq = make_seq(range(10, 20))  # 10 tokens -> 3 blocks
    assert kv.allocate(seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert kv.num_free_blocks == 7
    assert all(kv.ref_counts[b] == 1 for b in seq.block_table)
    seq.num_computed_tokens = 10
    assert kv.allocate(seq, 2)  # tokens 10, 11 still fit in block 3
    assert len(seq.block_table) == 3 and kv.num_free_blocks == 7
    seq.num_computed_tokens = 12
    assert kv.allocate(seq, 1)  # token 12 opens block 4
    assert len(seq.block_table) == 4 and kv.num_free_blocks == 6
    kv.free(seq)
    assert seq.block_table == []
    assert kv.num_free_blocks == 10
    assert kv.usage == 0.0
    assert_consistent(kv)


def test_allocate_returns_false_and_changes_nothing_when_short():
    kv = KVCacheManager(4, BLOCK_SIZE)
    other = make_seq(range(100, 108))
    assert kv.allocate(other, 8)  # 2 of 4 blocks held
    seq = make_seq(range(12))  # needs 3 blocks, 2 are free
    ref_counts, free = list(kv.ref_counts), list(kv.free_blocks)
    assert not kv.allocate(seq, 12)
    assert seq.block_table == []
    assert kv.ref_counts == ref_counts and list(kv.free_blocks) == free
    assert kv.num_free_blocks == 2

    # A sequence that holds blocks and grows past what is free is left as it was too.
    assert kv.allocate(seq, 4)
    seq.num_computed_tokens = 4
    table, ref_counts = list(seq.block_table), list(kv.ref_counts)
    assert not kv.allocate(seq, 8)  # 2 more blocks, 1 free
    assert seq.block_table == table and kv.ref_counts == ref_counts
    assert kv.num_free_blocks == 1
    assert kv.pending_copies == []
    assert_consistent(kv)


def test_prefix_hits_on_full_blocks_only_and_never_the_last_token():
    kv = KVCacheManager(16, BLOCK_SIZE)
    tokens = list(range(50, 60))  # 10 tokens: blocks [50..53], [54..57], partial [58, 59]
    a = prefill(kv, tokens)
    assert len(a.block_table) == 3

    same = make_seq(tokens)
    assert kv.find_cached_prefix(same) == a.block_table[:2]  # the partial block is never a hit

    # Exactly 8 tokens: both blocks are cached, but the last token must run for its logits.
    exact = make_seq(tokens[:8])
    assert kv.find_cached_prefix(exact) == a.block_table[:1]

    nine = make_seq(tokens[:9])
    assert kv.find_cached_prefix(nine) == a.block_table[:2]

    # Sharing only part of a block is a miss for that block.
    partial = make_seq(tokens[:6] + [999, 998, 997, 996])
    assert kv.find_cached_prefix(partial) == a.block_table[:1]
    assert kv.find_cached_prefix(make_seq([7] + tokens[1:])) == []


def test_prefix_hit_shares_blocks_and_skips_their_tokens():
    kv = KVCacheManager(16, BLOCK_SIZE)
    tokens = list(range(50, 60))
    a = prefill(kv, tokens)
    free_before = kv.num_free_blocks
    b = make_seq(tokens + [61, 62])
    cached = kv.find_cached_prefix(b)
    assert cached == a.block_table[:2]
    assert kv.allocate(b, b.num_tokens - 8, cached)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert kv.ref_counts[a.block_table[0]] == kv.ref_counts[a.block_table[1]] == 2
    assert kv.num_free_blocks == free_before - 1  # only the new tail block was taken
    assert kv.prefix_hits == 8 and kv.prefix_queries == 10 + 12  # a's prompt missed, b's hit 8
    assert_consistent(kv)


def test_chained_hashes_same_block_after_a_different_prefix_misses():
    kv = KVCacheManager(16, BLOCK_SIZE)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    prefill(kv, x + y + [0])
    # y alone matches a cached block's content, but it follows z, not x.
    assert kv.find_cached_prefix(make_seq(z + y + [0])) == []
    assert kv.find_cached_prefix(make_seq(y + [0])) == []
    assert len(kv.find_cached_prefix(make_seq(x + y + [0]))) == 2
    assert len(kv.find_cached_prefix(make_seq(x + z + [0]))) == 1


def test_freed_hashed_blocks_stay_cached():
    kv = KVCacheManager(8, BLOCK_SIZE)
    tokens = list(range(30, 39))  # 9 tokens: 2 full blocks + 1 partial
    a = prefill(kv, tokens)
    full_blocks = a.block_table[:2]
    kv.free(a)
    assert kv.num_free_blocks == 8
    assert set(kv.cached_blocks) == set(full_blocks)  # the partial block is plain free
    assert_consistent(kv)

    b = make_seq(tokens)
    cached = kv.find_cached_prefix(b)
    assert cached == full_blocks
    assert kv.allocate(b, 1, cached)
    assert b.block_table[:2] == full_blocks
    assert not kv.cached_blocks  # revived: held again, no longer evictable
    assert all(kv.ref_counts[blk] == 1 for blk in full_blocks)
    assert kv.num_free_blocks == 8 - 3
    assert_consistent(kv)


def test_reviving_cached_blocks_counts_them_against_free_space():
    kv = KVCacheManager(3, BLOCK_SIZE)
    tokens = list(range(30, 39))
    kv.free(prefill(kv, tokens))  # 2 cached blocks + 1 free block
    b = make_seq(tokens + list(range(40, 45)))  # 14 tokens: 4 blocks, 2 of them cached
    cached = kv.find_cached_prefix(b)
    assert len(cached) == 2
    assert not kv.allocate(b, b.num_tokens - 8, cached)  # needs 2 new blocks, only 1 is not cached
    assert b.block_table == [] and set(kv.cached_blocks) == set(cached)
    assert kv.allocate(b, 1, cached)
    assert kv.num_free_blocks == 0
    assert_consistent(kv)


def test_cached_blocks_are_evicted_least_recently_freed_first():
    kv = KVCacheManager(4, BLOCK_SIZE)
    first = [1, 2, 3, 4, 5]
    second = [6, 7, 8, 9, 10]
    a = prefill(kv, first)  # block 0 cached after free, block 1 plain free
    b = prefill(kv, second)
    a_block, b_block = a.block_table[0], b.block_table[0]
    kv.free(a)
    kv.free(b)
    assert list(kv.cached_blocks) == [a_block, b_block]

    # 3 blocks needed, 2 plain free: the oldest cached block (a's) is evicted.
    c = make_seq(range(100, 112))
    assert kv.allocate(c, 12)
    assert a_block in c.block_table and b_block not in c.block_table
    assert kv.find_cached_prefix(make_seq(first)) == []
    assert kv.find_cached_prefix(make_seq(second)) == [b_block]
    assert_consistent(kv)
    kv.free(c)
    assert kv.num_free_blocks == 4


def test_eviction_takes_the_tail_of_a_prefix_before_its_head():
    kv = KVCacheManager(3, BLOCK_SIZE)
    tokens = list(range(60, 69))  # 9 tokens: 2 full blocks (hashed) + 1 partial
    a = prefill(kv, tokens)
    head, tail = a.block_table[:2]
    kv.free(a)
    c = make_seq(range(200, 209))  # 3 blocks: the free one, then one eviction
    assert kv.allocate(c, 5)  # 2 blocks: the plain free block and one cached block
    assert tail in c.block_table and head not in c.block_table
    assert kv.find_cached_prefix(make_seq(tokens)) == [head]
    assert_consistent(kv)


def test_fork_shares_blocks_and_bumps_ref_counts():
    kv = KVCacheManager(8, BLOCK_SIZE)
    parent = prefill(kv, range(6))  # blocks: one full, one half full
    child = make_seq(range(6))
    kv.fork(parent, child)
    assert child.block_table == parent.block_table
    assert child.block_table is not parent.block_table
    assert all(kv.ref_counts[b] == 2 for b in parent.block_table)
    assert kv.num_free_blocks == 6  # forking takes no blocks
    kv.free(child)
    assert all(kv.ref_counts[b] == 1 for b in parent.block_table)
    assert kv.num_free_blocks == 6
    assert_consistent(kv)


def test_copy_on_write_of_the_shared_partial_last_block():
    kv = KVCacheManager(8, BLOCK_SIZE)
    parent = prefill(kv, range(6))
    full, partial = parent.block_table
    children = [make_seq(range(6)) for _ in range(2)]
    for child in children:
        kv.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.output_token_ids.append(7)
    parent.output_token_ids.append(7)
    assert kv.ref_counts[partial] == 3

    # The first writer copies the shared partial block; the full block stays shared.
    assert kv.allocate(children[0], 1)
    new0 = children[0].block_table[1]
    assert children[0].block_table[0] == full and new0 != partial
    assert kv.take_pending_copies() == [(partial, new0)]
    assert kv.take_pending_copies() == []  # taken once
    assert kv.ref_counts[partial] == 2 and kv.ref_counts[new0] == 1

    assert kv.allocate(children[1], 1)
    new1 = children[1].block_table[1]
    assert new1 not in (partial, new0)
    assert kv.take_pending_copies() == [(partial, new1)]

    # The last holder writes in place: no copy, no new block.
    free_before = kv.num_free_blocks
    assert kv.allocate(parent, 1)
    assert parent.block_table == [full, partial]
    assert kv.take_pending_copies() == []
    assert kv.num_free_blocks == free_before
    assert kv.ref_counts[full] == 3 and kv.ref_counts[partial] == 1
    assert_consistent(kv)


def test_fork_at_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(8, BLOCK_SIZE)
    parent = prefill(kv, range(8))  # two full blocks
    child = make_seq(range(8))
    kv.fork(parent, child)
    child.num_computed_tokens = 8
    assert kv.allocate(child, 1)
    assert child.block_table[:2] == parent.block_table
    assert len(child.block_table) == 3
    assert kv.take_pending_copies() == []


def test_copy_on_write_fails_cleanly_without_a_free_block():
    kv = KVCacheManager(2, BLOCK_SIZE)
    parent = prefill(kv, range(6))  # both blocks held
    child = make_seq(range(6))
    kv.fork(parent, child)
    child.num_computed_tokens = 6
    assert not kv.allocate(child, 1)  # the copy needs a block
    assert child.block_table == parent.block_table
    assert kv.pending_copies == []
    assert kv.ref_counts[parent.block_table[1]] == 2


def test_no_leak_after_freeing_everything():
    kv = KVCacheManager(12, BLOCK_SIZE)
    shared = list(range(300, 309))
    seqs = [prefill(kv, shared), prefill(kv, shared + [1, 2, 3]), prefill(kv, range(7))]
    child = make_seq(shared)
    kv.fork(seqs[0], child)
    child.num_computed_tokens = seqs[0].num_computed_tokens
    child.output_token_ids.append(5)
    assert kv.allocate(child, 1)  # copy-on-write of the shared partial block
    seqs.append(child)
    assert_consistent(kv)
    assert kv.num_free_blocks < kv.num_blocks
    for seq in seqs:
        kv.free(seq)
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.ref_counts == [0] * kv.num_blocks
    assert not kv.seq_hashes
    assert_consistent(kv)


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    tokens = list(range(9))
    kv.free(prefill(kv, tokens))
    assert kv.find_cached_prefix(make_seq(tokens)) == []
    assert not kv.cached_blocks and not kv.block_hashes
    assert len(kv.free_blocks) == 8
