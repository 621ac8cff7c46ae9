#!/usr/bin/env bash
# A lent GPU machine's whole session in one device call: build, test, sanitize, measure.
#   bash bench/gpu_session.sh [stage ...]          (default: every stage, in the order below)
#
# The device tool runs one command for at most 10 minutes, inside 15 minutes of device time in
# all (machine start included), and brings back at most 8 files of $OUT, no deeper than 2
# folders. So: one total budget (SPFT_SESSION_BUDGET, default 540 s for a 570 s call), each stage
# under its own time limit (never more than what is left), a stage skipped when too little is
# left for it, and the summary written to $OUT/summary.txt and printed after every stage, so
# that a killed call still returns what it learnt. bench/README.md says how to call it and how
# to read the summary.
#
# Stages (budget in seconds):
#   env          versions, GPU, toolkit, sanitizer; the sanitizer stages' test ids exist  30
#   build        pip install -e . (16 jobs, sm_80 + sm_90a); fails unless the cuda and
#                triton backends load                                                     140
#   gpu-tests    the CUDA-kernel tests, -x and CUDA_LAUNCH_BLOCKING=1: the first fault is
#                reported in the test that caused it                                      60
#   memcheck     compute-sanitizer memcheck, torch's caching allocator off, spft kernels
#                only, on a small subset (the failing test of gpu-tests first)            75
#   kernel-suite the Triton and kernel test files in parallel workers (pytest-xdist)       95
#   bench        one DESIGN.md case (4096x4096, 8192 tokens, 1%, bf16) against cuBLAS and
#                peft LoRA, plus the copy and GEMM ceilings                                75
#   racecheck    compute-sanitizer racecheck on the tensor-core kernels                   45
#   rest         the rest of the test suite, in parallel workers, with what time is left  (rest)
#
# Files in $OUT (8 at most, flat): summary.txt env-build.log gpu-tests.log sanitize.log
# suite.log bench.log bench.json ceilings.json.
# Without a GPU (a dry run) every stage but env reports "skipped: no GPU" within seconds.
#
# Environment: OUT (default /tmp/spft-gpu-session), SPFT_SESSION_BUDGET (540),
# SPFT_PYTHON (python3), SPFT_SESSION_WORKERS (12 pytest-xdist workers), MAX_JOBS (16),
# TORCH_CUDA_ARCH_LIST (8.0;9.0a); SPFT_SESSION_FORCE_GPU=1 runs the GPU stages without a GPU (to
# test this script's time limits and summaries on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spft-gpu-session}
mkdir -p "$OUT"
BUDGET=${SPFT_SESSION_BUDGET:-540}
PY=${SPFT_PYTHON:-python3}
WORKERS=${SPFT_SESSION_WORKERS:-12}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
export SPFT_REQUIRE_CUDA_EXT=1   # a CUDA test fails, not skips, when the extension is missing
SCRATCH=$(mktemp -d /tmp/spft-session.XXXXXX)   # anything but the 8 files goes here
(cd "$OUT" && rm -f summary.txt env-build.log gpu-tests.log sanitize.log suite.log bench.log bench.json ceilings.json)
START=$SECONDS

STAGES=(env build gpu-tests memcheck kernel-suite bench racecheck rest)
declare -A LIMIT=([env]=30 [build]=140 [gpu-tests]=60 [memcheck]=75 [kernel-suite]=95 [bench]=75 [racecheck]=45 [rest]=0)
declare -A LOG=([env]=env-build.log [build]=env-build.log [gpu-tests]=gpu-tests.log [memcheck]=sanitize.log
  [kernel-suite]=suite.log [bench]=bench.log [racecheck]=sanitize.log [rest]=suite.log)
declare -A RESULT USED
MIN_STAGE=20     # a stage needs at least this many seconds (or its whole budget if smaller)
RESERVE=5        # kept for the last summary
NEEDS_EXTENSION=" gpu-tests memcheck racecheck "   # skipped when the build fails; the rest still runs
FAILED=0
HAVE_GPU=0
BUILD_OK=1
FAILING_TESTS=()
HEADER=()

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
# The CUDA kernels all live in namespace spft (mangled _ZN4spft..., demangled spft::...), the
# Triton kernels and torch's do not: memcheck instruments ours and leaves the rest at full speed.
MEMCHECK_FILTER=(--kernel-name kns=spft)
# The kernels that stage tiles in shared memory for the tensor cores (csrc/fused_delta_linear.cu
# and csrc/sddmm.cu; Triton's _sddmm_tile_kernel matches the second substring too).
RACECHECK_FILTER=(--kernel-name kns=fused_delta_linear_tc_kernel --kernel-name kns=sddmm_tile_kernel)

