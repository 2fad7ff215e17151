"""Soak: a loopback server under a hostile mix, bounded in count and time; statuses, hangs, leaks.

    python -m tools.soak                                   # built-in tiny model, 300 requests
    python -m tools.soak --duration_s=300 --requests=100000 --concurrency=64

It starts its own server (`python -m server` on 127.0.0.1, free ports; nothing else is reached)
and runs --concurrency client threads until --requests calls have been made or --duration_s has
passed. Each call is one of (expected statuses on the right):

    normal     Generate (streamed) or Complete, 1..--max_tokens tokens        OK
    cancel     a stream cancelled after a random number of messages           CANCELLED, OK
    deadline   a call with a deadline of 5-100 ms                             DEADLINE_EXCEEDED, OK
    stop_bomb  64 stop strings of ~1,000 characters; or 65; or one of 10**6   OK, INVALID_ARGUMENT
    huge       a 15 MiB text prompt (Complete or Tokenize)                    INVALID_ARGUMENT
    garbage    random bytes to a random method                    INVALID_ARGUMENT (or parsed)

in the shares the flags give (normal takes the rest). A call with no short deadline that is
still open after --hang_s is a hang. After the run it waits for the server to go idle and
reads its leaks: KV blocks free (GetModelInfo's total against /metrics), host swap slots free
(against their total), requests in flight, and the server process's RSS, threads and open fds against a warmed-up baseline. RSS is
sampled through the run: a leak is growth over its second half (allocator high-water marks
plateau in the first), past --rss_growth_mb. Then
SIGTERM, and the exit code. Prints a table; writes everything as JSON to --json_out (outside the
repository by default). Exit code 1 when anything was unexpected, hung or leaked.
"""

import collections
import concurrent.futures
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import psutil
from absl import app, flags

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc

flags.DEFINE_string("model", "builtin:tiny-llama", "The server's --model.")
flags.DEFINE_list("server_args", ["--max_num_seqs=16", "--max_num_batched_tokens=128",
                                  "--max_model_len=512", "--block_size=8", "--num_kv_blocks=256",
                                  "--dtype=float32"], "More flags for the server.")
flags.DEFINE_integer("requests", 300, "Stop after this many calls.")
flags.DEFINE_float("duration_s", 120.0, "Stop after this long.")
flags.DEFINE_integer("concurrency", 16, "Client threads.")
flags.DEFINE_integer("max_tokens", 64, "Most tokens a normal call asks for.")
flags.DEFINE_float("cancel_share", 0.3, "Share of calls cancelled at a random moment.")
flags.DEFINE_float("deadline_share", 0.12, "Share of calls with a 5-100 ms deadline.")
flags.DEFINE_float("hostile_share", 0.06, "Share of each hostile kind (stop_bomb, huge, garbage).")
flags.DEFINE_float("hang_s", 60.0, "A call open this long is a hang.")
flags.DEFINE_integer("seed", 0, "Seed of the mix.")
flags.DEFINE_float("rss_growth_mb", 100.0, "RSS growth over the second half of the run that "
                   "counts as a leak.")
flags.DEFINE_string("json_out", "/tmp/jaxserve-soak.json", "Where the JSON report goes.")
FLAGS = flags.FLAGS

EXPECTED = {"normal": {"OK"}, "cancel": {"CANCELLED", "OK"},
            "deadline": {"DEADLINE_EXCEEDED", "OK"}, "stop_bomb": {"OK", "INVALID_ARGUMENT"},
            "huge": {"INVALID_ARGUMENT"},
            # (random bytes now and then parse as a request, with whatever that request gets)
            "garbage": {"INVALID_ARGUMENT", "OK", "OUT_OF_RANGE", "FAILED_PRECONDITION"}}
_METHODS = ("Generate", "Complete", "Chat", "Tokenize", "Detokenize", "GetModelInfo")
_STREAMED = {"Generate", "Chat"}
_HUGE = "x" * (15 << 20)


@dataclasses.dataclass
class Call:
    kind: str
    status: str
    seconds: float
    hang: bool


