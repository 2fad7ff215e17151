#!/usr/bin/env bash
# The H100 runs behind docs/BENCHMARKS.md, one stage per device call:
#   bash tools/gpu_runs.sh check|serve|offline|policies|swap|disagg|costs|ring_flash   (results under $OUT)
# Each command is timed and logged; a failing command does not stop the stage.
# The device machine has no internet: if it lacks a server dependency, wheels fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl grpcio-health-checking grpcio-reflection \
#     prometheus_client protobuf grpcio
# and carried along as .whl/ are installed into a private folder on the PYTHONPATH (the stubs in
# server/gen/ need grpcio >= 1.85.1; the H100 machine had 1.84.0).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxserve-jax-cache}
SHAPE8B=tools/model_shapes/llama3-8b
ENGINE8B="--model=$SHAPE8B --random_weights --max_model_len=2048 --max_num_seqs=64"

. "$(dirname "$0")/gpu_common.sh"
install_wheels .whl "import grpc_health.v1.health, grpc_reflection, prometheus_client,
server.gen.jaxserve.v1.jaxserve_pb2_grpc"

[ $# -gt 0 ] || set -- usage
for stage in "$@"; do
case "$stage" in
check)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
  step engine_check 150 python -m tools.check_engine_gpu --out="$OUT/engine_check.json"
  for backend in pallas reference; do
    step "throughput_$backend" 240 python -m tools.benchmark_throughput --shape=llama3-8b \
      --batch_sizes=1,64 --input_len=128 --output_len=128 --max_model_len=2048 \
      --max_num_seqs=64 --max_num_batched_tokens=2048 --attention_backend=$backend \
      --out="$OUT/throughput_$backend.json"
  done
  ;;
ring_flash)
  step ring_flash 300 python -m tools.check_ring_flash_gpu
  ;;
serve)
  python -m server $ENGINE8B --max_num_batched_tokens=512 --port=50051 \
    --compilation_cache_dir="$JAX_COMPILATION_CACHE_DIR" > "$OUT/server.log" 2>&1 &
  SERVER=$!
  WORKLOAD="--num_requests=120 --warmup_requests=8 --slo_ttft_ms=1000 --slo_tpot_ms=50"
  for rate in ${RATES:-2 4 8}; do
    step "serve_rate$rate" 300 python -m tools.benchmark_serving $WORKLOAD --request_rate=$rate \
      --out_json="$OUT/serve_rate$rate.json" --out_png="$OUT/serve_rate$rate.png"
  done
  kill -TERM $SERVER; wait $SERVER
  tail -n 5 "$OUT/server.log"
  ;;
offline)
  WORKLOAD="--num_requests=120 --warmup_requests=8 --slo_ttft_ms=1000 --slo_tpot_ms=50"
  for rate in 2 4 8; do
    step "offline_rate$rate" 200 python -m tools.benchmark_serving --offline $ENGINE8B \
      --max_num_batched_tokens=512 $WORKLOAD --request_rate=$rate \
      --out_json="$OUT/offline_rate$rate.json" --out_png=""
  done
  ;;
policies)
  # A burst of 300 requests on 16 sequence slots: a queue forms, so the order matters.
  for policy in ${POLICIES:-fcfs sjf srpt mlfq}; do
    step "policy_$policy" 200 python -m tools.benchmark_serving --offline $ENGINE8B \
      --max_num_seqs=16 --max_num_batched_tokens=512 --scheduling_policy=$policy \
      --num_requests=300 --warmup_requests=8 --request_rate=inf \
      --out_json="$OUT/policy_$policy.json" --out_png=""
  done
  ;;
swap)
  # Preemption on the GPU: golden tokens under a tiny cache, recompute and swap; then the 8B
  # burst on a KV cache too small for it (1,024 blocks of 16 tokens), recompute against swap.
  step swap_check 200 python -m tools.check_engine_gpu --families=llama3,mixtral --backends=pallas \
    --preemption_modes=recompute,swap --num_kv_blocks=32 --copies=4 --out="$OUT/swap_check.json"
  for mode in recompute swap; do
    step "preempt_$mode" 200 python -m tools.benchmark_serving --offline $ENGINE8B \
      --max_num_batched_tokens=512 --num_kv_blocks=1024 --preemption_mode=$mode \
      --num_requests=200 --warmup_requests=8 --request_rate=inf \
      --out_json="$OUT/preempt_$mode.json" --out_png=""
  done
  ;;
disagg)
  # Needs 2 GPUs. Long prompts at a steady rate: one engine on one GPU, then prefill on GPU 0
  # and decode on GPU 1 (docs/DISAGGREGATION.md). Compare TPOT/ITL, and goodput per GPU.
  WORKLOAD="--num_requests=120 --warmup_requests=8 --prompt_len_median=1024 \
    --max_prompt_len=1536 --slo_ttft_ms=1000 --slo_tpot_ms=50 --request_rate=${RATE:-4}"
  for mode in colocated disaggregated; do
    extra=""; [ $mode = disaggregated ] && extra="--disaggregate --swap_space_gib=16"
    step "disagg_$mode" 300 python -m tools.benchmark_serving --offline $ENGINE8B \
      --max_num_batched_tokens=512 $extra $WORKLOAD --out_json="$OUT/disagg_$mode.json" \
      --out_png=""
  done
  ;;
costs)
  step step_costs 440 python -m tools.measure_step_costs --model=$SHAPE8B --random_weights \
    --dtype=bfloat16 --tokens=16,64,256,1024,2048 --seqs=8,32,128 --repeats=5 \
    --max_model_len=4096 \
    --out="$OUT/h100.json"
  ;;
*)
  echo "usage: bash tools/gpu_runs.sh check|serve|offline|policies|swap|disagg|costs|ring_flash" >&2; exit 2 ;;
esac
done