left() { echo $((BUDGET - (SECONDS - START))); }

# Test files by name wherever they live under python_tests/ (the folders mirror the package's).
test_files() {
  local name path
  for name in "$@"; do
    path=$(find python_tests -name "$name.py" -print -quit)
    [ -n "$path" ] && echo "$path"
  done
}

GPU_KERNELS=$(test_files test_gpu_kernels)
GPU_TEST_FILES=($(test_files test_extension test_gpu_kernels test_spmm test_sddmm test_fused_delta_linear test_row_gather))
GPU_TEST_FILTER="cuda or gpu_kernels or extension"   # the cuda-backend cases, and every test of those two files
# memcheck: a few cases of every CUDA kernel (the scatter kernel's 96 cases are one here).
MEMCHECK_TESTS=("$GPU_KERNELS::test_scatter_delta_matches_reference_bitwise[shape1-0.13-index_dtype1-delta_dtype0-weight_dtype3]"
  "$GPU_KERNELS::test_row_gather_strided_and_non_contiguous_sources"
  "$GPU_KERNELS::test_cuda_sddmm_variants_on_aligned_shapes"
  "$GPU_KERNELS::test_cuda_kernels_take_int64_positions"
  "$GPU_KERNELS::test_fused_forward_uses_the_merged_weight"
  "$GPU_KERNELS::test_cuda_training_matches_the_reference_backend")
RACECHECK_TESTS=("$GPU_KERNELS::test_cuda_sddmm_variants_on_aligned_shapes"
  "$GPU_KERNELS::test_fused_forward_uses_the_merged_weight")
KERNEL_SUITE_FILES=($(test_files test_spmm test_sddmm test_row_gather test_fused_delta_linear test_sparse_delta_linear \
  test_row_delta_linear test_pst_linear test_triton_compile))

# Last pytest verdict in a stage's output; for a killed run, the per-test lines counted so far.
pytest_detail() {
  local out=$1 line
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$out" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  if [ -n "$line" ]; then echo "$line"; return; fi
  echo "$(grep -c 'PASSED' "$out") passed, $(grep -c -E 'FAILED|ERROR' "$out") failed so far"
}

sanitizer_detail() {
  grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY|Error: |Device not supported' "$1" | tail -2 | tr '\n' ' '
}

stage_detail() {  # stage, its output
  case $1 in
    env|build|bench) cat "$SCRATCH/detail" 2>/dev/null ;;
    memcheck|racecheck) echo "$(sanitizer_detail "$2") $(pytest_detail "$2")" ;;
    *) pytest_detail "$2" ;;
  esac
}

