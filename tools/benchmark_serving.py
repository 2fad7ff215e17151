"""Serving benchmark: a chat-like request stream against a server, or the same through the engine.

    python -m server --model=... --http_port=8000 &       # then, over gRPC, over HTTP, offline:
    python -m tools.benchmark_serving --num_requests=500 --request_rate=8 --slo_ttft_ms=500
    python -m tools.benchmark_serving --backend=openai --base_url=http://127.0.0.1:8000/v1 ...
    python -m tools.benchmark_serving --offline --model=... --num_requests=500 --request_rate=8

The workload is jaxserve.sim.workload's (the scheduling simulator draws the same one): Poisson
arrivals at --request_rate (inf: all at once), log-normal prompt and output lengths, seeded:
    prompt_len = clip(round(prompt_len_median * exp(prompt_len_sigma * z)), 4, max_prompt_len)
    output_len ~ log-normal(output_len_median, output_len_sigma), partly predictable from the
                 prompt, capped at max_output_len
with z standard normal. The defaults (median 128 / sigma 1.0 for prompts, 64 / 1.0 for outputs)
give a long tail like chat traces: p99 / median = exp(2.33 sigma), about 10. Prompts are random
token ids; each request asks for exactly its output_len tokens (ignore_eos, greedy).

--backend=grpc streams each request over jaxserve's gRPC API (Generate) and times chunks as they
arrive. --backend=openai streams it from any OpenAI-compatible server (jaxserve's --http_port,
vLLM, ...) as POST /v1/completions with token-id prompts, `stream` and
`stream_options.include_usage`: each chunk with a choice is timed as vLLM's benchmark times it
(its text may be empty while a character's bytes are incomplete, or with no tokenizer), and the
usage's completion_tokens gives the token count (a chunk does not say how many tokens it holds:
the last one counts the rest). --offline runs the
same arrivals through jaxserve.Engine in this process, timing tokens as step() returns them, so
the difference between the modes is each front end's own cost.
A progress bar runs on stderr; tools/serving_stats.py's table goes to stdout; the JSON record and
a plot go to --out_dir ($JAXSERVE_CACHE/benchmarks or ~/.cache/jaxserve/benchmarks) unless
--out_json / --out_png name other files.
"""

import asyncio
import dataclasses
import json
import math
import os
import sys
import time

import grpc
from absl import app, flags
from tqdm import tqdm

from jaxserve.model_io.default_model import jaxserve_cache_dir
from jaxserve.sim.workload import SimRequest, generate_workload
from tools import serving_stats
from tools.workload_flags import workload_spec
from jaxserve.cli.flags import FLAGS, engine_class_from_flags, engine_config_from_flags

flags.DEFINE_enum("backend", "grpc", ["grpc", "openai"], "The server's protocol: jaxserve's gRPC "
                  "(--target), or any OpenAI-compatible HTTP server (--base_url).")
flags.DEFINE_string("target", "127.0.0.1:50051", "--backend=grpc: host:port of the server.")
flags.DEFINE_string("base_url", "http://127.0.0.1:8000/v1", "--backend=openai: the API's base "
                    "URL (up to /v1).")
flags.DEFINE_string("served_model", "", "--backend=openai: the `model` to ask for; default: the "
                    "first of GET /v1/models.")
flags.DEFINE_integer("vocab_size", 0, "--backend=openai: draw prompt token ids below this; "
                     "default: the model card's vocab_size (jaxserve gives it; for vLLM set it).")
flags.DEFINE_string("auth_token", "", "Bearer token, if the server wants one.")
flags.DEFINE_string("tls_ca", "", "PEM root certificate: connect with TLS.")
flags.DEFINE_boolean("offline", False, "Run the workload through jaxserve.Engine in this "
                     "process (--model and the engine flags) instead of a server.")
flags.DEFINE_boolean("random_weights", False, "--offline: initialize --model's config.json "
                     "randomly instead of loading weights.")
flags.DEFINE_boolean("precompile", True, "--offline: compile every step shape first.")
flags.DEFINE_float("wait_for_server_s", 600.0, "How long to wait for the server to be SERVING.")
flags.DEFINE_integer("warmup_requests", 0, "First send this many requests (all at once, seed "
                     "--workload_seed + 1), unmeasured: compiles what a server started with "
                     "--noprecompile has not compiled yet.")
