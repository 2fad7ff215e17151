"""Synthetic serving workloads and JSON traces for the simulator.

`generate_workload` draws Poisson arrivals and log-normal (heavy-tailed) prompt and output
lengths. The output length is partly predictable from the prompt, as real traffic is: each
request belongs to a hidden task whose topic tokens are sprinkled through its prompt, and its
log output length = log(median) + sigma * (sqrt(r) * signal + sqrt(1 - r) * noise), where the
signal mixes the task's effect with the prompt's length and `r` (`predictability`) is the share
of the log-length variance that the prompt explains. Changing `task_effects` shifts the
distribution while keeping the prompts' look.
"""

import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_time: float  # seconds from the start of the run
    prompt_token_ids: Sequence[int]
    output_len: int  # tokens generated before the request stops (already <= max_tokens)
    max_tokens: int | None = None
    priority: int = 0
    client_id: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    """Parameters of `generate_workload`; lengths are in tokens, rate in requests per second."""

    num_requests: int = 1000
    rate: float = 10.0  # Poisson arrival rate; math.inf: everything arrives at time 0
    prompt_len_median: float = 128.0
    prompt_len_sigma: float = 1.0  # of the log-normal
    min_prompt_len: int = 4
    max_prompt_len: int = 1024
    output_len_median: float = 64.0
    output_len_sigma: float = 1.0
    max_output_len: int = 1024
    predictability: float = 0.7  # share of log output-length variance the prompt explains
    task_effects: tuple[float, ...] = (-1.5, -0.5, 0.5, 1.5)  # standardized below
    prompt_len_weight: float = 0.3  # share of the signal's variance from the prompt's length
    capped_fraction: float = 0.1  # requests whose max_tokens cuts them short
    vocab_size: int = 256
    topic_tokens_per_task: int = 8
    topic_share: float = 0.5  # share of a prompt's tokens drawn from its task's topic tokens
    client_shares: tuple[float, ...] = (1.0,)  # relative request rates of clients "c0", "c1", ...
    num_priorities: int = 1  # priorities drawn uniformly from range(num_priorities)
    seed: int = 0
    vocab_seed: int = 1234  # the tasks' topic tokens; fixed across seeds and shifts

    def __post_init__(self):
        if self.num_requests < 1:
            raise ValueError(f"WorkloadSpec.num_requests must be >= 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"WorkloadSpec.rate must be > 0, got {self.rate}")
        if not 0.0 <= self.predictability <= 1.0:
            raise ValueError(f"WorkloadSpec.predictability must be in [0, 1], got {self.predictability}")
        if not 1 <= self.min_prompt_len <= self.max_prompt_len:
            raise ValueError("WorkloadSpec needs 1 <= min_prompt_len <= max_prompt_len, got "
                             f"{self.min_prompt_len}, {self.max_prompt_len}")


def generate_workload(spec: WorkloadSpec) -> list[SimRequest]:
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    if math.isinf(spec.rate):
        arrivals = np.zeros(n)
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / spec.rate, n))

    z_prompt = rng.standard_normal(n)
    prompt_lens = np.clip(np.round(spec.prompt_len_median * np.exp(spec.prompt_len_sigma * z_prompt)),
                          spec.min_prompt_len, spec.max_prompt_len).astype(np.int64)
    effects = np.asarray(spec.task_effects, np.float64)
    effects = (effects - effects.mean()) / (effects.std() or 1.0)
    tasks = rng.integers(0, len(effects), n)
    signal = (math.sqrt(1 - spec.prompt_len_weight) * effects[tasks]
              + math.sqrt(spec.prompt_len_weight) * z_prompt)
    noise = rng.standard_normal(n)
    log_out = np.log(spec.output_len_median) + spec.output_len_sigma * (
        math.sqrt(spec.predictability) * signal + math.sqrt(1 - spec.predictability) * noise)
    natural = np.clip(np.round(np.exp(log_out)), 1, spec.max_output_len).astype(np.int64)
    capped = rng.random(n) < spec.capped_fraction
    cap = np.maximum(1, np.round(natural * rng.uniform(0.2, 1.0, n))).astype(np.int64)
    max_tokens = np.where(capped, cap, spec.max_output_len)
    output_lens = np.minimum(natural, max_tokens)

    topics = np.random.default_rng(spec.vocab_seed).integers(
        0, spec.vocab_size, (len(effects), spec.topic_tokens_per_task))
    total = int(prompt_lens.sum())
    owner = np.repeat(tasks, prompt_lens)
    tokens = np.where(rng.random(total) < spec.topic_share,
                      topics[owner, rng.integers(0, spec.topic_tokens_per_task, total)],
                      rng.integers(0, spec.vocab_size, total)).astype(np.int32)
    prompts = np.split(tokens, np.cumsum(prompt_lens)[:-1])

    shares = np.asarray(spec.client_shares, np.float64)
    clients = rng.choice(len(shares), n, p=shares / shares.sum())
    priorities = rng.integers(0, spec.num_priorities, n)
    return [SimRequest(str(i), float(arrivals[i]), prompts[i], int(output_lens[i]),
                       int(max_tokens[i]), int(priorities[i]), f"c{clients[i]}") for i in range(n)]


def save_trace(path: str, requests: Sequence[SimRequest]) -> None:
    rows = [dict(request_id=r.request_id, arrival_time=r.arrival_time,
                 prompt_token_ids=[int(t) for t in r.prompt_token_ids], output_len=r.output_len,
                 max_tokens=r.max_tokens, priority=r.priority, client_id=r.client_id)
            for r in requests]
    with open(path, "w") as f:
        json.dump({"requests": rows}, f)


def load_trace(path: str, vocab_size: int = 256, seed: int = 0) -> list[SimRequest]:
    """Reads {"requests": [...]}; a row may give `prompt_len` instead of `prompt_token_ids`
    (random tokens below `vocab_size` are drawn for it), and needs arrival_time and output_len."""
    with open(path) as f:
        rows = json.load(f)["requests"]
    rng = np.random.default_rng(seed)
    requests = []
    for i, row in enumerate(rows):
        for key in ("arrival_time", "output_len"):
            if key not in row:
                raise ValueError(f"trace {path}: request {i} has no {key!r}")
        tokens = row.get("prompt_token_ids")
        if tokens is None:
            if "prompt_len" not in row:
                raise ValueError(f"trace {path}: request {i} has neither prompt_token_ids nor prompt_len")
            tokens = rng.integers(0, vocab_size, int(row["prompt_len"])).astype(np.int32)
        requests.append(SimRequest(str(row.get("request_id", i)), float(row["arrival_time"]),
                                   tokens, int(row["output_len"]), row.get("max_tokens"),
                                   int(row.get("priority", 0)), str(row.get("client_id", ""))))
    return sorted(requests, key=lambda r: r.arrival_time)
