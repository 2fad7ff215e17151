"""Step shape buckets: the few sizes that a step's token count and row count are padded to, so
that each compiled step is compiled once and reused (jaxserve/worker/runner.py picks them)."""


def bucket_sizes(lo: int, hi: int, coarse_below: int = 256) -> list[int]:
    """lo, 4 lo, 16 lo, ... up to coarse_below, then doubling, then hi itself."""
    sizes, size = [], min(lo, hi)
    while size < hi:
        sizes.append(size)
        size *= 4 if size < coarse_below else 2
    return sizes + [hi]


def seq_bucket_sizes(hi: int) -> list[int]:
    """Decode batch sizes: 2, 4, then every 8 up to 256, then every 16, and hi itself.

    No 1: XLA turns a lone token's K/V scatter into a dynamic-update-slice that copies the
    layer's whole cache; a second (padding) row costs nothing next to the weights' traffic.
    """
    sizes = [2, 4] + list(range(8, 257, 8))
    sizes += list(range(272, hi + 1, 16))
    return sorted({s for s in sizes if s < hi} | {hi})


def pow2_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pow2_upto(n: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= n."""
    return [1 << i for i in range(pow2_bucket(n).bit_length())]


def pow2_between(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... below hi, then hi."""
    return [lo << i for i in range(max(hi // lo, 1).bit_length()) if lo << i < hi] + [hi]


def pick_bucket(sizes: list[int], n: int) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"batch of {n} exceeds the largest bucket {sizes[-1]}")