flags.DEFINE_integer("num_requests", 200, "Requests in the run.")
flags.DEFINE_float("request_rate", math.inf, "Poisson arrival rate, requests/s; inf: all at once.")
flags.DEFINE_integer("max_concurrency", 0, "Most requests in flight from this client; 0: no limit.")
flags.DEFINE_float("slo_ttft_ms", 1000.0, "Goodput SLO on time to first token.")
flags.DEFINE_float("slo_tpot_ms", 100.0, "Goodput SLO on time per output token.")
flags.DEFINE_float("request_timeout_s", 600.0, "Deadline of each request (server mode).")
flags.DEFINE_string("out_dir", None, "Where the JSON and the plot go by default; default: "
                    "$JAXSERVE_CACHE/benchmarks or ~/.cache/jaxserve/benchmarks.")
flags.DEFINE_string("out_json", None, "Summary and per-request records; default: "
                    "--out_dir/serving-<mode>-<time>.json; empty: none.")
flags.DEFINE_string("out_png", None, "Plot; default: beside the JSON, as .png; empty: none.")


def workloads(vocab_size: int, max_model_len: int) -> tuple[list[SimRequest], list[SimRequest]]:
    """(warm-up requests, measured requests) as the flags describe them."""
    if FLAGS.max_prompt_len + FLAGS.max_output_len > max_model_len:
        raise app.UsageError(f"--max_prompt_len ({FLAGS.max_prompt_len}) + --max_output_len "
                             f"({FLAGS.max_output_len}) exceed the model's max_model_len "
                             f"({max_model_len})")
    spec = workload_spec(FLAGS.num_requests, FLAGS.request_rate, vocab_size=vocab_size)
    warmup = []
    if FLAGS.warmup_requests:
        warmup = generate_workload(dataclasses.replace(
            spec, num_requests=FLAGS.warmup_requests, rate=math.inf, seed=spec.seed + 1))
    return warmup, generate_workload(spec)


# ----- server modes -----------------------------------------------------------------------------
async def drive(requests: list[SimRequest], send, label: str) -> list[serving_stats.RequestRecord]:
    """Sends each request at its arrival time (at most --max_concurrency at once) through
    `send(request, record)`, which fills in the record; a progress bar counts them on stderr."""
    limit = asyncio.Semaphore(FLAGS.max_concurrency or len(requests))
    progress = tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr,
                    dynamic_ncols=True)
    start = time.perf_counter()
    done = {"failed": 0, "tokens": 0}

    async def one(request: SimRequest) -> serving_stats.RequestRecord:
        await asyncio.sleep(max(0.0, start + request.arrival_time - time.perf_counter()))
        async with limit:
            record = serving_stats.RequestRecord(len(request.prompt_token_ids), time.perf_counter())
            await send(request, record)
        done["failed"] += bool(record.error)
        done["tokens"] += record.output_tokens
        progress.set_postfix(failed=done["failed"], out_tok_s=round(
            done["tokens"] / (time.perf_counter() - start)), refresh=False)
        progress.update(1)
        return record

    try:
        return list(await asyncio.gather(*(one(r) for r in requests)))
    finally:
        progress.close()


async def run_grpc() -> tuple[list[serving_stats.RequestRecord], dict]:
    from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
    from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
    from tools.grpc_channel import open_channel

    channel, metadata = open_channel(FLAGS.target, tls_ca=FLAGS.tls_ca, auth_token=FLAGS.auth_token)
    async with channel:
        await _wait_until_serving(channel, metadata)
        stub = pb_grpc.JaxServeStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=metadata)

        async def send(request: SimRequest, record: serving_stats.RequestRecord) -> None:
            call = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[int(t) for t in request.prompt_token_ids]),
                params=pb.SamplingParams(temperature=0.0, max_tokens=request.output_len,
                                         ignore_eos=True))
            try:
                async for response in stub.Generate(call, timeout=FLAGS.request_timeout_s,
                                                    metadata=metadata):
                    record.add_chunk(time.perf_counter(),
                                     sum(len(s.token_ids) for s in response.samples))
            except grpc.aio.AioRpcError as e:
                record.error = e.code().name

        warmup, measured = workloads(info.vocab_size, info.max_model_len)
        if warmup:
            await drive(warmup, send, "warm-up")
        records = await drive(measured, send, "grpc")
    model = {"model_path": info.model_path, "dtype": info.dtype, "max_model_len": info.max_model_len,
             "limits": {f.name: getattr(info.limits, f.name) for f in info.limits.DESCRIPTOR.fields}}
    return records, model


