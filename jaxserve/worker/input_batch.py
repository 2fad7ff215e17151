"""The persistent batch: one slot per running sequence, and what belongs to a slot kept between
steps, changed by deltas instead of rebuilt from Python lists every step.

A sequence takes a slot when it first runs and gives it back when it leaves the running set
(finished or preempted). Per slot:

- on the device (owned by the runner): its block-table row, `[num_slots + 1, max_blocks_per_seq]`
  int32, updated by (slot, column, block) deltas when the sequence gets a new block or a
  copy-on-write replaces its last one; and the last token sampled for it, which the next step
  reads as its input without the host ever seeing it first;
- on the host, here (numpy, one row per slot): sampling parameters, seed, the min_tokens ban,
  penalty weights. A step gathers its rows with one fancy index per array.

Row `num_slots` is the padding slot: padded rows of a step read and write it, harmlessly.
Host bookkeeping only: no device array is touched here.
"""

import numpy as np

from jaxserve.request import Sequence


class InputBatch:
    def __init__(self, num_slots: int, max_blocks_per_seq: int, eos_token_ids: tuple[int, ...],
                 num_banned: int):
        """num_banned: width of the ban list (EOS ids + stop_token_ids while below min_tokens)."""
        self.num_slots = num_slots
        self.pad_slot = num_slots
        self.max_blocks_per_seq = max_blocks_per_seq
        self.eos_token_ids = tuple(eos_token_ids)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest first
        n = num_slots + 1
        # The device row's current content, mirrored: its length and its last entry.
        self.table_len = np.zeros(n, np.int64)
        self.table_last = np.full(n, -1, np.int64)
        self.temperature = np.zeros(n, np.float32)
        self.top_k = np.zeros(n, np.int32)
        self.top_p = np.ones(n, np.float32)
        self.min_p = np.zeros(n, np.float32)
        self.seeds = np.zeros(n, np.uint32)
        self.min_tokens = np.zeros(n, np.int32)
        self.banned = np.full((n, num_banned), -1, np.int32)
        self.repetition = np.ones(n, np.float32)
        self.presence = np.zeros(n, np.float32)
        self.frequency = np.zeros(n, np.float32)
        self._update_idx: list[np.ndarray] = []  # flat indices slot * max_blocks + column
        self._update_val: list[np.ndarray] = []

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def assign(self, seq: Sequence) -> None:
        """Gives a sequence that has none a slot and writes its per-slot row."""
        if seq.slot >= 0:
            return
        if not self._free:
            raise RuntimeError(f"no free batch slot for sequence {seq.seq_id}: all "
                               f"{self.num_slots} (max_num_seqs) are held")
        slot = seq.slot = self._free.pop()
        p = seq.params
        self.temperature[slot], self.top_k[slot] = p.temperature, p.top_k
        self.top_p[slot], self.min_p[slot], self.seeds[slot] = p.top_p, p.min_p, seq.seed
        self.repetition[slot], self.presence[slot] = p.repetition_penalty, p.presence_penalty
        self.frequency[slot] = p.frequency_penalty
        self.min_tokens[slot] = p.min_tokens
        ids = list(self.eos_token_ids) + list(p.stop_token_ids) if p.min_tokens else []
        self.banned[slot] = -1
        self.banned[slot, :len(ids)] = ids
        self.table_len[slot], self.table_last[slot] = 0, -1

    def release(self, seq: Sequence) -> None:
        """Takes back a sequence's slot (it finished or was preempted)."""
        if seq.slot >= 0:
            self._free.append(seq.slot)
            seq.slot = -1

    def sync_block_table(self, seq: Sequence) -> None:
        """Records the deltas that bring the device row up to the sequence's block table.

        A block table only grows at its end, and only its last block is ever replaced (copy-on-
        write); a fresh slot starts empty. So the new entries and the last one are the delta.
        """
        slot, table = seq.slot, seq.block_table
        old, new = int(self.table_len[slot]), len(table)
        if new == old and (not new or self.table_last[slot] == table[-1]):
            return
        start = max(min(old, new) - 1, 0)  # the last old entry may have changed
        cols = np.arange(start, new, dtype=np.int64)
        self._update_idx.append(slot * self.max_blocks_per_seq + cols)
        self._update_val.append(np.asarray(table[start:new], np.int64))
        self.table_len[slot] = new
        self.table_last[slot] = table[-1] if new else -1

    def take_table_updates(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (flat indices, blocks) [n] int32 of the deltas since the last call."""
        if not self._update_idx:
            empty = np.zeros(0, np.int32)
            return empty, empty
        idx = np.concatenate(self._update_idx).astype(np.int32)
        val = np.concatenate(self._update_val).astype(np.int32)
        self._update_idx, self._update_val = [], []
        return idx, val
