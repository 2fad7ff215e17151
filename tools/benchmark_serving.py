"""Serving benchmark: a chat-like request stream against a server, or the same through the engine.

    python -m server --model=... &                        # then
    python -m tools.benchmark_serving --num_requests=500 --request_rate=8 --slo_ttft_ms=500
    python -m tools.benchmark_serving --offline --model=... --num_requests=500 --request_rate=8

The workload is jaxserve.sim.workload's (the scheduling simulator draws the same one): Poisson
arrivals at --request_rate (inf: all at once), log-normal prompt and output lengths, seeded:
    prompt_len = clip(round(prompt_len_median * exp(prompt_len_sigma * z)), 4, max_prompt_len)
    output_len ~ log-normal(output_len_median, output_len_sigma), partly predictable from the
                 prompt, capped at max_output_len
with z standard normal. The defaults (median 128 / sigma 1.0 for prompts, 64 / 1.0 for outputs)
give a long tail like chat traces: p99 / median = exp(2.33 sigma), about 10. Prompts are random
token ids; each request asks for exactly its output_len tokens (ignore_eos, greedy).

The server mode streams each request over gRPC (Generate) and times chunks as they arrive.
--offline runs the same arrivals through jaxserve.Engine in this process, timing tokens as
step() returns them, so the difference between the two is the server's overhead.
Reports tools/serving_stats.py's table; writes --out_json and a --out_png plot.
"""

import asyncio
import dataclasses
import json
import math
import sys
import time

import grpc
from absl import app, flags

from jaxserve.sim.workload import SimRequest, generate_workload
from tools import serving_stats
from tools.workload_flags import workload_spec
from jaxserve.flags import FLAGS, engine_class_from_flags, engine_config_from_flags

flags.DEFINE_string("target", "127.0.0.1:50051", "host:port of the server.")
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
flags.DEFINE_string("out_json", "serving_benchmark.json", "Summary and per-request records; "
                    "empty: none.")
flags.DEFINE_string("out_png", "serving_benchmark.png", "Plot; empty: none.")


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


# ----- server mode ------------------------------------------------------------------------------
async def run_server() -> tuple[list[serving_stats.RequestRecord], dict]:
    from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
    from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
    from tools.grpc_channel import open_channel

    channel, metadata = open_channel(FLAGS.target, tls_ca=FLAGS.tls_ca, auth_token=FLAGS.auth_token)
    async with channel:
        await _wait_until_serving(channel, metadata)
        stub = pb_grpc.JaxServeStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=metadata)

        async def drive(requests: list[SimRequest]) -> list[serving_stats.RequestRecord]:
            limit = asyncio.Semaphore(FLAGS.max_concurrency or len(requests))
            start = time.perf_counter()

            async def one(request: SimRequest) -> serving_stats.RequestRecord:
                await asyncio.sleep(max(0.0, start + request.arrival_time - time.perf_counter()))
                async with limit:
                    record = serving_stats.RequestRecord(len(request.prompt_token_ids),
                                                         time.perf_counter())
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
                    return record

            return list(await asyncio.gather(*(one(r) for r in requests)))

        warmup, measured = workloads(info.vocab_size, info.max_model_len)
        if warmup:
            await drive(warmup)
        records = await drive(measured)
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


# ----- offline mode -----------------------------------------------------------------------------
def run_offline() -> tuple[list[serving_stats.RequestRecord], dict]:
    from jaxserve import SamplingParams

    engine = engine_class_from_flags()(FLAGS.model, engine_config_from_flags(),
                                       precompile=FLAGS.precompile,
                                       random_weights=FLAGS.random_weights)

    def drive(requests: list[SimRequest]) -> list[serving_stats.RequestRecord]:
        pending = sorted(requests, key=lambda r: r.arrival_time)
        records, seen = {}, {}
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
        return list(records.values())  # in arrival order

    warmup, measured = workloads(engine.model_config.vocab_size, engine.config.max_model_len)
    if warmup:
        drive(warmup)
    records = drive(measured)
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    records, model = run_offline() if FLAGS.offline else asyncio.run(run_server())
    slo = serving_stats.SLO(ttft_ms=FLAGS.slo_ttft_ms, tpot_ms=FLAGS.slo_tpot_ms)
    summary = serving_stats.summarize(records, slo)
    mode = "offline (jaxserve.Engine)" if FLAGS.offline else f"server {FLAGS.target}"
    print(f"{mode}: {len(records)} requests at {FLAGS.request_rate} req/s")
    print(serving_stats.format_table(summary))
    flag_names = ("warmup_requests", "num_requests", "request_rate", "max_concurrency", "prompt_len_median",
                  "prompt_len_sigma", "max_prompt_len", "output_len_median", "output_len_sigma",
                  "max_output_len", "workload_seed", "offline")
    if FLAGS.out_json:
        with open(FLAGS.out_json, "w") as f:
            json.dump({"mode": mode, "command": " ".join(sys.argv), "model": model,
                       "flags": {k: _json_number(FLAGS[k].value) for k in flag_names},
                       "summary": summary,
                       "requests": [dict(prompt_tokens=r.prompt_tokens,
                                         output_tokens=r.output_tokens, ttft_s=r.ttft,
                                         tpot_s=r.tpot, e2e_s=r.e2e, error=r.error)
                                    for r in records]},
                      f, indent=1, default=float)
        print(f"wrote {FLAGS.out_json}")
    if FLAGS.out_png:
        serving_stats.plot(records, summary, FLAGS.out_png,
                           f"{mode}, {FLAGS.request_rate} req/s, {model['model_path']}")
        print(f"wrote {FLAGS.out_png}")


if __name__ == "__main__":
    app.run(main)