async def _wait_until_serving(channel, metadata) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + FLAGS.wait_for_server_s
    while True:
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        if time.monotonic() > deadline:
            raise SystemExit(f"{FLAGS.target} not SERVING after {FLAGS.wait_for_server_s} s")
        await asyncio.sleep(1.0)


async def run_openai() -> tuple[list[serving_stats.RequestRecord], dict]:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    base = FLAGS.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {FLAGS.auth_token}"} if FLAGS.auth_token else {}
    # No pool limit: a queue in the client would show up as the server's time to first token.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, limits=limits, verify=FLAGS.tls_ca or True,
                                 timeout=httpx.Timeout(FLAGS.request_timeout_s)) as client:
        card = await _wait_for_model(client, base)
        model_name = FLAGS.served_model or card["id"]
        vocab_size = FLAGS.vocab_size or card.get("vocab_size")
        if not vocab_size:
            raise app.UsageError(f"{base}/models does not give the vocabulary size: set "
                                 "--vocab_size (prompt token ids are drawn below it)")
        if not card.get("max_model_len"):
            raise app.UsageError(f"{base}/models does not give max_model_len")

        async def send(request: SimRequest, record: serving_stats.RequestRecord) -> None:
            body = {"model": model_name, "prompt": [int(t) for t in request.prompt_token_ids],
                    "max_tokens": request.output_len, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            completion_tokens = None
            try:
                async with client.stream("POST", base + "/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        record.error = f"HTTP {response.status_code}"
                        return
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            record.error = f"stream error: {chunk['error'].get('message', '')[:80]}"
                            return
                        now = time.perf_counter()
                        if chunk.get("choices"):  # new tokens (the text may be held back)
                            record.add_chunk(now, 1)
                        if chunk.get("usage"):
                            completion_tokens = chunk["usage"]["completion_tokens"]
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                record.error = type(e).__name__
                return
            # Chunks count one token each; the usage gives the rest to the last one.
            if completion_tokens and record.chunk_tokens and completion_tokens > record.output_tokens:
                record.chunk_tokens[-1] += completion_tokens - record.output_tokens

        warmup, measured = workloads(vocab_size, card["max_model_len"])
        if warmup:
            await drive(warmup, send, "warm-up")
        records = await drive(measured, send, "openai")
    model = {"model_path": card.get("root") or model_name, "served_model": model_name,
             "max_model_len": card["max_model_len"], "base_url": base}
    return records, model


async def _wait_for_model(client, base: str) -> dict:
    """The first model card of GET /models, once the server answers 200 (loading: 503)."""
    import httpx

    deadline = time.monotonic() + FLAGS.wait_for_server_s
    while True:
        try:
            response = await client.get(base + "/models", timeout=5)
            if response.status_code == 200:
                cards = response.json().get("data") or []
                if cards:
                    return cards[0]
            elif response.status_code in (401, 403, 404):
                raise SystemExit(f"{base}/models: HTTP {response.status_code}: {response.text[:200]}")
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{base} did not serve a model within {FLAGS.wait_for_server_s} s")
        await asyncio.sleep(1.0)


# ----- offline mode -----------------------------------------------------------------------------
def run_offline() -> tuple[list[serving_stats.RequestRecord], dict]:
    from jaxserve import SamplingParams

    engine = engine_class_from_flags()(FLAGS.model, engine_config_from_flags(),
                                       precompile=FLAGS.precompile,
                                       random_weights=FLAGS.random_weights)

    def drive(requests: list[SimRequest], label: str) -> list[serving_stats.RequestRecord]:
        pending = sorted(requests, key=lambda r: r.arrival_time)
        records, seen = {}, {}
        progress = tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr,
                        dynamic_ncols=True)
        start = time.perf_counter()
        while pending or engine.has_unfinished_requests:
            now = time.perf_counter()
            while pending and start + pending[0].arrival_time <= now:
                request = pending.pop(0)
                rid = engine.add_request(
                    [int(t) for t in request.prompt_token_ids],
                    SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True),
                    arrival_time=now)
                records[rid] = serving_stats.RequestRecord(len(request.prompt_token_ids), now)
                seen[rid] = 0
            if not engine.has_unfinished_requests:
                time.sleep(max(0.0, start + pending[0].arrival_time - time.perf_counter()))
                continue
            outputs = engine.step()
            now = time.perf_counter()
            for output in outputs:
                # Deltas carry the new tokens; the final output is whole.
                num_tokens = sum(len(c.token_ids) for c in output.outputs)
                if output.delta:
                    num_tokens += seen[output.request_id]
                records[output.request_id].add_chunk(now, num_tokens - seen[output.request_id])
                seen[output.request_id] = num_tokens
                progress.update(int(output.finished))
        progress.close()
        return list(records.values())  # in arrival order

    warmup, measured = workloads(engine.model_config.vocab_size, engine.config.max_model_len)
    if warmup:
        drive(warmup, "warm-up")
    records = drive(measured, "offline")
    model = {"model_path": engine.model_path, "dtype": engine.config.dtype,
             "max_model_len": engine.config.max_model_len,
             "limits": {k: getattr(engine.config, k) for k in (
                 "max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching",
                 "enable_chunked_prefill", "preemption_mode")} | {
                     "num_kv_blocks": engine.kv_cache.num_blocks},
             "engine_stats": dataclasses.asdict(engine.stats())}
    stats = model["engine_stats"]
    print(f"engine: {stats['num_preemptions']} preemptions ({stats['num_swap_outs']} by swap), "
          f"{stats['num_prompt_tokens_computed']} prompt tokens computed")
    return records, model