class Server:
    """`python -m server` in a child process, on free loopback ports."""

    def __init__(self, model: str, args: list[str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", f"--model={model}", "--host=127.0.0.1", "--port=0",
             "--metrics_port=0", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            text=True, env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
        self.log: list[str] = []
        self.ports: dict[str, int] = {}
        self._found = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._found.wait(120) or len(self.ports) < 2:
            self.process.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-30:]))
        self.target = f"127.0.0.1:{self.ports['grpc']}"
        self.info = psutil.Process(self.process.pid)

    def _read_log(self):
        for line in self.process.stderr:
            self.log.append(line)
            for name, pattern in (("grpc", r"JaxServe on 127\.0\.0\.1:(\d+)"),
                                  ("metrics", r"metrics on http://127\.0\.0\.1:(\d+)")):
                found = re.search(pattern, line)
                if found:
                    self.ports[name] = int(found.group(1))
            if len(self.ports) == 2:
                self._found.set()
        self._found.set()  # it exited

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics",
                                    timeout=10) as reply:
            text = reply.read().decode()
        return {m.group(1): float(m.group(2)) for m in
                re.finditer(r"^(jaxserve_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def resources(self) -> dict[str, float]:
        return {"rss_mb": self.info.memory_info().rss / 2**20,
                "threads": self.info.num_threads(), "fds": self.info.num_fds()}

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


def one_call(stub, channel, kind: str, rng: random.Random) -> Call:
    start, status = time.monotonic(), "OK"
    params = pb.SamplingParams(max_tokens=rng.randint(1, FLAGS.max_tokens), ignore_eos=True,
                               temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(2**32))
    text = f"soak {rng.randrange(10**6)}" + " word" * rng.randint(0, 30)  # < 200 tokens
    request = pb.GenerateRequest(text=text, params=params)
    timeout = FLAGS.hang_s
    try:
        if kind == "garbage":
            method = rng.choice(_METHODS)
            data = rng.randbytes(rng.randint(1, 64))
            path = f"/jaxserve.v1.JaxServe/{method}"
            if method in _STREAMED:
                list(channel.unary_stream(path)(data, timeout=timeout))
            else:
                channel.unary_unary(path)(data, timeout=timeout)
        elif kind == "huge":
            if rng.random() < 0.5:
                stub.Tokenize(pb.TokenizeRequest(text=_HUGE), timeout=timeout)
            else:
                stub.Complete(pb.GenerateRequest(text=_HUGE, params=params), timeout=timeout)
        elif kind == "stop_bomb":
            count, length = rng.choice([(64, 1000), (65, 8), (1, 1_000_000)])  # ok, too many, long
            request.params.stop.extend("\x01" * length + str(i) for i in range(count))
            stub.Complete(request, timeout=timeout)
        elif kind == "cancel":
            stream = stub.Generate(request, timeout=timeout)
            after = rng.randint(0, 4)
            for i, _ in enumerate(stream):
                if i >= after:
                    stream.cancel()
        elif kind == "deadline":
            stub.Complete(request, timeout=rng.uniform(0.005, 0.1))
        elif rng.random() < 0.5:
            list(stub.Generate(request, timeout=timeout))
        else:
            stub.Complete(request, timeout=timeout)
    except grpc.RpcError as e:
        status = e.code().name
    seconds = time.monotonic() - start
    hang = kind != "deadline" and status == "DEADLINE_EXCEEDED"
    return Call(kind, status, seconds, hang)


class RssSampler:
    """The server's RSS in MB every few seconds, on a thread, while the mix runs."""

    def __init__(self, server: Server, every_s: float = 2.0):
        self.samples: list[float] = []
        self._server, self._every_s, self._done = server, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(self._every_s):
            self.samples.append(self._server.resources()["rss_mb"])

    def stop(self) -> list[float]:
        self._done.set()
        self._thread.join()
        return self.samples


def run_mix(target: str) -> list[Call]:
    kinds = ["cancel", "deadline", "stop_bomb", "huge", "garbage"]
    weights = [FLAGS.cancel_share, FLAGS.deadline_share] + [FLAGS.hostile_share] * 3
    if sum(weights) > 1:
        raise app.UsageError("the shares add up to more than 1")
    kinds.append("normal")
    weights.append(1 - sum(weights))
    end = time.monotonic() + FLAGS.duration_s
    budget = iter(range(FLAGS.requests))
    lock, calls = threading.Lock(), []

    def worker(index: int):
        rng = random.Random(FLAGS.seed * 1000 + index)
        with grpc.insecure_channel(target, options=[
                ("grpc.max_send_message_length", 32 << 20)]) as channel:
            stub = pb_grpc.JaxServeStub(channel)
            while time.monotonic() < end:
                with lock:
                    if next(budget, None) is None:
                        return
                call = one_call(stub, channel, rng.choices(kinds, weights)[0], rng)
                with lock:
                    calls.append(call)

    with concurrent.futures.ThreadPoolExecutor(FLAGS.concurrency) as pool:
        for future in [pool.submit(worker, i) for i in range(FLAGS.concurrency)]:
            future.result()
    return calls


def wait_idle(server: Server, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if (metrics.get("jaxserve_requests_in_flight") == 0
                and metrics.get("jaxserve_num_requests_running") == 0) or (
                time.monotonic() > deadline):
            return metrics
        time.sleep(0.2)


def summarize(calls: list[Call], leaks: dict, exit_code: int, seconds: float) -> dict:
    by_kind = collections.defaultdict(collections.Counter)
    for call in calls:
        by_kind[call.kind][call.status] += 1
    unexpected = sum(n for kind, statuses in by_kind.items() for status, n in statuses.items()
                     if status not in EXPECTED[kind])
    normal = sorted(c.seconds for c in calls if c.kind == "normal" and c.status == "OK")
    pct = lambda q: round(normal[min(len(normal) - 1, int(q * len(normal)))], 3) if normal else None
    return {"calls": len(calls), "seconds": round(seconds, 1), "concurrency": FLAGS.concurrency,
            "statuses": {k: dict(v) for k, v in sorted(by_kind.items())},
            "unexpected": unexpected, "hangs": sum(c.hang for c in calls),
            "crashes": int(exit_code != 0), "exit_code": exit_code,
            "normal_latency_s": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "leaks": leaks}


def print_table(report: dict) -> None:
    print(f"{'kind':<10} {'calls':>6}  statuses")
    for kind, statuses in report["statuses"].items():
        text = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items(), key=lambda x: -x[1]))
        print(f"{kind:<10} {sum(statuses.values()):>6}  {text}")
    leaks = report["leaks"]
    print(f"\n{report['calls']} calls in {report['seconds']} s at concurrency "
          f"{report['concurrency']}: {report['unexpected']} unexpected, {report['hangs']} hung, "
          f"server exit code {report['exit_code']}")
    print(f"normal call latency s: {report['normal_latency_s']}; phases s: {report['phases_s']}")
    print(f"KV blocks free {leaks['kv_blocks_free']:.0f}/{leaks['kv_blocks']}, host swap slots "
          f"free {leaks['swap_slots_free']:.0f}/{leaks['swap_slots']:.0f} (preemptions "
          f"{leaks['preemptions']:.0f}, swapped out {leaks['swap_outs']:.0f}), in flight "
          f"{leaks['in_flight']:.0f}; RSS "
          f"{leaks['rss_mb'][0]:.0f} -> {leaks['rss_mb'][1]:.0f} MB (through the run "
          f"{leaks['rss_mb_quartiles']}; second half {leaks['rss_mb_second_half_growth']:+.0f}), "
          f"threads "
          f"{leaks['threads'][0]} -> {leaks['threads'][1]}, fds {leaks['fds'][0]} -> "
          f"{leaks['fds'][1]}: {'LEAK' if leaks['leaked'] else 'no leak'}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    started = time.monotonic()
    server = Server(FLAGS.model, FLAGS.server_args)
    try:
        with grpc.insecure_channel(server.target) as channel:
            grpc.channel_ready_future(channel).result(60)
            stub = pb_grpc.JaxServeStub(channel)
            deadline = time.monotonic() + 300
            while True:  # loading; then a warm-up that compiles what the mix needs
                try:
                    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            for n in (1, 4, 16):
                list(stub.Generate(pb.GenerateRequest(text="warm up " * n, params=pb.SamplingParams(
                    max_tokens=FLAGS.max_tokens, ignore_eos=True)), timeout=300))
        baseline = server.resources()
        phases = {"start_and_warm_up": time.monotonic() - started}
        sampler = RssSampler(server)
        calls = run_mix(server.target)
        rss = sampler.stop()
        phases["mix"] = time.monotonic() - started - phases["start_and_warm_up"]
        metrics = wait_idle(server)
        after = server.resources()
    finally:
        stopping = time.monotonic()
        exit_code = server.stop()
    phases["stop"] = time.monotonic() - stopping
    total = info.limits.num_kv_blocks
    free = metrics.get("jaxserve_num_free_kv_blocks")
    leaks = {"kv_blocks": total, "kv_blocks_free": free,
             "swap_slots_free": metrics.get("jaxserve_num_free_swap_slots"),
             "swap_slots": metrics.get("jaxserve_num_swap_slots"),
             "preemptions": metrics.get("jaxserve_preemptions_total"),
             "swap_outs": metrics.get("jaxserve_swap_outs_total"),
             "in_flight": metrics.get("jaxserve_requests_in_flight"),
             **{k: [round(baseline[k], 1), round(after[k], 1)] for k in baseline}}
    rss = rss or [baseline["rss_mb"]]
    leaks["rss_mb_quartiles"] = [round(rss[min(len(rss) - 1, q * len(rss) // 4)])
                                 for q in range(4)] + [round(after["rss_mb"])]
    leaks["rss_mb_second_half_growth"] = round(after["rss_mb"] - rss[len(rss) // 2], 1)
    leaks["leaked"] = bool(free != total or leaks["in_flight"] != 0
                           or leaks["swap_slots_free"] != leaks["swap_slots"]
                           or leaks["rss_mb_second_half_growth"] > FLAGS.rss_growth_mb
                           or after["threads"] > baseline["threads"] + 4
                           or after["fds"] > baseline["fds"] + 16)
    report = summarize(calls, leaks, exit_code, time.monotonic() - started)
    report["phases_s"] = {k: round(v, 1) for k, v in phases.items()}
    report["command"] = " ".join(["python -m tools.soak", *sys.argv[1:]])
    print_table(report)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"JSON: {FLAGS.json_out}")
    bad = report["unexpected"] or report["hangs"] or report["crashes"] or leaks["leaked"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    app.run(main)
