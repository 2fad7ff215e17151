"""The `jaxserve` command (tools/cli.py, jaxserve/cli/cli_app.py), run in subprocesses as a user
would: --help lists the engine and sampling flags under the same names in every command; each
user error is one line on stderr and exit status 2; `serve` writes the stats and access logs.
The stats and access log lines themselves are checked in-process against hand-worked numbers."""

import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from jaxserve.config import EngineConfig
from jaxserve.model_io.default_model import BUILTIN_MODEL
from jaxserve.engine.engine import EngineStats
from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxserve.sampling_params import SamplingParams
from server.access_log import AccessLog
from server.config import ServerConfig
from server.listen_check import check_can_listen
from server.stats_logger import StatsLogger

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, JAX_PLATFORMS="cpu")
LIMITS = ["--max_num_seqs=4", "--max_num_batched_tokens=64", "--max_model_len=128",
          "--block_size=8", "--dtype=float32"]


def jaxserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def in_parallel(calls: list[tuple]) -> list[subprocess.CompletedProcess]:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda args: jaxserve(*args), calls))


ENGINE_FLAGS = [("engine_seed" if f.name == "seed" else f.name) for f in
                dataclasses.fields(EngineConfig) if f.name != "disaggregation_role"]
SAMPLING_FLAGS = [f.name for f in dataclasses.fields(SamplingParams)]
SERVER_FLAGS = [f.name for f in dataclasses.fields(ServerConfig)]


def test_help_lists_the_engine_and_sampling_flags_under_the_same_names():
    run, chat, serve, client = in_parallel([("run", "--help"), ("chat", "--help"),
                                            ("serve", "--help"), ("client", "--help")])
    for result in (run, chat, serve, client):
        assert result.returncode == 0, result.stderr
    for result in (run, chat, serve):  # every EngineConfig field, derived: none hand-listed
        missing = [name for name in ENGINE_FLAGS if f"--{name}" not in result.stdout
                   and f"--[no]{name}" not in result.stdout]
        assert not missing, missing
        assert "--model (default: smollm2)" in result.stdout
        # Help from EngineConfig's docstring.
        assert "tokens in one step (decode tokens plus prefill chunks)" in result.stdout
    for result in (run, chat, client):  # SamplingParams' names and defaults
        missing = [name for name in SAMPLING_FLAGS if f"--{name}" not in result.stdout
                   and f"--[no]{name}" not in result.stdout]
        assert not missing, missing
        assert "--temperature (default: 1.0)" in result.stdout
        assert "per-request seed" in result.stdout
    assert "--max_tokens (default: 16)" in run.stdout and "--max_tokens (default: 16)" in client.stdout
    assert "--max_tokens (default: 512)" in chat.stdout  # a reply's length
    assert "--temperature" not in serve.stdout  # the server takes sampling per request
    for name in SERVER_FLAGS + ["log_stats_interval_s", "access_log"]:
        assert f"--{name}" in serve.stdout or f"--[no]{name}" in serve.stdout, name
    assert "Unable to initialize" not in run.stderr + serve.stderr


