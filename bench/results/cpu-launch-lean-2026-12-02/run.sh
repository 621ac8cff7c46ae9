#!/bin/bash
# Run from the worktree root: bash bench/results/cpu-launch-lean-2026-12-02/run.sh
# CPU, fp32, OMP_NUM_THREADS=1; providers take turns (spft-bench), medians of the repeats.
set -x
OUT=bench/results/cpu-launch-lean-2026-12-02
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
BENCH=/work/main/.venv/bin/spft-bench
LAYER="dense-frozen dense-full lora-peft spft-merged-reference spft-split-reference spruft-merged-reference block-merged-reference pst-reference"
uptime > $OUT/load.txt
$BENCH --shape 2048 2048 --tokens 1024 --density 0.01 --dtype float32 --ops linear_fwd_bwd sddmm spmm \
  --providers $LAYER spft-library-reference spft-row-blocks-reference spft-library-csr-reference spft-library-csc-reference \
  --repeats 15 --output $OUT/layer-2048x2048-t1024-d0.01 > $OUT/layer-2048x2048-t1024-d0.01.log 2>&1
uptime >> $OUT/load.txt
$BENCH --shape 2048 2048 --tokens 1024 --density 0.001 0.05 --dtype float32 --ops sddmm spmm \
  --providers dense-full dense-frozen spft-library-reference spft-row-blocks-reference spft-library-csr-reference spft-library-csc-reference \
  --repeats 15 --output $OUT/sddmm-2048x2048-t1024 > $OUT/sddmm-2048x2048-t1024.log 2>&1
uptime >> $OUT/load.txt
$BENCH --shape 32768 4096 --tokens 256 --density 0.01 --dtype float32 --ops sddmm \
  --providers dense-full spft-library-reference --repeats 5 --output $OUT/sddmm-32768x4096-t256 > $OUT/sddmm-32768x4096-t256.log 2>&1
uptime >> $OUT/load.txt
$BENCH --shape 64 64 --tokens 16 --density 0.05 --dtype float32 --ops linear_fwd_bwd \
  --providers $LAYER spft-split-reference --repeats 300 --output $OUT/host-overhead-64x64-t16 > $OUT/host-overhead-64x64-t16.log 2>&1
uptime >> $OUT/load.txt
# today's main (before this branch), the same layer case, for "no worse than today"
PYTHONPATH=/work/main $BENCH --shape 2048 2048 --tokens 1024 --density 0.01 --dtype float32 --ops linear_fwd_bwd \
  --providers lora-peft spft-merged-reference spruft-merged-reference block-merged-reference \
  --repeats 15 --output $OUT/main-layer-2048x2048-t1024-d0.01 > $OUT/main-layer-2048x2048-t1024-d0.01.log 2>&1
uptime >> $OUT/load.txt
echo finished >> $OUT/load.txt
