"""Swap preemption: a preempted sequence's KV blocks wait in host memory instead of being
recomputed.

Two halves, as with the device cache: `SwapSpace` is the scheduler's bookkeeping (which host
slots are free; pure host code, also driven by the simulator), and `HostKVStore` is the
runner's storage (numpy arrays in host memory) with the compiled copies between it and the
device cache.

The order within a step (runner.execute): swap-outs (device -> host), then swap-ins (host ->
device), then the step. A device block freed by a swap-out may be handed to a swap-in or to a
new sequence in the same step, so the swap-out reads it first. A host slot freed by a swap-in is
returned to the free list only at the next `schedule()`, so no swap-out of the same step can
overwrite it before it is read.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding


MAX_COPY_BLOCKS = 64


class SwapSpace:
    """Host slots for swapped-out KV blocks: a free list and a capacity."""

    def __init__(self, num_slots: int):
        if num_slots < 0:
            raise ValueError(f"swap space must have >= 0 slots, got {num_slots}")
        self.num_slots = num_slots
        self.free_slots: collections.deque[int] = collections.deque(range(num_slots))

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def allocate(self, n: int) -> list[int] | None:
        """n slots, or None (changing nothing) when fewer are free."""
        if n > len(self.free_slots):
            return None
        return [self.free_slots.popleft() for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        self.free_slots.extend(slots)


def swap_bucket_sizes(max_blocks: int) -> list[int]:
    """Powers of two up to the first >= max_blocks: copies are padded to one of them."""
    sizes = [1]
    while sizes[-1] < max_blocks:
        sizes.append(sizes[-1] * 2)
    return sizes


def _gather(kv_caches, idx):
    """-> [num_layers, 2, n, block_size, kv_heads, head_dim]: blocks idx [n] of every layer."""
    return jnp.stack([jnp.stack([keys[idx], values[idx]]) for keys, values in kv_caches])


def _scatter(kv_caches, idx, blocks):
    """Writes blocks [num_layers, 2, n, ...] into blocks idx [n]; out-of-range idx is skipped."""
    return [(keys.at[idx].set(blocks[i, 0], mode="drop"),
             values.at[idx].set(blocks[i, 1], mode="drop"))
            for i, (keys, values) in enumerate(kv_caches)]


class HostKVStore:
    """The swapped-out blocks in host memory: one numpy array
    [num_slots, num_layers, 2, block_size, kv_heads, head_dim] in the cache's dtype (its pages
    are touched only when written), and the compiled gather and scatter between it and the
    device cache, bucketed by the number of blocks moved at once."""

    def __init__(self, num_slots: int, kv_caches, kv_sharding: NamedSharding, max_blocks: int):
        keys = kv_caches[0][0]
        num_blocks, block_size, kv_heads, head_dim = keys.shape
        self.num_device_blocks = num_blocks
        self.data = np.empty((num_slots, len(kv_caches), 2, block_size, kv_heads, head_dim),
                             keys.dtype)
        # Copies move at most MAX_COPY_BLOCKS at once (more go in chunks), which bounds the
        # device memory of the gathered or scattered blocks. With no slots the store only reads
        # blocks out (a prefill engine handing KV over, jaxserve/engine/disaggregation.py).
        self.buckets = swap_bucket_sizes(
            max(1, min(max_blocks, num_slots or max_blocks, MAX_COPY_BLOCKS)))
        cache_shardings = [(kv_sharding, kv_sharding)] * len(kv_caches)
        repl = NamedSharding(kv_sharding.mesh, jax.sharding.PartitionSpec())
        self._gather = jax.jit(_gather, in_shardings=(cache_shardings, repl), out_shardings=repl)
        self._scatter = jax.jit(_scatter, in_shardings=(cache_shardings, repl, repl),
                                out_shardings=cache_shardings, donate_argnums=(0,))
        self.compiled: dict[tuple[str, int], object] = {}

    def compile_all(self, kv_caches) -> None:
        for n in self.buckets:
            self._compiled("out", n, kv_caches)
            if self.data.shape[0]:
                self._compiled("in", n, kv_caches)

    def _compiled(self, kind: str, n: int, kv_caches):
        if (kind, n) not in self.compiled:
            idx = jax.ShapeDtypeStruct((n,), jnp.int32)
            if kind == "out":
                lowered = self._gather.lower(kv_caches, idx)
            else:
                blocks = jax.ShapeDtypeStruct((len(kv_caches), 2, n, *self.data.shape[3:]),
                                              self.data.dtype)
                lowered = self._scatter.lower(kv_caches, idx, blocks)
            self.compiled[(kind, n)] = lowered.compile()
        return self.compiled[(kind, n)]

    def _chunks(self, items: list):
        """items split into runs of at most the largest bucket, each with its padded size."""
        step = self.buckets[-1]
        for i in range(0, len(items), step):
            chunk = items[i:i + step]
            yield chunk, next(b for b in self.buckets if b >= len(chunk))

    def swap_out(self, kv_caches, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks to host slots: pairs of (device block, host slot)."""
        for chunk, n in self._chunks(pairs):
            slots = [slot for _, slot in chunk]
            self.data[slots] = self._read(kv_caches, [block for block, _ in chunk], n)

    def read(self, kv_caches, blocks: list[int]) -> np.ndarray:
        """-> [len(blocks), num_layers, 2, block_size, kv_heads, head_dim]: device blocks copied
        to a new host array (the store's slots untouched)."""
        parts = [self._read(kv_caches, chunk, n) for chunk, n in self._chunks(blocks)]
        return np.concatenate(parts) if parts else np.empty((0, *self.data.shape[1:]),
                                                            self.data.dtype)

    def _read(self, kv_caches, blocks: list[int], n: int) -> np.ndarray:
        idx = np.zeros(n, np.int32)
        idx[:len(blocks)] = blocks
        gathered = np.asarray(self._compiled("out", n, kv_caches)(kv_caches, idx))
        return np.moveaxis(gathered[:, :, :len(blocks)], 2, 0)

    def swap_in(self, kv_caches, pairs: list[tuple[int, int]]):
        """Copies host slots to device blocks: pairs of (host slot, device block). Each chunk's
        copy donates the caches: yields the new ones after every chunk, for the caller to keep
        (so a failure midway leaves it holding live arrays)."""
        for chunk, n in self._chunks(pairs):
            idx = np.full(n, self.num_device_blocks, np.int32)  # padding rows are dropped
            idx[:len(chunk)] = [block for _, block in chunk]
            blocks = np.zeros((n, *self.data.shape[1:]), self.data.dtype)
            blocks[:len(chunk)] = self.data[[slot for slot, _ in chunk]]
            kv_caches = self._compiled("in", n, kv_caches)(kv_caches, idx,
                                                           np.moveaxis(blocks, 0, 2))
            yield kv_caches
