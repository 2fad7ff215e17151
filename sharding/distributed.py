"""Multi-host: one process per host, joined by `jax.distributed`, and the step broadcast.

Every process builds the same engine over the global mesh (all hosts' devices). Process 0 alone
runs the scheduler: before each compiled step it broadcasts a fixed-size header (which compiled
function, its bucket) and then the step's input arrays; the other processes wait in
`ModelRunner.follow`, receive them and run the same compiled function, so all processes enter
every collective together. A header with go = 0 ends the followers' loop.

Launch (docs/SHARDING.md): the same command on every host, with --coordinator_address (host 0's
address and a free port), --num_processes and --process_id; or the environment variables
JAXSERVE_COORDINATOR_ADDRESS, JAXSERVE_NUM_PROCESSES, JAXSERVE_PROCESS_ID. On managed clusters
(SLURM, Cloud TPU, Kubernetes with JAX's auto-detection) `initialize(auto=True)` lets JAX find
them itself.

On CPU, cross-process collectives go through gloo (JAX's default CPU collectives in 0.11).
"""

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXSERVE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXSERVE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSERVE_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Joins this process to the others; must run before any JAX computation.

    Arguments left None are read from the JAXSERVE_* environment variables. With neither, and
    auto False, this is a single-process run and nothing happens. Returns True when it joined.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if auto:
        jax.distributed.initialize()
        return True
    if coordinator_address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(f"multi-host: num_processes ({num_processes}) and process_id "
                             f"({process_id}) need a coordinator_address (host:port of process 0)")
        return False
    if num_processes is None or process_id is None:
        raise ValueError(f"multi-host: coordinator_address {coordinator_address!r} needs "
                         "num_processes and process_id too")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"multi-host: process_id ({process_id}) must be in [0, num_processes "
                         f"({num_processes}))")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    logger.info("process %d of %d joined %s: %d local devices, %d in all", process_id,
                num_processes, coordinator_address, jax.local_device_count(), jax.device_count())
    return True


def is_leader() -> bool:
    """True on process 0, which runs the scheduler (and on a single-process run)."""
    return jax.process_index() == 0


def _broadcast(tree, is_source: bool):
    out = multihost_utils.broadcast_one_to_all(tree, is_source=is_source)
    return jax.tree.map(np.asarray, out)


def send_step(header: tuple[int, ...], payload) -> None:
    """Process 0: announces a step (a fixed-length tuple of ints) and sends its input arrays."""
    _broadcast(np.array((1,) + tuple(header), np.int32), True)
    _broadcast(payload, True)


def send_stop(header_len: int) -> None:
    """Process 0: tells the followers that no more steps come."""
    _broadcast(np.zeros(header_len + 1, np.int32), True)


def receive_step_header(header_len: int) -> tuple[int, ...] | None:
    """Followers: the next step's header, or None when process 0 has stopped."""
    header = _broadcast(np.zeros(header_len + 1, np.int32), False)
    return None if header[0] == 0 else tuple(int(x) for x in header[1:])


def receive_step(template):
    """Followers: the step's input arrays, shaped like `template` (zeros of the right shapes)."""
    return _broadcast(template, False)
