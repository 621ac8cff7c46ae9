#!/usr/bin/env bash
# Does handing torch's CPU sampled_addmm its operands pre-transposed (row-major dyT, column-major x:
# tried.patch) make the entries merged step faster? main (MAIN: a tree of c2f3b45) against the
# patched tree (TRIED), taking turns, one spft-bench run each:
#   MAIN=/tmp/before TRIED=/tmp/tried bash bench/results/cpu-sddmm-layout-2026-12-03/ab.sh
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
P="dense-frozen lora-peft spft-merged-reference"
uptime > load.txt
for run in 1 2 3; do
  for tree in main tried; do
    root=$([ $tree = main ] && echo "$MAIN" || echo "$TRIED")
    PYTHONPATH=$root python -c "import spft_kernels; print('imports', spft_kernels.__file__)" > $tree-$run.log
    PYTHONPATH=$root spft-bench --device cpu --dtype float32 --ops linear_fwd_bwd --providers $P \
      --shape 2048 2048 --tokens 1024 --density 0.01 --repeats 9 >> $tree-$run.log 2>&1
  done
done
uptime >> load.txt
