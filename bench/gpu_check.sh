#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H100/H200, JAX 0.11.x with CUDA, no network), in
# under 8 minutes of device time. From the repo root, with the wheels the machine lacks in .whl/
# (carried by the device tool: carry [".whl"]):
#
#     bash bench/gpu_check.sh              # on the GPU
#     bash bench/gpu_check.sh --dry-run    # on CPU: the same steps on tiny shapes (CI runs it)
#
# Steps (each under its own time limit, all inside GPU_CHECK_BUDGET_S, default 450 s):
#   env          python, jax, devices, nvidia-smi; wheels from .whl/ installed into /tmp/site
#   gpu_tests    pytest -m gpu: the GPU kernels against the reference (compiled), the engine's
#                greedy tokens with the compiled kernel against the reference path
#   kernel_bench bench.kernel_bench: decode attention's achieved HBM bandwidth (share of a
#                measured copy and of the chip's nominal peak; goal >= 70%), mixed prefill+decode
#   throughput   bench.offline_throughput on a random-weight Llama-3-8B-shaped bf16 model:
#                output tok/s, TTFT and decode step time at 1, 64 and 256 concurrent sequences of
#                512 prompt + 256 output tokens; every bucket's compile time cold and warm
# Output, in $OUT (the device tool's) or /tmp/xlaserve_gpu_check: gpu_check.json (the report,
# rewritten after every step: bench/gpu_check_report.py documents the format), one .log per
# step. Exit status 0 only if every step passed; the report is written either way.
# GPU_CHECK_STEPS=a,b runs only those steps (a rerun of one that failed).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
START=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/xlaserve_gpu_check}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.json"
rm -f "$REPORT"
export GPU_CHECK_DRY_RUN=$DRY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# tests/conftest.py defaults JAX to the CPU: the device run must name cuda.
if [ "$DRY" = 1 ]; then export JAX_PLATFORMS=cpu; else export JAX_PLATFORMS=cuda; fi
STEPS=${GPU_CHECK_STEPS:-gpu_tests,kernel_bench,throughput}
left() { echo $((BUDGET_S - (SECONDS - START))); }
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }
report() { $PY -m bench.gpu_check_report "$@"; }

# run_step NAME LIMIT_S RESULT_JSON CMD...: runs CMD under min(LIMIT_S, time left), its output in
# $OUT/NAME.log, and records pass/fail (or skipped when there is no time left) in the report.
run_step() {
  local name=$1 limit=$2 json=$3; shift 3
  local budget; budget=$(( $(left) - 5 ))
  [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 20 ]; then
    report step "$REPORT" "$name" skipped 0 --detail "no time left"
    return 1
  fi
  echo "== $name (limit ${limit}s, ${budget}s left)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local status=pass detail
  detail=$(grep -E " in [0-9.]+s|passed|failed|error|collected|MET|ERROR" "$OUT/$name.log" \
           | tail -1 | cut -c1-300)
  [ "$rc" -eq 124 ] && detail="timed out after ${limit}s; $detail"
  [ "$rc" -ne 0 ] && status=fail
  if [ "$name" = gpu_tests ] && [ "$DRY" = 0 ] \
      && grep -qE "skipped|deselected.* 0 passed|no tests ran" <<<"$detail"; then
    status=fail  # a skip means the GPU was not seen
  fi
  report step "$REPORT" "$name" "$status" $((SECONDS - t0)) --rc "$rc" --detail "$detail" \
    ${json:+--json "$json"}
  [ "$status" = pass ]
}

echo "== env"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
      | head -1)
env_json=$($PY - "$gpu" <<'PY'
import json, sys
import jax
print(json.dumps({"python": sys.version.split()[0], "jax": jax.__version__,
                  "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()], "nvidia_smi": sys.argv[1]}))
PY
)
rc=$?
echo "$env_json"
report env "$REPORT" "${env_json:-{\}}"
report step "$REPORT" env "$([ $rc -eq 0 ] && echo pass || echo fail)" $((SECONDS - START)) \
  --rc "$rc"

if wanted gpu_tests; then
  tests=(tests/ops/test_pallas_gpu.py tests/ops/test_engine_e2e.py)
  if [ "$DRY" = 1 ]; then  # no GPU: the tests must collect (imports, marks), not run
    run_step gpu_tests 120 "" $PY -m pytest -m gpu "${tests[@]}" -q -p no:cacheprovider \
      --collect-only
  else
    run_step gpu_tests 150 "" $PY -m pytest -m gpu "${tests[@]}" -q -rs -p no:cacheprovider
  fi
fi

if wanted kernel_bench; then
  smoke=(); [ "$DRY" = 1 ] && smoke=(--smoke)
  # shellcheck disable=SC2086
  run_step kernel_bench 100 "$OUT/kernel_bench.json" $PY -m bench.kernel_bench "${smoke[@]}" \
    ${KERNEL_BENCH_ARGS:-} --json-out "$OUT/kernel_bench.json"
fi

if wanted throughput; then
  rm -rf "$OUT/jax_cache"  # cold compile: a fresh persistent cache
  if [ "$DRY" = 1 ]; then
    shape=(--random-weights tiny-llama --dtype float32 --concurrency 1,2 --input-len 8
           --output-len 4 --max-model-len 64 --max-num-batched-tokens 16
           --attention-backend reference)
  else
    shape=(--random-weights llama3-8b --dtype bfloat16 --concurrency 1,64,256 --input-len 512
           --output-len 256 --max-model-len 1024 --attention-backend pallas)
  fi
  run_step throughput 300 "$OUT/throughput.json" $PY -m bench.offline_throughput "${shape[@]}" \
    --no-peer --compile-cache "$OUT/jax_cache" --json-out "$OUT/throughput.json"
  rm -rf "$OUT/jax_cache"  # not brought back: only the report and logs are
fi

echo "== summary ($((SECONDS - START))s): $REPORT"
report finish "$REPORT"
rc=$?
$PY - "$REPORT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for name, s in r["steps"].items():
    print(f"{name:<13} {s['status']:<8} {s['seconds']:>6.1f}s  {s['detail'][:90]}")
print("ok" if r["ok"] else "FAILED")
PY
exit $rc