def _json_number(value):
    """inf and nan as strings: JSON has no such numbers."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def output_paths(mode: str) -> tuple[str, str]:
    """(JSON path, PNG path) from the flags: given names as they are ("" for none), else a
    timestamped name in --out_dir, which is made."""
    out_json, out_png = FLAGS.out_json, FLAGS.out_png
    if out_json is None or (out_png is None and not out_json):
        out_dir = FLAGS.out_dir or os.path.join(jaxserve_cache_dir(), "benchmarks")
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"serving-{mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        out_json = stem + ".json" if out_json is None else out_json
        out_png = stem + ".png" if out_png is None else out_png
    elif out_png is None:
        out_png = os.path.splitext(out_json)[0] + ".png"
    return out_json, out_png


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.offline:
        records, model = run_offline()
        mode, label = "offline", "offline (jaxserve.Engine)"
    elif FLAGS.backend == "openai":
        records, model = asyncio.run(run_openai())
        mode, label = "openai", f"OpenAI HTTP {FLAGS.base_url}"
    else:
        records, model = asyncio.run(run_grpc())
        mode, label = "grpc", f"gRPC {FLAGS.target}"
    slo = serving_stats.SLO(ttft_ms=FLAGS.slo_ttft_ms, tpot_ms=FLAGS.slo_tpot_ms)
    summary = serving_stats.summarize(records, slo)
    print(f"{label}: {len(records)} requests at {FLAGS.request_rate} req/s")
    print(serving_stats.format_table(summary))
    flag_names = ("warmup_requests", "num_requests", "request_rate", "max_concurrency", "prompt_len_median",
                  "prompt_len_sigma", "max_prompt_len", "output_len_median", "output_len_sigma",
                  "max_output_len", "workload_seed", "offline", "backend")
    out_json, out_png = output_paths(mode)
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"mode": label, "backend": mode, "command": " ".join(sys.argv),
                       "model": model,
                       "flags": {k: _json_number(FLAGS[k].value) for k in flag_names},
                       "summary": summary,
                       "requests": [dict(prompt_tokens=r.prompt_tokens,
                                         output_tokens=r.output_tokens, ttft_s=r.ttft,
                                         tpot_s=r.tpot, e2e_s=r.e2e, error=r.error)
                                    for r in records]},
                      f, indent=1, default=float)
        print(f"wrote {out_json}")
    if out_png:
        serving_stats.plot(records, summary, out_png,
                           f"{label}, {FLAGS.request_rate} req/s, {model['model_path']}")
        print(f"wrote {out_png}")


if __name__ == "__main__":
    app.run(main)
