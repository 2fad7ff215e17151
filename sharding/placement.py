"""Building a sharded array one device shard at a time, from a reader of slices.

`jax.make_array_from_callback` reads every addressable shard before it places any, so its host
memory peaks at the whole tensor (times the replication). Here each distinct shard is read once,
put on the devices that hold it, and dropped before the next is read: host memory peaks near one
shard. In a multi-process run each process reads only the shards of its own devices.
"""

from collections.abc import Callable

import jax
import numpy as np


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
    return tuple(s.indices(n) for s, n in zip(index, shape))


def put_sharded(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding,
                read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """The global array of `shape` and `dtype` laid out by `sharding`; `read(index)` returns the
    global array's value at `index` (a tuple of slices), in any dtype."""
    shape = tuple(shape)
    by_index: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        by_index.setdefault(_key(index, shape), [index, []])[1].append(device)
    shards = {}
    for index, devices in by_index.values():
        host = np.asarray(read(index)).astype(dtype, copy=False)
        expected = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
        if host.shape != expected:
            raise ValueError(f"shard reader returned shape {host.shape} for index {index}, "
                             f"expected {expected}")
        for device in devices:
            shards[device] = jax.device_put(host, device)
        del host
    arrays = [shards[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
