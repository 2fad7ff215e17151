"""KV cache manager: paged blocks, a free list, reference counts, prefix caching, copy-on-write.

Host bookkeeping only: it hands out block numbers; the device arrays they index live in the
runner. A block is in exactly one of three places: held (ref count > 0), cached (ref count 0 but
its content is a known full block, kept reusable in LRU order until evicted), or free.

Prefix caching keys each full block by a hash chained through all blocks before it, so a block
is reused only when the whole prefix up to and including it is the same.
"""

import collections

from jaxserve.request import Sequence


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks: collections.deque[int] = collections.deque(range(num_blocks))
        # ref count 0 with a hash: reusable on a prefix hit, evicted oldest first.
        self.cached_blocks: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.block_hashes: dict[int, int] = {}  # block -> hash of the prefix ending in it
        self.hash_to_block: dict[int, int] = {}
        self.seq_hashes: dict[int, list[int]] = {}  # seq_id -> hashes of its full blocks
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for the step
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.cached_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def _chain_hashes(self, token_ids: list[int], num_blocks: int, known: list[int]) -> list[int]:
        hashes = list(known[:num_blocks])
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(hash((parent, tuple(token_ids[i * bs:(i + 1) * bs]))))
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of the sequence's tokens.

        The last token is never taken from the cache: it must run to produce logits.
        """
        if not self.enable_prefix_caching:
            return []
        tokens = seq.token_ids
        hashes = self._chain_hashes(tokens, (len(tokens) - 1) // self.block_size, [])
        blocks = []
        for h in hashes:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            blocks.append(block)
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += min(len(blocks) * self.block_size, seq.num_prompt_tokens)
        self.seq_hashes[seq.seq_id] = hashes[:len(blocks)]
        return blocks

    def _take_free_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.cached_blocks.popitem(last=False)  # evict the least recently used
            del self.hash_to_block[self.block_hashes.pop(block)]
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Makes room for `num_new_tokens` more tokens after `seq.num_computed_tokens`.

        `cached_blocks` (from find_cached_prefix, for a sequence holding no blocks) become its
        first blocks. Returns False, changing nothing, when there are not enough free blocks.
        A shared last block that the new tokens would write into is copied first (copy-on-write).
        """
        bs = self.block_size
        held = list(seq.block_table) or list(cached_blocks)
        num_computed = max(seq.num_computed_tokens, len(cached_blocks) * bs)
        needed = -(-(num_computed + num_new_tokens) // bs) - len(held)
        cow = bool(held) and num_computed % bs != 0 and self.ref_counts[held[-1]] > 1
        reviving = sum(1 for b in cached_blocks if b in self.cached_blocks) if not seq.block_table else 0
        if max(needed, 0) + cow > self.num_free_blocks - reviving:
            return False
        if not seq.block_table:
            for block in cached_blocks:
                if self.ref_counts[block] == 0:
                    del self.cached_blocks[block]
                self.ref_counts[block] += 1
            seq.block_table = list(cached_blocks)
        if cow:
            old = seq.block_table[-1]
            new = self._take_free_block()
            self.ref_counts[old] -= 1
            seq.block_table[-1] = new
            self.pending_copies.append((old, new))
        for _ in range(max(needed, 0)):
            seq.block_table.append(self._take_free_block())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares all of the parent's blocks; writes to a shared block copy it first."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.ref_counts[block] += 1
        self.seq_hashes[child.seq_id] = list(self.seq_hashes.get(parent.seq_id, []))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the hashes of the sequence's full, computed blocks for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        # Only tokens the host knows: a pending token (sampled, not read back) has no value yet.
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        known = self.seq_hashes.get(seq.seq_id, [])
        if num_full <= len(known):
            return
        hashes = self._chain_hashes(seq.token_ids, num_full, known)
        for i in range(len(known), num_full):
            block, h = seq.block_table[i], hashes[i]
            if h not in self.hash_to_block and block not in self.block_hashes:
                self.hash_to_block[h] = block
                self.block_hashes[block] = h
        self.seq_hashes[seq.seq_id] = hashes

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Frees the blocks past the first `num_tokens` tokens: those allocated for rejected
        proposals (speculative decoding). They were taken fresh for this sequence alone and
        hold nothing hashed."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.appendleft(block)  # next to be handed out again

    def free(self, seq: Sequence) -> None:
        """Drops the sequence's references; its full blocks stay cached until evicted."""
        # Tail blocks first, so eviction takes the ends of prefixes before their beginnings.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.block_hashes:
                    self.cached_blocks[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        self.seq_hashes.pop(seq.seq_id, None)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
