#!/usr/bin/env bash
# Rows and blocks "no worse than before issue 24": main before the issue (3addba1, unpacked with
# `git archive 3addba1 | tar -x -C /tmp/before24`) and this tree, taking turns, one spft-bench run
# each: BEFORE=/tmp/before24 bash bench/results/cpu-issue24-final-2026-12-02/ab_rows_blocks.sh
set -euo pipefail
cd "$(dirname "$0")"
here=$(cd ../../.. && pwd)
export OMP_NUM_THREADS=1
P="dense-frozen lora-peft spruft-merged-reference block-merged-reference"
for run in 1 2; do
  for tree in before after; do
    root=$([ $tree = before ] && echo "$BEFORE" || echo "$here")
    PYTHONPATH=$root python -c "import spft_kernels, sys; print('imports', spft_kernels.__file__)" > ab-$tree-$run.log
    PYTHONPATH=$root spft-bench --device cpu --dtype float32 --ops linear_fwd_bwd --providers $P \
      --shape 2048 2048 --tokens 1024 --density 0.01 --repeats 9 --output ab-$tree-$run >> ab-$tree-$run.log 2>&1
    PYTHONPATH=$root spft-bench --device cpu --dtype float32 --ops linear_fwd_bwd --providers $P \
      --shape 64 64 --tokens 16 --density 0.05 --repeats 200 --output ab-tiny-$tree-$run >> ab-$tree-$run.log 2>&1
  done
done
