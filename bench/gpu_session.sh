#!/usr/bin/env bash
# Everything a session does on a lent GPU machine, in one device call (10 minutes a command):
#   bash bench/gpu_session.sh [build] [test] [sanitize] [bench] [bench-full] [e2e]   (default: build test sanitize bench)
# Installs in place (the machine's torch/triton/peft, no downloads), runs the GPU tests,
# compute-sanitizer memcheck + racecheck on the kernel tests, and spft-bench; logs, JSON and
# plots go under $OUT (the device tool brings them back), a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spft-gpu-out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test sanitize bench)
summary=()
run_stage() {  # name, command...
  local name=$1; shift
  local begin=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  summary+=("$name: exit $status in $((SECONDS - begin)) s; $(grep -E 'passed|failed|ERROR SUMMARY|error' "$OUT/$name.log" | tail -1)")
  return $status
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)' >> "$OUT/device.txt" 2>&1
for stage in "${stages[@]}"; do
  case $stage in
    build) run_stage build python3 -m pip install --no-build-isolation --no-deps -e . || { tail -40 "$OUT/build.log"; exit 1; } ;;
    test) run_stage test python3 -m pytest python_tests -q -ra ;;
    sanitize)
      for tool in memcheck racecheck; do
        run_stage "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 \
          python3 -m pytest python_tests/ops/test_gpu_kernels.py python_tests/ops/test_spmm.py python_tests/ops/test_sddmm.py python_tests/ops/test_fused_delta_linear.py -q -x
      done ;;
    bench) run_stage bench spft-bench --quick --output "$OUT/bench-quick" ;;
    bench-full) run_stage bench-full spft-bench --output "$OUT/bench" ;;
    e2e) run_stage e2e spft-bench --e2e-only --output "$OUT/e2e" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
cat "$OUT/device.txt"
printf '%s\n' "${summary[@]}"