def _free_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_each_user_error_is_one_line_and_exit_status_2():
    busy = _free_port()  # held open for the port-in-use cases
    port = busy.getsockname()[1]
    tiny = f"--model={BUILTIN_MODEL}"
    cases = [  # (args, what the line must say)
        (("run", "--max_tokens=0"), "--max_tokens must be an integer >= 1, got 0"),
        (("run", "--temperature=-1"), "--temperature must be in [0, 100], got -1.0"),
        (("run", "--max_tokens=abc"), "flag --max_tokens=abc: invalid literal"),
        (("run", "--model=/no/such/model"), "'/no/such/model' is not a folder"),
        (("run", tiny, "--tensor_parallel=3", *LIMITS), "needs 3 devices; 1 are available"),
        (("chat", "--top_p=0"), "--top_p must be in (0, 1], got 0.0"),
        (("client", "--seed=-1"), "--seed must be an integer in [0, 2**32), got -1"),
        (("serve", "--port=70000"), "port must be in [0, 65536), got 70000"),
        (("serve", "--model=/no/such/model"), "'/no/such/model' is not a folder"),
        (("serve", tiny, "--tensor_parallel=3", *LIMITS), "needs 3 devices; 1 are available"),
        (("serve", tiny, f"--port={port}", *LIMITS), f"127.0.0.1:{port} is in use"),
        (("serve", tiny, "--port=0", "--http_port=18093", "--metrics_port=18093", *LIMITS),
         "--metrics_port=18093 is --http_port's too"),
        (("serve", tiny, "--port=0", "--tls_cert=/no/cert.pem", "--tls_key=/no/key.pem", *LIMITS),
         "--tls_cert: no such file: '/no/cert.pem'"),
        (("router", "--backends="), "backends must list at least one backend"),
        (("run", "--prompts_file=/no/such/file"), "--prompts_file: No such file or directory"),
        (("run", tiny, "--prompt=", *LIMITS), "--prompt: an empty prompt"),
        (("bogus", "--no_such_flag"), "unknown command 'bogus'"),
    ]
    try:
        results = in_parallel([args for args, _ in cases])
    finally:
        busy.close()
    for (args, expected), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (args, result.returncode, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"jaxserve {args[0]}: error: ".replace(
            "jaxserve bogus", "jaxserve")), (args, result.stderr[-2000:])
        assert expected in lines[0], (args, lines[0])


def test_serve_logs_stats_and_each_request_then_stops_on_sigterm():
    import grpc
    from server.gen.jaxserve.v1 import jaxserve_pb2 as pb, jaxserve_pb2_grpc as pb_grpc

    process = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "serve", f"--model={BUILTIN_MODEL}", "--port=0",
         "--http_port=0", "--noprecompile", "--log_stats_interval_s=0.2", "--access_log",
         *LIMITS],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        port = http_port = None
        while port is None or http_port is None:  # the two "... on 127.0.0.1:PORT" lines
            line = process.stdout.readline()
            assert line, "".join(log)
            log.append(line)
            if found := re.search(r"gRPC \S+ on 127\.0\.0\.1:(\d+)", line):
                port = int(found[1])
            if found := re.search(r"HTTP API on http://127\.0\.0\.1:(\d+)", line):
                http_port = int(found[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = pb_grpc.JaxServeStub(channel)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), params=pb.SamplingParams(
                temperature=0, max_tokens=5, ignore_eos=True))
            deadline = time.monotonic() + 120
            while True:  # UNAVAILABLE until the model is loaded
                try:
                    stub.Complete(request, timeout=60)
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                    time.sleep(0.2)
        body = json.dumps({"model": BUILTIN_MODEL, "prompt": [1, 2], "max_tokens": 2}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/completions", body,
                {"Content-Type": "application/json"}), timeout=60) as reply:
            assert reply.status == 200
        time.sleep(0.6)  # a stats interval or more after the requests
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    text = "".join(log) + rest
    assert process.returncode == 0, text[-3000:]
    assert "status=OK prompt_tokens=3 cached_tokens=0 output_tokens=5 finish=length" in text
    assert '"POST /v1/completions HTTP/1.1" 200' in text  # uvicorn's access line
    assert "generation " in text and " tokens/s; running " in text, text[-3000:]
    assert "Unable to initialize" not in text and "Traceback" not in text


def _stats(prompt: int, generated: int, running: int = 0, waiting: int = 0,
           preemptions: int = 0) -> EngineStats:
    return EngineStats(num_waiting=waiting, num_running=running, num_free_blocks=30,
                       num_kv_blocks=40, kv_cache_usage=0.25, prefix_cache_hit_rate=0.5,
                       num_preemptions=preemptions, num_generated_tokens=generated,
                       num_prompt_tokens_computed=prompt)


def test_port_0_still_checks_the_host():
    """--port=0 (a free port) on a host this machine does not have is the one-line error, not
    grpc's RuntimeError at bind (192.0.2.1 is TEST-NET-1, never a local address)."""
    with pytest.raises(ValueError, match=r"--port: 192\.0\.2\.1:0 cannot be listened on"):
        check_can_listen("192.0.2.1", 0, "port")
    check_can_listen("127.0.0.1", 0, "port")
    check_can_listen("192.0.2.1", None, "http_port")  # unset: nothing to check


