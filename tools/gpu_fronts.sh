#!/usr/bin/env bash
# Each front end's own cost on one GPU (issue 15): tools/benchmark_serving over gRPC, over the
# OpenAI-compatible HTTP API of the same server process, and offline (jaxserve.Engine in the
# benchmark's own process): the same seeded workload at the same rates, the Llama-3-8B shape with
# random bf16 weights. One stage per device call (each fits the 10-minute limit):
#   bash tools/gpu_fronts.sh serve     # one server, --port and --http_port; gRPC then HTTP per rate
#   bash tools/gpu_fronts.sh offline   # the same rates through the engine in-process
#   bash tools/gpu_fronts.sh table     # $OUT/*.json as docs/BENCHMARKS.md's table, by rate and path
# Results (JSON per run, logs) under $OUT (default gpu_out/fronts). RATES (default "4 8 16")
# go past the earlier 2-8 to find where the HTTP path's goodput falls off next to offline's.
# Expected time (H100 figures of docs/BENCHMARKS.md: 120 requests, p99 E2E ~9 s): serve ~5-6 min
# (the server's start and precompile, then 6 runs of 20-50 s), offline ~5 min (3 engine starts).
#
# The device has no internet. The wheels this needs beyond jax/flax/torch/transformers were
# fetched here into .wheels/ (carry it: run(carry=[".wheels"])) with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .wheels fastapi starlette pydantic pydantic-core uvicorn \
#     httpx httpcore h11 anyio click annotated-types typing-inspection annotated-doc idna certifi \
#     typing-extensions opentelemetry-api grpcio protobuf grpcio-health-checking grpcio-reflection \
#     prometheus_client gguf absl-py tqdm
# (versions as in .venv); when an import fails they are installed into /tmp/jaxserve-extra, first
# on the PYTHONPATH. On the CPU, a small try-out of the whole script:
#   ENGINE="--model=builtin:tiny-llama --dtype=float32 --max_model_len=256 --max_num_seqs=8 \
#     --max_num_batched_tokens=64 --noprecompile" WORKLOAD="--num_requests=8 --max_prompt_len=64 \
#     --max_output_len=64" RATES="4 16" bash tools/gpu_fronts.sh serve offline table
set -uo pipefail
OUT=${OUT:-gpu_out/fronts}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxserve-jax-cache}
ENGINE=${ENGINE:-"--model=tools/model_shapes/llama3-8b --random_weights --max_model_len=2048 \
--max_num_seqs=64 --max_num_batched_tokens=512"}
WORKLOAD=${WORKLOAD:-"--num_requests=120 --warmup_requests=8"}
SLO="--slo_ttft_ms=1000 --slo_tpot_ms=50"
RATES=${RATES:-"4 8 16"}
PORT=${PORT:-50051}
HTTP_PORT=${HTTP_PORT:-8000}

. "$(dirname "$0")/gpu_common.sh"
STEP_TAIL=14
install_wheels .wheels "import fastapi, uvicorn, httpx, gguf, absl,
tqdm, prometheus_client, grpc_health.v1.health, grpc_reflection,
server.gen.jaxserve.v1.jaxserve_pb2_grpc"

[ $# -gt 0 ] || set -- usage
for stage in "$@"; do
case "$stage" in
serve)
  # shellcheck disable=SC2086
  python -m server $ENGINE --port="$PORT" --http_port="$HTTP_PORT" \
    --compilation_cache_dir="$JAX_COMPILATION_CACHE_DIR" > "$OUT/server.log" 2>&1 &
  SERVER=$!
  for rate in $RATES; do
    # shellcheck disable=SC2086
    step "grpc_rate$rate" 240 python -m tools.benchmark_serving --backend=grpc \
      --target="127.0.0.1:$PORT" $WORKLOAD $SLO --request_rate="$rate" \
      --out_json="$OUT/grpc_rate$rate.json" --out_png=""
    # shellcheck disable=SC2086
    step "openai_rate$rate" 240 python -m tools.benchmark_serving --backend=openai \
      --base_url="http://127.0.0.1:$HTTP_PORT/v1" $WORKLOAD $SLO --request_rate="$rate" \
      --out_json="$OUT/openai_rate$rate.json" --out_png=""
  done
  kill -TERM $SERVER; wait $SERVER
  echo "== server exit $?"; tail -n 5 "$OUT/server.log"
  ;;
offline)
  for rate in $RATES; do
    # shellcheck disable=SC2086
    step "offline_rate$rate" 240 python -m tools.benchmark_serving --offline $ENGINE \
      $WORKLOAD $SLO --request_rate="$rate" --out_json="$OUT/offline_rate$rate.json" --out_png=""
  done
  ;;
table)
  python - "$OUT" <<'EOF'
import glob, json, os, re, sys
rows = []
for path in glob.glob(os.path.join(sys.argv[1], "*_rate*.json")):
    kind, rate = re.match(r"(\w+)_rate([\d.]+|inf)\.json", os.path.basename(path)).groups()
    rows.append((float(rate), ["grpc", "openai", "offline"].index(kind), kind,
                 json.load(open(path))["summary"]))
print("| rate req/s | path | output tok/s | TTFT mean / p50 / p99 ms | TPOT mean / p99 ms "
      "| ITL mean / p99 ms | E2E mean / p99 s | goodput req/s | failed |")
print("|---:|---|---:|---|---|---|---|---:|---:|")
f = lambda d, *keys: " / ".join(f"{d[k]:.1f}" if d[k] is not None else "-" for k in keys)
for rate, _, kind, s in sorted(rows):
    e2e = s["e2e_ms"]
    print(f"| {rate:g} | {kind} | {s['output_throughput']:.1f} | {f(s['ttft_ms'], 'mean', 'p50', 'p99')} "
          f"| {f(s['tpot_ms'], 'mean', 'p99')} | {f(s['itl_ms'], 'mean', 'p99')} "
          f"| {e2e['mean'] / 1e3:.2f} / {e2e['p99'] / 1e3:.2f} | {s['goodput']:.2f} | {s['failed']} |")
EOF
  ;;
*)
  echo "usage: bash tools/gpu_fronts.sh serve|offline|table" >&2; exit 2 ;;
esac
done
