"""Running jaxserve's step on a device mesh (docs/SHARDING.md).

    mesh.py               the four named axes, the mesh, the start-up checks against a model
    partition_rules.py    parameter path -> PartitionSpec (Megatron), the KV cache's spec
    placement.py          building a sharded array shard by shard from a reader of slices
    parallel_attention.py paged attention under shard_map: heads over tensor, tokens split
    moe_dispatch.py       grouped-matmul experts (ragged_dot) over expert x tensor
    distributed.py        multi-host: jax.distributed, and the step broadcast from process 0

This package never imports `jaxserve` (DESIGN.md): callers pass plain values and callables.
"""
