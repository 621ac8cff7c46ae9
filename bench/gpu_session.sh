#!/usr/bin/env bash
# A lent GPU machine's whole session in one device call: build, test, measure, sanitize.
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
# Every stage imports spft_kernels from this source tree (PYTHONPATH; the build puts the
# extension here with build_ext --inplace): a failed or slow build costs the CUDA backend, never
# the measurements or the other tests.
#
# Stages (budget in seconds):
#   env          versions, GPU, toolkit, sanitizer; the sanitizer stages' test ids exist  30
#   build        setup.py build_ext --inplace (16 jobs, sm_80 + sm_90a); fails unless the
#                cuda and triton backends load                                            140
#   gpu-tests    the CUDA-kernel tests in 8 workers, CUDA_LAUNCH_BLOCKING=1: a fault is
#                reported in the test that caused it; stops after 3 failures               60
#   bench        the ceilings, then the providers that decide "auto" at 4096x4096 (512 and
#                4,096 tokens, 1%, bf16) and the SDDMM alone at 0.1/1/5%, each case
#                appended to bench.jsonl as it finishes                                   100
#   memcheck     compute-sanitizer memcheck, torch's caching allocator off, spft kernels
#                only, one test per CUDA kernel (the failing tests of gpu-tests first)     60
#   kernel-suite the Triton and kernel test files in parallel workers (pytest-xdist)       90
#   racecheck    compute-sanitizer racecheck on the tensor-core kernels                   40
#   rest         the rest of the test suite, in parallel workers, with what time is left  (rest)
#
# Files in $OUT (8 at most, flat): summary.txt env-build.log gpu-tests.log sanitize.log
# suite.log bench.log bench.jsonl ceilings.json.
# Without a GPU (a dry run) every stage but env reports "skipped: no GPU" within seconds.
#
# Environment: OUT (default /tmp/spft-gpu-session), SPFT_SESSION_BUDGET (540),
# SPFT_PYTHON (python3), SPFT_SESSION_WORKERS (12 pytest-xdist workers), MAX_JOBS (16),
# TORCH_CUDA_ARCH_LIST (8.0;9.0a). For testing this script on a CPU machine:
# SPFT_SESSION_FORCE_GPU=1 runs the GPU stages without a GPU; SPFT_SESSION_STUBS="build:N ..."
# replaces the named stages by a line of output (taking N seconds of a fake clock);
# SPFT_SESSION_CLOCK=FILE reads the session's clock (seconds since the start) from FILE, so a
# test moves time on itself, whatever the machine's load;
# SPFT_SESSION_BENCH_SHAPE ("4096 4096"), SPFT_SESSION_BENCH_TOKENS ("512 4096") and
# SPFT_SESSION_BENCH_REPEATS (20) size the bench.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spft-gpu-session}
mkdir -p "$OUT"
BUDGET=${SPFT_SESSION_BUDGET:-540}
PY=${SPFT_PYTHON:-python3}
WORKERS=${SPFT_SESSION_WORKERS:-12}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
export SPFT_REQUIRE_CUDA_EXT=1   # a CUDA test fails, not skips, when the extension is missing
SCRATCH=$(mktemp -d /tmp/spft-session.XXXXXX)   # anything but the 8 files goes here
FILES=(summary.txt env-build.log gpu-tests.log sanitize.log suite.log bench.log bench.jsonl ceilings.json)
(cd "$OUT" && rm -f "${FILES[@]}")

EPOCH=$(date +%s)
now() {  # seconds since the session started (or the fake clock's reading)
  local t
  if [ -n "${SPFT_SESSION_CLOCK:-}" ]; then read -r t < "$SPFT_SESSION_CLOCK" 2> /dev/null; echo "${t:-0}"
  else echo $(( $(date +%s) - EPOCH )); fi
}
START=$(now)

STAGES=(env build gpu-tests bench memcheck kernel-suite racecheck rest)
declare -A LIMIT=([env]=30 [build]=140 [gpu-tests]=60 [bench]=100 [memcheck]=60 [kernel-suite]=90 [racecheck]=40 [rest]=0)
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
# Flags for a process full of libraries (NVIDIA's advice for such applications): torch, cuBLAS
# and Triton probe the driver with calls that fail on purpose, which the sanitizer would report
# as errors of a clean run (--report-api-errors no; kernel faults still count); importing torch
# and friends takes longer than the sanitizer's default wait for the first launch
# (--launch-timeout 0: the stage's own limit stops a hang).
SANITIZER_FLAGS=(--report-api-errors no --launch-timeout 0 --error-exitcode 9 --print-limit 20)
# The CUDA kernels all live in namespace spft (mangled _ZN4spft..., demangled spft::...), the
# Triton kernels and torch's do not: memcheck instruments ours and leaves the rest at full speed.
MEMCHECK_FILTER=(--kernel-name kns=spft)
# The kernels that stage tiles in shared memory for the tensor cores (csrc/fused_delta_linear.cu
# and csrc/sddmm.cu; Triton's _sddmm_tile_kernel matches the second substring too).
RACECHECK_FILTER=(--kernel-name kns=fused_delta_linear_tc_kernel --kernel-name kns=sddmm_tile_kernel)