write_summary() {
  local stage limit files
  files=$( (cd "$OUT" && find . -mindepth 1 | sed 's|^\./||'; echo summary.txt) | sort -u)
  {
    printf 'spft GPU session: budget %s s, used %s s, %s s left\n' "$BUDGET" $((SECONDS - START)) "$(left)"
    printf '%s\n' "${HEADER[@]}"
    printf '%-13s %6s %5s  %s\n' stage limit used result
    for stage in "${STAGES[@]}"; do
      limit=${LIMIT[$stage]}; [ "$limit" -gt 0 ] || limit=rest
      printf '%-13s %6s %5s  %s\n' "$stage" "$limit" "${USED[$stage]:--}" "${RESULT[$stage]:-pending}"
    done
    [ ${#FAILING_TESTS[@]} -eq 0 ] || printf 'first failures: %s\n' "${FAILING_TESTS[*]}"
    printf 'files in $OUT: %s of 8 allowed (%s)\n' "$(echo "$files" | wc -l)" "$(echo $files)"
  } > "$OUT/summary.txt"
  echo; cat "$OUT/summary.txt"; echo
}

# run_stage NAME COMMAND...: COMMAND under the stage's limit (its own process group, killed
# whole at the limit), its output appended to the stage's log and kept for the summary line.
run_stage() {
  local stage=$1; shift
  local budget=${LIMIT[$stage]} remaining limit need=$MIN_STAGE begin status pid watchdog
  local log=$OUT/${LOG[$stage]} out=$SCRATCH/$stage.out
  remaining=$(( $(left) - RESERVE ))
  limit=$budget
  [ "$limit" -gt 0 ] && [ "$limit" -le "$remaining" ] || limit=$remaining
  [ "$budget" -eq 0 ] || [ "$budget" -ge "$need" ] || need=$budget
  if [ "$limit" -lt "$need" ]; then
    RESULT[$stage]="skipped: $remaining s left, needs $need"
    write_summary > /dev/null; return 0
  fi
  echo "== $stage: limit $limit s ($(left) s of the budget left)"
  printf '\n===== %s (limit %s s) =====\n' "$stage" "$limit" >> "$log"
  rm -f "$SCRATCH/detail" "$SCRATCH/timed-out"
  begin=$SECONDS
  set -m   # background jobs get their own process group: the watchdog kills all of it
  { "$@" 2>&1 | tee "$out" >> "$log"; } < /dev/null &
  pid=$!
  { sleep "$limit"; touch "$SCRATCH/timed-out"; kill -TERM -- -"$pid"; sleep 10; kill -KILL -- -"$pid"; } > /dev/null 2>&1 &
  watchdog=$!
  set +m
  wait "$pid"
  status=$?
  kill -- -"$watchdog" 2> /dev/null
  USED[$stage]=$((SECONDS - begin))
  local detail; detail=$(stage_detail "$stage" "$out" | head -c 300 | tr '\n' ' ')
  if [ -e "$SCRATCH/timed-out" ]; then
    RESULT[$stage]="TIMED OUT after $limit s${detail:+: $detail}"; FAILED=1; status=124
  elif [ $status -eq 0 ]; then
    RESULT[$stage]="ok${detail:+: $detail}"
  else
    RESULT[$stage]="FAILED (exit $status)${detail:+: $detail}"; FAILED=1
  fi
  write_summary
  return $status
}

skip_stage() { RESULT[$1]="skipped: $2"; write_summary > /dev/null; }

spft_bench() {  # the spft-bench entry point, wherever the package keeps it
  "$PY" -c 'import sys; from importlib.metadata import entry_points
(ep,) = entry_points(group="console_scripts", name="spft-bench"); sys.argv[0] = "spft-bench"; sys.exit(ep.load()())' "$@"
}

# ---- the stages ------------------------------------------------------------------------------

stage_env() {
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "host: $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}'), kernel $(uname -r)"
  { command -v nvidia-smi > /dev/null && nvidia-smi; } || echo "nvidia-smi: not available"
  echo "nvcc: $( (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>/dev/null | tail -1)"
  echo "compute-sanitizer: ${SANITIZER:-missing} $([ -n "$SANITIZER" ] && "$SANITIZER" --version 2>/dev/null | tail -1)"
  "$PY" - <<'PYEOF' 2>&1
import sys
from importlib.metadata import PackageNotFoundError, version
print("python", sys.version.split()[0], sys.executable)
for name, dist in [(n, n) for n in ("torch", "triton", "transformers", "peft", "numpy", "accelerate", "safetensors",
                                    "pytest")] + [("xdist", "pytest-xdist")]:
    try:
        print(name, version(dist))  # the installed versions, without importing them (seconds each)
    except PackageNotFoundError:
        print(name, "missing")
try:
    import torch
    print("torch-cuda", torch.version.cuda, "available:", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"gpu {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
except Exception as error:
    print("torch failed:", error)
PYEOF
  # The exact test ids the sanitizer stages name must exist (checked here, without a GPU too).
  "$PY" -m pytest --collect-only -q -p no:cacheprovider "${MEMCHECK_TESTS[@]}" "${RACECHECK_TESTS[@]}" > "$SCRATCH/collect" 2>&1
  local status=$?
  tail -1 "$SCRATCH/collect"
  echo "sanitizer test ids: $(tail -1 "$SCRATCH/collect")" > "$SCRATCH/detail"
  [ $status -eq 0 ] || { cat "$SCRATCH/collect"; return $status; }
}

stage_build() {
  "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . || return 1
  # Fail loudly: pip succeeds without the extension when it finds no toolkit.
  "$PY" - > "$SCRATCH/detail" 2>&1 <<'PYEOF'
import spft_kernels as spft
backends = spft.available_backends()
print("backends", backends)
import spft_kernels._C  # noqa: F401  (raises the real import error, if that is what is missing)
assert "cuda" in backends and "triton" in backends, f"BUILD CHECK FAILED: cuda and triton must load, got {backends}"
PYEOF
  local status=$?
  cat "$SCRATCH/detail"
  return $status
}

stage_gpu_tests() {
  CUDA_LAUNCH_BLOCKING=1 "$PY" -m pytest -x -q -ra -p no:cacheprovider "${GPU_TEST_FILES[@]}" -k "$GPU_TEST_FILTER"
}

stage_memcheck() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 9 --print-limit 20 \
    "${MEMCHECK_FILTER[@]}" "$PY" -m pytest -q -ra -p no:cacheprovider "${FAILING_TESTS[@]}" "${MEMCHECK_TESTS[@]}"
}

parallel_pytest() {  # files...: pytest-xdist workers when the plugin is there
  local parallel=()
  "$PY" -c 'import xdist' 2> /dev/null && parallel=(-n "$WORKERS")
  "$PY" -m pytest -v -ra -p no:cacheprovider "${parallel[@]}" "$@"
}

stage_kernel_suite() { parallel_pytest "${KERNEL_SUITE_FILES[@]}"; }

stage_bench() {
  "$PY" bench/ceilings.py --output "$OUT/ceilings.json" || return 1
  spft_bench --shape 4096 4096 --tokens 8192 --density 0.01 --dtype bfloat16 --output "$SCRATCH/bench" || return 1
  cp "$SCRATCH/bench/results.json" "$OUT/bench.json"
  "$PY" - "$OUT/bench.json" "$OUT/ceilings.json" > "$SCRATCH/detail" <<'PYEOF'
import json, math, sys
records, ceilings = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
ms = {(r["op"], r["provider"]): r["median_ms"] for r in records}
spft = min((v, p) for (op, p), v in ms.items() if op == "linear_fwd_bwd" and p.startswith("spft-"))
print(f"copy {ceilings['copy_tb_s']:.2f} TB/s, gemm {ceilings['gemm_tflops']:.0f} TFLOP/s; fwd+bwd {spft[1]} "
      f"{spft[0]:.3f} ms, lora-peft {ms.get(('linear_fwd_bwd', 'lora-peft'), math.nan):.3f} ms; fwd dense-frozen "
      f"{ms.get(('linear_fwd', 'dense-frozen'), math.nan):.3f} ms")
PYEOF
}

stage_racecheck() {
  "$SANITIZER" --tool racecheck --error-exitcode 9 --print-limit 20 "${RACECHECK_FILTER[@]}" \
    "$PY" -m pytest -q -ra -p no:cacheprovider "${RACECHECK_TESTS[@]}"
}

stage_rest() {
  local files
  mapfile -t files < <(find python_tests -name 'test_*.py' | sort \
    | grep -vxF -f <(printf '%s\n' "${KERNEL_SUITE_FILES[@]}" "$GPU_KERNELS" $(test_files test_extension)))
  parallel_pytest "${files[@]}"
}

# ---- the session -----------------------------------------------------------------------------

asked=("$@")
for stage in "${asked[@]}"; do
  [[ " ${STAGES[*]} " == *" $stage "* ]] || { echo "unknown stage $stage; stages: ${STAGES[*]}" >&2; exit 2; }
done
wanted() { [ ${#asked[@]} -eq 0 ] || [[ " ${asked[*]} " == *" $1 "* ]]; }

command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1 \
  && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null && HAVE_GPU=1
[ "${SPFT_SESSION_FORCE_GPU:-0}" = 0 ] || HAVE_GPU=1

for stage in "${STAGES[@]}"; do
  if ! wanted "$stage"; then skip_stage "$stage" "not asked"; continue; fi
  if [ "$stage" = env ]; then
    run_stage env stage_env
    HEADER+=("$(grep -m1 '^gpu ' "$OUT/env-build.log" || echo 'gpu: none')")
    HEADER+=("$(grep -E '^(python|torch|torch-cuda|triton|transformers|peft|numpy|xdist) ' "$OUT/env-build.log" | awk '{printf "%s %s, ", $1, $2}')")
    write_summary > /dev/null
    continue
  fi
  if [ $HAVE_GPU -eq 0 ]; then skip_stage "$stage" "no GPU"; continue; fi
  if [ $BUILD_OK -eq 0 ] && [[ $NEEDS_EXTENSION == *" $stage "* ]]; then skip_stage "$stage" "the build failed"; continue; fi
  if [[ $stage == *check ]] && [ -z "$SANITIZER" ]; then skip_stage "$stage" "compute-sanitizer not found"; continue; fi
  run_stage "$stage" "stage_${stage//-/_}"
  status=$?
  if [ "$stage" = build ] && [ $status -ne 0 ]; then
    BUILD_OK=0
    echo "!!!!! BUILD FAILED: the CUDA-extension stages are skipped. The end of env-build.log:"
    tail -25 "$OUT/env-build.log"
  fi
  if [ "$stage" = gpu-tests ]; then
    mapfile -t FAILING_TESTS < <(grep -oE '^(FAILED|ERROR) [^ ]+' "$SCRATCH/gpu-tests.out" | awk '{print $2}' | head -3)
  fi
done
echo "===== summary ====="
cat "$OUT/summary.txt"
rm -rf "$SCRATCH"
exit $FAILED
