#!/usr/bin/env bash
# Before (main at 1cb214d, exported to /tmp/main24 with `git archive`) and after (this branch's
# tree), taking turns, in one run: the tiny shape twice each (200 repeats), then 2048x2048 at
# 1,024 tokens, 1% (15 repeats) three times each. Run from the worktree root:
#   bash bench/results/cpu-split-tiny-2026-12-02/run.sh
# (then, for more large runs: TINY_RUNS= LARGE_RUNS="4 5 6" bash .../run.sh)
set -euo pipefail
OUT=bench/results/cpu-split-tiny-2026-12-02
BEFORE=${BEFORE:-/tmp/main24}
AFTER=$PWD
PY=${PY:-/work/main/.venv/bin/python}
export OMP_NUM_THREADS=1
tiny=(--device cpu --shape 64 64 --tokens 16 --density 0.05 --dtype float32
      --providers lora-peft spft-merged-reference spft-split-reference spruft-merged-reference
      block-merged-reference pst-reference --ops linear_fwd_bwd --repeats 200)
large=(--device cpu --shape 2048 2048 --tokens 1024 --density 0.01 --dtype float32
       --providers lora-peft spft-merged-reference spft-split-reference --ops linear_fwd_bwd --repeats 15)
bench() {  # tree label args...
  local tree=$1 label=$2; shift 2
  echo "== $label ($tree) $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
  (cd "$tree" && PYTHONPATH="$tree" "$PY" -c "import spft_kernels; print('imports', spft_kernels.__file__)" \
     && PYTHONPATH="$tree" "$PY" -m spft_kernels.bench.benchmark "$@") > "$OUT/$label.txt" 2>&1
}
for run in ${TINY_RUNS-1 2}; do
  bench "$BEFORE" "tiny-before-$run" "${tiny[@]}"
  bench "$AFTER" "tiny-after-$run" "${tiny[@]}"
done
for run in ${LARGE_RUNS-1 2 3}; do
  bench "$BEFORE" "large-before-$run" "${large[@]}"
  bench "$AFTER" "large-after-$run" "${large[@]}"
done