left() { echo $((BUDGET - ($(now) - START))); }

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
# memcheck: one test per CUDA kernel (ids that exist without a GPU too, so env checks them here).
MEMCHECK_TESTS=(
  "$GPU_KERNELS::test_scatter_delta_matches_reference_bitwise[shape1-0.13-index_dtype1-delta_dtype0-weight_dtype3]"  # scatter
  "$GPU_KERNELS::test_row_gather_strided_and_non_contiguous_sources"                  # row_gather_kernel
  "$(test_files test_row_delta_linear)::test_cuda_row_scatter_add_strided_operands"   # row_scatter_add_kernel
  "$GPU_KERNELS::test_cuda_kernels_take_int64_positions"   # spmm_add (CSR, CSC), sddmm gather-dot + tile, fused tc
  "$(test_files test_sddmm)::test_sddmm_is_bitwise_reproducible"   # 1,100 tokens: 3 splits, sum_splits_kernel
  "$GPU_KERNELS::test_fused_forward_uses_the_merged_weight[dtype2]")                 # fp32: fused simt kernel
RACECHECK_TESTS=("$GPU_KERNELS::test_cuda_sddmm_variants_on_aligned_shapes[shape0-dtype1]"
  "$GPU_KERNELS::test_fused_forward_uses_the_merged_weight[dtype1]")
KERNEL_SUITE_FILES=($(test_files test_spmm test_sddmm test_row_gather test_fused_delta_linear test_sparse_delta_linear \
  test_row_delta_linear test_pst_linear test_triton_compile))
# Stage sizes: the CPU time of a selection, measured on a CPU machine, spread over the workers.
# kernel-suite: 582 tests ran (143 skipped for want of a GPU) in 74 s of CPU, serially, with
# OMP_NUM_THREADS=1 and the Triton kernels in the interpreter (2 shared cores, 2026-12-02; wall
# 343 s under load). On the GPU machine the skipped cuda cases run too (count them twice: 150 s)
# and every Triton specialization is compiled once; test_triton_compile compiles all of them for
# two architectures in 100 s here, so ~250 s of CPU in all, over 12 workers ~21 s, plus ~10 s of
# imports per worker: inside 90 s with room for a slower first compile. gpu-tests: 294 small
# CUDA cases; serially under CUDA_LAUNCH_BLOCKING they did not fit 60 s (issue 28), so 8 workers
# of 2 OpenMP threads (16 cores), ~37 tests each. Every multi-worker stage caps OMP_NUM_THREADS
# (12 workers x torch's default of a thread per core oversubscribed the 16 cores).
# Re-measure: time OMP_NUM_THREADS=1 python -m pytest -q <the stage's files>.
GPU_TEST_WORKERS=8
GPU_TEST_THREADS=2

# The bench: the providers that decide "auto" (the dense floors and LoRA; each method's default
# path, the reference backend, and every custom kernel beside it), then the SDDMM alone.
BENCH_SHAPE=(${SPFT_SESSION_BENCH_SHAPE:-4096 4096})
BENCH_TOKENS=(${SPFT_SESSION_BENCH_TOKENS:-512 4096})
BENCH_REPEATS=${SPFT_SESSION_BENCH_REPEATS:-20}
BENCH_LAYER_PROVIDERS=(dense-frozen dense-full lora-peft
  spft-merged-reference spft-split-reference spft-split-triton spft-split-cuda spft-fused-cuda
  spruft-merged-reference spruft-split-reference spruft-split-triton spruft-split-cuda
  block-merged-reference block-split-reference pst-reference pst-triton
  spft-csr-reference spft-csr-triton spft-csr-cuda spft-csc-reference spft-csc-triton spft-csc-cuda)
BENCH_SDDMM_PROVIDERS=(dense-full spft-row-blocks-reference spft-gather-dot-triton spft-gather-dot-cuda
  spft-tensor-core-triton spft-tensor-core-cuda)

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

