#!/usr/bin/env bash
# One prepared run for a lent GPU machine (Python 3.12, JAX 0.11.x with CUDA, flax, transformers,
# orbax, pytest; no network). Fits in 8 minutes. Run from anywhere:
#
#     bash bench/gpu_check.sh            # results under $OUT (the device tool's) or /tmp/xlaserve_gpu_check
#
# Steps, each under its own time limit:
#   0. environment: python, jax, devices, nvidia-smi; wheels from .whl/ if any (sanic, pydantic)
#   1. pytest -m gpu on the GPU kernel tests (tests/ops/test_pallas_gpu.py), compiled for real
#   2. bench.kernel_bench: Pallas kernel vs the jnp reference on Llama-3-8B-shaped decode-heavy
#      and prefill-heavy batches, achieved bandwidth vs a measured copy bandwidth
#   3. optional: the engine's offline throughput on a random-weight Llama-3-8B-shaped bf16 model
#      (1,000 prompts, 512 in / 128 out) when bench/offline_throughput.py and
#      bench/random_models.py exist; otherwise it prints that it is skipped
#   4. a short summary table, last
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/xlaserve_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# tests/conftest.py defaults JAX to the CPU; the GPU run must say cuda explicitly.
# (GPU_CHECK_PLATFORM=cpu KERNEL_BENCH_ARGS=--smoke dry-runs the script on a CPU machine.)
export JAX_PLATFORMS=${GPU_CHECK_PLATFORM:-cuda}
left() { echo $((BUDGET_S - (SECONDS - START))); }
declare -A STATUS

echo "== 0. environment"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'EOF'
import sys, jax
print("python", sys.version.split()[0], "| jax", jax.__version__, "| backend",
      jax.default_backend(), "|", [d.device_kind for d in jax.devices()])
EOF

echo "== 1. pytest -m gpu (GPU kernel tests, compiled)"
timeout 170 $PY -m pytest -m gpu tests/ops/test_pallas_gpu.py -q -rs -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest_gpu.log"
rc=${PIPESTATUS[0]}
# pytest's closing line, e.g. "17 passed, 80 deselected in 41.2s"; skips mean no GPU was seen.
summary=$(grep -E " in [0-9.]+s" "$OUT/pytest_gpu.log" | tail -1)
if [ "$rc" -eq 0 ] && grep -q "passed" <<<"$summary" \
    && ! grep -qE "skipped|failed|error" <<<"$summary"; then STATUS[tests]="PASS ($summary)"
else STATUS[tests]="FAIL rc=$rc ($summary)"; fi

echo "== 2. kernel bench (left: $(left)s)"
bench_limit=$(( $(left) - 100 ))
[ "$bench_limit" -gt 240 ] && bench_limit=240
if [ "$bench_limit" -gt 60 ]; then
  # shellcheck disable=SC2086
  timeout "$bench_limit" $PY -m bench.kernel_bench ${KERNEL_BENCH_ARGS:-} \
    --json-out "$OUT/kernel_bench.json" \
    2>&1 | tee "$OUT/kernel_bench.log"
  rc=${PIPESTATUS[0]}
  STATUS[bench]=$([ "$rc" -eq 0 ] && echo "OK" || echo "FAIL rc=$rc")
else
  STATUS[bench]="SKIPPED (no time left)"
fi

echo "== 3. offline throughput, random-weight llama3-8b bf16 (left: $(left)s)"
if [ -f bench/offline_throughput.py ] && [ -f bench/random_models.py ]; then
  flags=(--random-weights llama3-8b --dtype bfloat16 --num-prompts 1000 --output-len 128
         --no-peer --json-out "$OUT/offline_throughput.json")
  help=$($PY -m bench.offline_throughput --help 2>/dev/null || true)
  grep -q -- "--input-len" <<<"$help" && flags+=(--input-len 512)
  grep -q -- "--attention-backend" <<<"$help" && flags+=(--attention-backend pallas)
  grep -q -- "--concurrency" <<<"$help" && flags+=(--concurrency 256)
  tp_limit=$(( $(left) - 10 ))
  if [ "$tp_limit" -gt 60 ]; then
    timeout "$tp_limit" $PY -m bench.offline_throughput "${flags[@]}" 2>&1 \
      | tee "$OUT/offline_throughput.log"
    rc=${PIPESTATUS[0]}
    STATUS[throughput]=$([ "$rc" -eq 0 ] && echo "OK" || echo "FAIL rc=$rc")
  else
    STATUS[throughput]="SKIPPED (no time left)"
  fi
else
  echo "skipped: bench/offline_throughput.py or bench/random_models.py is not in this tree"
  STATUS[throughput]="SKIPPED (no bench/random_models.py)"
fi

echo
echo "== summary ($((SECONDS - START))s)"
printf '%-12s %s\n' "gpu tests" "${STATUS[tests]}" "kernel bench" "${STATUS[bench]}" \
  "throughput" "${STATUS[throughput]}"
if [ -f "$OUT/kernel_bench.log" ]; then
  sed -n '/^kernel vs reference/,$p' "$OUT/kernel_bench.log"
fi
[[ "${STATUS[tests]}" == PASS* && "${STATUS[bench]}" == OK ]]