def test_stats_line_gives_rates_over_the_interval_and_is_silent_when_idle():
    clock, stats = [100.0], [_stats(0, 0)]
    logger = StatsLogger(lambda: stats[0], interval_s=10.0, clock=lambda: clock[0])
    assert logger.tick() is None  # the first snapshot only starts the interval
    clock[0], stats[0] = 110.0, _stats(prompt=120, generated=35, running=2, waiting=1)
    assert logger.tick() == ("prompt 12.0 tokens/s, generation 3.5 tokens/s; running 2, waiting "
                             "1 requests; KV cache 25.0% used; prefix cache hit rate 50.0%; "
                             "preemptions 0")
    clock[0], stats[0] = 115.0, _stats(prompt=120, generated=45, preemptions=1)
    assert logger.tick().startswith("prompt 0.0 tokens/s, generation 2.0 tokens/s; running 0")
    clock[0] = 125.0
    assert logger.tick() is None  # nothing happened
    assert StatsLogger(lambda: None, 1.0).tick() is None  # still loading
    with pytest.raises(ValueError, match="log_stats_interval_s must be > 0"):
        StatsLogger(lambda: None, 0.0)


def test_access_log_line():
    output = RequestOutput(
        request_id="7", prompt=None, prompt_token_ids=[5, 6, 7], finished=True,
        outputs=[CompletionOutput(0, "ab", [1, 2], "length"), CompletionOutput(1, "c", [3], "stop")],
        metrics=RequestMetrics(arrival_time=0.0), num_cached_tokens=2)
    started = time.monotonic() - 1.5
    line = AccessLog(True).request_done("grpc Generate", "7", "OK", output, started)
    assert line.startswith("grpc Generate request=7 status=OK prompt_tokens=3 cached_tokens=2 "
                           "output_tokens=3 finish=length,stop e2e=1.5")
    line = AccessLog(True).request_done("grpc Generate", None, "CANCELLED", None, started)
    assert "request=- status=CANCELLED prompt_tokens=- cached_tokens=- output_tokens=-" in line
    assert AccessLog(False).request_done("grpc Generate", "7", "OK", output, started) is None


def test_attribute_docs_read_grouped_names_and_continuation_lines():
    from jaxserve.cli.dataclass_flags import attribute_docs, name_flags

    @dataclasses.dataclass(frozen=True)
    class Toy:
        """A toy.

        Attributes:
          a, b: the first two,
            over two lines.
          c: the third.

        Not an attribute: this ends the section.
        """
        a: int = 0
        b: int = 0
        c: str = ""

    assert attribute_docs(Toy) == {"a": "the first two, over two lines.",
                                   "b": "the first two, over two lines.", "c": "the third."}
    assert attribute_docs(EngineConfig)["seed"].startswith(
        "seeds the per-request sampling seeds")
    import jaxserve.cli.flags  # noqa: F401  (defines the engine flags, so their names are known)
    assert name_flags("EngineConfig.seed must be >= 0; EngineConfig.nope") == \
        "--engine_seed must be >= 0; EngineConfig.nope"


def test_seed_is_the_request_seed_and_engine_seed_the_engine_one(tmp_path):
    outs = [tmp_path / f"{i}.json" for i in range(3)]
    common = ("run", f"--model={BUILTIN_MODEL}", "--prompt=Hello", "--max_tokens=6",
              "--ignore_eos", *LIMITS)
    results = in_parallel([(*common, "--seed=3", "--engine_seed=1", f"--json_out={outs[0]}"),
                           (*common, "--seed=3", "--engine_seed=2", f"--json_out={outs[1]}"),
                           (*common, "--engine_seed=2", f"--json_out={outs[2]}")])
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    tokens = [json.loads(p.read_text())["outputs"][0]["samples"][0]["token_ids"] for p in outs]
    assert tokens[0] == tokens[1]  # the request's seed decides, not the engine's
    # Without --seed the engine's seed picks one; sampled (SamplingParams' temperature 1.0), so
    # another seed gives other tokens (seeded throughout: the same outcome every run).
    assert tokens[2] != tokens[1] and len(tokens[2]) == 6