stage_detail() {  # stage, its output; a stage's own verdict ($SCRATCH/detail) first
  if [ -s "$SCRATCH/detail" ]; then cat "$SCRATCH/detail"; return; fi
  case $1 in
    env|build) ;;
    bench) bench_headline ;;
    memcheck|racecheck) echo "$(sanitizer_detail "$2") $(pytest_detail "$2")" ;;
    *) pytest_detail "$2" ;;
  esac
}

write_summary() {
  local stage limit files
  files=$( (cd "$OUT" && find . -mindepth 1 | sed 's|^\./||'; echo summary.txt) | sort -u)
  {
    printf 'spft GPU session: budget %s s, used %s s, %s s left\n' "$BUDGET" $(($(now) - START)) "$(left)"
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
# whole when the session's clock passes the limit), its output appended to the stage's log and
# kept for the summary line.
run_stage() {
  local stage=$1; shift
  local budget=${LIMIT[$stage]} remaining limit need=$MIN_STAGE begin deadline status pid watchdog
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
  begin=$(now)
  deadline=$((begin + limit))
  set -m   # background jobs get their own process group: the watchdog kills all of it
  { "$@" 2>&1 | tee "$out" >> "$log"; } < /dev/null &
  pid=$!
  # The watchdog reads the session's clock every second (so a fake clock drives it too).
  { while [ "$(now)" -lt "$deadline" ]; do sleep 1; done
    touch "$SCRATCH/timed-out"; kill -TERM -- -"$pid"; sleep 10; kill -KILL -- -"$pid"; } > /dev/null 2>&1 &
  watchdog=$!
  set +m
  wait "$pid"
  status=$?
  kill -- -"$watchdog" 2> /dev/null
  USED[$stage]=$(( $(now) - begin ))
  local detail; detail=$(stage_detail "$stage" "$out" | head -c 300 | tr '\n' ' ' | sed 's/ *$//')
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

# ---- the stages ------------------------------------------------------------------------------

stage_stub() {  # seconds: a stubbed stage, which with a fake clock takes that many seconds of it
  echo "stubbed (SPFT_SESSION_STUBS)"
  if [ -n "${SPFT_SESSION_CLOCK:-}" ] && [ "$1" -gt 0 ]; then
    echo $(( $(now) + $1 )) > "$SPFT_SESSION_CLOCK.next" && mv "$SPFT_SESSION_CLOCK.next" "$SPFT_SESSION_CLOCK"
  fi
  echo "stubbed" > "$SCRATCH/detail"
}

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
  # In place: the extension lands in spft_kernels/ of this tree, which PYTHONPATH points at.
  "$PY" setup.py build_ext --inplace || return 1
  # Fail loudly: setup.py succeeds without the extension when it finds no toolkit.
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

parallel_pytest() {  # workers, OpenMP threads per worker, pytest arguments...: xdist when it is there
  local workers=$1 threads=$2 parallel=()
  shift 2
  "$PY" -c 'import xdist' 2> /dev/null && parallel=(-n "$workers")
  OMP_NUM_THREADS=$threads "$PY" -m pytest -v -ra -p no:cacheprovider "${parallel[@]}" "$@"
}

stage_gpu_tests() {
  CUDA_LAUNCH_BLOCKING=1 parallel_pytest "$GPU_TEST_WORKERS" "$GPU_TEST_THREADS" --maxfail 3 \
    "${GPU_TEST_FILES[@]}" -k "$GPU_TEST_FILTER"
}

stage_memcheck() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck "${SANITIZER_FLAGS[@]}" "${MEMCHECK_FILTER[@]}" \
    "$PY" -m pytest -q -ra -p no:cacheprovider "${FAILING_TESTS[@]}" "${MEMCHECK_TESTS[@]}"
}

stage_kernel_suite() { parallel_pytest "$WORKERS" 1 "${KERNEL_SUITE_FILES[@]}"; }

bench_headline() {  # the summary's bench line, from whatever bench.jsonl and ceilings.json hold
  "$PY" - "$OUT/bench.jsonl" "$OUT/ceilings.json" <<'PYEOF'
import json, os, sys
parts = []
if os.path.exists(sys.argv[2]):
    c = json.load(open(sys.argv[2]))
    parts.append(f"copy {c['copy_tb_s']:.2f} TB/s, gemm {c['gemm_tflops']:.0f} TFLOP/s")
records = [json.loads(line) for line in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
parts.append(f"{len(records)} records")
layer = [r for r in records if r["op"] == "linear_fwd_bwd"]
if layer:
    tokens = max(r["tokens"] for r in layer)
    ms = {r["provider"]: r for r in layer if r["tokens"] == tokens}
    best = min((r for p, r in ms.items() if p.startswith(("spft-", "spruft-"))), key=lambda r: r["median_ms"], default=None)
    line = f"fwd+bwd T={tokens}:"
    for name, r in [("best sparse " + best["provider"] if best else None, best)] + [(p, ms.get(p)) for p in ("lora-peft", "dense-full")]:
        if r is not None:
            line += f" {name} {r['median_ms']:.3f} ms (host {r['host_ms']:.3f})"
    parts.append(line)
sddmm = [r for r in records if r["op"] == "sddmm" and r["density"] == 0.01]
if sddmm:
    parts.append("sddmm 1%: " + ", ".join(f"{r['provider'].removeprefix('spft-')} {r['median_ms']:.3f}"
                                          for r in sorted(sddmm, key=lambda r: r["median_ms"])))
print("; ".join(parts))
PYEOF
}

stage_bench() {
  # Each case goes to bench.jsonl as it finishes, and the summary line is made from that file
  # after the stage (bench_headline): a timeout keeps, and reports, what finished.
  local status=0 bench=("$PY" -m spft_kernels.bench.benchmark --shape "${BENCH_SHAPE[@]}" --repeats "$BENCH_REPEATS"
    --warmup 3 --append-jsonl "$OUT/bench.jsonl")
  "$PY" bench/ceilings.py --output "$OUT/ceilings.json" || status=1
  "${bench[@]}" --tokens "${BENCH_TOKENS[@]}" --density 0.01 --providers "${BENCH_LAYER_PROVIDERS[@]}" \
    --ops linear_fwd linear_bwd linear_fwd_bwd spmm || status=1
  "${bench[@]}" --tokens "${BENCH_TOKENS[-1]}" --density 0.001 0.01 0.05 --providers "${BENCH_SDDMM_PROVIDERS[@]}" \
    --ops sddmm || status=1
  return $status
}

stage_racecheck() {
  "$SANITIZER" --tool racecheck "${SANITIZER_FLAGS[@]}" "${RACECHECK_FILTER[@]}" \
    "$PY" -m pytest -q -ra -p no:cacheprovider "${RACECHECK_TESTS[@]}"
}

stage_rest() {
  local files
  mapfile -t files < <(find python_tests -name 'test_*.py' | sort \
    | grep -vxF -f <(printf '%s\n' "${KERNEL_SUITE_FILES[@]}" "$GPU_KERNELS" $(test_files test_extension)))
  parallel_pytest "$WORKERS" 1 "${files[@]}"
}

# ---- the session -----------------------------------------------------------------------------

asked=("$@")
for stage in "${asked[@]}"; do
  [[ " ${STAGES[*]} " == *" $stage "* ]] || { echo "unknown stage $stage; stages: ${STAGES[*]}" >&2; exit 2; }
done
wanted() { [ ${#asked[@]} -eq 0 ] || [[ " ${asked[*]} " == *" $1 "* ]]; }
stub_seconds() {  # stage: N for "stage:N" in SPFT_SESSION_STUBS, 0 for "stage"; fails when not stubbed
  local entry
  for entry in ${SPFT_SESSION_STUBS:-}; do
    [ "${entry%%:*}" = "$1" ] || continue
    if [[ $entry == *:* ]]; then echo "${entry#*:}"; else echo 0; fi
    return 0
  done
  return 1
}

command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1 \
  && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null && HAVE_GPU=1
[ "${SPFT_SESSION_FORCE_GPU:-0}" = 0 ] || HAVE_GPU=1

for stage in "${STAGES[@]}"; do
  if ! wanted "$stage"; then skip_stage "$stage" "not asked"; continue; fi
  command=("stage_${stage//-/_}")
  seconds=$(stub_seconds "$stage") && command=(stage_stub "$seconds")
  if [ "$stage" = env ]; then
    run_stage env "${command[@]}"
    HEADER+=("$(grep -m1 '^gpu ' "$OUT/env-build.log" || echo 'gpu: none')")
    HEADER+=("$(grep -E '^(python|torch|torch-cuda|triton|transformers|peft|numpy|xdist) ' "$OUT/env-build.log" | awk '{printf "%s %s, ", $1, $2}')")
    write_summary > /dev/null
    continue
  fi
  if [ $HAVE_GPU -eq 0 ]; then skip_stage "$stage" "no GPU"; continue; fi
  if [ $BUILD_OK -eq 0 ] && [[ $NEEDS_EXTENSION == *" $stage "* ]]; then skip_stage "$stage" "the build failed"; continue; fi
  if [[ $stage == *check ]] && [ -z "$SANITIZER" ] && [ "${command[0]}" != stage_stub ]; then
    skip_stage "$stage" "compute-sanitizer not found"; continue
  fi
  run_stage "$stage" "${command[@]}"
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
