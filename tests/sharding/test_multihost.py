"""Multi-host on one machine: two processes of 4 CPU devices each, joined by jax.distributed
(coordinator on 127.0.0.1, a free port), data 2 across the processes x tensor 4 within each.
Process 0 schedules and broadcasts every step; the greedy tokens equal the golden ones (which
the one-process tests also produce). Cross-process CPU collectives go through gloo."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.sharding.conftest import golden

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallelism", [dict(data_parallel=2, tensor_parallel=4)])
def test_two_processes_give_the_one_process_greedy_tokens(parallelism):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    args = lambda pid: [sys.executable, "-m", "tests.sharding.multihost_worker", str(pid),
                        str(port), "llama3", json.dumps(parallelism)]
    procs = [subprocess.Popen(args(pid), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    line = [l for l in outputs[0].splitlines() if l.startswith("TOKENS ")]
    assert line, outputs[0][-3000:]
    assert json.loads(line[0][len("TOKENS "):]) == golden("llama3")["greedy_tokens"]
