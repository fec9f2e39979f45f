#!/usr/bin/env bash
# Every pending GPU check and timing of issue 5, in three parts that each fit one 10-minute device call.
#
#     bash benchmarks/gpu_session.sh 1      # correctness on the GPU, the epilogues, the launch count, the FP8
#                                           # kernels (checked, then timed: benchmarks/fp8_gpu.py), the W4A16
#                                           # ones (the same: benchmarks/w4a16_gpu.py)
#     bash benchmarks/gpu_session.sh 2      # decode_gpu.py: Nano and Mini (the issue's table), HF at batch 1/16
#     bash benchmarks/gpu_session.sh 3      # the tuners (MoE tiles and crossover, prefill tiles), the profile,
#                                           # Mini's TTFT with and without prefix caching
#     bash benchmarks/gpu_session.sh list   # print each part's commands and check that every script exists
#
# Run from the repository root on the device machine (its own python3: torch with CUDA, Triton). Each step's whole
# output goes to $OUT/partN/<step>.log (the device returns $OUT); the console gets each step's exit code, time and
# last line (every benchmark prints one JSON object last). A failing step does not stop the part: the others'
# numbers still come back. Part 2 needs about 55 GB of GPU memory for Mini in bf16, plus HF's copy for its rows.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=src:tests

part1=(
  "gpu_tests|$PY -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py tests/test_last_program.py tests/test_kernels_attention.py tests/test_kernels_moe.py tests/test_kernels_norm.py tests/test_kernels_linear_norm.py tests/test_kernels_embed.py tests/test_pdl.py"
  "last_program|$PY benchmarks/last_program_gpu.py"
  "launch_count|$PY benchmarks/launch_count.py --device cuda"
  "fp8_tests|$PY -m pytest -q -p no:cacheprovider -m 'not slow' tests/test_kernels_fp8_triton.py"
  "fp8_bench|$PY benchmarks/fp8_gpu.py"
  "w4a16_tests|$PY -m pytest -q -p no:cacheprovider -m 'not slow' tests/test_kernels_int4_triton.py"
  "w4a16_bench|$PY benchmarks/w4a16_gpu.py"
)
part2=(
  "decode_nano|$PY benchmarks/decode_gpu.py --models nano"
  "decode_mini|$PY benchmarks/decode_gpu.py --models mini"
)
part3=(
  "tune_moe|$PY benchmarks/tune_moe.py"
  "tune_prefill|$PY benchmarks/tune_prefill.py"
  "profile|$PY benchmarks/profile_gpu.py --out ${OUT:-out/gpu}/part3"
  "prefix_cache_mini|$PY benchmarks/prefix_cache.py --preset mini --device cuda --kv-gb 4"
)

run_part() {
  local name=$1; shift
  local dir="${OUT:-out/gpu}/$name"
  mkdir -p "$dir"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  for step in "$@"; do
    local label=${step%%|*} cmd=${step#*|}
    local start=$SECONDS
    bash -c "$cmd" >"$dir/$label.log" 2>&1
    local rc=$?
    echo "== $label rc=$rc $((SECONDS - start))s: $cmd"
    tail -n 1 "$dir/$label.log" | cut -c1-3000
  done
}

list_parts() {
  local missing=0
  for part in 1 2 3; do
    local -n steps="part$part"
    for step in "${steps[@]}"; do
      local cmd=${step#*|}
      echo "part $part: $cmd"
      for word in $cmd; do
        if [[ $word == benchmarks/*.py || $word == tests/*.py ]] && [[ ! -f $word ]]; then
          echo "missing: $word"; missing=1
        fi
      done
    done
  done
  return $missing
}

case "${1:-}" in
  1) run_part part1 "${part1[@]}" ;;
  2) run_part part2 "${part2[@]}" ;;
  3) run_part part3 "${part3[@]}" ;;
  list) list_parts ;;
  *) echo "usage: $0 1|2|3|list" >&2; exit 2 ;;
esac
